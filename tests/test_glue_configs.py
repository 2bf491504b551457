"""The paper's GLUE configs (BERT-base teacher -> 6-layer BERT on CoLA, RTE, MRPC): they load and
validate, the sweep plans every baseline, and their code path (hub GLUE loader, teacher
fine-tuning, layer-subset student, layer-paired feature losses) runs end to end on a tiny 12-layer
BERT and a small GLUE-shaped DatasetDict built locally in place of the hub download."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from conftest import tiny_bert, tiny_tokenizer
from geodistill.cli import CONFIG_DIR
from geodistill.config import DistillConfig, load_config
from geodistill.experiments import expand, load_sweep

TASKS = ("cola", "rte", "mrpc")


def test_every_glue_config_loads_with_the_papers_models() -> None:
    for task in TASKS:
        cfg = load_config(DistillConfig, CONFIG_DIR / "glue" / f"{task}.yaml")
        assert cfg.data.name == f"glue/{task}"
        assert cfg.teacher.name == "bert-base-uncased" and cfg.teacher.finetune
        assert cfg.student.init == "layer_subset" and len(cfg.student.layers) == 6
        assert [loss.name for loss in cfg.losses] == ["kd", "procrustes"]


def test_glue_sweep_plans_every_baseline_on_every_task() -> None:
    plan = expand(load_sweep(CONFIG_DIR / "experiments" / "glue.yaml"))
    methods = {run.method for run in plan}
    assert {"ft", "kd", "kd+pkd", "kd+proj_mse", "kd+cka", "kd+procrustes", "kd+gram"} <= methods
    assert {"ce+procrustes", "ce+gram", "ce+cka"} <= methods
    assert {run.config.data.name for run in plan} == {f"glue/{t}" for t in TASKS}
    replicates = {(run.config.train.seed, run.config.data.split_seed) for run in plan}
    assert len(replicates) >= 10 and len({s for _, s in replicates}) >= 3


def _glue_like(task: str, n: int, seed: int) -> Dataset:
    """GLUE's column layout for ``task``; label 1 iff word w5 occurs (learnable)."""
    rng = random.Random(seed)
    pair = task != "cola"
    rows: dict[str, list] = {"label": [], "idx": []}
    rows.update({"sentence1": [], "sentence2": []} if pair else {"sentence": []})
    for i in range(n):
        words = [f"w{rng.randrange(6, 60)}" for _ in range(rng.randrange(3, 8))]
        if i % 2:
            words.insert(rng.randrange(len(words)), "w5")
        if pair:
            rows["sentence1"].append(" ".join(words))
            rows["sentence2"].append(" ".join(f"w{rng.randrange(6, 60)}" for _ in range(4)))
        else:
            rows["sentence"].append(" ".join(words))
        rows["label"].append(i % 2)
        rows["idx"].append(i)
    names = ["unacceptable", "acceptable"] if task == "cola" else ["not_equivalent", "equivalent"]
    features = {k: Value("string") for k in rows if k.startswith("sentence")}
    features.update(label=ClassLabel(names=names), idx=Value("int32"))
    return Dataset.from_dict(rows, features=Features(features))


@pytest.fixture(scope="module")
def bert12(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert12") / "bert-base-like"
    tiny_bert(layers=12, hidden=16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("task", TASKS)
def test_glue_config_runs_end_to_end_on_tiny_models(
    task: str, bert12: Path, tmp_path: Path, monkeypatch
) -> None:
    from geodistill.data import classification
    from geodistill.train import distill

    requested = []

    def local_glue(name: str) -> DatasetDict:  # the hub download, replaced by a local DatasetDict
        requested.append(name)
        return DatasetDict(train=_glue_like(task, 60, 0), validation=_glue_like(task, 16, 1))

    monkeypatch.setattr(classification, "load_hub_dict", local_glue)
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))  # the teacher fine-tune lands here
    overrides = [
        f"teacher.name={bert12}",
        "data.max_length=24",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.device=cpu",
        "teacher_train.max_steps=2",
        "teacher_train.batch_size=8",
        "teacher_train.device=cpu",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(DistillConfig, CONFIG_DIR / "glue" / f"{task}.yaml", overrides)
    results = distill(cfg, progress=False)
    assert requested and all(r == f"nyu-mll/glue:{task}" for r in requested)
    assert results["steps"] == 2
    metric = {"cola": "mcc", "rte": "accuracy", "mrpc": "f1"}[task]
    assert metric in results["test"] and metric in results["dev"]
    assert list((tmp_path / "cache" / "teachers").glob("*/results.json"))  # the teacher was fine-tuned
    assert (tmp_path / "run" / "best" / "config.json").exists()  # a save_pretrained student


def test_glue_sweep_runs_every_method_through_sweep_and_report(
    bert12: Path, tmp_path: Path, monkeypatch
) -> None:
    """The GLUE sweep's --quick form, every baseline it names (FT, KD, PKD, projection MSE, CKA,
    Procrustes, Gram, and CE + feature terms), run and reported on the tiny 12-layer BERT."""
    import json

    from geodistill.cli import main
    from geodistill.data import classification
    from geodistill.experiments import run_distill, run_sweep

    monkeypatch.setattr(
        classification,
        "load_hub_dict",
        lambda name: DatasetDict(train=_glue_like("rte", 64, 0), validation=_glue_like("rte", 24, 1)),
    )
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    overrides = [
        f"base.teacher.name={bert12}",
        "base.data.max_length=24",
        "base.train.batch_size=8",
        "base.teacher_train.batch_size=8",
        f"output_dir={tmp_path / 'glue'}",
    ]
    sweep = load_sweep(CONFIG_DIR / "experiments" / "glue.yaml", overrides)
    summary = run_sweep(
        sweep, quick=True, jobs=1, runner=run_distill, in_process=True, progress=False, log=lambda s: None
    )
    results = tmp_path / "glue-quick" / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    methods = {"ft", "kd", "kd+pkd", "kd+proj_mse", "kd+cka", "kd+procrustes", "kd+gram"}
    methods |= {"ce+cka", "ce+procrustes", "ce+gram"}
    assert {r["method"] for r in rows} == methods and len(rows) == len(methods), summary
    assert all(r["status"] == "ok" and r["steps"] == 2 and r["task"] == "glue/rte" for r in rows)
    assert len(list((tmp_path / "cache" / "teachers").glob("*/results.json"))) == 1  # one teacher for all
    assert main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"{m}" in report for m in methods)
