"""Writing similarity results: the CSV always, heatmaps when matplotlib is there, a warning when not."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from geodistill.similarity import MEASURES, write_similarity

ROWS = [
    {"layer_a": a, "layer_b": b, "n": 8, **{m: 0.1 * (a + b) for m in MEASURES}}
    for a in range(2)
    for b in range(3)
]


def test_without_matplotlib_the_csv_is_written_and_one_line_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = write_similarity(ROWS, tmp_path)
    assert paths == [tmp_path / "similarity.csv"] and not list(tmp_path.glob("*.png"))
    with open(paths[0]) as f:
        assert len(list(csv.DictReader(f))) == len(ROWS)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib is not installed" in err and "similarity.csv" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hidden_states_of_a_model_on_cuda_match_the_cpu() -> None:
    """The task's batches are built on the CPU; a model on a GPU gets them moved to its device
    (geodistill geometry measures students on CUDA wherever it is available)."""
    from transformers import BertConfig, BertModel

    from geodistill.similarity import hidden_states

    class Task:
        separate_teacher_inputs = False

        def dataset(self, split):
            g = torch.Generator().manual_seed(0)
            return [{"input_ids": torch.randint(1, 50, (n,), generator=g)} for n in (5, 3, 7, 4)]

        def collate(self, rows):
            length = max(len(r["input_ids"]) for r in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r["input_ids"])], mask[i, : len(r["input_ids"])] = r["input_ids"], 1
            return {"input_ids": ids, "attention_mask": mask}

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    )
    on_cpu = hidden_states(model, Task(), "dev", "mean", 2, teacher=False)
    on_gpu = hidden_states(model.cuda(), Task(), "dev", "mean", 2, teacher=False)
    assert [h.device.type for h in on_gpu] == ["cpu"] * 3
    for a, b in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
