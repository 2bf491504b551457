"""Config loading: defaults of nested configs, include files, --set paths, value ranges."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from geodistill.config import (
    ConfigError,
    DistillConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
)


def test_a_partial_nested_config_keeps_its_fields_default_instance() -> None:
    """teacher_train's default (lr 5e-5, 2 epochs) is not TrainConfig(): a mapping that sets one
    key of it keeps the rest of teacher_train's default, not TrainConfig's."""
    default = DistillConfig().teacher_train
    assert (default.lr, default.epochs) != (TrainConfig().lr, TrainConfig().epochs)  # else nothing to test
    cfg = load_config(DistillConfig, None, ["teacher_train.batch_size=16"])
    assert cfg.teacher_train == dataclasses.replace(default, batch_size=16)
    assert from_dict(DistillConfig, {"teacher_train": {}}).teacher_train == default
    assert cfg.train == TrainConfig()  # a field whose default is its class is unchanged
    with pytest.raises(ConfigError, match=r"^unknown key teacher_train\.lrate "):  # still strict below
        from_dict(DistillConfig, {"teacher_train": {"lrate": 1}})


def test_shipped_configs_keep_the_teacher_training_they_recorded() -> None:
    """rt.yaml (every classification sweep's base) and demo.yaml set teacher_train in part; results
    and cached teachers were recorded when the keys they leave out took TrainConfig's defaults
    (3 epochs, unused beside max_steps): they spell those out, so their identity hashes stay."""
    from geodistill.cli import CONFIG_DIR

    for name in ("experiments/rt.yaml", "demo.yaml"):
        tt = load_config(DistillConfig, CONFIG_DIR / name).teacher_train
        assert (tt.epochs, tt.lr, tt.warmup_ratio) == (3.0, 1e-4, 0.1), name
        assert tt.max_steps is not None, name  # why epochs does not matter to them


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_an_include_cycle_is_named(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "include: b.yaml\ntrain: {lr: 0.1}\n")
    _write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: include cycle: a\.yaml -> b\.yaml -> a\.yaml$"):
        read_yaml(a)
    me = _write(tmp_path / "me.yaml", "include: me.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle: me\.yaml -> me\.yaml$"):
        read_yaml(me)
    # a file included twice, not in a cycle, is fine
    _write(tmp_path / "c.yaml", "train: {lr: 0.2}\n")
    both = _write(tmp_path / "both.yaml", "include: [c.yaml, c.yaml]\n")
    assert read_yaml(both) == {"train": {"lr": 0.2}}


@pytest.mark.parametrize("include", ["", "[]", "[1]", "{a: b.yaml}", "['']"])
def test_an_include_that_names_no_files_is_named(tmp_path: Path, include: str) -> None:
    path = _write(tmp_path / "x.yaml", f"include: {include}\ntrain: {{lr: 0.1}}\n")
    if include == "[]":  # an empty list includes nothing
        assert read_yaml(path) == {"train": {"lr": 0.1}}
        return
    with pytest.raises(ConfigError, match=rf"^{path}: include: expected a file name"):
        read_yaml(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.layers.0.x=1", r"--set student\.layers\.0\.x: student\.layers\.0 is 0, not a mapping"),
        ("student.layers.1.x.y=1", r"student\.layers\.1 is 2, not a mapping"),
        ("student.init.x=1", r"student\.init is 'config', not a mapping"),
        ("losses.--1.weight=1", r"--set losses\.--1\.weight: '--1' is not an index of a list of 1"),
        ("losses.1_0.weight=1", r"'1_0' is not an index"),
        ("losses.5=1", r"'5' is not an index of a list of 1"),
    ],
)
def test_a_set_path_through_a_value_names_the_key(override: str, message: str) -> None:
    data = {"student": {"init": "config", "layers": [0, 2]}, "losses": [{"name": "ce"}]}
    with pytest.raises(ConfigError, match=message):
        apply_overrides(data, [override])


def test_a_set_path_by_index_still_sets() -> None:
    data = {"losses": [{"name": "ce"}, {"name": "kd"}]}
    out = apply_overrides(data, ["losses.-1.weight=2", "losses.0.weight=3", "losses.2={name: gram}"])
    assert out["losses"] == [{"name": "ce", "weight": 3}, {"name": "kd", "weight": 2}, {"name": "gram"}]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=0", "train.max_steps: must be at least 1, got 0"),
        ("teacher_train.max_steps=-5", "teacher_train.max_steps: must be at least 1, got -5"),
        ("train.epochs=0", "train.epochs: must be a finite number above 0, got 0.0"),
        ("train.epochs=-1", "train.epochs: must be a finite number above 0, got -1.0"),
        ("train.epochs=.inf", "train.epochs: must be a finite number above 0, got inf"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: must be from 0 to 1, got 1.5"),
        ("train.warmup_ratio=-0.1", "train.warmup_ratio: must be from 0 to 1, got -0.1"),
        ("train.warmup_ratio=.nan", "train.warmup_ratio: must be from 0 to 1, got nan"),
        ("train.lr=0", "train.lr: must be a finite number above 0, got 0.0"),
        ("train.lr=-1e-4", "train.lr: must be a finite number above 0, got -0.0001"),
        ("teacher_train.lr=nan", "teacher_train.lr: must be a finite number above 0, got nan"),
        ("train.lr=.inf", "train.lr: must be a finite number above 0, got inf"),
        ("data.max_new_tokens=0", "data.max_new_tokens: must be at least 1, got 0"),
        ("data.max_prompt_length=0", "data.max_prompt_length: must be at least 1, got 0"),
    ],
)
def test_nonsense_values_are_refused_naming_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, [override])
    assert str(e.value) == message


def test_values_at_the_edges_and_none_stay_allowed() -> None:
    cfg = load_config(
        DistillConfig,
        None,
        ["train.max_steps=null", "train.warmup_ratio=0", "teacher_train.warmup_ratio=1", "train.epochs=0.25"],
    )
    assert cfg.train.max_steps is None and cfg.train.warmup_ratio == 0.0
    assert cfg.teacher_train.warmup_ratio == 1.0 and cfg.train.epochs == 0.25
    assert load_config(DistillConfig, None, ["train.max_steps=1", "train.lr=1e-9"]).train.max_steps == 1
    assert math.isfinite(DistillConfig().train.lr)


def test_intermediate_size_help_says_what_narrow_student_does() -> None:
    """The default feed-forward width keeps the teacher's feed-forward/hidden ratio (here 1.5),
    as the field's help says; it is not 4 x hidden_size."""
    import transformers

    from geodistill.models import narrow_student

    teacher = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    student = narrow_student(teacher, num_layers=1, hidden_size=16, num_heads=2, task="classification")
    assert student.config.intermediate_size == 24
    (f,) = (f for f in dataclasses.fields(DistillConfig().student) if f.name == "intermediate_size")
    assert "ratio" in f.metadata["help"] and "4 x hidden_size" not in f.metadata["help"]
