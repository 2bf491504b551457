"""Trainer invariants on tiny random models built from configs (no downloads).

The teacher never changes, the student does, the loss falls when overfitting one batch,
accumulation is exact (batch 8 x 1 == batch 2 x 4, geometry terms included), an interrupted
and resumed run ends bit-identical to an uninterrupted one, and bad input stops before training
with one line naming the field or file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from geodistill.config import ConfigError, DistillConfig, LossConfig, from_dict, load_config, to_dict
from geodistill.losses import LOSSES
from geodistill.train import TrainingDiverged, setup, train

TEACHER = "teacher_dropout"  # dropout on: the RNG state must resume too


def run(cfg: DistillConfig, **kw):
    r = setup(cfg, progress=False)
    results = train(r, progress=False, **kw)
    return r, results


def run64(cfg: DistillConfig):
    """A run with student, heads and teacher (and its cached outputs) in float64."""
    r = setup(cfg, progress=False)
    r.student.double()
    r.teacher.double()
    if r.teacher_cache is not None:
        r.teacher_cache.logits = r.teacher_cache.logits.double()
        r.teacher_cache.features = {k: v.double() for k, v in r.teacher_cache.features.items()}
    train(r, progress=False)
    return r


class Interrupt(Exception):
    pass


def interrupt(cfg: DistillConfig, at_step: int) -> None:
    """Run ``cfg`` until it reaches ``at_step`` and stop it there, as a kill would."""

    def crash(event: str, state: dict) -> None:
        if state["step"] == at_step:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(cfg, callbacks=[crash])


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cached-teacher", "live-teacher"])
def test_teacher_frozen_student_trained(assets, tmp_path, cache: bool) -> None:
    cfg = make_cfg(
        assets,
        tmp_path / "run",
        f"train.cache_teacher={str(cache).lower()}",
        "losses.2={name: proj_mse, layers: uniform}",
    )
    r = setup(cfg, progress=False)
    teacher_before, student_before = weights(r.teacher), weights(r.student.model)
    results = train(r, progress=False)
    assert all(torch.equal(v, r.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not any(p.requires_grad for p in r.teacher.parameters())
    assert not r.teacher.training  # eval mode: no dropout in its outputs, live or cached
    changed = [k for k, v in weights(r.student.model).items() if not torch.equal(v, student_before[k])]
    assert len(changed) > 0.9 * len(student_before)
    assert results["steps"] == 6 and set(results["test"]) >= {"accuracy"}
    # every term logged on its own
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss/kd", "loss/procrustes", "loss/proj_mse"} <= set(rows[0])


def test_cached_teacher_equals_live_teacher(assets, tmp_path) -> None:
    cfg = make_cfg(assets, tmp_path / "a", "losses.1.pooling=tokens")
    r = setup(cfg, progress=False)
    batch = r.task.collate([r.task.dataset("train")[i] for i in (3, 1, 7)])
    live = r.task.forward(r.teacher, batch, r.objective.teacher_taps(), teacher=True)
    cached = r.teacher_cache.lookup(batch, r.objective.teacher_taps(), torch.device("cpu"))
    assert torch.allclose(live.logits, cached.logits, atol=1e-5)
    for k in live.features:
        assert torch.allclose(live.features[k], cached.features[k], atol=1e-5)


def test_teacher_cache_tells_subsamples_of_a_published_split_apart(assets, tmp_path) -> None:
    """The test data's splits are published, so a subsample's description does not name its
    split_seed: the cache must still give each seed's run its own examples' teacher outputs (it
    gave seed 1 the outputs of seed 0's examples)."""
    runs = [
        setup(
            make_cfg(assets, tmp_path / f"s{seed}", "data.max_train=20", f"data.split_seed={seed}"),
            progress=False,
        )
        for seed in (0, 1)
    ]
    assert runs[0].task.data.description == runs[1].task.data.description  # the words agree
    for r in runs:
        batch = r.task.collate([r.task.dataset("train")[i] for i in range(8)])
        live = r.task.forward(r.teacher, batch, [], teacher=True).logits
        assert torch.allclose(live, r.teacher_cache.lookup(batch, [], torch.device("cpu")).logits, atol=1e-5)


def _cache_holds_live_logits(r) -> bool:
    batch = r.task.collate([r.task.dataset("train")[i] for i in range(8)])
    live = r.task.forward(r.teacher, batch, [], teacher=True).logits
    return torch.allclose(live, r.teacher_cache.lookup(batch, [], torch.device("cpu")).logits, atol=1e-5)


def test_teachers_passed_in_are_cached_by_their_weights(assets, tmp_path) -> None:
    """Two teachers passed in under one config (one teacher.name) are two teachers: the second
    read the first's cached outputs when the key was the config's name."""
    from conftest import tiny_bert

    for i, seed in enumerate((0, 1)):
        r = setup(make_cfg(assets, tmp_path / f"r{i}"), teacher_override=tiny_bert(seed=seed), progress=False)
        assert _cache_holds_live_logits(r)


def test_a_teacher_saved_again_in_place_is_another_teacher(assets, tmp_path) -> None:
    """A local teacher directory rewritten with other weights of the same size, its files' times
    set back, keys neither the teacher-output cache nor the fine-tune cache of the old weights
    (they were keyed by path, size and modification second)."""
    import shutil

    from conftest import tiny_bert
    from geodistill.finetune import finetune_config

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    cfg = make_cfg(assets, tmp_path / "a", f"teacher.name={teacher}")
    assert _cache_holds_live_logits(setup(cfg, progress=False))
    fine_tune_before = finetune_config(cfg).output_dir
    stamps = {f: f.stat() for f in teacher.iterdir()}
    tiny_bert(seed=1).save_pretrained(teacher)
    for f, st in stamps.items():
        assert f.stat().st_size == st.st_size
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = setup(replace(cfg, output_dir=str(tmp_path / "b")), progress=False)
    assert _cache_holds_live_logits(again)
    assert finetune_config(cfg).output_dir != fine_tune_before


@pytest.mark.parametrize(
    "losses",
    [
        "[{name: ce}]",
        "[{name: kd, temperature: 1.0}, {name: procrustes, weight: 1.0, pooling: tokens}]",
        "[{name: kd}, {name: gram, layers: uniform}, {name: cka}]",
    ],
    ids=["ce", "kd+procrustes", "kd+gram+cka"],
)
def test_loss_falls_when_overfitting_one_batch(assets, tmp_path, losses: str) -> None:
    cfg = make_cfg(
        assets,
        tmp_path / "run",
        f"losses={losses}",
        "data.max_eval=8",
        "train.max_steps=40",
        "train.batch_size=40",
        "train.lr=3e-3",
        "train.max_grad_norm=null",
        "train.schedule=constant",
    )
    run(cfg)
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if "loss/" in line
    ]
    keys = [k for k in rows[0] if k.startswith("loss/")]
    for k in keys:
        first, last = rows[0][k], rows[-1][k]
        assert last < 0.5 * first, (k, first, last)


@pytest.mark.parametrize(
    "losses",
    [
        "[{name: ce}, {name: kd, temperature: 2.0}]",
        "[{name: kd, temperature: 2.0}, {name: procrustes, pooling: tokens}, {name: gram}, {name: cka, pooling: mean}, {name: pkd}]",
        # a feature term on every token averages over tokens, not examples: micro-batches with
        # more tokens weigh more
        "[{name: ce}, {name: kd, temperature: 2.0}, {name: pkd, pooling: tokens}, {name: proj_mse, pooling: tokens}]",
    ],
    ids=["per-example terms", "batch-coupled terms", "per-token feature terms"],
)
def test_accumulation_is_exact(assets, tmp_path, losses: str) -> None:
    # float64 so that the comparison is not swamped by Adam amplifying float32 summation-order noise
    common = [f"losses={losses}", "train.max_steps=5", "train.max_grad_norm=1.0"]
    ra = run64(make_cfg(assets, tmp_path / "a", *common, "train.batch_size=8", "train.grad_accum=1"))
    rb = run64(make_cfg(assets, tmp_path / "b", *common, "train.batch_size=2", "train.grad_accum=4"))
    wa, wb = weights(ra.student), weights(rb.student)
    assert all(v.dtype == torch.float64 for v in wa.values() if v.is_floating_point())
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-9, worst
    # and the step really moved the weights (so equality is not vacuous)
    init = weights(setup(make_cfg(assets, tmp_path / "c", *common), progress=False).student)
    assert max((wa[k] - init[k]).abs().max().item() for k in wa) > 1e-3


def test_accumulated_batch_terms_see_the_features_they_train(assets, tmp_path) -> None:
    """With micro-batches, the batch-coupled terms' gradient is taken in a pass without grad and
    fed back in pass 2: that pass must run the student once per micro-batch (not once per tap) and,
    dropout on, see the very features pass 2 recomputes for every tap."""
    cfg = make_cfg(
        assets,
        tmp_path / "run",
        "losses=[{name: kd}, {name: procrustes, pooling: mean}, {name: cka, pooling: cls}]",
        "train.max_steps=1",
        "train.batch_size=4",
        "train.grad_accum=2",
        teacher=TEACHER,
    )
    r = setup(cfg, progress=False)
    assert r.student.model.config.hidden_dropout_prob > 0
    taps = r.objective.coupled_student_taps()
    assert len(taps) == 2
    calls: list[tuple[bool, dict]] = []
    r.student.register_forward_hook(
        lambda mod, args, out: calls.append(
            (torch.is_grad_enabled(), {k: out.features[k].detach().clone() for k in taps})
        )
    )
    train(r, progress=False)
    first = [f for grad, f in calls if not grad][:2]
    second = [f for grad, f in calls if grad]
    assert len(second) == 2 and len([c for c in calls[:4] if not c[0]]) == 2  # 2 + 2 forwards
    for p1, p2 in zip(first, second, strict=True):
        for k in taps:
            assert torch.equal(p1[k], p2[k]), k


def test_resume_is_bit_identical(assets, tmp_path) -> None:
    # dropout on: the RNG state must be restored too, not just the weights
    common = [
        "train.max_steps=9",
        "train.save_every=3",
        "train.eval_every=3",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.log_every=2",  # the step-3 checkpoint falls between log lines: line 4 averages 3 and 4
    ]
    cfg_a = make_cfg(assets, tmp_path / "a", *common, teacher=TEACHER)
    ra, res_a = run(cfg_a)

    cfg_b = make_cfg(assets, tmp_path / "b", *common, teacher=TEACHER)
    interrupt(cfg_b, at_step=5)
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["step"] == 4
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss/kd": 0.2')  # a line a kill cut short
    rb, res_b = run(cfg_b)  # resumes from the step-3 checkpoint
    wa, wb = weights(ra.student), weights(rb.student)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert res_a["dev"] == res_b["dev"] and res_a["best_step"] == res_b["best_step"]
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in rows]  # noqa: E731
    assert strip(log_a) == strip(log_b)


@pytest.mark.parametrize(
    "term, accum",
    [("proj_mse", 1), ("procrustes", 1), ("procrustes", 2)],
    ids=["per-example term", "batch-coupled term", "batch-coupled term, 2 micro-batches"],
)
def test_a_ramped_term_trains_at_its_ramped_weight(assets, tmp_path, term: str, accum: int) -> None:
    """Step 1 of a term with weight 1 and warmup_steps 4 is step 1 at weight 0.25, to the bit (and
    differs from weight 1: the ramp is applied); the log records the ramped weight every step."""
    common = ["train.max_steps=1", "train.batch_size=4", f"train.grad_accum={accum}"]
    losses = lambda extra: f"losses=[{{name: kd}}, {{name: {term}, pooling: mean, {extra}}}]"  # noqa: E731
    ramped = weights(
        run(make_cfg(assets, tmp_path / "r", *common, losses("weight: 1.0, warmup_steps: 4")))[0].student
    )
    quarter = weights(run(make_cfg(assets, tmp_path / "q", *common, losses("weight: 0.25")))[0].student)
    full = weights(run(make_cfg(assets, tmp_path / "f", *common, losses("weight: 1.0")))[0].student)
    assert all(torch.equal(ramped[k], quarter[k]) for k in ramped)
    assert any(not torch.equal(ramped[k], full[k]) for k in ramped)
    run(make_cfg(assets, tmp_path / "log", "train.max_steps=6", losses("weight: 2.0, warmup_steps: 4")))
    log = [json.loads(x) for x in (tmp_path / "log" / "log.jsonl").read_text().splitlines()]  # + eval rows
    assert [row[f"weight/{term}"] for row in log if "lr" in row] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    first = json.loads((tmp_path / "f" / "log.jsonl").read_text().splitlines()[0])
    assert "loss/kd" in first and not any(k.startswith("weight/") for k in first)


def test_a_delayed_term_leaves_kd_alone_until_it_starts(assets, tmp_path) -> None:
    """With start_step: 2 a feature term does not touch the student for 2 steps: the student
    equals plain KD's to the bit after 2 steps and differs after 3; the log records weight 0, 0, 1."""
    kd = "losses=[{name: kd}]"
    late = "losses=[{name: kd}, {name: procrustes, pooling: mean, weight: 1.0, start_step: 2}]"
    for steps, same in ((2, True), (3, False)):
        common = [f"train.max_steps={steps}", "train.batch_size=4"]
        a = weights(run(make_cfg(assets, tmp_path / f"kd{steps}", *common, kd))[0].student.model)
        b = weights(run(make_cfg(assets, tmp_path / f"late{steps}", *common, late))[0].student.model)
        assert all(torch.equal(a[k], b[k]) for k in a) is same, steps
    log = [json.loads(x) for x in (tmp_path / "late3" / "log.jsonl").read_text().splitlines()]
    assert [row["weight/procrustes"] for row in log if "lr" in row] == [0.0, 0.0, 1.0]


PAIRED_METHODS = {
    "ft": "losses=[{name: ce}]",
    "kd": "losses=[{name: kd}]",
    "kd+proj_mse": "losses=[{name: kd}, {name: proj_mse, weight: 0.1}]",
    "kd+procrustes": "losses=[{name: kd}, {name: procrustes, weight: 0.1}]",
    "kd+pkd": "losses=[{name: kd}, {name: pkd, weight: 0.1, layers: uniform}]",
}


def trace_training(cfg: DistillConfig) -> tuple[dict, list, list]:
    """A run's initial student weights, the input ids of every training forward and its dropout masks."""
    r = setup(cfg, progress=False)
    init = weights(r.student.model)
    inputs, masks = [], []
    model = r.student.model

    def seen(module, args, kwargs):
        if module.training:
            inputs.append(kwargs["input_ids"].clone())

    def dropped(module, args, out):
        if module.training:
            masks.append(out == 0)

    model.register_forward_pre_hook(seen, with_kwargs=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(dropped)
    train(r, progress=False)
    return init, inputs, masks


@pytest.mark.parametrize("finetune", [True, False], ids=["finetuned-teacher", "pretrained-teacher"])
def test_same_seed_same_init_data_order_and_dropout_across_methods(
    assets, tmp_path, monkeypatch, finetune
) -> None:
    """Issue 4's pairing: one seed, every method (FT without a teacher too) starts from the same
    student, sees the same batches in the same order and draws the same dropout masks. The teacher is
    a headless encoder with dropout, as MiniLM is: loading it draws a new head from the RNG."""
    import geodistill.finetune as finetune_module
    from conftest import tiny_bert, tiny_tokenizer

    headless = tmp_path / "encoder"
    tiny_bert(dropout=0.1).bert.save_pretrained(headless)
    tiny_tokenizer().save_pretrained(headless)
    # the fine-tune's output: a classifier of the same architecture (a real fine-tune is slow)
    monkeypatch.setattr(finetune_module, "finetuned_teacher", lambda cfg, **kw: assets["teacher_dropout"])
    over = [
        f"teacher.name={headless}",
        f"teacher.finetune={str(finetune).lower()}",
        "train.cache_teacher=false",
    ]
    traces = {
        name: trace_training(make_cfg(assets, tmp_path / name, loss, *over))
        for name, loss in PAIRED_METHODS.items()
    }
    init, inputs, masks = traces["kd"]
    assert len(inputs) == 6 and masks and any(m.any() for m in masks)  # dropout really drops
    assert not all(torch.equal(inputs[0], x) for x in inputs[1:])  # batches differ from step to step
    for name, (w, x, m) in traces.items():
        assert w.keys() == init.keys() and all(torch.equal(w[k], init[k]) for k in init), name
        assert len(x) == len(inputs) and all(torch.equal(a, b) for a, b in zip(x, inputs, strict=True)), name
        assert len(m) == len(masks) and all(torch.equal(a, b) for a, b in zip(m, masks, strict=True)), name
    # a control: another seed gives another init, order and dropout
    w, x, m = trace_training(
        make_cfg(assets, tmp_path / "seed1", PAIRED_METHODS["ft"], *over, "train.seed=1")
    )
    assert not all(torch.equal(w[k], init[k]) for k in init)
    assert not all(torch.equal(a, b) for a, b in zip(x, inputs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(m, masks, strict=True))


def test_saved_student_loads_with_plain_transformers(assets, tmp_path) -> None:
    _, res = run(make_cfg(assets, tmp_path / "run", "losses=[{name: kd}, {name: proj_mse}]"))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(res["student_dir"])
    tok = AutoTokenizer.from_pretrained(res["student_dir"])
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 2
    assert not any("proj" in k for k in model.state_dict())  # training-only heads are not saved
    logits = model(**tok(["w5 w7 w9"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    meta = json.loads((Path(res["student_dir"]) / "geodistill_run.json").read_text())
    assert meta["config"]["losses"][1]["name"] == "proj_mse" and "version" in meta


def test_nan_stops_with_last_good_checkpoint(assets, tmp_path, monkeypatch) -> None:
    import geodistill.losses as L

    spec = L.LOSSES["procrustes"]
    calls = {"n": 0}

    def poisoned(x, y, **kw):
        calls["n"] += 1
        value = spec.fn(x, y, **kw)
        return value * float("nan") if calls["n"] >= 5 else value

    monkeypatch.setitem(L.LOSSES, "procrustes", replace(spec, fn=poisoned))
    cfg = make_cfg(assets, tmp_path / "run", "train.save_every=2", "train.max_steps=8")
    with pytest.raises(TrainingDiverged, match=r"step 5: loss term 'procrustes' is nan.*checkpoint.*step 4"):
        run(cfg)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# bad input stops before training, naming the field or file


def test_unknown_config_key(assets, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.lrate"):
        make_cfg(assets, tmp_path, "train.lrate=0.1")
    with pytest.raises(ConfigError, match=r"losses\[1\]\.temprature|unknown key losses\[1\]\.temprature"):
        make_cfg(assets, tmp_path, "losses.1.temprature=2")


@pytest.mark.parametrize(
    "override, match",
    [
        ("losses.1.name=procrustez", r"losses\[1\]\.name: unknown loss 'procrustez'"),
        ("losses.1.temperature=2.0", r"losses\[1\]\.temperature does not apply to procrustes"),
        (
            "losses.1.layers=[[2, 7]]",
            r"losses\[1\]\.layers\[0\]: teacher layer 7 is out of range: the teacher has 3 layers",
        ),
        ("losses.1.layers=[[5, 1]]", r"student layer 5 is out of range"),
        ("losses.0.temperature=0", r"losses\[0\]\.temperature must be > 0"),
        ("student.num_heads=3", r"student: .*(divis|divide)"),
        (
            "data.max_length=100",
            r"data\.max_length: 100 tokens is more than the student reads \(64, its position embeddings\)",
        ),
    ],
)
def test_bad_objective_stops_before_training(assets, tmp_path, override: str, match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        setup(make_cfg(assets, tmp_path / "run", override), progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_an_unknown_split_is_named(assets, tmp_path) -> None:
    task = setup(make_cfg(assets, tmp_path / "run"), progress=False).student.task
    with pytest.raises(ValueError, match=r"split 'validation': the data has 'train', 'dev', 'test'"):
        task.dataset("validation")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["student.init=pretrained"], r"student\.name: required when student\.init is 'pretrained'"),
        (["student.init=layer_subset"], r"student\.layers: required .*\(e\.g\. \[0, 2, 4\]\)"),
        (["student.init=layer_subset", "student.layers=[0, 7]"], r"student\.layers: .*7"),
    ],
)
def test_bad_student_names_its_field(assets, tmp_path, overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        setup(make_cfg(assets, tmp_path / "run", *overrides), progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def no_finetune(monkeypatch) -> list:
    """Make the teacher's fine-tune fail the test if it runs; returns the calls that reached it."""
    import geodistill.finetune as finetune

    calls: list = []

    def refuse(cfg, **kw):
        calls.append(cfg)
        raise AssertionError("the teacher was fine-tuned before the config was checked")

    monkeypatch.setattr(finetune, "finetuned_teacher", refuse)
    return calls


def other_tokenizer_student(root: Path, extra: str = "w-extra") -> Path:
    """A pretrained 2-layer student whose tokenizer has one more word than the teacher's."""
    from conftest import tiny_bert, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens([extra])
    tiny_bert(layers=2, hidden=16).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["losses.1.layers=[[1, 9]]"], r"^losses\[1\]\.layers\[0\]: teacher layer 9 is out of range"),
        (["losses.1.layers=[[3, 1]]"], r"^losses\[1\]\.layers\[0\]: student layer 3 is out of range"),
        (["student.num_heads=3"], r"^student: hidden_size=16 is not divisible by num_heads=3"),
        (["student.init=layer_subset", "student.layers=[0, 7]"], r"^student\.layers: layer index 7"),
        (["student.init=pretrained"], r"^student\.name: required"),
        (["student.init=pretrained", "student.name=no/such/student"], r"^student\.name: could not load"),
        (["teacher.name=no/such/teacher"], r"^teacher\.name: could not load"),
        (["losses.0.name=kl"], r"^losses\[0\]\.name: unknown loss 'kl'"),
    ],
)
def test_config_errors_stop_before_the_teachers_finetune(
    assets, tmp_path, monkeypatch, overrides: list[str], match: str
) -> None:
    """teacher.finetune=true (the shipped default): the checks run on the teacher's config first."""
    calls = no_finetune(monkeypatch)
    cfg = make_cfg(assets, tmp_path / "run", "teacher.finetune=true", *overrides)
    with pytest.raises(ConfigError, match=match):
        setup(cfg, progress=False)
    assert not calls


def test_tokens_pooling_across_tokenizers_stops_before_the_finetune(assets, tmp_path, monkeypatch) -> None:
    calls = no_finetune(monkeypatch)
    student = other_tokenizer_student(tmp_path / "student")
    over = ["teacher.finetune=true", "student.init=pretrained", f"student.name={student}"]
    with pytest.raises(ConfigError, match=r"^losses\[1\]\.pooling: 'tokens' needs student and teacher"):
        setup(make_cfg(assets, tmp_path / "run", *over, "losses.1.pooling=tokens"), progress=False)
    assert not calls


def test_a_valid_config_reaches_the_finetune_and_uses_its_teacher(assets, tmp_path, monkeypatch) -> None:
    """The control for the tests above: checks that pass lead to the fine-tune, whose teacher is used."""
    import geodistill.finetune as finetune

    calls = []

    def fake(cfg, **kw):
        calls.append(cfg)
        return assets["teacher_dropout"]  # stands in for the fine-tuned teacher

    monkeypatch.setattr(finetune, "finetuned_teacher", fake)
    r = setup(make_cfg(assets, tmp_path / "run", "teacher.finetune=true"), progress=False)
    assert len(calls) == 1 and r.teacher.config.hidden_dropout_prob == 0.1
    # the student is the one built without a fine-tune (the teacher's architecture is all it reads)
    plain = setup(make_cfg(assets, tmp_path / "plain"), progress=False)
    assert all(torch.equal(v, plain.student.state_dict()[k]) for k, v in r.student.state_dict().items())


def test_pretrained_student_with_another_head_names_student_name(assets, tmp_path) -> None:
    from conftest import tiny_bert, tiny_tokenizer

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "three")
    tiny_tokenizer().save_pretrained(tmp_path / "three")
    over = ["student.init=pretrained", f"student.name={tmp_path / 'three'}"]
    with pytest.raises(
        ConfigError, match=r"^student\.name: .*three' has a classification head whose size differs"
    ):
        setup(make_cfg(assets, tmp_path / "run", *over), progress=False)


def test_kd_with_a_passed_in_teacher_of_other_labels(assets, tmp_path) -> None:
    """Students get the task's labels, as loaded and fine-tuned teachers do: only a teacher passed
    in can disagree, and KD between them is refused naming the loss entry."""
    from transformers import BertForSequenceClassification

    other = BertForSequenceClassification.from_pretrained(
        assets["teacher"], num_labels=3, ignore_mismatched_sizes=True
    )
    with pytest.raises(ConfigError, match=r"^losses\[0\] \(kd\): teacher has 3 labels, student 2"):
        setup(make_cfg(assets, tmp_path / "run"), teacher_override=other, progress=False)


def test_out_of_range_sizes_and_an_output_dir_that_is_a_file(assets, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.max_train: must be at least 1, got 0"):
        make_cfg(assets, tmp_path / "run", "data.max_train=0")
    with pytest.raises(ConfigError, match=r"^teacher_train\.grad_accum: must be at least 1, got 0"):
        make_cfg(assets, tmp_path / "run", "teacher_train.grad_accum=0")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^output_dir: .*file is a file"):
        setup(make_cfg(assets, tmp_path / "file"), progress=False)


def test_labels_outside_label_set(assets, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.csv").write_text("text,label\nw5 w6,pos\nw7 w8,neg\n")
    (data / "test.csv").write_text("text,label\nw5 w6,pos\nw9,neutral\n")
    with pytest.raises(ValueError, match=r"test\.csv: row 3: label 'neutral' is outside the label set"):
        setup(make_cfg(assets, tmp_path / "run", f"data.name={data}"), progress=False)
    with pytest.raises(ValueError, match=r"test\.csv: row 3: label 'neutral' is not in label_names"):
        setup(
            make_cfg(assets, tmp_path / "run", f"data.name={data}", "data.label_names=[neg, pos]"),
            progress=False,
        )


@pytest.mark.parametrize(
    "content, match",
    [
        (None, r"missing\.csv"),
        ("", r"empty\.csv"),
        ("text,label\n", r"empty\.csv"),
        ("words,label\nw5,0\n", r"empty\.csv.*text"),
    ],
)
def test_empty_or_unreadable_dataset(assets, tmp_path, content, match) -> None:
    path = tmp_path / ("missing.csv" if content is None else "empty.csv")
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        setup(make_cfg(assets, tmp_path / "run", f"data.name={path}"), progress=False)


def test_output_dir_holding_another_run(assets, tmp_path) -> None:
    run(make_cfg(assets, tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(ConfigError, match=r"output_dir .*run holds another run"):
        setup(make_cfg(assets, tmp_path / "run", "train.max_steps=2"), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        setup(make_cfg(assets, tmp_path / "other"), progress=False)
    # the same config again resumes (here: returns the finished results) instead of failing, also
    # with other threads, device or checkpoint cadence: they say how a run executes, not what it is
    _, res = run(make_cfg(assets, tmp_path / "run", "train.max_steps=1"))
    assert res["steps"] == 1
    _, res = run(
        make_cfg(assets, tmp_path / "run", "train.max_steps=1", "train.threads=1", "train.device=cpu")
    )
    assert res["steps"] == 1
    # a run.json written when the hash still counted something it now leaves out resumes too
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps({**meta, "config_hash": "0123456789ab"}))
    _, res = run(make_cfg(assets, tmp_path / "run", "train.max_steps=1"))
    assert res["steps"] == 1
    with pytest.raises(ConfigError, match=r"holds another run \(config hash 0123456789ab"):
        setup(make_cfg(assets, tmp_path / "run", "train.max_steps=2"), progress=False)


def test_overwrite_deletes_the_old_run_only_once_the_new_config_holds(assets, tmp_path) -> None:
    """overwrite=true replaces another run's directory after every check has passed: a config
    error found only when the models are built (a layer the student lacks) leaves the old run
    whole; it was deleted before the config was read."""
    run(make_cfg(assets, tmp_path / "run", "train.max_steps=1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert "run.json" in before
    bad = make_cfg(
        assets, tmp_path / "run", "train.max_steps=2", "overwrite=true", "losses.1.layers=[[3, 1]]"
    )
    with pytest.raises(ConfigError, match=r"^losses\[1\]\.layers\[0\]: student layer 3 is out of range"):
        setup(bad, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    _, res = run(make_cfg(assets, tmp_path / "run", "train.max_steps=2", "overwrite=true"))
    assert res["steps"] == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["train"]["max_steps"] == 2


def test_select_metric_is_checked_before_training(assets, tmp_path) -> None:
    """A select_metric the task does not compute stops setup, naming the key (it stopped the run at
    its first evaluation, eval_every steps in); the names setup checks are those dev returns."""
    with pytest.raises(
        ConfigError, match=r"^train\.select_metric: 'rouge' is not among the dev metrics \['accuracy'"
    ):
        setup(make_cfg(assets, tmp_path / "run", "train.select_metric=rouge"), progress=False)
    assert not (tmp_path / "run").exists()
    r = setup(make_cfg(assets, tmp_path / "ok", "train.select_metric=f1"), progress=False)
    dev = r.task.evaluate(r.student.model, "dev", batch_size=16, device=torch.device("cpu"))
    assert set(dev) == set(r.task.dev_metrics)


def test_a_classification_teacher_refuses_another_dtype(assets, tmp_path) -> None:
    """teacher.dtype casts instruction teachers only: a classification run asked for bfloat16 stops
    naming the key (it ran in float32 and said nothing)."""
    with pytest.raises(ConfigError, match=r"^teacher\.dtype: bfloat16 applies to instruction teachers only"):
        setup(make_cfg(assets, tmp_path / "run", "teacher.dtype=bfloat16"), progress=False)


def test_the_logged_lr_is_the_one_each_step_used(assets, tmp_path) -> None:
    """Warm-up then linear decay: step s (1-based) runs at lr * factor(s - 1); the log gave the
    next step's rate (step 1 of a 6-step run without warm-up showed 5/6 of lr)."""
    run(make_cfg(assets, tmp_path / "run", "train.max_steps=6", "train.warmup_ratio=0.34"))  # 2 warm-up steps
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"lr"' in x]
    factors = [1 / 3, 2 / 3, 1.0, 3 / 4, 2 / 4, 1 / 4]  # (s + 1) / 3 warming up, then 1 - (s - 2) / 4
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in factors])


def test_identity_hash_ignores_only_execution_fields(assets, tmp_path) -> None:
    from geodistill.config import config_hash, identity_hash
    from geodistill.finetune import finetune_config

    cfg = make_cfg(assets, tmp_path / "run")
    # fields at their defaults: the plain hash of the config as it was before they existed
    before = to_dict(cfg)
    later = {
        "group_by_length": True,
        "fused_optimizer": True,
        "polar": "newton-schulz",
        "compile_polar": True,
    }
    for section in ("train", "teacher_train"):
        for name in later:
            del before[section][name]
    for loss in before["losses"]:
        del loss["warmup_steps"], loss["start_step"]  # a term's weight schedule, added later
    assert identity_hash(cfg) == config_hash(before)
    for name, value in later.items():  # a later field that is used changes the run
        assert identity_hash(replace(cfg, train=replace(cfg.train, **{name: value}))) != identity_hash(cfg)
    how = replace(
        cfg,
        train=replace(cfg.train, threads=1, device="cpu", parallel="fsdp", save_every=2, num_workers=2),
        teacher_train=replace(cfg.teacher_train, threads=4),
        teacher=replace(cfg.teacher, shard=True),
    )
    assert config_hash(how) != config_hash(cfg) and identity_hash(how) == identity_hash(cfg)
    assert finetune_config(how).output_dir == finetune_config(cfg).output_dir  # the cached teacher is reused
    for what in (
        replace(cfg, train=replace(cfg.train, lr=2e-3)),
        replace(cfg, train=replace(cfg.train, seed=1)),
        replace(cfg, train=replace(cfg.train, log_every=5)),
        replace(cfg, teacher=replace(cfg.teacher, dtype="bfloat16")),
        replace(cfg, data=replace(cfg.data, max_length=8)),
    ):
        assert identity_hash(what) != identity_hash(cfg)
    assert finetune_config(replace(cfg, teacher_train=replace(cfg.teacher_train, lr=1.0))).output_dir != (
        finetune_config(cfg).output_dir
    )


def test_identity_hash_unsets_loss_options_at_their_default() -> None:
    """A loss option spelled out at its default hashes as the option left out (the same run); any
    other value, or a value that only compares equal (0 for False), is another run; under
    task: instruction a feature term's default pooling is tokens, not cls."""
    from geodistill.config import LOSS_OPTIONS, identity_hash, loss_defaults

    def cfg(*losses: LossConfig, task: str = "classification") -> DistillConfig:
        return DistillConfig(task=task, losses=(LossConfig(name="kd", temperature=2.0), *losses))

    plain = cfg(LossConfig(name="procrustes", weight=0.1))
    spelled = cfg(
        LossConfig(name="procrustes", weight=0.1, layers="last", pooling="cls", scope="global", angular=False)
    )
    assert identity_hash(spelled) == identity_hash(plain)
    # a weight warm-up of 0 is no warm-up: the hash of every run recorded before the field existed
    assert identity_hash(cfg(LossConfig(name="procrustes", weight=0.1, warmup_steps=0))) == identity_hash(
        plain
    )
    assert identity_hash(cfg(LossConfig(name="procrustes", weight=0.1, warmup_steps=150))) != identity_hash(
        plain
    )
    assert identity_hash(cfg(LossConfig(name="procrustes", weight=0.1, start_step=0))) == identity_hash(plain)
    assert identity_hash(cfg(LossConfig(name="procrustes", weight=0.1, start_step=150))) != identity_hash(
        plain
    )
    assert identity_hash(cfg(LossConfig(name="kd", temperature=1))) == identity_hash(
        cfg(LossConfig(name="kd"))
    )
    for other in (
        LossConfig(name="procrustes", weight=0.1, pooling="mean"),
        LossConfig(name="procrustes", weight=0.1, layers="uniform"),
        LossConfig(name="procrustes", weight=0.1, layers=[[4, 6]]),
        LossConfig(name="procrustes", weight=0.1, angular=True),
        LossConfig(name="procrustes", weight=0.2),
        LossConfig(name="pkd", weight=0.1, layers="last"),  # last is the default of the other feature terms
    ):
        assert identity_hash(cfg(other)) != identity_hash(plain), other
    assert identity_hash(cfg(LossConfig(name="procrustes", angular=0))) != identity_hash(  # type: ignore[arg-type]
        cfg(LossConfig(name="procrustes"))
    )
    inst = cfg(LossConfig(name="cka", pooling="tokens"), task="instruction")
    assert identity_hash(inst) == identity_hash(cfg(LossConfig(name="cka"), task="instruction"))
    assert identity_hash(cfg(LossConfig(name="cka", pooling="cls"), task="instruction")) != identity_hash(
        inst
    )
    assert (
        loss_defaults("gram", "instruction")["pooling"] == "tokens"
        and loss_defaults("gram")["pooling"] == "cls"
    )
    assert {name: spec.options for name, spec in LOSSES.items()} == LOSS_OPTIONS  # one table of defaults


def test_every_shipped_config_loads() -> None:
    """Run configs load strictly and round-trip; sweep configs load and expand (both plain and --quick)."""
    from geodistill.cli import CONFIG_DIR, shipped_configs
    from geodistill.config import read_yaml
    from geodistill.experiments import expand, load_sweep

    names = shipped_configs()
    assert {"demo", "instruct/quick", "experiments/alpha"} <= set(names)
    for name in names:
        path = CONFIG_DIR / f"{name}.yaml"
        if "methods" in read_yaml(path):
            sweep = load_sweep(path)
            assert len(expand(sweep)) > len(expand(sweep, quick=True)) > 0, name
        else:
            cfg = load_config(DistillConfig, path)
            assert to_dict(from_dict(DistillConfig, to_dict(cfg))) == to_dict(cfg), name


@pytest.mark.parametrize(
    ("name", "runs", "finished"),
    [
        ("main", 210, 210),
        ("tokens", 120, 120),
        ("layers_tokens", 120, 120),
        ("layers_tokens_terms", 210, 210),
        ("layers_cls", 120, 120),
        ("layers_mean", 150, 150),
        ("layers_grid", 840, 840),
        ("tokens_dev", 150, 150),
        ("tokens_alpha_splits", 300, 300),
        ("tokens_gram_alpha", 150, 150),
        ("tokens_alpha_high", 480, 480),
        ("tokens_mse", 390, 390),
        ("tokens_mse_low", 120, 120),
        ("tokens_mse_warmup", 90, 90),
        ("tokens_mse_delay", 120, 120),
        ("student_geometry", 40, 40),
        ("ce_tokens", 240, 240),
        ("ce_layers_tokens", 240, 240),
        ("ce_geometry", 50, 50),
        ("subset_geometry", 60, 60),
        ("subset_ce_layers", 240, 240),
        ("cls_alpha", 52, 52),
        ("subset", 210, 210),
        ("subset_tokens", 120, 120),
        ("subset_layers", 240, 240),
        ("subset_layers_cls", 120, 120),
        ("tasks", 420, 420),
        ("tokens_multiemo", 120, 120),
        ("tokens_r8", 120, 120),
        ("layers_tasks", 240, 240),
        ("subset_tasks", 240, 180),
        ("layers_cls_tasks", 240, 240),
        ("layers_tokens_alpha", 44, 44),
        ("subset_layers_alpha", 64, 64),
        ("subset_r8", 390, 390),
        ("subset_r8_cells", 150, 150),
        ("ce", 180, 180),
    ],
)
def test_shipped_results_keep_their_identity(name: str, runs: int, finished: int) -> None:
    """Every row of a committed table is a run its sweep file plans (by config hash: nothing
    reruns), one row each; every planned run has its row, or for a table still growing the stated
    number do."""
    from geodistill.cli import CONFIG_DIR
    from geodistill.experiments import expand, load_sweep, read_rows

    root = Path(__file__).resolve().parents[1]
    plan = {run.config_hash for run in expand(load_sweep(CONFIG_DIR / "experiments" / f"{name}.yaml"))}
    rows = read_rows(root / "experiments" / name / "results.jsonl")
    assert all(r["status"] == "ok" for r in rows) and len({r["run_id"] for r in rows}) == len(rows)
    assert len(plan) == runs and {r["config_hash"] for r in rows} <= plan and len(rows) == finished


def test_student_geometry_reruns_reproduce_their_committed_rows() -> None:
    """experiments/student_geometry re-trained 40 committed runs of tokens_alpha_high (same config
    hashes) on another machine and day, for their checkpoints: every test accuracy is the committed
    one to the last digit; dev differs by at most one sentence (two KD runs)."""
    from geodistill.experiments import read_rows

    root = Path(__file__).resolve().parents[1] / "experiments"
    old = {r["config_hash"]: r for r in read_rows(root / "tokens_alpha_high" / "results.jsonl")}
    new = read_rows(root / "student_geometry" / "results.jsonl")
    assert len(new) == 40 and all(r["config_hash"] in old for r in new)
    assert all(r["test.accuracy"] == old[r["config_hash"]]["test.accuracy"] for r in new)
    dev = [abs(r["dev.accuracy"] - old[r["config_hash"]]["dev.accuracy"]) for r in new]
    assert max(dev) < 1 / 1200 and sum(d > 0 for d in dev) == 2


def test_ce_geometry_reruns_reproduce_their_committed_rows() -> None:
    """experiments/ce_geometry re-trained ce's 10 CE + KD runs of split 0 (same config hashes), on
    another machine and day, measuring each against its teacher as it ended: test and dev accuracy
    are the committed ones to the last digit, and each row carries its measures."""
    from geodistill.experiments import read_rows

    root = Path(__file__).resolve().parents[1] / "experiments"
    old = {r["config_hash"]: r for r in read_rows(root / "ce" / "results.jsonl")}
    new = [r for r in read_rows(root / "ce_geometry" / "results.jsonl") if not r.get("reused_from")]
    assert len(new) == 10 and all(r["method"] == "ce+kd" and r["config_hash"] in old for r in new)
    for r in new:
        assert (r["test.accuracy"], r["dev.accuracy"]) == (
            old[r["config_hash"]]["test.accuracy"],
            old[r["config_hash"]]["dev.accuracy"],
        )
        assert r["geometry"]["samples"] == 6692 and 0 < r["test.teacher_cka"] < 1


def test_subset_geometry_kd_reruns_reproduce_their_committed_rows() -> None:
    """experiments/subset_geometry re-trained subset's 10 KD runs of split 0 (same config hashes) on
    another machine and day, measuring each as it ended: test accuracy is the committed one to the
    last digit in all 10, dev in 9 (the tenth moved by one of its ~1,270 sentences), and each row
    carries its measures."""
    from geodistill.experiments import read_rows

    root = Path(__file__).resolve().parents[1] / "experiments"
    old = {r["config_hash"]: r for r in read_rows(root / "subset" / "results.jsonl")}
    new = [r for r in read_rows(root / "subset_geometry" / "results.jsonl") if not r.get("reused_from")]
    assert len(new) == 10 and all(r["method"] == "kd" and r["config_hash"] in old for r in new)
    assert all(r["test.accuracy"] == old[r["config_hash"]]["test.accuracy"] for r in new)
    dev = [abs(r["dev.accuracy"] - old[r["config_hash"]]["dev.accuracy"]) for r in new]
    assert sum(d == 0 for d in dev) == 9 and max(dev) < 1 / 1200
    assert all(r["geometry"]["samples"] == 6692 and 0 < r["test.teacher_cka"] < 1 for r in new)


def test_git_revision_says_when_the_package_is_uncommitted(tmp_path, monkeypatch) -> None:
    """A run's git_revision is the commit, with -dirty when the package's tracked files differ
    from it; other files of the repository and untracked ones do not count; no repository: None."""
    import subprocess

    from geodistill.train import _git_revision

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above counts

    def git(*args: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        return subprocess.run(
            ["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "train.py").write_text("x = 1\n")
    (tmp_path / "results.jsonl").write_text("{}\n")
    assert _git_revision(pkg) is None  # not a repository yet
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short", "HEAD")
    assert _git_revision(pkg) == head
    (tmp_path / "results.jsonl").write_text("{}\n{}\n")  # a result changed: still the commit
    (pkg / "new.py").write_text("")  # an untracked file: still the commit
    assert _git_revision(pkg) == head
    (pkg / "train.py").write_text("x = 2\n")
    assert _git_revision(pkg) == f"{head}-dirty"


def test_length_grouped_batches() -> None:
    from geodistill.train import EpochSampler, ShardedBatches, length_grouped

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 64, (1000,), generator=gen).tolist()
    order = torch.randperm(1000, generator=gen).tolist()
    batches = length_grouped(order, lengths, 8, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and all(len(b) == 8 for b in batches)  # each example once
    assert batches == length_grouped(order, lengths, 8, seed=3, epoch=0)  # a pure function: resumable
    assert batches != length_grouped(order, lengths, 8, seed=3, epoch=1)
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    plain = sum(8 * max(lengths[i] for i in order[j : j + 8]) for j in range(0, 1000, 8))
    real = sum(lengths)
    assert padded - real < 0.25 * (plain - real)  # most of the padding is gone
    # through the sampler: epochs differ, and two ranks x batch 8 split one process's batches of 16
    # (the groups are formed at the global batch size), the last, short one (1000 = 62 x 16 + 8) too
    one = ShardedBatches(EpochSampler(1000, 5), 16, lengths=lengths)
    ranks = [ShardedBatches(EpochSampler(1000, 5), 8, r, 2, lengths=lengths) for r in (0, 1)]
    firsts = []
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        single, r0, r1 = list(one), list(ranks[0]), list(ranks[1])
        assert len(single) == len(one) == 63 and len(r0) == len(ranks[0]) == len(r1) == 63
        assert [a + b for a, b in zip(r0, r1, strict=True)] == single
        assert sorted(len(b) for b in r0 + r1)[:2] == [4, 4]  # the short batch, halved
        firsts.append(single[0])
    assert firsts[0] != firsts[1]
    # 3 ranks: a global batch that cannot give each rank an example is dropped, and len() says so
    three = [ShardedBatches(EpochSampler(50, 1), 8, r, 3, lengths=lengths[:50]) for r in range(3)]
    assert all(len(list(s)) == len(s) == 2 for s in three)  # 50 = 2 x 24 + 2: the 2 are dropped


def test_group_by_length_trains_and_resumes(assets, tmp_path) -> None:
    common = ["train.max_steps=6", "train.save_every=2", "train.eval_every=2", "train.batch_size=4"]
    common += ["train.group_by_length=true", "losses.1.pooling=tokens"]
    ra, res_a = run(make_cfg(assets, tmp_path / "a", *common, teacher=TEACHER))
    cfg_b = make_cfg(assets, tmp_path / "b", *common, teacher=TEACHER)
    interrupt(cfg_b, at_step=3)
    rb, res_b = run(cfg_b)
    wa, wb = weights(ra.student), weights(rb.student)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and res_a["dev"] == res_b["dev"]
    plain, _ = run(make_cfg(assets, tmp_path / "c", *common[:-2], "losses.1.pooling=tokens", teacher=TEACHER))
    assert any(not torch.equal(v, weights(plain.student)[k]) for k, v in wa.items())  # a different order


def test_one_teacher_pass_serves_every_pooled_tap(assets, tmp_path, monkeypatch) -> None:
    """KD, CLS and mean terms on any layers share one cached teacher pass; token taps get their own."""
    import geodistill.train as train_module

    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "teacher_outputs"
    variants = [
        "losses=[{name: kd}]",
        "losses=[{name: kd}, {name: procrustes, layers: last, pooling: cls}]",
        "losses=[{name: kd}, {name: gram, layers: uniform, pooling: mean}]",
    ]
    runs = [setup(make_cfg(assets, tmp_path / f"r{i}", v), progress=False) for i, v in enumerate(variants)]
    assert len(list(cache.glob("*.pt"))) == 1
    batch = runs[2].task.collate([runs[2].task.dataset("train")[i] for i in (0, 5)])
    taps = runs[2].objective.teacher_taps()
    live = runs[2].task.forward(runs[2].teacher, batch, taps, teacher=True)
    cached = runs[0].teacher_cache.lookup(batch, taps, torch.device("cpu"))  # built by the KD-only run
    assert all(torch.allclose(live.features[t], cached.features[t], atol=1e-5) for t in taps)
    setup(make_cfg(assets, tmp_path / "tok", "losses.1.pooling=tokens"), progress=False)
    assert len(list(cache.glob("*.pt"))) == 2
    # over the budget: only the requested taps are kept
    monkeypatch.setattr(train_module, "POOLED_CACHE_BYTES", 0)
    small = train_module.cached_taps([(2, "cls")], runs[0].teacher, 100)
    assert small == [(2, "cls")]
    monkeypatch.undo()
    n = runs[0].teacher.config.num_hidden_layers + 1
    assert len(train_module.cached_taps([(2, "cls")], runs[0].teacher, 100)) == 2 * n


def _setup_slowly(cfg: DistillConfig, out, start) -> None:
    """In a fresh process: set a run up with a slow teacher pass; report how many teacher caches
    this process computed and wrote, and the logits it ended up with."""
    import time

    import geodistill.tasks as tasks

    forward, save, saved = tasks.ClassificationTask.forward, tasks.TeacherCache.save, []

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.2)
        return forward(self, *args, **kwargs)

    def counted_save(self, path: Path) -> None:
        saved.append(path)
        save(self, path)

    tasks.ClassificationTask.forward, tasks.TeacherCache.save = slow_forward, counted_save
    start.wait()  # every process is imported and ready: set up together
    try:
        r = setup(cfg, progress=False)
        out.put((len(saved), r.teacher_cache.logits.tolist()))  # plain data: the child exits
    except Exception as e:  # the parent fails the test with it
        out.put((repr(e), None))


def test_concurrent_runs_compute_the_teacher_cache_once(assets, tmp_path, monkeypatch) -> None:
    """A sweep's workers start runs of one teacher together on a fresh cache: one process computes
    the teacher's outputs, the others wait and read them (they raced on one temporary file)."""
    import multiprocessing

    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))  # inherited by the children
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    cfgs = [make_cfg(assets, tmp_path / f"r{i}", "losses.1.pooling=tokens") for i in range(3)]
    start = ctx.Barrier(len(cfgs))
    procs = [ctx.Process(target=_setup_slowly, args=(cfg, out, start)) for cfg in cfgs]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(n, int) for n, _ in results), results
    assert sorted(n for n, _ in results) == [0, 0, 1]
    assert all(logits == results[0][1] for _, logits in results)
    files = sorted(p.name for p in (tmp_path / "cache" / "teacher_outputs").iterdir())
    assert len(files) == 2 and files[0].endswith(".pt") and files[1].endswith(".pt.lock"), files


def test_optimizer_implementations() -> None:
    """foreach AdamW (the default here) is torch's per-tensor CPU AdamW bit for bit; fused AdamW
    (train.fused_optimizer) agrees to float rounding."""
    from geodistill.config import TrainConfig
    from geodistill.train import _optimizer

    def steps(**cfg) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3))
        reference = cfg.pop("reference", False)
        opt = _optimizer(net, TrainConfig(lr=1e-2, **cfg))
        if reference:
            for group in opt.param_groups:
                group["foreach"] = False  # torch's own default on a CPU
        for _ in range(5):
            net(torch.randint(0, 50, (4, 6))).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return weights(net)

    reference, foreach, fused = steps(reference=True), steps(), steps(fused_optimizer=True)
    assert all(torch.equal(reference[k], foreach[k]) for k in reference)
    assert all(torch.allclose(reference[k], fused[k], rtol=1e-5, atol=1e-6) for k in reference)
    # the fused kernel is the one selected (whether it rounds differently from the per-tensor loop
    # depends on the CPU: it did on an AMD EPYC, it agreed to the last bit on an Intel Xeon)
    opt = _optimizer(torch.nn.Linear(2, 2), TrainConfig(fused_optimizer=True))
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)


def test_polar_method_of_the_config_applies_during_training(assets, tmp_path) -> None:
    """train.polar / train.compile_polar choose geometry's route for the whole run (and only it)."""
    from typing import get_args, get_type_hints

    from geodistill import geometry
    from geodistill.config import TrainConfig

    assert get_args(get_type_hints(TrainConfig)["polar"]) == geometry.POLAR_METHODS
    seen = []
    cfg = make_cfg(
        assets, tmp_path / "run", "train.max_steps=2", "train.polar=eigh", "train.compile_polar=true"
    )

    def record(event: str, state: dict) -> None:
        seen.append(dict(geometry._POLAR))

    run(cfg, callbacks=[record])
    assert seen and all(p == {"method": "eigh", "compile": True} for p in seen)
    assert geometry._POLAR == {"method": "auto", "compile": False}
    with pytest.raises(ConfigError, match=r"train\.polar"):
        make_cfg(assets, tmp_path / "bad", "train.polar=svd")


def test_evaluation_in_length_order_and_best_dev_kept(assets, tmp_path) -> None:
    """Evaluation batches examples of similar length: the metrics are those of one example at a
    time; the results' dev metrics are the ones measured when the best student was selected."""
    from geodistill.evaluate import classification_metrics
    from geodistill.tasks import _model_inputs

    r, res = run(make_cfg(assets, tmp_path / "run", "train.max_steps=4", "train.eval_every=2"))
    lengths = r.task.lengths("dev")
    assert len(set(lengths)) > 3  # otherwise the order would not matter
    model = r.student.model.eval()
    ds = r.task.dataset("dev")
    with torch.no_grad():
        # a tiny student may answer one class everywhere: move its threshold into the widest gap
        # between the middle half of its margins (away from ties that padding could flip)
        logits = [model(**_model_inputs(r.task.collate([row]))).logits[0] for row in ds]
        d = torch.stack([x[1] - x[0] for x in logits]).sort().values
        lo = len(d) // 4
        k = lo + int((d[lo + 1 : len(d) - lo] - d[lo : len(d) - lo - 1]).argmax())
        model.classifier.bias[1] -= (d[k] + d[k + 1]) / 2
        preds = [int(model(**_model_inputs(r.task.collate([row]))).logits.argmax(-1)) for row in ds]
    labels = [row["labels"] for row in ds]
    top = max(preds.count(c) for c in set(preds)) / len(preds)
    assert r.task.evaluate(model, "dev", batch_size=3, device=torch.device("cpu")) == {
        **classification_metrics(preds, labels, r.task.data.metrics),
        "top_class_share": top,
    }
    assert 0.5 <= top < 1.0
    # a classifier that answers one class whatever the input has a share of 1 (what reports flag)
    for c in (0, 1):
        with torch.no_grad():
            model.classifier.bias.copy_(torch.tensor([1e6 * (c == 0), 1e6 * (c == 1)]))
        collapsed = r.task.evaluate(model, "dev", batch_size=3, device=torch.device("cpu"))
        assert collapsed["top_class_share"] == 1.0
        assert collapsed["accuracy"] == sum(y == c for y in labels) / len(labels)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    at_best = next(row for row in logged if row["step"] == res["best_step"] and "dev/accuracy" in row)
    assert res["dev"] == {k[len("dev/") :]: v for k, v in at_best.items() if k.startswith("dev/")}


def test_last_step_metrics_kept_beside_the_selected_ones(assets, tmp_path) -> None:
    """results["last"] holds the last step's dev and test metrics: measured on the final student
    when dev selected an earlier step, the selected student's own when the last step won."""
    from transformers import AutoModelForSequenceClassification

    r = setup(make_cfg(assets, tmp_path / "early", "train.max_steps=4", "train.eval_every=2"), progress=False)
    evaluate, calls = r.task.evaluate, []

    def falling_dev(model, split, **kw):  # dev accuracy falls at every evaluation: step 2 is selected
        calls.append((split, model))
        out = evaluate(model, split, **kw)
        return {**out, "accuracy": 1.0 / len(calls)} if split == "dev" else out

    r.task.evaluate = falling_dev
    res = train(r, progress=False)
    cpu = torch.device("cpu")
    best = AutoModelForSequenceClassification.from_pretrained(tmp_path / "early" / "best")
    assert (res["best_step"], res["steps"], res["last"]["step"]) == (2, 4, 4)
    assert ("test", r.student.model) in calls  # the final student, not only the selected one
    assert res["last"]["test"] == evaluate(r.student.model, "test", batch_size=8, device=cpu)
    assert res["test"] == evaluate(best, "test", batch_size=8, device=cpu)
    assert res["last"]["dev"]["accuracy"] == 1.0 / 2 and res["dev"]["accuracy"] == 1.0

    r, res = run(make_cfg(assets, tmp_path / "late", "train.max_steps=2", "train.eval_every=2"))
    assert res["best_step"] == res["last"]["step"] == 2
    assert res["last"] == {"step": 2, "dev": res["dev"], "test": res["test"]}


# ----------------------------------------------------------------------------------------------
# mixed precision


def test_bf16_autocast_on_a_cpu_trains_with_accumulation(assets, tmp_path) -> None:
    """train.mixed_precision=bf16 runs the student under bfloat16 autocast (also on a CPU); the losses
    are computed in float32 and stay finite through accumulation and the gradient-cache pass. The
    process trained in float32 before (as after a teacher's fine-tune): Accelerate lets it switch."""
    from geodistill.config import TrainConfig
    from geodistill.train import _accelerator

    _accelerator(TrainConfig(device="cpu", mixed_precision="no"))
    cfg = make_cfg(
        assets,
        tmp_path / "run",
        "train.mixed_precision=bf16",
        "train.device=cpu",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=2",
    )
    r = setup(cfg, progress=False)
    forward, dtypes = r.task.forward, set()

    def recorded(model, batch, taps, **kw):
        out = forward(model, batch, taps, **kw)
        dtypes.add(out.logits.dtype)
        return out

    r.task.forward = recorded
    results = train(r, progress=False)
    assert torch.bfloat16 in dtypes  # autocast really was on
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss/")]
    assert results["steps"] == 3 and len(losses) == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)


KD = LOSSES["kd"]  # as shipped (the tests below patch the registry)


class Blow(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: an fp16 overflow, made to order."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflow_at(monkeypatch, steps: set[int] | None) -> None:
    """KD's gradient overflows on the optimiser steps in ``steps`` (all when None); its value stays finite."""
    import geodistill.losses as L

    spec, calls = KD, {"n": 0}

    def kd(s, t, **kw):
        calls["n"] += 1  # one call per step (no accumulation)
        return spec.fn(Blow.apply(s) if steps is None or calls["n"] in steps else s, t, **kw)

    monkeypatch.setitem(L.LOSSES, "kd", replace(spec, fn=kd))


def scaled_accelerators(monkeypatch, cuda: bool) -> list:
    """Every Accelerator the trainer makes, recorded; on a CPU a float32 one with a real GradScaler
    attached, unscaling as Accelerate does under fp16 on a GPU (the trainer's fp16 path, no GPU)."""
    import geodistill.train as T

    made, real = [], T._accelerator

    def make(cfg):
        if cuda:
            made.append(real(cfg))
            return made[-1]
        acc = real(replace(cfg, mixed_precision="no"))
        acc.scaler = torch.amp.GradScaler(
            "cpu", init_scale=2.0**8
        )  # before prepare(): its optimizer steps with it

        def unscale_gradients(optimizer=None) -> None:
            for opt in acc._optimizers:
                acc.scaler.unscale_(opt.optimizer)

        acc.unscale_gradients = unscale_gradients
        made.append(acc)
        return acc

    monkeypatch.setattr(T, "_accelerator", make)
    return made


@pytest.mark.parametrize(
    "cuda",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA")),
    ],
    ids=["cpu-grad-scaler", "cuda-fp16"],
)
def test_fp16_overflow_is_skipped_by_the_grad_scaler(assets, tmp_path, monkeypatch, cuda: bool) -> None:
    """An overflowing step is skipped and the loss scale halved; training goes on (no divergence),
    and the scale reached is checkpointed and restored on resume."""
    made = scaled_accelerators(monkeypatch, cuda)
    overflow_at(monkeypatch, {3})
    common = ["train.mixed_precision=fp16", "train.max_steps=6", "train.save_every=2", "train.eval_every=6"]
    common += [f"train.device={'cuda' if cuda else 'cpu'}"]
    r = setup(make_cfg(assets, tmp_path / "run", *common), progress=False)
    seen = []

    def record(event: str, state: dict) -> None:
        seen.append((made[-1].scaler.get_scale(), weights(r.student.model)))

    results = train(r, callbacks=[record], progress=False)
    assert made[-1].scaler is not None and results["steps"] == 6
    scales = [scale for scale, _ in seen]
    assert scales[2] == scales[1] / 2 and scales[3:] == [scales[2]] * 3  # halved once, at step 3
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for (_, a), (_, b) in itertools.pairwise(seen)]
    assert moved == [True, False, True, True, True]  # step 3 (seen[1] -> seen[2]) changed nothing
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    overflowed = [not math.isfinite(row["grad_norm"]) for row in log if "grad_norm" in row]
    assert overflowed == [False, False, True, False, False, False]
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == scales[-1]

    # interrupted after step 4 (checkpoint with the halved scale) and resumed: the scale is restored
    cfg_b = make_cfg(assets, tmp_path / "b", *common)
    overflow_at(monkeypatch, {3})
    interrupt(cfg_b, at_step=5)
    overflow_at(monkeypatch, set())
    rb, _ = run(cfg_b)
    assert made[-1].scaler.get_scale() == scales[-1]
    assert all(torch.equal(v, seen[-1][1][k]) for k, v in weights(rb.student.model).items())


def test_persistent_overflow_is_divergence(assets, tmp_path, monkeypatch) -> None:
    import geodistill.train as T

    made = scaled_accelerators(monkeypatch, cuda=False)
    overflow_at(monkeypatch, None)
    monkeypatch.setattr(T, "MAX_OVERFLOW_STEPS", 3)
    cfg = make_cfg(
        assets, tmp_path / "run", "train.mixed_precision=fp16", "train.save_every=1", "train.device=cpu"
    )
    with pytest.raises(
        TrainingDiverged,
        match=r"step 3: gradient norm is (inf|nan) for 3 steps in a row \(fp16 loss scale now 32\)",
    ):
        run(cfg)
    assert made[-1].scaler.get_scale() == 2.0**8 / 2**3
    # without a grad scaler (float32) the first non-finite gradient stops the run
    monkeypatch.undo()
    overflow_at(monkeypatch, {2})
    with pytest.raises(TrainingDiverged, match=r"step 2: gradient norm is (inf|nan); .*step 1"):
        run(make_cfg(assets, tmp_path / "fp32", "train.save_every=1"))


# ----------------------------------------------------------------------------------------------
# the saved student, in a process that never imports geodistill


def test_trained_student_loads_in_a_fresh_process_without_geodistill(assets, tmp_path) -> None:
    """The best student of a run with projection heads (proj_mse and pkd) is a plain transformers
    directory: it loads in `python -I` with transformers alone, holds no head, and computes what
    the trainer's student computed."""
    import subprocess
    import sys
    import textwrap

    cfg = make_cfg(
        assets,
        tmp_path / "run",
        "losses=[{name: kd}, {name: proj_mse, layers: uniform}, {name: pkd}]",
        "train.max_steps=2",
    )
    r, res = run(cfg)
    assert res["best_step"] == 2 and len(r.student.projectors) == 2 + 2  # heads were trained
    best = Path(res["student_dir"])
    ids = r.task.collate([r.task.dataset("dev")[i] for i in range(4)])
    inputs = {k: ids[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in ids}
    with torch.no_grad():
        expected = r.student.model.eval()(**inputs).logits
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors import safe_open
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        best = {str(best)!r}
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForSequenceClassification.from_pretrained(best).eval()
        tok = AutoTokenizer.from_pretrained(best)
        with safe_open(best + "/model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and not any("projector" in k for k in keys), keys
        assert set(keys) <= set(model.state_dict()), set(keys) - set(model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(**ref["inputs"]).logits, ref["expected"])
        assert tok("w5 w7").input_ids[1:3] == [9, 11], tok("w5 w7").input_ids
        assert not [m for m in sys.modules if m.startswith("geodistill")]
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_map_fingerprint_names_exactly_what_the_tokenised_rows_depend_on() -> None:
    """The fingerprint passed to ``datasets.map`` (instead of dill-hashing the task's closure)
    changes with the source rows, the tokenizer, the settings and the encoding code, and only
    with them; the rows are those of a plain ``map``."""
    from datasets import Dataset

    from conftest import tiny_tokenizer
    from geodistill.tasks import map_fingerprint

    ds = Dataset.from_dict({"text": ["w5 w6", "w7 w8 w9"]})
    tok, same_tok = tiny_tokenizer(), tiny_tokenizer()
    other_tok = tiny_tokenizer()
    other_tok.backend_tokenizer.post_processor = None  # no [CLS] / [SEP]: other ids

    def encode(batch: dict) -> dict:
        return dict(tok(batch["text"], truncation=True, max_length=3))

    def encode_longer(batch: dict) -> dict:
        return dict(tok(batch["text"], truncation=True, max_length=4))

    base = map_fingerprint(ds, encode, [tok], max_length=3)
    assert base == map_fingerprint(ds, encode, [same_tok], max_length=3)  # equal content, other object
    others = [
        map_fingerprint(ds.select([1, 0]), encode, [tok], max_length=3),
        map_fingerprint(ds, encode, [other_tok], max_length=3),
        map_fingerprint(ds, encode, [tok, tok], max_length=3),
        map_fingerprint(ds, encode, [tok], max_length=4),
        map_fingerprint(ds, encode_longer, [tok], max_length=3),
    ]
    assert len({base, *others}) == 6
    fast = ds.map(encode, batched=True, new_fingerprint=base)
    assert fast._fingerprint == base and fast.to_dict() == ds.map(encode, batched=True).to_dict()
