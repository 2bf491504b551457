"""Evaluate saved models and compare two models' representations, from a config's dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geodistill.config import DistillConfig

__all__ = ["evaluate_saved", "similarity_report"]


def _classification_task(
    cfg: DistillConfig, tokenizer: Any, teacher_tokenizer: Any | None = None, max_examples: int | None = None
) -> Any:
    from geodistill.data import load_classification
    from geodistill.tasks import ClassificationTask

    data = load_classification(
        cfg.data.name,
        split_seed=cfg.data.split_seed,
        max_train=cfg.data.max_train,
        max_eval=max_examples or cfg.data.max_eval,
        text_column=cfg.data.text_column,
        text_pair_column=cfg.data.text_pair_column,
        label_column=cfg.data.label_column,
        label_names=cfg.data.label_names,
    )
    return ClassificationTask(data, tokenizer, teacher_tokenizer, cfg.data.max_length)


def evaluate_saved(
    model: str,
    cfg: DistillConfig,
    splits: list[str] | None = None,
    *,
    progress: bool = True,
    predictions_dir: str | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of a saved model (directory, offline or hub name) on the config's dataset."""
    from geodistill import models
    from geodistill.train import quiet_libraries

    if cfg.task != "classification":
        from geodistill.instruct import evaluate_saved_lm  # quiets the libraries itself

        return evaluate_saved_lm(model, cfg, splits, predictions_dir=predictions_dir, progress=progress)
    quiet_libraries()
    tok = models.load_tokenizer(model)
    task = _classification_task(cfg, tok)
    net = models.load_classifier(model, num_labels=task.num_labels, label_names=list(task.data.label_names))
    device = torch.device(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)
    return {
        s: task.evaluate(net, s, batch_size=cfg.train.eval_batch_size, device=device)
        for s in (splits or ["dev", "test"])
    }


def similarity_report(
    model_a: str,
    model_b: str,
    cfg: DistillConfig,
    out_dir: Path,
    *,
    split: str = "dev",
    pooling: str = "cls",
    max_examples: int = 512,
) -> list[Path]:
    """Every layer pair of two classifiers compared with CKA, Procrustes and Gram; CSV + heatmaps."""
    from geodistill import models
    from geodistill.similarity import layer_similarity, write_similarity
    from geodistill.train import quiet_libraries

    quiet_libraries()  # no per-call bars of weight loading and dataset maps
    tok_a, tok_b = models.load_tokenizer(model_a), models.load_tokenizer(model_b)
    task = _classification_task(cfg, tok_a, tok_b, max_examples=max_examples)
    a = models.load_classifier(model_a, num_labels=task.num_labels)
    b = models.load_classifier(model_b, num_labels=task.num_labels)
    rows = layer_similarity(a, b, task, split=split, pooling=pooling, batch_size=cfg.train.eval_batch_size)
    return write_similarity(rows, out_dir, label_a=Path(model_a).name, label_b=Path(model_b).name)
