"""The command line end to end on tiny local models and data."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import make_cfg
from geodistill.cli import main, shipped_configs
from geodistill.config import to_dict


def write_config(assets, tmp_path: Path, *overrides: str) -> Path:
    cfg = make_cfg(assets, tmp_path / "run", *overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def test_distill_eval_similarity(assets, tmp_path, capsys) -> None:
    cfg = write_config(assets, tmp_path)
    assert main(["distill", str(cfg), "--set", "train.max_steps=3", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    student = Path(out["student_dir"])
    assert (student / "config.json").exists() and set(out["test"]) >= {"accuracy"}

    assert main(["eval", str(student), str(cfg), "--split", "test"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test"]["accuracy"] == pytest.approx(out["test"]["accuracy"])

    sim = tmp_path / "sim"
    assert (
        main(
            [
                "similarity",
                str(student),
                str(assets["teacher"]),
                str(cfg),
                "--out",
                str(sim),
                "--pooling",
                "mean",
            ]
        )
        == 0
    )
    rows = (sim / "similarity.csv").read_text().splitlines()
    assert rows[0].startswith("layer_a,layer_b,n,cka,procrustes")
    assert len(rows) == 1 + 3 * 4  # (2 + 1) student x (3 + 1) teacher hidden states
    assert (sim / "similarity_procrustes.png").stat().st_size > 1000


def test_similarity_of_a_model_with_itself_is_perfect_on_the_diagonal(assets, tmp_path) -> None:
    import datasets
    import transformers

    cfg = write_config(assets, tmp_path)
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()
    # mean pooling: the CLS vectors of the embedding layer are all equal (a constant matrix)
    teacher = str(assets["teacher"])
    assert (
        main(["similarity", teacher, teacher, str(cfg), "--pooling", "mean", "--out", str(tmp_path / "s")])
        == 0
    )
    with open(tmp_path / "s" / "similarity.csv") as f:
        rows = list(csv.DictReader(f))
    diag = [r for r in rows if r["layer_a"] == r["layer_b"]]
    assert all(float(r["cka"]) > 1 - 1e-6 and float(r["procrustes"]) < 1e-6 for r in diag)
    off = [r for r in rows if r["layer_a"] != r["layer_b"]]
    assert all(float(r["procrustes"]) > 1e-6 for r in off)  # a random tiny BERT: small but clearly > 0
    # the libraries' own per-call bars (weight loading, dataset maps) stay off, as in distill
    assert not datasets.is_progress_bar_enabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrate=0.1"], "unknown key train.lrate"),
        (["losses.0.name=kl"], "losses[0].name: unknown loss 'kl'"),
        (["losses.1.layers=[[1, 9]]"], "teacher layer 9 is out of range"),
        (["losses=[{name: kd"], "--set losses: '[{name: kd' is not valid YAML: expected ',' or '}'"),
        (["data.max_train=0"], "data.max_train: must be at least 1, got 0"),
        (["student.num_heads=3"], "student: hidden_size=16 is not divisible by num_heads=3"),
        (["teacher.name=no/such/teacher"], "teacher.name: could not load 'no/such/teacher'"),
        (["student.init=pretrained", "student.name=no/such/student"], "student.name: could not load"),
    ],
)
def test_errors_are_one_line_naming_the_field(
    assets, tmp_path, capsys, monkeypatch, overrides: list[str], message: str
) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    cfg = write_config(assets, tmp_path)
    assert main(["distill", str(cfg), *(a for o in overrides for a in ("--set", o)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_file_errors_are_one_line_naming_the_file(assets, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: x\n  max_train: [1, 2\ntrain: {lr: 1}\n")
    file_is_dir = tmp_path / "taken"
    file_is_dir.write_text("a file where the run would go")
    cfg = write_config(assets, tmp_path)
    for argv, message in [
        (["distill", str(bad)], f"{bad}:4:6: invalid YAML: expected ',' or ']', but got ':'"),
        (["distill", str(cfg), "--set", f"output_dir={file_is_dir}"], f"output_dir: {file_is_dir} is a file"),
        (["eval", str(tmp_path / "no-model"), str(cfg)], str(tmp_path / "no-model")),
    ]:
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_diverged_run_is_one_line_naming_the_checkpoint(assets, tmp_path, capsys, monkeypatch) -> None:
    import dataclasses

    import geodistill.losses as L

    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    spec = L.LOSSES["procrustes"]
    monkeypatch.setitem(
        L.LOSSES, "procrustes", dataclasses.replace(spec, fn=lambda x, y, **kw: spec.fn(x, y) * float("nan"))
    )
    cfg = write_config(assets, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["distill", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "step 1: loss term 'procrustes' is nan" in err and len(err.splitlines()) == 1, err
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # nothing but that line


def test_finetune_caches_the_teacher(assets, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    cfg = write_config(assets, tmp_path)
    argv = ["finetune", str(cfg), "--set", "teacher_train.max_steps=2", "--set", "teacher_train.batch_size=8"]
    assert main([*argv, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    teacher = Path(out["teacher_dir"])
    assert (
        teacher.is_relative_to(tmp_path / "cache" / "teachers") and (teacher / "model.safetensors").is_file()
    )
    assert set(out["dev"]) >= {"accuracy"} and set(out["test"]) >= {"accuracy"}
    results = teacher.parent / "results.json"
    assert json.loads(results.read_text())["steps"] == 2
    stamp = results.stat().st_mtime_ns
    assert main([*argv, "--quiet"]) == 0  # cached: the same teacher, not trained again
    assert json.loads(capsys.readouterr().out) == out and results.stat().st_mtime_ns == stamp


def test_missing_config_file(capsys, monkeypatch) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    assert main(["distill", "no/such.yaml"]) == 2
    assert "no/such.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "expected at least 1, got 0"),
        ("-3", "expected at least 1, got -3"),
        ("many", "expected a whole number, got 'many'"),
    ],
)
@pytest.mark.parametrize("command", ["geometry", "similarity"])
def test_max_examples_must_be_a_positive_whole_number(command, value, message, tmp_path, capsys) -> None:
    argv = [command, str(tmp_path / "r.jsonl")] if command == "geometry" else [command, "a", "b", "demo"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, f"--max-examples={value}"])
    assert exit_.value.code == 2  # argparse's usage error, before any file or model is read
    err = capsys.readouterr().err
    assert f"argument --max-examples: {message}" in err


def test_configs_lists_every_key_with_help(capsys) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for key in ("data.name", "losses", "train.grad_accum", "teacher_train.lr", "student.hidden_size"):
        assert f"\n{key} = " in out
    assert "demo" in shipped_configs()


def test_configs_shows_each_nested_configs_own_defaults(capsys) -> None:
    """teacher_train's default is not TrainConfig(): the listing shows teacher_train's own."""
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "\nteacher_train.lr = 5e-05\n" in out and "\nteacher_train.epochs = 2.0\n" in out
    assert "\ntrain.lr = 0.0001\n" in out and "\ntrain.epochs = 3.0\n" in out


def test_configs_applies_set_without_a_config(capsys) -> None:
    """As distill does: --set alone overrides the defaults (here the resolved config is printed)."""
    assert main(["configs", "--set", "train.lr=0.5", "--set", "teacher_train.batch_size=16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5 and printed["teacher_train"]["batch_size"] == 16
    assert printed["teacher_train"]["lr"] == 5e-5  # the rest of teacher_train's default
    assert main(["configs", "--set", "train.lrate=1"]) == 2  # checked as strictly as with a file
    assert "unknown key train.lrate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "files, overrides, message",
    [
        (
            {"a.yaml": "include: b.yaml\n", "b.yaml": "include: a.yaml\n"},
            [],
            "include cycle: a.yaml -> b.yaml -> a.yaml",
        ),
        ({"a.yaml": "include:\ntrain: {lr: 0.1}\n"}, [], "a.yaml: include: expected a file name"),
        (
            {"a.yaml": "student: {init: layer_subset, layers: [0, 2]}\n"},
            ["student.layers.0.x=1"],
            "--set student.layers.0.x: student.layers.0 is 0, not a mapping",
        ),
        (
            {"a.yaml": "losses: [{name: ce}]\n"},
            ["losses.--1.weight=1"],
            "--set losses.--1.weight: '--1' is not an index",
        ),
        ({"a.yaml": "train: {max_steps: 0}\n"}, [], "train.max_steps: must be at least 1, got 0"),
        ({"a.yaml": "train: {lr: .nan}\n"}, [], "train.lr: must be a finite number above 0, got nan"),
    ],
)
def test_config_mistakes_are_one_line_with_status_2(
    tmp_path, capsys, monkeypatch, files, overrides, message
) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["configs", str(tmp_path / "a.yaml"), *(a for o in overrides for a in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_geometry_with_no_student_exits_1_as_documented(tmp_path, capsys) -> None:
    import geodistill.cli

    results = tmp_path / "results.jsonl"
    results.write_text("")
    assert main(["geometry", str(results), "--out", str(tmp_path / "g"), "--quiet"]) == 1
    assert "no student measured" in capsys.readouterr().err
    doc = " ".join(geodistill.cli.__doc__.split())
    assert re.search(r"Status 1 [^.]*``geometry``", doc), doc  # the sentence on status 1 names it


def test_a_directory_does_not_shadow_a_shipped_config(tmp_path, monkeypatch) -> None:
    from geodistill.cli import CONFIG_DIR, resolve_config_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments" / "alpha").mkdir(parents=True)  # e.g. committed results of that sweep
    assert resolve_config_path("experiments/alpha") == CONFIG_DIR / "experiments/alpha.yaml"


def _tiny_sweep(
    assets, tmp_path: Path, name: str, methods: dict, *, steps: int, seeds=(0, 1), **extra
) -> Path:
    """A sweep file over the tiny local models: ``methods`` x ``seeds``, ``steps`` steps each,
    results under ``tmp_path/name``."""
    base = to_dict(make_cfg(assets, tmp_path / "unused", f"train.max_steps={steps}"))
    base.pop("output_dir")
    sweep = {
        "name": "geo",
        "base": base,
        "methods": methods,
        "grid": {"seed": list(seeds)},
        "output_dir": str(tmp_path / name),
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _last_layer_tokens(assets, model_dir: Path):
    """Every valid token's last hidden state of a saved model over the tiny test split (float64),
    from transformers' own forward: the independent side of the geometry tests."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [line.split(",")[0] for line in (assets["data"] / "test.csv").read_text().splitlines()[1:]]
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(model_dir)(**enc, output_hidden_states=True).hidden_states[-1]
    return h[enc["attention_mask"].bool()].double()


def test_geometry_measures_each_swept_student_against_its_teacher(assets, tmp_path, capsys) -> None:
    """`geodistill geometry` over a finished sweep: each student's last hidden state against the
    teacher's, equal to an independent NumPy computation from the saved models; resumes without
    repeating a run, refuses other settings in the same folder, names runs it cannot measure,
    and its rows feed `geodistill report` (a distance: lower is better, in its own units)."""
    import numpy as np

    from geodistill.experiments import read_rows
    from test_geometry import ref_all

    methods = {
        "kd": {"losses": [{"name": "kd", "temperature": 2.0}]},
        "kd+procrustes": {
            "losses": [
                {"name": "kd", "temperature": 2.0},
                {"name": "procrustes", "weight": 1.0, "pooling": "tokens"},
            ]
        },
    }
    path = _tiny_sweep(assets, tmp_path, "sweep", methods, steps=3)
    assert main(["sweep", str(path), "--quiet"]) == 0
    results = tmp_path / "sweep" / "results.jsonl"
    rows = read_rows(results)
    assert len(rows) == 4
    # a row whose run folder is gone (e.g. a row copied from another machine's sweep)
    with open(results, "a") as f:
        f.write(
            json.dumps(
                {
                    **rows[0],
                    "config_hash": "0" * 12,
                    "run_id": "kd-00000000",
                    "output_dir": str(tmp_path / "gone"),
                }
            )
            + "\n"
        )
    capsys.readouterr()

    out = tmp_path / "geo"
    assert main(["geometry", str(results), "--out", str(out), "--max-examples", "12", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "not measured" in err and str(tmp_path / "gone") in err
    measured = read_rows(out / "geometry.jsonl")
    assert len(measured) == 4 and {r["seed"] for r in measured} == {0, 1}
    assert (out / "geometry.md").read_text().count("| kd") == 2
    assert (out / "geometry.png").stat().st_size > 1000

    # independent: transformers' own forward of the saved models over the test split's tokens
    teacher = _last_layer_tokens(assets, assets["teacher"])
    for row in measured:
        ref = ref_all(_last_layer_tokens(assets, Path(row["output_dir"]) / "best"), teacher)
        assert row["geometry"]["samples"] == teacher.shape[0]
        assert row["test.teacher_cka"] == pytest.approx(ref["cka"], abs=1e-9)
        assert row["test.teacher_procrustes"] == pytest.approx(ref["procrustes"], abs=1e-9)
        assert row["test.teacher_procrustes_angular"] == pytest.approx(ref["angular"], abs=1e-9)
        assert row["test.teacher_gram"] == pytest.approx(ref["gram"], abs=1e-9)
    assert len({round(r["test.teacher_procrustes"], 9) for r in measured}) == 4  # four different students
    assert all(np.isfinite(r["test.accuracy"]) for r in measured)  # the run's own row, kept

    # resumes: nothing measured twice; other settings in the same folder are refused
    assert main(["geometry", str(results), "--out", str(out), "--max-examples", "12", "--quiet"]) == 0
    assert len(read_rows(out / "geometry.jsonl")) == 4
    assert main(["geometry", str(results), "--out", str(out), "--max-examples", "6", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (
        main(["geometry", str(results), "--out", str(tmp_path / "g9"), "--student-layer", "9", "--quiet"])
        == 2
    )
    err = capsys.readouterr().err
    assert "student_layer 9: " in err and "has 3 hidden states" in err

    # the rows are a results file: paired comparisons of a distance, lower being closer
    assert main(["report", str(out / "geometry.jsonl"), "--metric", "test.teacher_procrustes"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "lower is better" in report and "measure against the teacher" in report


def test_a_sweep_with_geometry_measures_each_student_as_its_run_ends(assets, tmp_path, capsys) -> None:
    """`geometry:` in a sweep file: each finished row carries the student's measures against its
    teacher (equal to an independent NumPy computation from the saved models), `geodistill
    geometry` takes such rows as they are (no checkpoint needed), and a measurement that fails
    leaves the run finished, its row saying why."""
    from geodistill.experiments import read_rows
    from test_geometry import ref_all

    methods = {"kd+cka": {"losses": [{"name": "kd"}, {"name": "cka", "weight": 1.0, "pooling": "tokens"}]}}
    path = _tiny_sweep(assets, tmp_path, "sweep", methods, steps=2, geometry={"max_examples": 12})
    assert main(["sweep", str(path), "--quiet"]) == 0
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    teacher = _last_layer_tokens(assets, assets["teacher"])
    for row in rows:
        assert row["geometry"]["max_examples"] == 12 and row["geometry"]["pooling"] == "tokens"
        assert row["geometry"]["samples"] == teacher.shape[0] and 0 < row["geometry"]["seconds"] < 60
        ref = ref_all(_last_layer_tokens(assets, Path(row["output_dir"]) / "best"), teacher)
        assert row["test.teacher_cka"] == pytest.approx(ref["cka"], abs=1e-9)
        assert row["test.teacher_procrustes"] == pytest.approx(ref["procrustes"], abs=1e-9)
        assert row["test.teacher_procrustes_angular"] == pytest.approx(ref["angular"], abs=1e-9)
        assert row["test.teacher_gram"] == pytest.approx(ref["gram"], abs=1e-9)
    assert rows[0]["test.teacher_gram"] != rows[1]["test.teacher_gram"]

    # `geodistill geometry` with the same settings takes the rows as they are: no checkpoint needed
    for row in rows:
        for f in (Path(row["output_dir"]) / "best").iterdir():
            f.unlink()
    out = tmp_path / "geo"
    assert (
        main(
            [
                "geometry",
                str(tmp_path / "sweep" / "results.jsonl"),
                "--out",
                str(out),
                "--max-examples",
                "12",
                "--quiet",
            ]
        )
        == 0
    )
    measured = read_rows(out / "geometry.jsonl")
    assert [r["test.teacher_procrustes"] for r in measured] == [r["test.teacher_procrustes"] for r in rows]
    # other settings need the checkpoints, which are gone: named, nothing measured
    assert (
        main(
            [
                "geometry",
                str(tmp_path / "sweep" / "results.jsonl"),
                "--out",
                str(tmp_path / "g6"),
                "--max-examples",
                "6",
                "--quiet",
            ]
        )
        == 1
    )
    assert "no trained student at" in capsys.readouterr().err

    # a measurement that fails does not fail the run: its row is finished and says why
    path = _tiny_sweep(
        assets,
        tmp_path,
        "sweep9",
        methods,
        steps=2,
        seeds=[0],
        geometry={"student_layer": 9, "max_examples": 12},
    )
    assert main(["sweep", str(path), "--quiet"]) == 0
    assert "student not measured against its teacher" in capsys.readouterr().out
    (row,) = read_rows(tmp_path / "sweep9" / "results.jsonl")
    assert row["status"] == "ok" and "test.teacher_cka" not in row and "geometry" not in row
    assert "student_layer 9" in row["geometry_note"] and math.isfinite(row["test.accuracy"])
