"""Sweeps: grid expansion, strict schema errors, resumable results.jsonl, crash isolation.

No training here: the runner is injectable, and these tests pass fakes that record their calls.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from geodistill.config import ConfigError, DistillConfig
from geodistill.evaluate_model import measure_student, student_geometry
from geodistill.experiments import (
    _child,
    append_row,
    expand,
    load_sweep,
    parse_sweep,
    read_rows,
    run_sweep,
    run_sweeps,
    sweep_dir,
)

METHODS = {
    "ft": {"losses": [{"name": "ce"}]},
    "kd": {"losses": [{"name": "kd", "temperature": 2}]},
    "kd+procrustes": {
        "losses": [{"name": "kd", "temperature": 2}, {"name": "procrustes", "weight": "${alpha}"}]
    },
}


def sweep_dict(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    data = {
        "name": "t",
        "base": {"data": {"name": "rotten_tomatoes", "max_train": 64}, "train": {"max_steps": 3}},
        "methods": METHODS,
        "grid": {"seed": [0, 1, 2], "alpha": [0.1, 1, 10], "data.split_seed": [0, 1]},
        "quick": {"set": {"train.max_steps": 1}, "grid": {"seed": [0]}},
        "output_dir": str(tmp_path / "sweep"),
    }
    data.update(changes)
    return data


def write_sweep(tmp_path: Path, data: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class _SlowRunner:
    """A runner for worker processes (picklable) that says whether another run was training in its
    output directory when it started, holding the directory for a moment as a training would."""

    def __call__(self, cfg: DistillConfig) -> dict[str, Any]:
        import time

        busy = Path(cfg.output_dir) / "busy"
        busy.parent.mkdir(parents=True, exist_ok=True)
        overlapped = busy.exists()
        busy.write_text("")
        time.sleep(4.0)  # longer than a spawned worker takes to start: without the lock they overlap
        busy.unlink(missing_ok=True)
        return {"overlapped": overlapped}


class FakeRunner:
    """Records every config it is asked to run; optionally dies at call ``stop_at`` (1-based)."""

    def __init__(self, stop_at: int | None = None, fail: set[int] | None = None) -> None:
        self.calls: list[DistillConfig] = []
        self.stop_at, self.fail = stop_at, fail or set()

    def __call__(self, cfg: DistillConfig) -> dict[str, Any]:
        self.calls.append(cfg)
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt  # the sweep is killed mid-way
        if cfg.train.seed in self.fail:
            raise RuntimeError(f"seed {cfg.train.seed} diverged")
        return fake_results(cfg)


def fake_results(cfg: DistillConfig) -> dict[str, Any]:
    acc = 0.7 + 0.01 * cfg.train.seed + 0.001 * len(cfg.losses)
    return {
        "output_dir": cfg.output_dir,
        "steps": cfg.train.max_steps,
        "best_step": cfg.train.max_steps // 2,
        "dev": {"accuracy": acc},
        "test": {"accuracy": acc - 0.01},
        "last": {
            "step": cfg.train.max_steps,
            "dev": {"accuracy": acc - 0.02},
            "test": {"accuracy": acc - 0.03},
        },
        "metric": "accuracy",
        "seconds_per_step": 0.5,
        "train_seconds": 1.5,
        "peak_memory_mb": 123.0,
        "student_parameters": 1000,
        "world_size": 1,
        "version": "0.1.0",
        "git_revision": "abc1234",
        "torch": "2.x",
    }


def crashing_runner(cfg: DistillConfig) -> dict[str, Any]:
    """Module level, so a spawned worker can import it: dies hard on seed 1."""
    if cfg.train.seed == 1:
        os._exit(3)  # no exception, no message: as if killed
    return fake_results(cfg)


def environment_runner(cfg: DistillConfig) -> dict[str, Any]:
    """Module level, for worker processes: writes what its process sees beside its run."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    seen = {"mark": os.environ.get("GEODISTILL_TEST_MARK"), "cwd": os.getcwd()}
    Path(cfg.output_dir, "seen.json").write_text(json.dumps(seen))
    return fake_results(cfg)


# ------------------------------------------------------------------------------------------
# expansion


def test_grid_counts_and_alpha_substitution(tmp_path: Path) -> None:
    plan = expand(parse_sweep(sweep_dict(tmp_path)))
    by_method = Counter(run.method for run in plan)
    # 3 seeds x 2 split seeds; the alpha method also x 3 alphas; ft and kd are not repeated per alpha
    assert by_method == {"ft": 6, "kd": 6, "kd+procrustes": 18}
    assert len({run.config_hash for run in plan}) == len(plan) == 30
    assert len({run.run_id for run in plan}) == 30
    for run in plan:
        assert run.config.output_dir == str(tmp_path / "sweep" / "runs" / run.run_id)
        assert run.values["seed"] == run.config.train.seed
        assert run.values["split_seed"] == run.config.data.split_seed
        assert run.values["task"] == "rotten_tomatoes"
        if run.method == "kd+procrustes":
            assert run.config.losses[1].weight == pytest.approx(run.values["alpha"])
            assert run.values["alpha"] in (0.1, 1, 10)
        else:
            assert run.values["alpha"] is None
    assert {r.config.losses[1].weight for r in plan if r.method == "kd+procrustes"} == {0.1, 1.0, 10.0}
    assert plan[0].axes == {
        "treatment": ["method", "alpha"],
        "setting": ["task"],
        "replicate": ["seed", "split_seed"],
    }
    # replicates outermost: the first runs cover every method for seed 0, split seed 0
    first = plan[: 1 + 1 + 3]
    assert {r.method for r in first} == set(METHODS) and {r.values["seed"] for r in first} == {0}


def test_identity_ignores_output_dir_and_is_stable(tmp_path: Path) -> None:
    a = expand(parse_sweep(sweep_dict(tmp_path)))
    b = expand(parse_sweep(sweep_dict(tmp_path, output_dir=str(tmp_path / "elsewhere"))))
    assert [r.config_hash for r in a] == [r.config_hash for r in b]
    assert a[0].config.output_dir != b[0].config.output_dir


def test_student_layers_and_task_axes(tmp_path: Path) -> None:
    methods = {
        "kd": METHODS["kd"],
        "kd+gram": {
            "losses": [{"name": "kd"}, {"name": "gram", "weight": "${alpha}", "layers": "${layers}"}]
        },
    }
    grid = {
        "seed": [0, 1],
        "alpha": [1],
        "layers": ["last", [[2, 6], [4, 12]]],
        "student": [
            {"label": "small", "init": "config", "num_layers": 2, "hidden_size": 64},
            {"init": "layer_subset", "layers": [0, 2, 4]},
        ],
        "data.name": ["rotten_tomatoes", "reuters_r8"],
    }
    base = {"data": {"name": "rotten_tomatoes"}, "student": {"num_layers": 3, "num_heads": 2}}
    sweep = parse_sweep(sweep_dict(tmp_path, base=base, methods=methods, grid=grid))
    before = copy.deepcopy(sweep.base)
    plan = expand(sweep)
    assert sweep.base == before  # runs do not leak into each other through the shared base
    assert Counter(r.method for r in plan) == {"kd": 2 * 2 * 2, "kd+gram": 2 * 2 * 2 * 2}
    assert plan[0].axes["treatment"] == ["method", "alpha", "layers"]
    assert plan[0].axes["setting"] == ["task", "student"]
    students = {r.values["student"] for r in plan}
    assert students == {"small", "init=layer_subset,layers=[0,2,4]"}
    small = next(r for r in plan if r.values["student"] == "small")
    student = small.config.student
    # a mapping value is merged into the base's mapping: num_heads comes from the base
    assert (student.init, student.num_layers, student.hidden_size, student.num_heads) == ("config", 2, 64, 2)
    subset = next(r for r in plan if r.values["student"] != "small")
    assert subset.config.student.layers == (0, 2, 4)
    gram = [r for r in plan if r.method == "kd+gram"]
    assert {r.values["layers"] for r in gram} == {"last", "[[2,6],[4,12]]"}
    assert {json.dumps(r.config.losses[1].layers) for r in gram} == {'"last"', "[[2, 6], [4, 12]]"}
    assert {r.values["task"] for r in plan} == {"rotten_tomatoes", "reuters_r8"}
    assert all(r.values["layers"] is None for r in plan if r.method == "kd")


def test_quick_overrides_and_directory(tmp_path: Path) -> None:
    sweep = parse_sweep(sweep_dict(tmp_path))
    plan = expand(sweep, quick=True)
    assert len(plan) == 1 * 2 * (1 + 1 + 3)  # quick.grid: seed [0]
    assert all(r.config.train.max_steps == 1 for r in plan)
    assert all(Path(r.config.output_dir).parent.parent == tmp_path / "sweep-quick" for r in plan)


def test_quick_directory_of_an_output_dir_without_a_name(tmp_path: Path, monkeypatch) -> None:
    """output_dir "." or ".." (a sweep file run from its results' directory) gets its quick runs
    beside the directory it stands for; it raised ValueError (an empty name has no sibling)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for where, quick in ((".", tmp_path / "here-quick"), ("..", tmp_path.parent / f"{tmp_path.name}-quick")):
        sweep = parse_sweep(sweep_dict(tmp_path, output_dir=where))
        assert sweep_dir(sweep) == Path(where)
        assert sweep_dir(sweep, quick=True) == quick


def test_base_include_file_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rt.yaml").write_text(
        "data: {name: reuters_r8}\ntrain: {max_steps: 7, lr: 0.001}\n"
    )
    included = write_sweep(
        tmp_path, sweep_dict(tmp_path, base={"include": "configs/rt.yaml", "train": {"lr": 0.01}})
    )
    plan = expand(load_sweep(included, ["grid.seed=[5]", "grid.alpha=[2]"]))
    assert {(r.config.data.name, r.config.train.max_steps, r.config.train.lr) for r in plan} == {
        ("reuters_r8", 7, 0.01)
    }
    assert {r.config.train.seed for r in plan} == {5}
    assert len(plan) == 3 * 2
    # a dotted axis is one key of grid (and of quick.set), not a nested mapping
    dotted = load_sweep(
        included,
        ["grid.data.split_seed=[1,2]", "grid.seed=[0]", "quick.set.train.max_steps=3"],
    )
    assert dotted.grid["data.split_seed"] == [1, 2] and dotted.quick.set["train.max_steps"] == 3
    plan = expand(dotted)
    assert sorted({r.config.data.split_seed for r in plan}) == [1, 2]
    assert {r.config.train.max_steps for r in expand(dotted, quick=True)} == {3}
    with pytest.raises(ConfigError, match=r"grid\.data\.spilt_seed"):
        expand(load_sweep(included, ["grid.data.spilt_seed=[1]"]))
    empty = write_sweep(tmp_path, sweep_dict(tmp_path, base={"include": None}), "empty.yaml")
    with pytest.raises(
        ConfigError, match=r"base\.include: expected a file name or a list of file names, got None"
    ):
        load_sweep(empty)
    as_path = write_sweep(tmp_path, sweep_dict(tmp_path, base="configs/rt.yaml"), "s2.yaml")
    assert load_sweep(as_path).base["train"]["max_steps"] == 7
    assert load_sweep(as_path).name == "t"
    del_name = sweep_dict(tmp_path)
    del del_name["name"]
    assert load_sweep(write_sweep(tmp_path, del_name, "main.yaml")).name == "main"


G = {"seed": [0], "alpha": [1]}  # a grid the default methods accept
NO_ALPHA = {"grid": {"seed": [0]}, "quick": {}}  # for method sets without ${alpha}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methds": {}}, "unknown key methds"),
        ({"grid": {**G, "sed": [0, 1]}}, "grid.sed: unknown key"),
        ({"grid": {**G, "train.sed": [0, 1]}}, "unknown key train.sed"),
        ({"grid": {**G, "student.num_layerz": [2]}}, "unknown key student.num_layerz"),
        ({"grid": {**G, "losses.x.weight": [2]}}, "losses is a list; expected an index"),
        ({"grid": {**G, "seed": []}}, "grid.seed: expected a non-empty list"),
        ({"grid": {**G, "train.seed": [1]}}, "grid.train.seed: the same config key"),
        (
            {"grid": {**G, "student": [{"label": "s", "num_layers": 2}, {"label": "s", "num_layers": 3}]}},
            'grid.student: two values show as "s" in the rows',
        ),
        ({"grid": {**G, "seed": [0, 1, 0]}}, "grid.seed: two values show as 0"),
        ({"quick": {"grid": {"beta": [1]}}}, "quick.grid.beta: not an axis"),
        ({"quick": {"sett": {}}}, "unknown key quick.sett"),
        ({"quick": {"set": {"train.max_stepz": 1}}}, "unknown key train.max_stepz"),
        ({**NO_ALPHA, "methods": {"kd": {"losses": [{"name": "kd", "temprature": 2}]}}}, "temprature"),
        (
            {**NO_ALPHA, "methods": {"kd": {"losses": [{"weight": "${beta}"}]}}},
            "'${beta}' is not a grid axis",
        ),
        ({"methods": {"kd": {"losses": [{"name": "kd", "weight": "x${alpha}"}]}}}, "must be the whole value"),
        # base's placeholders are named as base's, not as the first method's
        (
            {"base": {"train": {"lr": "x${alpha}"}}},
            "base.train.lr: 'x${alpha}': a placeholder must be the whole",
        ),
        ({"base": {"train": {"lr": "${beta}"}}}, "base: '${beta}' is not a grid axis"),
        ({**NO_ALPHA, "methods": {"kd": {"lossez": []}}}, "unknown key lossez"),
        ({**NO_ALPHA, "methods": {}}, "name at least one method"),
        ({**NO_ALPHA, "methods": {"kd": []}}, "methods.kd: expected a mapping"),
        ({"grid": {"status": [1]}, "methods": {"kd": {"train": {"lr": "${status}"}}}}, "grid.status"),
        ({"geometry": "yes"}, "geometry: expected true or a mapping"),
        ({"geometry": {"poolng": "tokens"}}, "geometry.poolng: unknown setting"),
        ({"geometry": {"pooling": "avg"}}, "geometry.pooling: expected one of cls, mean, tokens, last"),
        ({"geometry": {"split": "val"}}, "geometry.split: expected train, dev or test"),
        ({"geometry": {"max_examples": 0}}, "geometry.max_examples: expected at least 1"),
        ({"geometry": {"teacher_layer": "last"}}, "geometry.teacher_layer: expected an integer"),
    ],
)
def test_strict_errors_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand(parse_sweep(sweep_dict(tmp_path, **change)))


def test_the_task_axis_keeps_its_own_column(tmp_path: Path) -> None:
    """The config key ``task`` (classification or instruction) must not be shown in, or overwrite,
    the rows' ``task`` column (the data set)."""
    (run, *_) = expand(parse_sweep(sweep_dict(tmp_path, grid={**G, "task": ["classification"]})))
    assert run.values["task_type"] == "classification" and run.values["task"] == "rotten_tomatoes"


def test_a_placeholder_without_a_value_names_its_run_and_key(tmp_path: Path) -> None:
    """quick.set is applied after the grid: a placeholder there that the run has no value for is
    named by the run and the config key, not by its text alone."""
    sweep = parse_sweep(sweep_dict(tmp_path, quick={"set": {"train.lr": "${beta}"}, "grid": {"seed": [0]}}))
    expand(sweep)  # the full grid does not apply quick.set
    with pytest.raises(
        ConfigError, match=re.escape("train.lr: '${beta}': no value for this placeholder in this run")
    ):
        expand(sweep, quick=True)
    with pytest.raises(ConfigError, match=r"^run ft, seed=0, split_seed=0: "):
        expand(sweep, quick=True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: student_geometry([d / "none.jsonl"], d, pooling="avg"),
            "student_geometry.pooling: expected",
        ),
        (
            lambda d: student_geometry([d / "none.jsonl"], d, layer=1),
            "student_geometry.layer: unknown setting",
        ),
        (
            lambda d: measure_student(d, {"split": "val"}),
            "measure_student.split: expected train, dev or test",
        ),
        (
            lambda d: measure_student(d, {"max_examples": True}),
            "measure_student.max_examples: expected an integer",
        ),
    ],
)
def test_geometry_settings_are_checked_alike_outside_a_sweep(
    tmp_path: Path, call: Callable[[Path], Any], message: str
) -> None:
    # the same checks as a sweep's geometry:, before any file or checkpoint is read
    with pytest.raises(ConfigError, match=re.escape(message)):
        call(tmp_path)


def test_duplicate_configs_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same config"):
        expand(
            parse_sweep(sweep_dict(tmp_path, **NO_ALPHA, methods={"a": METHODS["kd"], "b": METHODS["kd"]}))
        )


def test_error_inside_one_run_names_the_run(tmp_path: Path) -> None:
    grid = {"seed": [0], "student": [{"init": "config", "num_layerz": 2}]}
    with pytest.raises(ConfigError, match=r"run ft.*num_layerz"):
        expand(parse_sweep(sweep_dict(tmp_path, grid=grid, quick={}, methods={"ft": METHODS["ft"]})))


# ------------------------------------------------------------------------------------------
# running and resuming


def test_rows_hold_every_swept_value_and_measurement(tmp_path: Path) -> None:
    sweep = parse_sweep(sweep_dict(tmp_path, grid={"seed": [0], "alpha": [1]}))
    summary = run_sweep(sweep, runner=FakeRunner(), progress=False, log=lambda _: None)
    assert (summary.planned, summary.finished, summary.skipped, summary.failed) == (3, 3, 0, [])
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    row = next(r for r in rows if r["method"] == "kd+procrustes")
    for key in (
        "config_hash", "run_id", "method", "alpha", "seed", "split_seed", "task", "dev.accuracy",
        "test.accuracy", "steps", "wall_seconds", "seconds_per_step", "peak_memory_mb", "version",
        "git_revision", "output_dir", "axes", "loss_terms", "status", "sweep",
    ):  # fmt: skip
        assert key in row, key
    assert (row["alpha"], row["seed"], row["status"], row["loss_terms"]) == (1, 0, "ok", ["kd", "procrustes"])
    assert row["test.accuracy"] == pytest.approx(0.7 + 0.002 - 0.01)
    assert (row["last_dev.accuracy"], row["last_test.accuracy"]) == pytest.approx(
        (0.7 + 0.002 - 0.02, 0.7 + 0.002 - 0.03)
    )
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"] == [r["run_id"] for r in rows]


def test_rows_keep_measures_of_the_training_split(tmp_path: Path) -> None:
    """`geometry: {split: train}` measures each student on training examples: the row keeps them as
    train.teacher_<measure> (they were measured, then dropped: rows took dev and test only)."""
    from geodistill.experiments import _row

    run = expand(parse_sweep(sweep_dict(tmp_path)))[0]
    results = {
        "dev": {"accuracy": 0.7},
        "test": {"accuracy": 0.6},
        "train": {"teacher_cka": 0.5, "teacher_gram": 0.25},
        "geometry": {"split": "train", "pooling": "tokens"},
    }
    row = _row(run, "t", results, 1.0)
    assert (row["train.teacher_cka"], row["train.teacher_gram"], row["test.accuracy"]) == (0.5, 0.25, 0.6)
    del results["geometry"]  # no measurement: the training split's results stay out of the row
    assert not any(k.startswith("train.") for k in _row(run, "t", results, 1.0))


def test_a_placeholder_mapping_is_shown_by_its_label(tmp_path: Path) -> None:
    """A mapping taken by a placeholder may carry a label, as a settings axis's may: the rows show it
    and the config does not get it (it was refused as an unknown key of the loss)."""
    terms = [
        {"label": "P", "name": "procrustes", "weight": 0.1},
        {"label": "G", "name": "gram", "weight": 0.1},
    ]
    sweep = parse_sweep(
        sweep_dict(
            tmp_path,
            methods={"kd+term": {"losses": [{"name": "kd"}, "${term}"]}},
            grid={"seed": [0], "term": terms},
        )
    )
    plan = expand(sweep)
    assert [(r.values["term"], r.config.losses[1].name) for r in plan] == [("P", "procrustes"), ("G", "gram")]
    assert terms[0]["label"] == "P"  # the sweep's own value is left as it was


def test_set_names_a_base_file_or_an_include(tmp_path: Path) -> None:
    """`--set base=FILE` and `--set base.include=FILE` read the file, as the same keys in the sweep
    file do (the overrides came after the files were read, so a path stayed a string)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "r8.yaml").write_text(
        "data: {name: reuters_r8}\ntrain: {max_steps: 7, lr: 0.002}\n"
    )
    path = write_sweep(tmp_path, sweep_dict(tmp_path, grid={"seed": [0], "alpha": [1]}))
    whole = expand(load_sweep(path, ["base=configs/r8.yaml"]))
    assert {(r.config.data.name, r.config.train.max_steps) for r in whole} == {("reuters_r8", 7)}
    under = expand(load_sweep(path, ["base.include=configs/r8.yaml"]))  # the sweep's base keys win
    assert {(r.config.data.name, r.config.train.max_steps, r.config.train.lr) for r in under} == {
        ("rotten_tomatoes", 3, 0.002)
    }


def test_a_worker_ends_when_its_sweep_is_killed(tmp_path: Path) -> None:
    """A sweep killed outright (SIGKILL) leaves its workers running; each watches the sweep's pid
    and exits once it is gone, instead of training on beside the worker a rerun starts."""
    import subprocess
    import sys
    import time

    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    code = f"from geodistill.experiments import _watch_parent; import time; _watch_parent({sweep.pid}, 0.05); time.sleep(120)"
    worker = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        assert worker.poll() is None  # the sweep is alive: the worker goes on
        sweep.kill()
        sweep.wait()
        assert worker.wait(timeout=60) == 1
    finally:
        for p in (sweep, worker):
            p.kill()


def test_two_workers_of_one_run_take_turns(tmp_path: Path) -> None:
    """A run's worker holds ``<output_dir>.lock`` while it trains: a second one for the same run
    directory waits for it (not two trainings writing one folder at once)."""
    import multiprocessing as mp

    out = tmp_path / "runs" / "kd-0123"
    cfg = DistillConfig(output_dir=str(out))
    ctx = mp.get_context("spawn")
    readers, procs = [], []
    for _ in range(2):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(_SlowRunner(), cfg, 1, writer, dict(os.environ), os.getpid()))
        proc.start()
        readers.append(reader)
        procs.append(proc)
    outcomes = [r.recv() for r in readers]
    for p in procs:
        p.join(timeout=60)
    assert [o[0] for o in outcomes] == ["ok", "ok"]
    assert not any(o[1]["overlapped"] for o in outcomes)  # one after the other


def test_killed_sweep_resumes_without_duplicates(tmp_path: Path) -> None:
    sweep = parse_sweep(sweep_dict(tmp_path))
    plan = expand(sweep)
    results = tmp_path / "sweep" / "results.jsonl"

    first = FakeRunner(stop_at=8)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, runner=first, progress=False, log=lambda _: None)
    assert len(read_rows(results)) == 7  # the 8th was killed before writing a row

    second = FakeRunner()
    summary = run_sweep(sweep, runner=second, progress=False, log=lambda _: None)
    assert summary.skipped == 7 and summary.finished == len(plan) - 7
    done_first = {c.output_dir for c in first.calls[:7]}
    assert not done_first & {c.output_dir for c in second.calls}  # finished runs are not rerun
    rows = read_rows(results)
    assert sorted(r["config_hash"] for r in rows) == sorted(r.config_hash for r in plan)  # each once

    third = FakeRunner()
    assert run_sweep(sweep, runner=third, progress=False, log=lambda _: None).finished == 0
    assert third.calls == [] and len(read_rows(results)) == len(plan)


def test_rows_under_a_former_hash_still_count_as_finished(tmp_path: Path) -> None:
    """A results file written before loss options at their default hashed as left out (its rows
    carry the former hash) is not run again, and its rows are copied into other sweeps."""
    methods = {"gram": {"losses": [{"name": "kd", "temperature": 2.0}, {"name": "gram", "pooling": "cls"}]}}
    sweep = parse_sweep(sweep_dict(tmp_path, methods=methods, grid={"seed": [0, 1]}))
    plan = expand(sweep)
    assert all(len(run.former_hashes) == 1 for run in plan)  # pooling: cls is the default
    run_sweep(sweep, runner=FakeRunner(), progress=False, log=lambda _: None)
    results = tmp_path / "sweep" / "results.jsonl"
    text = results.read_text()
    for run in plan:
        text = text.replace(run.config_hash, run.former_hashes[0])
    results.write_text(text)
    again = FakeRunner()
    assert (
        run_sweep(sweep, runner=again, progress=False, log=lambda _: None).finished == 0 and again.calls == []
    )
    other = parse_sweep(
        sweep_dict(tmp_path, name="u", methods=methods, grid={"seed": [0, 1]}, output_dir=str(tmp_path / "u"))
    )
    summaries = run_sweeps([sweep, other], runner=FakeRunner(), progress=False, log=lambda _: None)
    assert summaries[1].finished == 2 and {
        r["config_hash"] for r in read_rows(tmp_path / "u" / "results.jsonl")
    } == {run.config_hash for run in plan}


def test_failed_runs_write_error_rows_and_are_retried(tmp_path: Path) -> None:
    sweep = parse_sweep(sweep_dict(tmp_path, grid={"seed": [0, 1], "alpha": [1]}))
    logged: list[str] = []
    summary = run_sweep(sweep, runner=FakeRunner(fail={1}), progress=False, log=logged.append)
    assert summary.finished == 3 and len(summary.failed) == 3
    assert all("seed 1 diverged" in error for _, error in summary.failed)
    assert any("failed" in line for line in logged)
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 3 and all("RuntimeError" in r["error"] and r["traceback"] for r in errors)
    assert all("test.accuracy" not in r for r in errors)

    retry = FakeRunner()
    summary = run_sweep(sweep, runner=retry, progress=False, log=lambda _: None)
    assert summary.skipped == 3 and summary.finished == 3 and not summary.failed
    assert {c.train.seed for c in retry.calls} == {1}


def test_truncated_last_line_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b"')  # killed mid-write
    append_row(path, {"a": 3})
    with pytest.warns(UserWarning, match="not JSON"):
        assert [r["a"] for r in read_rows(path)] == [1, 3]


def test_parallel_processes_isolate_a_hard_crash(tmp_path: Path) -> None:
    """Two worker processes at once; one run dies without a word; the other finishes."""
    sweep = parse_sweep(sweep_dict(tmp_path, quick={}, methods={"kd": METHODS["kd"]}, grid={"seed": [0, 1]}))
    summary = run_sweep(sweep, runner=crashing_runner, jobs=2, progress=False, log=lambda _: None)
    assert summary.finished == 1 and len(summary.failed) == 1
    assert "worker process died (exit code 3" in summary.failed[0][1]
    rows = read_rows(tmp_path / "sweep" / "results.jsonl")
    assert sorted((r["seed"], r["status"]) for r in rows) == [(0, "ok"), (1, "error")]
    assert next(r for r in rows if r["status"] == "ok")["wall_seconds"] > 0


def test_workers_see_the_environment_and_directory_of_their_start(tmp_path: Path, monkeypatch) -> None:
    """Workers fork from a server started once per process (on Linux); each run still sees the
    environment and working directory the parent had when it started that run, as a fresh
    interpreter would."""
    monkeypatch.chdir(tmp_path)
    sweep = parse_sweep(sweep_dict(tmp_path, quick={}, methods={"kd": METHODS["kd"]}, grid={"seed": [0, 1]}))
    seen = []
    for mark in ("first", "second"):  # the second sweep's workers fork from the first's server
        monkeypatch.setenv("GEODISTILL_TEST_MARK", mark)
        (tmp_path / mark).mkdir()
        monkeypatch.chdir(tmp_path / mark)
        shutil.rmtree(tmp_path / "sweep", ignore_errors=True)
        summary = run_sweep(sweep, runner=environment_runner, jobs=2, progress=False, log=lambda _: None)
        assert summary.finished == 2 and not summary.failed
        seen += [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep" / "runs").glob("*/seen.json"))]
    assert seen == [{"mark": m, "cwd": str(tmp_path / m)} for m in ("first", "first", "second", "second")]


def test_cli_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from geodistill.cli import main

    path = write_sweep(tmp_path, sweep_dict(tmp_path))
    sweep = load_sweep(path)
    run_sweep(sweep, runner=FakeRunner(stop_at=None, fail={2}), progress=False, log=lambda _: None)
    assert main(["sweep", str(path), "--dry-run", "--set", "grid.seed=[0,1,2,3]"]) == 0
    out = capsys.readouterr().out
    assert "40 runs planned, 20 finished, 0 to copy from another sweep's results, 20 to run" in out
    assert out.count("| to run |") == 10 and out.count("| failed before |") == 10
    assert out.count("| done |") == 20
    assert main(["sweep", str(path), "--dry-run", "--set", "grid.sed=[0]"]) == 2
    assert "grid.sed" in capsys.readouterr().err
    # a second sweep with the same runs, given with the first: the dry run shows what it would copy
    other = write_sweep(tmp_path, sweep_dict(tmp_path, name="u", output_dir=str(tmp_path / "u")), "u.yaml")
    assert main(["sweep", str(other), str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep u: 30 runs planned, 0 finished, 20 to copy from another sweep's results, 10 to run" in out
    assert (
        out.count("| copied from t |") == 20 and out.count("| to run |") == 10
    )  # t's 10 failed: u runs them
    assert "sweep t: 30 runs planned, 20 finished, 0 to copy from another sweep's results, 10 to run" in out
    assert main(["sweep", str(other), "--dry-run"]) == 0  # alone it has nothing to copy from
    assert (
        "30 runs planned, 0 finished, 0 to copy from another sweep's results, 30 to run"
        in capsys.readouterr().out
    )


def test_every_shipped_experiment_plans_in_full_and_quick() -> None:
    from geodistill.cli import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "experiments").rglob("*.yaml")):
        if path.stem == "rt":  # the base the others include: a run config, not a sweep
            continue
        sweep = load_sweep(path)
        full, quick = expand(sweep), expand(sweep, quick=True)
        assert 0 < len(quick) < len(full), path.stem
        assert len({r.config_hash for r in full}) == len(full)


def test_several_sweeps_share_runs_and_keep_their_own_rows(tmp_path: Path) -> None:
    """Two sweeps in one pool: a run both plan (the KD baseline) runs once and is a row in each
    file, with each sweep's own columns; a run one sweep finished earlier is copied, not rerun."""
    grid = {"seed": [0, 1], "alpha": [1]}
    a = parse_sweep(sweep_dict(tmp_path, name="a", grid=grid, output_dir=str(tmp_path / "a")))
    b_methods = {
        "kd": METHODS["kd"],
        "kd+gram": {"losses": [{"name": "kd", "temperature": 2}, {"name": "gram"}]},
    }
    b = parse_sweep(
        sweep_dict(
            tmp_path, name="b", methods=b_methods, grid={"seed": [0, 1, 2]}, output_dir=str(tmp_path / "b")
        )
    )
    run_sweep(b, runner=FakeRunner(), progress=False, log=lambda _: None, quick=True)  # elsewhere: ignored
    runner = FakeRunner()
    first = run_sweeps([a, b], runner=runner, progress=False, log=lambda _: None)
    assert [(s.planned, s.finished) for s in first] == [(6, 6), (6, 6)]
    assert len(runner.calls) == 6 + 6 - 2  # kd at seeds 0 and 1 ran once
    rows_a, rows_b = read_rows(tmp_path / "a" / "results.jsonl"), read_rows(tmp_path / "b" / "results.jsonl")
    kd_a = {r["seed"]: r for r in rows_a if r["method"] == "kd"}
    kd_b = {r["seed"]: r for r in rows_b if r["method"] == "kd"}
    for seed in (0, 1):
        assert kd_a[seed]["config_hash"] == kd_b[seed]["config_hash"]
        assert kd_a[seed]["test.accuracy"] == kd_b[seed]["test.accuracy"]
        assert (kd_a[seed]["sweep"], kd_b[seed]["sweep"]) == ("a", "b")
        # it ran once, in a's folder: b's row says so (not a folder of b's that never existed)
        assert (
            kd_b[seed]["output_dir"]
            == kd_a[seed]["output_dir"]
            == str(tmp_path / "a" / "runs" / kd_a[seed]["run_id"])
        )
        assert kd_b[seed]["reused_from"] == "a" and "reused_from" not in kd_a[seed]
    assert "alpha" in kd_a[0] and "alpha" not in kd_b[0]  # each file has its own sweep's columns

    # a third sweep planning runs that a and b finished: copied with its columns, nothing runs
    c = parse_sweep(
        sweep_dict(
            tmp_path,
            name="c",
            methods={"kd": METHODS["kd"]},
            grid={"seed": [1, 2]},
            output_dir=str(tmp_path / "c"),
        )
    )
    runner = FakeRunner()
    (summary,) = run_sweeps([a, b, c], runner=runner, progress=False, log=lambda _: None)[2:]
    assert runner.calls == [] and (summary.planned, summary.finished) == (2, 2)
    rows_c = read_rows(tmp_path / "c" / "results.jsonl")
    assert {r["sweep"] for r in rows_c} == {"c"} and "alpha" not in rows_c[0]
    by_hash = {r["config_hash"]: r for r in rows_b}
    for row in rows_c:
        for metric in ("test.accuracy", "last_dev.accuracy", "last_test.accuracy"):
            assert row[metric] == by_hash[row["config_hash"]][metric]
        assert row["output_dir"] == by_hash[row["config_hash"]]["output_dir"]  # where it ran
        assert row["reused_from"] == {1: "a", 2: "b"}[row["seed"]]  # the sweep it ran for
    assert all("reused_from" not in r for r in rows_a)  # rows of runs that ran here
    assert {r["seed"] for r in rows_b if "reused_from" in r} == {0, 1}  # b's rows of a's kd runs

    # a copy of a copy names the sweep that ran it, not the one it was copied through
    d = parse_sweep(
        sweep_dict(
            tmp_path,
            name="d",
            methods={"kd": METHODS["kd"]},
            grid={"seed": [2]},
            output_dir=str(tmp_path / "d"),
        )
    )
    run_sweeps([c, d], runner=FakeRunner(), progress=False, log=lambda _: None)
    (row_d,) = read_rows(tmp_path / "d" / "results.jsonl")
    assert (row_d["sweep"], row_d["reused_from"]) == ("d", "b")
    with pytest.raises(ConfigError, match="write the same"):
        run_sweeps([a, a], runner=FakeRunner(), progress=False, log=lambda _: None)
    (tmp_path / "x").mkdir()
    a_again = parse_sweep(
        sweep_dict(tmp_path, name="a2", grid=grid, output_dir=str(tmp_path / "x" / ".." / "a"))
    )
    with pytest.raises(ConfigError, match="'a' and 'a2' write the same"):  # one folder, two spellings
        run_sweeps([a, a_again], runner=FakeRunner(), progress=False, log=lambda _: None)


def test_a_sweep_runs_in_one_process_at_a_time(tmp_path: Path) -> None:
    """A second `geodistill sweep` on a sweep whose runs are being run stops with a clear error
    instead of training the same runs again; a sweep with nothing left to do takes no lock, and
    the lock goes with the sweep that held it."""
    from geodistill.experiments import SweepBusy

    sweep = parse_sweep(sweep_dict(tmp_path, grid={"seed": [0, 1], "alpha": [1]}))
    seen: list[str] = []

    class Intruder(FakeRunner):
        def __call__(self, cfg: DistillConfig) -> dict[str, Any]:
            if not seen:  # while the first run trains, the same sweep is started again
                with pytest.raises(SweepBusy, match=r"sweep 't': another `geodistill sweep` is running"):
                    run_sweeps([sweep], runner=FakeRunner(), progress=False, log=lambda _: None)
                seen.append("refused")
            return super().__call__(cfg)

    runner = Intruder()
    (summary,) = run_sweeps([sweep], runner=runner, progress=False, log=lambda _: None)
    assert seen == ["refused"] and summary.finished == summary.planned == len(runner.calls) == 6
    assert len(read_rows(tmp_path / "sweep" / "results.jsonl")) == 6  # no run twice
    # the lock was released; a finished sweep needs none, even while another process holds it
    import fcntl

    with open(tmp_path / "sweep" / "sweep.lock", "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        (again,) = run_sweeps([sweep], runner=FakeRunner(), progress=False, log=lambda _: None)
    assert again.skipped == 6 and again.finished == 0


def test_rows_of_another_process_count_are_kept_and_named(tmp_path: Path) -> None:
    """The number of processes is not part of a run's identity (it is how a run is launched), but
    batch_size is per process: a resumed sweep says how many of its finished rows ran with another
    count than this launch's, and keeps them."""

    class OnTwo(FakeRunner):
        def __call__(self, cfg: DistillConfig) -> dict[str, Any]:
            return {**super().__call__(cfg), "world_size": 2}

    sweep = parse_sweep(sweep_dict(tmp_path, grid={"seed": [0, 1], "alpha": [1]}))
    run_sweeps([sweep], runner=OnTwo(), progress=False, log=lambda _: None)
    lines: list[str] = []
    (again,) = run_sweeps([sweep], runner=FakeRunner(), progress=False, log=lines.append)
    assert again.skipped == 6 and again.finished == 0
    assert any("note: 6 finished runs" in x and "launch's 1" in x for x in lines), lines
    lines.clear()  # rows another sweep's results give this one count too (they were not named)
    other = parse_sweep(sweep_dict(tmp_path / "two", name="t2", grid={"seed": [0, 1], "alpha": [1]}))
    copied, _ = run_sweeps([other, sweep], runner=FakeRunner(), progress=False, log=lines.append)
    assert copied.finished == 6 and len(read_rows(copied.results_path)) == 6
    assert any(f"note: 6 finished runs in {copied.results_path}" in x for x in lines), lines
    lines.clear()
    run_sweeps(
        [parse_sweep(sweep_dict(tmp_path / "one", grid={"seed": [0], "alpha": [1]}))],
        runner=FakeRunner(),
        progress=False,
        log=lines.append,
    )
    assert not any("processes" in x for x in lines)


def test_cli_runs_a_folder_of_sweeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from geodistill.cli import main

    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("one", "two"):
        write_sweep(folder, sweep_dict(tmp_path, name=name, output_dir=str(tmp_path / name)), f"{name}.yaml")
    assert main(["sweep", str(folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep one: 30 runs planned" in out and "sweep two: 30 runs planned" in out
    assert main(["sweep", str(tmp_path / "empty-folder-that-is-not-there.yaml"), "--dry-run"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["sweep", str(tmp_path / "empty"), "--dry-run"]) == 2
    assert "'" + str(tmp_path / "empty") + "' not found" in capsys.readouterr().err


def test_workers_do_not_queue_behind_a_teacher_being_fine_tuned(tmp_path: Path, monkeypatch) -> None:
    """A free worker takes a run whose teacher is cached (or another teacher to fine-tune) rather
    than one that would wait on the lock of the teacher another worker is fine-tuning."""
    from collections import deque

    from geodistill.experiments import _next_run, _teacher_dir, _unbuilt

    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    base = {
        "data": {"name": "rotten_tomatoes", "max_train": 64},
        "teacher": {"name": "minilm-l6", "finetune": True},
    }
    grid = {"seed": [0, 1], "data.split_seed": [0, 1]}
    plan = expand(parse_sweep(sweep_dict(tmp_path, base=base, grid=grid, methods={"kd": METHODS["kd"]})))
    teachers = [_unbuilt(_teacher_dir(run.config)) for run in plan]
    assert all(teachers) and len(set(teachers)) == 2  # one teacher per split, none cached yet
    split0, split1 = teachers[0], next(t for t in teachers if t != teachers[0])
    pending = deque(plan)
    first = _next_run(pending, set())
    assert first is plan[0]
    second = _next_run(pending, {split0})  # the worker of `first` fine-tunes split 0's teacher
    assert _unbuilt(_teacher_dir(second.config)) == split1  # the other split's, in parallel
    assert _next_run(pending, {split0, split1}) is None  # both busy: wait
    Path(split0, "results.json").parent.mkdir(parents=True)
    Path(split0, "results.json").write_text("{}")  # fine-tuned: cached from now on
    assert _unbuilt(_teacher_dir(plan[0].config)) is None
    third = _next_run(pending, {split1})  # split 1 still being fine-tuned: a split-0 run goes
    assert third.values["split_seed"] == 0 and _unbuilt(_teacher_dir(third.config)) is None
    no_teacher = expand(parse_sweep(sweep_dict(tmp_path, grid={"seed": [0]}, methods={"ft": METHODS["ft"]})))
    assert _unbuilt(_teacher_dir(no_teacher[0].config)) is None


def test_a_teacher_to_fine_tune_starts_before_runs_whose_teacher_is_ready(
    tmp_path: Path, monkeypatch
) -> None:
    """Three splits, two workers: when split 0's teacher is done and split 1's is being fine-tuned,
    the free worker starts split 2's fine-tune, not a split-0 run; were split 2's left for the end
    of the queue, the runs after it would all wait on it with the other worker idle."""
    from collections import deque

    from geodistill.experiments import _next_run, _teacher_dir, _unbuilt

    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    base = {
        "data": {"name": "rotten_tomatoes", "max_train": 64},
        "teacher": {"name": "minilm-l6", "finetune": True},
    }
    grid = {"data.split_seed": [0, 1, 2], "seed": [0, 1]}
    plan = expand(parse_sweep(sweep_dict(tmp_path, base=base, grid=grid, methods={"kd": METHODS["kd"]})))
    split = {run.config_hash: run.values["split_seed"] for run in plan}
    assert [split[run.config_hash] for run in plan] == [0, 0, 1, 1, 2, 2]  # the queue, split by split
    teacher = {run.values["split_seed"]: _teacher_dir(run.config) for run in plan}
    assert len(set(teacher.values())) == 3 and all(teacher.values())
    dirs: dict[str, str | None] = {}
    pending = deque(plan)
    assert split[_next_run(pending, set(), dirs).config_hash] == 0  # fine-tunes split 0's teacher
    assert split[_next_run(pending, {teacher[0]}, dirs).config_hash] == 1  # split 1's, beside it
    Path(teacher[0], "results.json").parent.mkdir(parents=True)
    Path(teacher[0], "results.json").write_text("{}")  # split 0's teacher is done; split 1's is not
    nxt = _next_run(pending, {teacher[1]}, dirs)
    assert (
        split[nxt.config_hash] == 2 and _unbuilt(_teacher_dir(nxt.config)) == teacher[2]
    )  # not a split-0 run
    assert split[_next_run(pending, {teacher[1], teacher[2]}, dirs).config_hash] == 0  # ready: goes
    assert [split[run.config_hash] for run in pending] == [1, 2]  # each waits on its teacher's worker
    assert _next_run(pending, {teacher[1], teacher[2]}, dirs) is None
    assert len(dirs) == len(plan)  # every run's teacher directory hashed once, then memoised


def writing_runner(cfg: DistillConfig) -> dict[str, Any]:
    """Leaves what a real run leaves: a best student, a log and a resume checkpoint."""
    out = Path(cfg.output_dir)
    for name in ("best/model.safetensors", "log.jsonl", "checkpoint/state.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    if cfg.train.seed == 1:
        raise RuntimeError("diverged")
    return fake_results(cfg)


def test_finished_runs_drop_their_resume_checkpoint(tmp_path: Path) -> None:
    sweep = parse_sweep(sweep_dict(tmp_path, grid={"seed": [0, 1]}, methods={"kd": METHODS["kd"]}))
    run_sweep(sweep, runner=writing_runner, progress=False, log=lambda _: None)
    ok, failed = (Path(run.config.output_dir) for run in expand(sweep))
    assert (ok / "best" / "model.safetensors").exists() and (ok / "log.jsonl").exists()
    assert not (ok / "checkpoint").exists()
    assert (failed / "checkpoint" / "state.pt").exists()  # a failed run resumes from it
