"""Compare the representations of two models layer by layer: CKA, Procrustes and Gram.

Every hidden-state index of model A is compared with every index of model B on the same
examples, with the samples chosen by ``pooling`` (padding masked). Output: a tidy CSV with one
row per (layer_a, layer_b) and heatmap PNGs, one per measure.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from geodistill import geometry
from geodistill.features import pool

__all__ = ["MEASURES", "hidden_states", "layer_similarity", "measure_pair", "write_similarity"]

MEASURES = {
    "cka": geometry.cka,
    "procrustes": geometry.procrustes_distance,
    "procrustes_angular": lambda x, y: geometry.procrustes_distance(x, y, angular=True),
    "gram": geometry.gram_distance,
}


@torch.no_grad()
def hidden_states(
    model: Any, task: Any, split: str, pooling: str, batch_size: int, teacher: bool
) -> list[torch.Tensor]:
    """Every hidden state of ``model`` on ``task``'s ``split``, pooled (padding masked), float64:
    one ``(samples, width)`` tensor per hidden-state index (0 = embeddings). ``teacher`` reads the
    teacher's inputs where the task tokenises them apart."""
    model.eval()
    device = next(model.parameters()).device  # the batches are built on the CPU
    per_layer: list[list[torch.Tensor]] | None = None
    loader = DataLoader(task.dataset(split), batch_size=batch_size, shuffle=False, collate_fn=task.collate)
    for batch in loader:
        prefix = "t_" if teacher and task.separate_teacher_inputs else ""
        inputs = {
            k: batch[prefix + k].to(device)
            for k in ("input_ids", "attention_mask", "token_type_ids")
            if prefix + k in batch
        }
        hs = model(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"].bool()
        pooled = [pool(h, mask, pooling).double().cpu() for h in hs]
        per_layer = (
            [[p] for p in pooled]
            if per_layer is None
            else [[*acc, p] for acc, p in zip(per_layer, pooled, strict=False)]
        )
    assert per_layer is not None, f"split {split!r} is empty"
    return [torch.cat(parts) for parts in per_layer]


def layer_similarity(
    model_a: Any, model_b: Any, task: Any, *, split: str = "dev", pooling: str = "cls", batch_size: int = 64
) -> list[dict[str, Any]]:
    """One row per (layer_a, layer_b): every measure in :data:`MEASURES` (float64)."""
    if pooling == "tokens" and task.separate_teacher_inputs:
        raise ValueError("pooling 'tokens' needs both models to share a tokenizer")
    ha = hidden_states(model_a, task, split, pooling, batch_size, teacher=False)
    hb = hidden_states(model_b, task, split, pooling, batch_size, teacher=True)
    rows = []
    for i, x in enumerate(ha):
        for j, y in enumerate(hb):
            rows.append({"layer_a": i, "layer_b": j, "n": x.shape[0], **measure_pair(x, y)})
    return rows


def measure_pair(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every measure in :data:`MEASURES` of one pair of sample matrices (same rows)."""
    return {m: float(f(x, y)) for m, f in MEASURES.items()}


def write_similarity(
    rows: list[dict[str, Any]], out_dir: Path, *, label_a: str = "A", label_b: str = "B"
) -> list[Path]:
    """Write ``similarity.csv`` and one heatmap PNG per measure; returns the written paths.

    Without matplotlib only the CSV is written, and one line on stderr says so.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "similarity.csv"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"geodistill similarity: matplotlib is not installed, so no heatmaps were drawn (only {paths[0]}); "
            "pip install matplotlib for them",
            file=sys.stderr,
        )
        return paths
    na, nb = 1 + max(r["layer_a"] for r in rows), 1 + max(r["layer_b"] for r in rows)
    for m in MEASURES:
        grid = torch.full((na, nb), float("nan"))
        for r in rows:
            grid[r["layer_a"], r["layer_b"]] = r[m]
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * nb, 1.0 + 0.5 * na))
        im = ax.imshow(
            grid.numpy(), origin="lower", cmap="viridis" if m == "cka" else "viridis_r", aspect="auto"
        )
        for i in range(na):
            for j in range(nb):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel(f"{label_b} hidden-state index (0 = embeddings)")
        ax.set_ylabel(f"{label_a} hidden-state index")
        ax.set_title(
            {
                "cka": "linear CKA (similarity)",
                "procrustes": "Procrustes distance 2 - 2||X^T Y||_*",
                "procrustes_angular": "angular Procrustes (radians)",
                "gram": "Gram distance",
            }[m]
        )
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"similarity_{m}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
