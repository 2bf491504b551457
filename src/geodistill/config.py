"""Configuration: frozen dataclasses, strict loading, command-line overrides.

Every field is documented once, in its ``help`` metadata; that text feeds ``geodistill ... --help``
and error messages. Loading is strict: an unknown key is an error that names its full path
(``losses[2].temprature``), and values are checked against the field's type. Configs hold no
code. YAML files may ``include:`` other YAML files (relative paths), merged key by key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LossConfig",
    "ModelConfig",
    "StudentConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "from_dict",
    "identity_hash",
    "load_config",
    "loss_defaults",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the offending field."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


# ------------------------------------------------------------------------------------------
# the schema


@dataclass(frozen=True)
class DataConfig:
    """Which examples to train and evaluate on."""

    name: str = _help(
        "dataset: an offline name (rotten_tomatoes, reuters_r8, 20newsgroups, natural_instructions, ...), "
        "a hub name (glue/cola, glue/rte, databricks/databricks-dolly-15k), or a local .csv/.jsonl file or directory",
        default="rotten_tomatoes",
    )
    split_seed: int = _help(
        "seed of the train/dev/test split for datasets without an official one", default=0
    )
    max_train: int | None = _help(
        "subsample the training split to this many examples (stratified, seeded)", default=None
    )
    max_eval: int | None = _help("subsample dev and test to this many examples each", default=None)
    max_length: int = _help("truncate tokenised inputs to this many tokens", default=128)
    text_column: str | None = _help(
        "local files: column holding the text (default: text/sentence/sentence1)", default=None
    )
    text_pair_column: str | None = _help(
        "local files: column holding the second text of pair tasks", default=None
    )
    label_column: str | None = _help("local files: column holding the label (default: label)", default=None)
    label_names: tuple[str, ...] | None = _help(
        "local files: the label set in id order (default: the training split's labels, sorted)", default=None
    )
    max_new_tokens: int = _help("instruction tasks: tokens generated per answer at evaluation", default=64)
    max_prompt_length: int = _help(
        "instruction tasks: prompts over this many tokens lose the middle of the user's text (the template's "
        "start and end stay)",
        default=384,
    )
    max_per_task: int | None = _help("instruction tasks: cap on training instances per task", default=None)
    eval_sets: Any = _help(
        "instruction tasks: extra evaluation sets scored with the test split: {name: hub name | load_dataset "
        "args | .jsonl path}, or 'minillm' (Dolly, SelfInst, Vicuna, S-NI, UnNI)",
        default=None,
    )
    eval_decoding: Literal["greedy", "sample"] = _help(
        "instruction tasks: decoding of test and evaluation sets (dev selection is always greedy)",
        default="greedy",
    )
    eval_temperature: float = _help("instruction tasks, eval_decoding=sample: temperature", default=1.0)
    eval_top_p: float = _help("instruction tasks, eval_decoding=sample: nucleus mass (1 = none)", default=1.0)
    eval_seeds: tuple[int, ...] | None = _help(
        "instruction tasks, eval_decoding=sample: one run per seed, metrics averaged (default 10, 20, 30, 40, 50)",
        default=None,
    )
    answers: Literal["reference", "teacher"] = _help(
        "instruction tasks: train on reference answers, or on the teacher's greedy answers (sequence-level KD, "
        "generated once and cached)",
        default="reference",
    )


@dataclass(frozen=True)
class ModelConfig:
    """A model by offline name (minilm-l6, smollm2-135m-instruct), hub name or local directory."""

    name: str = _help("offline name, hub name or local directory", default="minilm-l6")
    finetune: bool = _help(
        "fine-tune this (teacher) model on the task first, cached and reused across runs "
        "(needed when the checkpoint has no head for the task); instruction tasks: SFT on the answers "
        "first (false for an instruction-tuned teacher)",
        default=True,
    )
    shard: bool = _help(
        "train.parallel=fsdp: shard this frozen teacher across processes too (for teachers that do not fit one "
        "device); otherwise every process holds a replica in inference mode",
        default=False,
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "weights dtype for a frozen instruction teacher (a classification teacher runs in float32)",
        default="float32",
    )


@dataclass(frozen=True)
class StudentConfig:
    """How the student is made. It always shares the teacher's tokenizer unless ``init=pretrained``."""

    init: Literal["layer_subset", "config", "pretrained"] = _help(
        "layer_subset: copy of the teacher keeping `layers` (DistilBERT-style); config: random init from the "
        "teacher's config with new sizes; pretrained: load `name`",
        default="config",
    )
    layers: tuple[int, ...] | None = _help(
        "layer_subset: teacher layers to keep (0-based, in order)", default=None
    )
    num_layers: int = _help("config: number of transformer layers", default=4)
    hidden_size: int = _help("config: hidden width", default=192)
    num_heads: int = _help("config: attention heads (must divide hidden_size)", default=4)
    intermediate_size: int | None = _help(
        "config: feed-forward width (default: hidden_size times the teacher's feed-forward/hidden ratio, "
        "4 for BERT and GPT-2)",
        default=None,
    )
    architecture: str | None = _help(
        "config: another architecture than the teacher's (e.g. opt), same vocabulary", default=None
    )
    name: str | None = _help("pretrained: offline name, hub name or local directory", default=None)


#: every loss's options and their defaults: what a :class:`LossConfig` field left at ``None`` means
#: (``losses.py`` builds its table from this). Under ``task: instruction`` feature terms default to
#: ``pooling: tokens`` instead (a decoder's first token is the same for every prompt).
LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "ce": {},
    "kd": {"temperature": 1.0, "direction": "forward"},
    "pkd": {"layers": "uniform", "pooling": "cls"},
    "proj_mse": {"layers": "last", "pooling": "cls"},
    "cka": {"layers": "last", "pooling": "cls", "scope": "global"},
    "procrustes": {"layers": "last", "pooling": "cls", "scope": "global", "angular": False},
    "gram": {"layers": "last", "pooling": "cls", "scope": "global"},
}


def loss_defaults(name: str, task: str = "classification") -> dict[str, Any]:
    """The options a loss entry takes, with the values an unset (``None``) option means for ``task``."""
    options = dict(LOSS_OPTIONS.get(name, {}))
    if task == "instruction" and "pooling" in options:
        options["pooling"] = "tokens"
    return options


@dataclass(frozen=True)
class LossConfig:
    """One named, weighted term of the training objective."""

    name: str = _help("loss: ce, kd, pkd, proj_mse, cka, procrustes, gram")
    weight: float = _help("weight of this term in the objective", default=1.0)
    temperature: float | None = _help(
        "kd: softmax temperature tau (the loss is scaled by tau^2)", default=None
    )
    direction: Literal["forward", "reverse"] | None = _help(
        "kd: forward KL(teacher || student) or reverse KL(student || teacher)", default=None
    )
    layers: Any = _help(
        "feature terms: 'last', 'uniform', or explicit [[student_layer, teacher_layer], ...] pairs; "
        "hidden-state indices, 0 = embeddings, L = last layer",
        default=None,
    )
    pooling: Literal["cls", "mean", "tokens", "last"] | None = _help(
        "feature terms: which vectors are the samples: the first token, the mean over valid tokens, "
        "every valid token, or the last valid token",
        default=None,
    )
    angular: bool | None = _help(
        "procrustes: use the angular metric arccos(nuc) instead of 2 - 2 nuc", default=None
    )
    scope: Literal["global", "local"] | None = _help(
        "cka/procrustes/gram under data parallelism: over the global batch (default) or each rank's shard",
        default=None,
    )
    start_step: int = _help(
        "any term: off (weight 0) for the first S optimiser steps, so that KD alone moves the student "
        "first; 0: on from the first step",
        default=0,
    )
    warmup_steps: int = _help(
        "any term: once on, its weight rises linearly over N optimiser steps, weight x min(1, k / N) at "
        "its k-th step (a ramp that lets KD move the student before a feature term pulls); 0: full weight "
        "from its first step",
        default=0,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    seed: int = _help(
        "seed of student initialisation, data order and dropout (shared across methods)", default=0
    )
    epochs: float = _help("training epochs (ignored when max_steps is set)", default=3.0)
    max_steps: int | None = _help("optimiser steps; overrides epochs", default=None)
    batch_size: int = _help("examples per micro-batch (per process)", default=32)
    grad_accum: int = _help("micro-batches per optimiser step", default=1)
    lr: float = _help("peak learning rate of AdamW", default=1e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norms)", default=0.01)
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.1)
    schedule: Literal["linear", "cosine", "constant"] = _help(
        "learning-rate decay after warm-up", default="linear"
    )
    max_grad_norm: float | None = _help("clip the gradient norm (None: no clipping)", default=1.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "autocast precision: auto = bf16 on a GPU that supports it, else no; bf16 also works on a CPU; fp16 "
        "(GPU only) adds a loss scaler: a step whose gradients overflow is skipped and the scale lowered, and "
        "only 20 such steps in a row stop the run",
        default="auto",
    )
    eval_every: int | None = _help("evaluate on dev every N steps (default: once per epoch)", default=None)
    eval_batch_size: int = _help("examples per evaluation batch", default=64)
    save_every: int | None = _help(
        "checkpoint every N steps for resuming (default: at each evaluation)", default=None
    )
    log_every: int = _help("write a log line every N optimiser steps", default=10)
    select_metric: str | None = _help(
        "dev metric for best-checkpoint selection (default: the task's metric)", default=None
    )
    cache_teacher: bool = _help(
        "compute teacher logits and tapped features once per example and reuse them "
        "(classification only; LM teachers run live)",
        default=True,
    )
    group_by_length: bool = _help(
        "batch examples of similar length together (shuffled groups of 50 batches sorted by length, then the "
        "batches shuffled; as transformers' group_by_length): less padding, same examples per epoch. With "
        "batch-coupled terms (cka, procrustes, gram) it can change results: on MultiEmo it sent KD + CKA to "
        "50 % on every seed (experiments/grouping); on Rotten Tomatoes it did not",
        default=False,
    )
    fused_optimizer: bool = _help(
        "fused AdamW (one kernel for all parameters): on a CPU about 8x faster per optimiser step than the "
        "default, which matters for small students; results agree with the default to float rounding only",
        default=False,
    )
    polar: Literal["auto", "eigh", "newton-schulz"] = _help(
        "how Procrustes terms compute the nuclear norm and its gradient: auto = Newton-Schulz polar iteration "
        "on a GPU, float64 eigh elsewhere (both exact to the geometry core's bound; see geometry.polar_method)",
        default="auto",
    )
    compile_polar: bool = _help(
        "run the Newton-Schulz polar steps through torch.compile (compiled once per process, on first use)",
        default=False,
    )
    num_workers: int = _help("DataLoader worker processes", default=0)
    parallel: Literal["ddp", "fsdp"] = _help(
        "under torchrun / accelerate launch: ddp replicates the student on every process; fsdp (FSDP2) shards "
        "it (every transformer layer, then the rest) for students that do not fit one device",
        default="ddp",
    )
    device: str | None = _help("force a device (cpu, cuda, mps); default: Accelerate's choice", default=None)
    threads: int | None = _help("CPU threads for torch (default: torch's choice)", default=None)


@dataclass(frozen=True)
class DistillConfig:
    """A whole run: data, teacher, student, objective, training and where results go."""

    task: Literal["classification", "instruction"] = _help(
        "classification or instruction following", default="classification"
    )
    data: DataConfig = _help("the dataset", default_factory=DataConfig)
    teacher: ModelConfig = _help("the frozen teacher", default_factory=ModelConfig)
    student: StudentConfig = _help("the student", default_factory=StudentConfig)
    losses: tuple[LossConfig, ...] = _help(
        "terms of the objective, e.g. [{name: kd, temperature: 2}, {name: procrustes, weight: 1}]",
        default=(LossConfig(name="ce"),),
    )
    train: TrainConfig = _help("optimisation", default_factory=TrainConfig)
    teacher_train: TrainConfig = _help(
        "optimisation of the teacher's fine-tuning (teacher.finetune), cached by teacher, data and these settings",
        default_factory=lambda: TrainConfig(lr=5e-5, epochs=2.0, warmup_ratio=0.1),
    )
    output_dir: str = _help("directory for checkpoints, logs and the final student", default="runs/distill")
    overwrite: bool = _help("reuse an output directory that holds another run's files", default=False)


#: the smallest value of integer fields whose type alone allows nonsense (a batch of 0 examples);
#: None stays allowed where the type allows it. Checked when a config is read, naming the key
MINIMUM: dict[type, dict[str, int]] = {
    DataConfig: {
        "max_train": 1,
        "max_eval": 1,
        "max_length": 1,
        "max_per_task": 1,
        "max_new_tokens": 1,
        "max_prompt_length": 1,
    },
    TrainConfig: {
        "max_steps": 1,  # 0 would read as unset: the run would train for `epochs` instead
        "batch_size": 1,
        "grad_accum": 1,
        "eval_batch_size": 1,
        "eval_every": 1,
        "save_every": 1,
        "log_every": 1,
        "num_workers": 0,
        "threads": 1,
    },
}

#: the range of float fields whose type alone allows nonsense (a learning rate of nan or -1):
#: ``(least, most, least_allowed)``, ``least`` itself allowed only when ``least_allowed``; nan and
#: infinities never are. Checked when a config is read, naming the key
INTERVAL: dict[type, dict[str, tuple[float, float, bool]]] = {
    TrainConfig: {
        "epochs": (0.0, math.inf, False),
        "lr": (0.0, math.inf, False),
        "warmup_ratio": (0.0, 1.0, True),
    },
}


def _check_ranges(cls: type, values: dict[str, Any], path: str) -> None:
    """Raise naming the key unless every value of ``values`` lies in its :data:`MINIMUM` / :data:`INTERVAL`."""
    where = f"{path}." if path else ""
    for name, least in MINIMUM.get(cls, {}).items():
        value = values.get(name)
        if value is not None and value < least:
            raise ConfigError(f"{where}{name}: must be at least {least}, got {value}")
    for name, (least, most, closed) in INTERVAL.get(cls, {}).items():
        value = values.get(name)
        if value is None or (
            math.isfinite(value) and (value >= least if closed else value > least) and value <= most
        ):
            continue
        if math.isinf(most):
            wanted = f"a finite number {'at least' if closed else 'above'} {least:g}"
        else:
            wanted = f"{'from' if closed else 'above'} {least:g} to {most:g}"
        raise ConfigError(f"{where}{name}: must be {wanted}, got {value}")


# ------------------------------------------------------------------------------------------
# strict conversion between dicts and dataclasses

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise naming ``path``.
    A mapping for a dataclass takes the keys it leaves out from ``default`` (an instance) if given."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}"
        )
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = (a for a in get_args(tp) if a is not Ellipsis)
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, default if isinstance(default, tp) else None)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float syntax
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # a schema bug, not a user error


def _field_default(f: dataclasses.Field) -> Any:
    """What a field left out means: its default, or a fresh instance of its default factory
    (``teacher_train``'s factory differs from ``TrainConfig()``), or MISSING for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def from_dict(cls: type[T], data: Any, path: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values.

    Keys the mapping leaves out take their values from ``base`` if given, else the field's default;
    a nested mapping fills its missing keys from the field's default instance in the same way, so
    ``teacher_train: {batch_size: 16}`` keeps the rest of ``teacher_train``'s own defaults."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s} (known keys{' of ' + path if path else ''}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        default = getattr(base, name) if base is not None else _field_default(f)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, default)
        elif default is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required")
        else:
            kwargs[name] = default
    _check_ranges(cls, kwargs, path)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-ready structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return copy.deepcopy(obj)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a config (or any JSON-able structure)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


#: fields that say how a run executes, not what it computes: changing them must not make a
#: cached teacher, a half-trained run or a finished sweep row look like a different experiment
EXECUTION_ONLY: dict[type, tuple[str, ...]] = {
    TrainConfig: ("save_every", "num_workers", "parallel", "device", "threads"),
    ModelConfig: ("shard",),
}


def _reset_execution(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _reset_execution(v) for k, v in obj.items()}
    if not dataclasses.is_dataclass(obj):
        return obj
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in EXECUTION_ONLY.get(type(obj), ()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                changes[f.name] = default
        elif dataclasses.is_dataclass(value):
            reset = _reset_execution(value)
            if reset is not value:
                changes[f.name] = reset
    return dataclasses.replace(obj, **changes) if changes else obj


#: fields added after results were recorded: left out of the identity while at their default, so
#: that configs which do not use them keep the hash of their finished runs and cached teachers
ADDED_LATER: dict[type, tuple[str, ...]] = {
    TrainConfig: ("group_by_length", "fused_optimizer", "polar", "compile_polar"),
    LossConfig: ("start_step", "warmup_steps"),
}


def _identity_view(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name in ADDED_LATER.get(type(obj), ()) and value == f.default:
                continue
            out[f.name] = _identity_view(value)
        return out
    if isinstance(obj, dict):
        return {k: _identity_view(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_identity_view(v) for v in obj]
    return obj


def _unset_loss_defaults(obj: Any) -> Any:
    """A DistillConfig whose loss options that spell out their default are unset (``None``), as a
    config that leaves them out has them: ``{name: procrustes, pooling: cls}`` is ``{name: procrustes}``."""
    if not isinstance(obj, DistillConfig):
        return obj
    losses = []
    for loss in obj.losses:
        unset = {
            k: None
            for k, default in loss_defaults(loss.name, obj.task).items()
            if (value := getattr(loss, k)) == default and isinstance(value, bool) == isinstance(default, bool)
        }
        losses.append(dataclasses.replace(loss, **unset) if unset else loss)
    return dataclasses.replace(obj, losses=tuple(losses))


def identity_hash(obj: Any, length: int = 12) -> str:
    """``config_hash`` of a config with its execution-only fields at their defaults.

    Threads, device, DDP/FSDP, data-loader workers, checkpoint cadence and teacher sharding say how a
    run executes, not what it computes, so a teacher fine-tuned with 2 threads is reused by a run
    with 8, a run resumes on another device, and a sweep row stays finished. Configs that leave those
    fields (and the fields of :data:`ADDED_LATER`) at their defaults hash exactly as ``config_hash``
    hashed them before those fields existed. A loss option written out at its default
    (:func:`loss_defaults`) hashes as the option left out: the two compute the same run.
    """
    return config_hash(_identity_view(_reset_execution(_unset_loss_defaults(obj))), length)


def former_identity_hash(obj: Any, length: int = 12) -> str:
    """:func:`identity_hash` as it was before loss options written at their default hashed as left
    out (2026-12-06): how rows of older results files name such a config, so a sweep still finds them."""
    return config_hash(_identity_view(_reset_execution(obj)), length)


# ------------------------------------------------------------------------------------------
# files and overrides


def _yaml():
    try:
        import yaml
    except ImportError as e:  # the core package does not depend on PyYAML
        raise ConfigError("reading YAML configs needs PyYAML: pip install 'geodistill[hf]'") from e
    return yaml


def _yaml_error(e: Exception) -> tuple[str, str]:
    """PyYAML's error on one line (its own message runs over several): ``(":LINE:COLUMN", what)``."""
    mark, problem, context = (getattr(e, a, None) for a in ("problem_mark", "problem", "context"))
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    what = (problem or " ".join(str(e).split())) + (f" ({context})" if context else "")
    return where, what


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pop_includes(data: dict, where: str) -> list[str]:
    """Remove ``include:`` from a config mapping and return its file names: one name or a list of
    them; anything else (an empty ``include:`` reads as None) is a ConfigError naming ``where``."""
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(inc, str) and inc for inc in includes):
        raise ConfigError(f"{where}: expected a file name or a list of file names, got {includes!r}")
    return includes


def read_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``include:`` (a path or list of paths, relative to the file).
    ``_including``: the files whose includes led here, to name a cycle instead of recursing forever."""
    path = Path(path)
    here = path.resolve()
    if here in _including:
        cycle = _including[_including.index(here) :]
        raise ConfigError(f"{path}: include cycle: {' -> '.join(p.name for p in (*cycle, here))}")
    try:
        data = _yaml().safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except _yaml().YAMLError as e:
        where, what = _yaml_error(e)
        raise ConfigError(f"{path}{where}: invalid YAML: {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base: dict = {}
    for inc in pop_includes(data, f"{path}: include"):
        base = _merge(base, read_yaml(path.parent / inc, (*_including, here)))
    return _merge(base, data)


def _set_path(data: dict, dotted: str, value: Any, keys: list[str] | None = None) -> None:
    """Set ``dotted`` (split at its dots, or into ``keys`` when given) in ``data``."""
    keys = keys if keys is not None else dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        node = node[_index(key, dotted, len(node))] if isinstance(node, list) else node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is {node!r}, not a mapping or list")
    last = keys[-1]
    if isinstance(node, list):
        if last == str(len(node)):  # one past the end appends: losses.2={name: gram}
            node.append(value)
        else:
            node[_index(last, dotted, len(node))] = value
    else:
        node[last] = value


def _index(key: str, dotted: str, n: int) -> int:
    if re.fullmatch(r"-?[0-9]+", key) is None or not -n <= int(key) < n:
        raise ConfigError(f"--set {dotted}: {key!r} is not an index of a list of {n}")
    return int(key)


def apply_overrides(data: dict, overrides: list[str], flat: tuple[str, ...] = ()) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML; list items by index, ``losses.1.weight=2``;
    the index one past the end appends, ``losses.2={name: gram}``). Under a prefix in ``flat`` the rest
    of the key is one key, dots included: with ``flat=("grid.",)``, ``grid.data.seed=[1]`` sets the
    mapping ``grid``'s key ``data.seed``."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _yaml().safe_load(raw) if raw.strip() else ""
        except _yaml().YAMLError as e:
            raise ConfigError(f"--set {key}: {raw!r} is not valid YAML: {_yaml_error(e)[1]}") from e
        prefix = next((p for p in flat if key.startswith(p) and len(key) > len(p)), None)
        keys = None if prefix is None else [*prefix[:-1].split("."), key[len(prefix) :]]
        _set_path(data, key, value, keys)
    return data


C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load ``cls`` from a YAML file (or defaults) plus ``--set`` overrides, strictly."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def describe(cls: type, prefix: str = "", base: Any = None) -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every field, recursively: the reference for docs and --help.
    A nested dataclass's defaults are those of its field's default instance (``base`` below the top)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(
                describe(hints[f.name], key + ".", None if default is dataclasses.MISSING else default)
            )
            continue
        shown = "(required)" if default is dataclasses.MISSING else json.dumps(to_dict(default))
        rows.append((key, shown, f.metadata.get("help", "")))
    return rows
