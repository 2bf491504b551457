"""The command line end to end on tiny local models and data."""

from __future__ import annotations

import csv
import json
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
    cfg = write_config(assets, tmp_path)
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrate=0.1", "unknown key train.lrate"),
        ("losses.0.name=kl", "losses[0].name: unknown loss 'kl'"),
        ("losses.1.layers=[[1, 9]]", "teacher layer 9 is out of range"),
    ],
)
def test_errors_are_one_line_naming_the_field(
    assets, tmp_path, capsys, monkeypatch, override, message
) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    cfg = write_config(assets, tmp_path)
    assert main(["distill", str(cfg), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_config_file(capsys, monkeypatch) -> None:
    monkeypatch.delenv("GEODISTILL_DEBUG", raising=False)
    assert main(["distill", "no/such.yaml"]) == 2
    assert "no/such.yaml" in capsys.readouterr().err


def test_configs_lists_every_key_with_help(capsys) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for key in ("data.name", "losses", "train.grad_accum", "teacher_train.lr", "student.hidden_size"):
        assert f"\n{key} = " in out
    assert "demo" in shipped_configs()


def test_a_directory_does_not_shadow_a_shipped_config(tmp_path, monkeypatch) -> None:
    from geodistill.cli import CONFIG_DIR, resolve_config_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments" / "alpha").mkdir(parents=True)  # e.g. committed results of that sweep
    assert resolve_config_path("experiments/alpha") == CONFIG_DIR / "experiments/alpha.yaml"
