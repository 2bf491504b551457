"""Sweeps: methods x seeds x alphas x layer maps x students x tasks -> one tidy row per run.

A sweep file names a base :class:`~geodistill.config.DistillConfig`, the methods (named objectives)
and a grid. Every combination is resolved to a full ``DistillConfig``; its hash is the run's identity.
Each finished run appends one row to ``<sweep dir>/results.jsonl``; rerunning the sweep skips the
runs whose rows say ``status: ok`` (a killed sweep loses nothing: half-trained runs also resume from
their own checkpoints). Runs go in parallel, one fresh process per run, up to ``--jobs`` at a time.

The schema (strict: an unknown key is an error that names it)::

    name: main                      # default: the file's stem
    base:                           # a DistillConfig mapping; `include:` files relative to this file,
      include: ../distill/rt.yaml   #   or base: path/to/config.yaml
      train: {max_steps: 2000}
    methods:                        # name -> DistillConfig overrides (merged over base, lists replaced)
      ft: {losses: [{name: ce}]}
      kd: {losses: [{name: kd, temperature: 2}]}
      kd+procrustes:
        losses: [{name: kd, temperature: 2}, {name: procrustes, weight: "${alpha}", layers: "${layers}"}]
    grid:                           # every combination of these axes
      seed: [0, 1, 2]               # shorthand for train.seed
      data.split_seed: [0, 1]       # any dotted DistillConfig key: a *setting* (applied to every method)
      student:                      # mapping values are merged into the base's mapping; `label:` names
        - {label: small, init: config, num_layers: 4, hidden_size: 192, num_heads: 4}
        - {label: subset, init: layer_subset, layers: [0, 2, 4]}
      alpha: [0.1, 1, 10]           # any other name is a placeholder: substituted where a method's
      layers: [last, uniform]       #   value is exactly "${name}"; methods without it run once
    quick:                          # what --quick changes (a smoke test of the whole pipeline)
      set: {train.max_steps: 5, data.max_train: 64}   # dotted overrides, applied last
      grid: {seed: [0]}             # replacement values for some axes
    output_dir: runs/sweeps/main    # default runs/sweeps/<name>; --quick writes to <output_dir>-quick
    geometry: true                  # optional: measure each student against its teacher as its run
                                    #   ends (true: `geodistill geometry`'s defaults; or a mapping of
                                    #   split, pooling, max_examples, student_layer, teacher_layer)

Columns of a row: ``method``, one column per placeholder (``alpha``, ``layers``; empty where the
method does not use it), one per dotted axis (named by its last key: ``split_seed``, ``student``;
``data.name`` is ``task``), and always ``task``, ``seed``, ``split_seed``. Placeholders and
``method`` are the *treatment*; dotted axes other than the seeds are the *setting*; ``seed`` and
``split_seed`` are the *replicates* over which methods are paired (the trainer fixes initialisation,
data order and dropout by ``train.seed`` identically for every method). The row records this split
under ``axes`` for :mod:`geodistill.stats`. With ``geometry:``, a run measured when it finished
also has ``<split>.teacher_cka``, ``<split>.teacher_procrustes``, ``<split>.teacher_procrustes_angular``,
``<split>.teacher_gram`` and the measurement's settings (``geometry``), as ``geodistill geometry``
writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import types
import typing
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from geodistill.assets import file_lock
from geodistill.config import (
    ConfigError,
    DistillConfig,
    _help,
    _merge,
    _set_path,
    former_identity_hash,
    from_dict,
    identity_hash,
    pop_includes,
    read_yaml,
    to_dict,
)
from geodistill.stats import METRIC_PREFIXES

__all__ = [
    "PlannedRun",
    "QuickConfig",
    "SweepConfig",
    "SweepSummary",
    "append_row",
    "expand",
    "load_sweep",
    "plan_table",
    "read_rows",
    "run_distill",
    "run_sweep",
    "run_sweeps",
    "sweep_dir",
]

Runner = Callable[[DistillConfig], dict[str, Any]]

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_NAMED_AXES = {"seed": "train.seed"}  # grid shorthands
#: the row column of an axis where its last key would not do ("task" is the data set's column)
_COLUMN_NAMES = {
    "train.seed": "seed",
    "data.split_seed": "split_seed",
    "data.name": "task",
    "task": "task_type",
}
REPLICATE_COLUMNS = ("seed", "split_seed")
# keys of a row that an axis column must not shadow
_ROW_FIELDS = {
    "sweep", "run_id", "config_hash", "status", "method", "task", "seed", "split_seed", "axes",
    "loss_terms", "metric", "steps", "best_step", "wall_seconds", "train_seconds", "seconds_per_step",
    "peak_memory_mb", "student_parameters", "world_size", "version", "git_revision", "torch",
    "output_dir", "finished_at", "error", "traceback", "geometry", "geometry_note",
}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the schema


@dataclass(frozen=True)
class QuickConfig:
    """What ``--quick`` changes: a smoke test of the whole sweep in minutes."""

    set: Any = _help(
        "DistillConfig overrides as {dotted.key: value}, applied to every run after the grid (like --set)",
        default_factory=dict,
    )
    grid: Any = _help("replacement values for some grid axes, e.g. {seed: [0]}", default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of distillation runs. See the module docstring for the full schema and an example."""

    methods: Any = _help(
        "named objectives: name -> DistillConfig overrides merged over base, e.g. "
        "{kd: {losses: [{name: kd, temperature: 2}]}}; a value exactly '${alpha}' takes the grid's alpha"
    )
    name: str | None = _help("sweep name (default: the file's stem)", default=None)
    base: Any = _help(
        "the DistillConfig every run starts from: a mapping (may `include:` config files) or a file path",
        default_factory=dict,
    )
    grid: Any = _help(
        "axes -> lists of values: `seed`, dotted DistillConfig keys (settings: data.split_seed, student, "
        "data.name, ...) and placeholder names used as '${name}' in methods (alpha, layers, ...)",
        default_factory=dict,
    )
    quick: QuickConfig = _help("overrides applied with --quick", default_factory=QuickConfig)
    output_dir: str | None = _help(
        "directory of results.jsonl and the runs (default runs/sweeps/<name>)", default=None
    )
    geometry: Any = _help(
        "measure each classification student against its teacher when its run finishes (CKA, Procrustes, "
        "its angle, Gram; as `geodistill geometry`): true for the defaults, or a mapping of split, pooling, "
        "max_examples, student_layer, teacher_layer; rows gain <split>.teacher_cka, ... and its cost in "
        "geometry.seconds (also in wall_seconds; rows finished before keep none: `geodistill geometry` "
        "measures those from their checkpoints)",
        default=None,
    )


@dataclass(frozen=True)
class PlannedRun:
    """One resolved run of a sweep."""

    run_id: str  # <method>-<first 8 hex digits of config_hash>, the run's directory name
    method: str
    config: DistillConfig  # fully resolved, output_dir set to the run's directory
    config_hash: str  # identity: hash of the config without output_dir (where it is written)
    values: dict[str, Any]  # column -> swept value (labels for mappings and lists)
    axes: dict[str, list[str]]  # {"treatment": [...], "setting": [...], "replicate": [...]}
    loss_terms: tuple[str, ...]
    former_hashes: tuple[str, ...] = ()  # what older versions hashed this config as, where different


@dataclass
class SweepSummary:
    """What a call of :func:`run_sweep` did."""

    results_path: Path
    planned: int
    skipped: int  # already finished before this call
    finished: int  # finished in this call
    failed: list[tuple[str, str]]  # (run_id, error) of the runs that failed in this call
    stale: int  # ok rows in results.jsonl that belong to no planned run (an edited sweep file)


# ------------------------------------------------------------------------------------------
# loading and validation


# Mappings whose keys are dotted config paths: ``--set grid.data.split_seed=[1,2]`` names the axis
# ``data.split_seed``, not a key ``split_seed`` under a key ``data``.
SWEEP_FLAT_KEYS = ("grid.", "quick.grid.", "quick.set.")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML file plus ``--set`` overrides (``grid.seed=[0,1]``, ``base.train.lr=1e-4``,
    ``grid.data.split_seed=[1,2]``)."""
    from geodistill.config import apply_overrides

    path = Path(path)
    data = read_yaml(path)
    if "base" in data:
        data["base"] = _resolve_base(data["base"], path.parent)
    data = apply_overrides(data, overrides or [], flat=SWEEP_FLAT_KEYS)
    if "base" in data:  # again: --set base=FILE or base.include=FILE names files too
        data["base"] = _resolve_base(data["base"], path.parent)
    data.setdefault("name", path.stem)
    return parse_sweep(data)


def parse_sweep(data: dict[str, Any]) -> SweepConfig:
    """Strictly build a :class:`SweepConfig` from a mapping whose ``base`` is already a mapping."""
    sweep = from_dict(SweepConfig, data)
    _check_mapping(sweep.methods, "methods")
    if not sweep.methods:
        raise ConfigError("methods: name at least one method")
    for name, spec in sweep.methods.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"methods: method names must be non-empty strings, got {name!r}")
        _check_mapping(spec, f"methods.{name}")
    _check_mapping(sweep.base, "base")
    _check_mapping(sweep.grid, "grid")
    _check_mapping(sweep.quick.set, "quick.set")
    _check_mapping(sweep.quick.grid, "quick.grid")
    for where, grid in (("grid", sweep.grid), ("quick.grid", sweep.quick.grid)):
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
    _classify_axes(sweep)  # unknown axes, unused placeholders
    for key in sweep.quick.grid:
        if key not in sweep.grid:
            raise ConfigError(
                f"quick.grid.{key}: not an axis of grid (axes: {', '.join(sweep.grid) or 'none'})"
            )
    for key in sweep.quick.set:
        _check_config_path(key, f"quick.set.{key}")
    geometry_settings(sweep)
    return sweep


def geometry_settings(sweep: SweepConfig) -> dict[str, Any] | None:
    """The sweep's ``geometry:`` as the full settings of :func:`~geodistill.evaluate_model.measure_student`
    (None: no measurement), checked, naming a bad key or value."""
    from geodistill.evaluate_model import GEOMETRY_SETTINGS, check_geometry_settings

    g = sweep.geometry
    if g is None or g is False:
        return None
    if g is True:
        return dict(GEOMETRY_SETTINGS)
    if not isinstance(g, dict):
        raise ConfigError(
            f"geometry: expected true or a mapping of {', '.join(GEOMETRY_SETTINGS)}, got {g!r}"
        )
    return check_geometry_settings(g)


def _check_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")


def _find_file(name: str, here: Path) -> Path:
    for candidate in (here / name, Path(name)):
        if candidate.exists():
            return candidate
    raise ConfigError(f"base: config file {name!r} not found (relative to {here} or the working directory)")


def _resolve_base(base: Any, here: Path) -> Any:
    """A path, or a mapping whose ``include:`` files are merged under it, as one mapping."""
    if isinstance(base, str):
        return read_yaml(_find_file(base, here))
    if not isinstance(base, dict):
        return base  # parse_sweep names the error
    base = dict(base)
    merged: dict[str, Any] = {}
    for inc in pop_includes(base, "base.include"):
        merged = _merge(merged, read_yaml(_find_file(inc, here)))
    return _merge(merged, base)


def _check_config_path(dotted: str, where: str) -> None:
    """Raise unless ``dotted`` names a DistillConfig field (list items by index)."""
    tp: Any = DistillConfig
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else Any
        if tp is Any:  # free-form values (a loss's layer map): anything below is the loss's business
            return
        prefix = ".".join(keys[:i])
        if typing.get_origin(tp) is tuple:
            if not key.isdigit():
                raise ConfigError(f"{where}: {prefix} is a list; expected an index, got {key!r}")
            tp = next(a for a in typing.get_args(tp) if a is not Ellipsis)
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: {prefix} has no sub-keys")
        hints = typing.get_type_hints(tp)
        if key not in hints:
            raise ConfigError(
                f"{where}: unknown key {dotted} (known keys{' of ' + prefix if prefix else ''}: {', '.join(hints)})"
            )
        tp = hints[key]


@dataclass(frozen=True)
class _Axes:
    paths: dict[str, str]  # grid key -> dotted config path
    columns: dict[str, str]  # grid key -> row column
    placeholders: tuple[str, ...]  # grid keys that are placeholders
    uses: dict[str, tuple[str, ...]]  # method -> placeholders it uses


def _is_path_axis(key: str) -> bool:
    return key in _NAMED_AXES or "." in key or key in {f.name for f in dataclasses.fields(DistillConfig)}


def _classify_axes(sweep: SweepConfig) -> _Axes:
    paths: dict[str, str] = {}
    placeholders: list[str] = []
    for key in sweep.grid:
        if _is_path_axis(key):
            path = _NAMED_AXES.get(key, key)
            _check_config_path(path, f"grid.{key}")
            if path in paths.values():
                raise ConfigError(f"grid.{key}: the same config key as another axis ({path})")
            paths[key] = path
        elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"grid.{key}: neither a DistillConfig key nor a placeholder name")
        else:
            placeholders.append(key)

    for key in placeholders:
        if key in _ROW_FIELDS:
            raise ConfigError(
                f"grid.{key}: {key!r} is a column of every row; name this placeholder otherwise"
            )
    used_anywhere: set[str] = set()
    uses: dict[str, tuple[str, ...]] = {}
    unknown = sorted(_placeholders_in(sweep.base, "base") - set(placeholders))  # named as base's
    if unknown:
        raise ConfigError(
            f"base: '${{{unknown[0]}}}' is not a grid axis (placeholder axes: {', '.join(placeholders) or 'none'})"
        )
    for method, spec in sweep.methods.items():
        found = _placeholders_in(_merge(sweep.base, spec), f"methods.{method}")
        unknown = sorted(found - set(placeholders))
        if unknown:
            raise ConfigError(
                f"methods.{method}: '${{{unknown[0]}}}' is not a grid axis "
                f"(placeholder axes: {', '.join(placeholders) or 'none'})"
            )
        uses[method] = tuple(p for p in placeholders if p in found)
        used_anywhere |= found
    for key in placeholders:
        if key not in used_anywhere:
            raise ConfigError(
                f"grid.{key}: unknown key: not a DistillConfig key, and no method uses '${{{key}}}' "
                f"(config keys: {', '.join(f.name for f in dataclasses.fields(DistillConfig))}, seed)"
            )

    columns: dict[str, str] = {p: p for p in placeholders}
    for key, path in paths.items():
        name = _COLUMN_NAMES.get(path)
        if name is None:
            name = next(k for k in reversed(path.split(".")) if not k.isdigit())
            if name in columns.values() or name in _ROW_FIELDS:
                name = path
        columns[key] = name
    return _Axes(paths, columns, tuple(placeholders), uses)


def _placeholders_in(obj: Any, where: str) -> set[str]:
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            found |= _placeholders_in(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found |= _placeholders_in(v, f"{where}[{i}]")
    elif isinstance(obj, str) and "${" in obj:
        match = _PLACEHOLDER.fullmatch(obj.strip())
        if not match:
            raise ConfigError(f"{where}: {obj!r}: a placeholder must be the whole value, like '${{alpha}}'")
        found.add(match.group(1))
    return found


def _substitute(obj: Any, values: dict[str, Any], where: str = "") -> Any:
    """``obj`` with every ``${name}`` replaced by ``values[name]``; ``where`` is the dotted key of
    ``obj`` in the run's config, for the error."""
    if isinstance(obj, dict):
        return {k: _substitute(v, values, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, str) and "${" in obj:
        match = _PLACEHOLDER.fullmatch(obj.strip())
        if match is None or match.group(1) not in values:
            raise ConfigError(
                f"{where}: {obj!r}: no value for this placeholder in this run (a placeholder takes the "
                "values of the grid axis of its name where base or the method's own values use it; "
                f"this run's: {', '.join(values) or 'none'})"
            )
        value = copy.deepcopy(values[match.group(1)])
        if isinstance(value, dict):  # a mapping's label names it in the rows, as on a settings axis
            value.pop("label", None)
        return value
    return obj


# ------------------------------------------------------------------------------------------
# expansion


def sweep_dir(sweep: SweepConfig, *, quick: bool = False) -> Path:
    """Where results.jsonl and the runs of this sweep live."""
    out = Path(sweep.output_dir or f"runs/sweeps/{sweep.name or 'sweep'}")
    if not quick:
        return out
    if out.name in ("", ".."):  # ".", "..", "a/..": named by the directory they stand for
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + "-quick")


def label(value: Any) -> Any:
    """A swept value as a row cell: scalars as they are; a mapping by its ``label`` key or as
    ``k=v,k=v``; a list as compact JSON (``[[2,6],[4,12]]``)."""
    if isinstance(value, dict):
        if "label" in value:
            return str(value["label"])
        return ",".join(f"{k}={label(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return json.dumps(value, separators=(",", ":"))
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+_.=-]+", "_", text).strip("_") or "run"


def _set_value(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set a dotted key; a mapping value is merged into the mapping already there."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "label"}
        node: Any = data
        try:
            for key in path.split("."):
                node = node[int(key)] if isinstance(node, list) else node.get(key, {})
        except (IndexError, ValueError, AttributeError):
            node = None
        if isinstance(node, dict):
            value = _merge(node, value)
    try:
        _set_path(data, path, copy.deepcopy(value))
    except (ConfigError, IndexError, AttributeError) as e:
        raise ConfigError(f"{where}: cannot set {path}: {e}") from e


def expand(sweep: SweepConfig, *, quick: bool = False) -> list[PlannedRun]:
    """Every run of the sweep, resolved and validated, in a stable order: seeds outermost, then the
    other setting axes, methods, and the method's placeholder values."""
    axes = _classify_axes(sweep)
    grid = {**sweep.grid, **(sweep.quick.grid if quick else {})}
    for key, values in grid.items():  # a row tells its runs apart by these cells
        shown = [json.dumps(label(v), sort_keys=True, default=str) for v in values]
        twice = next((v for v in shown if shown.count(v) > 1), None)
        if twice is not None:
            where = "quick.grid" if quick and key in sweep.quick.grid else "grid"
            raise ConfigError(
                f"{where}.{key}: two values show as {twice} in the rows; give each its own label"
            )
    root = sweep_dir(sweep, quick=quick)
    path_keys = list(axes.paths)
    treatment = ["method", *(axes.columns[p] for p in axes.placeholders)]
    setting = ["task"] + [
        axes.columns[k] for k in path_keys if axes.columns[k] not in ("task", *REPLICATE_COLUMNS)
    ]
    axes_info = {"treatment": treatment, "setting": setting, "replicate": list(REPLICATE_COLUMNS)}

    plan: list[PlannedRun] = []
    seen: dict[str, str] = {}
    # replicates outermost: a sweep stopped half-way has whole seeds done for every method (paired)
    path_keys.sort(key=lambda k: axes.columns[k] not in REPLICATE_COLUMNS)
    for path_values in itertools.product(*(grid[k] for k in path_keys)):
        for method, spec in sweep.methods.items():
            used = axes.uses[method]
            for ph_values in itertools.product(*(grid[p] for p in used)):
                subst = dict(zip(used, ph_values, strict=True))
                values: dict[str, Any] = {"method": method}
                values.update({axes.columns[p]: label(subst.get(p)) for p in axes.placeholders})
                where = f"run {method}" + "".join(f", {p}={label(v)}" for p, v in subst.items())
                data = copy.deepcopy(_merge(sweep.base, spec))  # _set_path mutates nested mappings
                for key, value in zip(path_keys, path_values, strict=True):
                    _set_value(data, axes.paths[key], value, f"{where}: grid.{key}")
                    values[axes.columns[key]] = label(value)
                    where += f", {axes.columns[key]}={label(value)}"
                if quick:
                    for key, value in sweep.quick.set.items():
                        _set_value(data, key, value, f"{where}: quick.set.{key}")
                try:
                    data = _substitute(data, subst)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from e
                data["output_dir"] = ""
                try:
                    cfg = from_dict(DistillConfig, data)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from e
                cfg = replace(cfg, output_dir="", overwrite=False)
                digest = identity_hash(cfg)
                if digest in seen:
                    raise ConfigError(
                        f"{where}: resolves to the same config as {seen[digest]} (hash {digest}); "
                        "remove the duplicate method or axis value"
                    )
                seen[digest] = where
                run_id = f"{_slug(method)}-{digest[:8]}"
                values.update(task=cfg.data.name, seed=cfg.train.seed, split_seed=cfg.data.split_seed)
                plan.append(
                    PlannedRun(
                        run_id=run_id,
                        method=method,
                        config=replace(cfg, output_dir=str(root / "runs" / run_id)),
                        config_hash=digest,
                        values=values,
                        axes=axes_info,
                        loss_terms=tuple(loss.name for loss in cfg.losses),
                        former_hashes=tuple({former_identity_hash(cfg)} - {digest}),
                    )
                )
    return plan


def plan_table(
    plan: list[PlannedRun],
    done: set[str] | None = None,
    failed: set[str] | None = None,
    copied: dict[str, str] | None = None,
) -> str:
    """A markdown table of the planned runs and their state (done / copied from another sweep's
    results / failed before / to run); ``copied`` maps a config hash to the sweep it comes from."""
    done, failed, copied = done or set(), failed or set(), copied or {}
    columns: list[str] = []
    for run in plan:
        for c in (*run.axes["treatment"], *run.axes["setting"], *run.axes["replicate"]):
            if c not in columns:
                columns.append(c)
    header = ["#", "run_id", *columns, "state"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, run in enumerate(plan, 1):
        if run.config_hash in done:
            state = "done"
        elif run.config_hash in copied:
            state = f"copied from {copied[run.config_hash]}"
        else:
            state = "failed before" if run.config_hash in failed else "to run"
        cells = [
            str(i),
            run.run_id,
            *("" if run.values.get(c) is None else str(run.values[c]) for c in columns),
        ]
        lines.append("| " + " | ".join([*cells, state]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# results.jsonl


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line under a file lock, flushed to disk before returning."""
    path = Path(path)
    line = json.dumps(row, default=str, allow_nan=True) + "\n"
    with file_lock(path.with_name(path.name + ".lock")), open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:  # a line cut short by a kill must not swallow this one
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results.jsonl file; a line cut short by a kill is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i}: skipping a line that is not JSON (cut short?)", stacklevel=2)
    return rows


def _row(
    run: PlannedRun,
    sweep_name: str,
    results: dict[str, Any] | None,
    wall: float | None,
    error: str | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    from geodistill import __version__

    res = results or {}
    row: dict[str, Any] = {
        "sweep": sweep_name,
        "run_id": run.run_id,
        "config_hash": run.config_hash,
        "status": "ok" if error is None else "error",
        **run.values,
        "axes": run.axes,
        "loss_terms": list(run.loss_terms),
    }
    measured = (res.get("geometry") or {}).get("split")  # `geometry: {split: train}` measures train
    for split in ("dev", "test", *([measured] if measured not in (None, "dev", "test") else [])):
        for k, v in (res.get(split) or {}).items():
            row[f"{split}.{k}"] = v
        for k, v in ((res.get("last") or {}).get(split) or {}).items():  # the last step's student
            row[f"last_{split}.{k}"] = v
    row.update(
        metric=res.get("metric"),
        steps=res.get("steps"),
        best_step=res.get("best_step"),
        wall_seconds=wall,
        train_seconds=res.get("train_seconds"),
        seconds_per_step=res.get("seconds_per_step"),
        peak_memory_mb=res.get("peak_memory_mb"),
        student_parameters=res.get("student_parameters"),
        world_size=res.get("world_size"),
        version=res.get("version", __version__),
        git_revision=res.get("git_revision"),
        torch=res.get("torch"),
        output_dir=run.config.output_dir,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if res.get("geometry"):
        row["geometry"] = res["geometry"]
    if res.get("geometry_note"):
        row["geometry_note"] = res["geometry_note"]
    if error is not None:
        row["error"] = error
        row["traceback"] = trace
    return row


# ------------------------------------------------------------------------------------------
# running


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    """The default runner: :func:`geodistill.train.distill` without its progress bar."""
    from geodistill.train import distill

    return distill(cfg, progress=False)


def _measured(runner: Runner, settings: dict[str, Any], cfg: DistillConfig) -> dict[str, Any]:
    """``runner(cfg)``, then its student measured against its teacher
    (:func:`~geodistill.evaluate_model.measure_student`): the measures join the results of
    ``settings["split"]`` as ``teacher_<measure>`` and the settings go under ``geometry``. A run that
    cannot be measured keeps its results, with ``geometry_note`` saying why (training is not lost to a
    measurement). Only the main process measures under a launcher."""
    from geodistill.evaluate_model import measure_student

    results = runner(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return results
    try:
        values, meta = measure_student(cfg.output_dir, settings)
    except Exception as e:  # any failure of the measurement is a note, not a failed run
        return {**results, "geometry_note": f"{type(e).__name__}: {e}"}
    split = settings["split"]
    measures = {f"teacher_{m}": v for m, v in values.items()}
    return {**results, split: {**(results.get(split) or {}), **measures}, "geometry": meta}


def _limit_threads(threads: int | None) -> None:
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        import torch

        torch.set_num_threads(threads)


# What every worker imports before its run (torch, transformers' model code: ~8 s of a ~20 s quick
# run on 2 cores). On Linux the workers fork from a server that imported them once, before any
# thread pool or accelerator exists; elsewhere each worker is a fresh ``spawn`` interpreter.
_WORKER_PRELOAD = ["geodistill.models", "geodistill.train", "geodistill.tasks"]


def _worker_context() -> Any:
    """The multiprocessing context of sweep workers: ``forkserver`` with :data:`_WORKER_PRELOAD`
    on Linux, ``spawn`` elsewhere (never plain ``fork``: the parent may have torch thread pools or
    CUDA state, which do not survive a fork)."""
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_WORKER_PRELOAD)  # read when the server starts (once per process)
        return ctx
    return multiprocessing.get_context("spawn")


def _watch_parent(pid: int, interval: float = 2.0) -> None:
    """End this process (exit status 1) once process ``pid`` is gone, checking every ``interval``
    seconds from a daemon thread: a worker whose sweep was killed outright (SIGKILL, no cleanup)
    stops instead of training on beside the worker a rerun of the sweep starts for the same run."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pragma: no cover - alive, another user's (pid reused)
                pass

    threading.Thread(target=watch, name="geodistill-watch-sweep", daemon=True).start()


def _child(
    runner: Runner,
    cfg: DistillConfig,
    threads: int | None,
    conn: Any,
    environ: dict[str, str],
    sweep_pid: int | None = None,
) -> None:
    """Body of a worker process: one run, its outcome sent back through ``conn``. ``environ`` is
    the parent's environment when it started the run (a forkserver worker would otherwise have the
    server's, frozen when the server started). The run holds a lock on ``<output_dir>.lock`` while
    it trains, and the worker ends when the sweep process ``sweep_pid`` does."""
    from geodistill.assets import file_lock

    os.environ.clear()
    os.environ.update(environ)
    if sweep_pid is not None:
        _watch_parent(sweep_pid)
    _limit_threads(threads)
    start = time.perf_counter()
    try:
        out = Path(cfg.output_dir)
        with file_lock(out.with_name(out.name + ".lock")):  # one worker per run directory
            results = runner(cfg)
        conn.send(("ok", results, time.perf_counter() - start, None))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}", time.perf_counter() - start, traceback.format_exc()))
    finally:
        conn.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def run_sweep(
    sweep: SweepConfig,
    *,
    quick: bool = False,
    jobs: int = 1,
    runner: Runner | None = None,
    in_process: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepSummary:
    """Run every planned run without an ``ok`` row in results.jsonl; append one row per run.

    ``runner(cfg) -> results`` defaults to :func:`run_distill`. Runs go in fresh worker processes
    (forked from a ``forkserver`` that imported torch and transformers once, on Linux; ``spawn``
    elsewhere), ``jobs`` at a time, each limited to ``max(1, cores // jobs)`` torch threads (unless
    the config sets ``train.threads``), so a crash, however hard, costs only its own run, and
    ``peak_memory_mb`` is the run's own. ``in_process=True`` (the default for a custom runner with
    ``jobs=1``) calls the runner in this process, which lets tests pass any callable. A failed run
    writes an ``error`` row (not counted as finished: the next call retries it) and the sweep goes on.
    A finished run keeps its ``best/`` student, logs and results; its resume checkpoint is deleted
    (a sweep of a few hundred runs would otherwise keep tens of GB of optimiser states).

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process walks the same
    plan and each run is one data-parallel run across all of them, in this process; only rank 0
    writes rows, logs and shows progress, and the list of finished runs is rank 0's, broadcast.
    A failed run stops the sweep there (its row recorded by rank 0 when rank 0 saw the failure):
    the other ranks could be waiting in one of its collectives.
    """
    (summary,) = run_sweeps(
        [sweep], quick=quick, jobs=jobs, runner=runner, in_process=in_process, progress=progress, log=log
    )
    return summary


def run_sweeps(
    sweeps: list[SweepConfig],
    *,
    quick: bool = False,
    jobs: int = 1,
    runner: Runner | None = None,
    in_process: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[SweepSummary]:
    """:func:`run_sweep` for several sweeps at once, in one pool of ``jobs`` processes (no core
    idles between one sweep and the next). A run that several sweeps plan (the same config hash,
    e.g. the KD baseline of an ablation) runs once; each sweep gets its own row for it, with its own
    columns, in its own results.jsonl. A run one sweep already finished is copied into the others'
    results instead of being run again. Returns one summary per sweep, in order."""
    if jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1, got {jobs}")
    launched = _launched_world_size() > 1
    if launched:
        if jobs != 1:
            raise ConfigError(
                f"--jobs {jobs}: under torchrun / accelerate launch each run uses every process; "
                "runs go one at a time (drop --jobs)"
            )
        in_process = True
    elif in_process is None:
        in_process = runner is not None and jobs == 1
    runner = runner or run_distill
    measuring = [geometry_settings(sweep) for sweep in sweeps]
    main_process = not launched or int(os.environ.get("RANK", "0")) == 0
    if not main_process:
        log = _quiet
        progress = False

    plans = [expand(sweep, quick=quick) for sweep in sweeps]
    paths = [sweep_dir(sweep, quick=quick) / "results.jsonl" for sweep in sweeps]
    resolved = [path.resolve() for path in paths]  # one folder spelled two ways is one folder
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ConfigError(
                f"sweeps {sweeps[resolved.index(path)].name!r} and {sweeps[i].name!r} write the same "
                f"{path}; give each its own output_dir"
            )
    files = [read_rows(path) if main_process else [] for path in paths]
    done, copies, waiting = _divide_work(plans, files)
    held = []  # one `geodistill sweep` at a time writes a sweep's runs: two would train each twice
    if main_process:
        writing = {i for runs in waiting.values() for i, _ in runs} | {i for i, _, _ in copies}
        held = [_lock_sweep(paths[i], sweeps[i].name or "") for i in sorted(writing)]
        if held:  # rows another process wrote before the locks were ours are not run again
            files = [read_rows(path) for path in paths]
            done, copies, waiting = _divide_work(plans, files)
    if launched:
        done, waiting = _broadcast_from_rank0((done, waiting), plans[0][0].config if plans[0] else None)
    todo = [runs[0][1] for runs in waiting.values()]

    def runner_for(run: PlannedRun) -> Runner:
        """The runner of ``run``: measuring its student after training where the sweep that runs
        it (the first that plans it) asks for ``geometry:``."""
        settings = measuring[waiting[run.config_hash][0][0]]
        return functools.partial(_measured, runner, settings) if settings else runner

    summaries = []
    world = _launched_world_size()
    for i, (sweep, plan, path) in enumerate(zip(sweeps, plans, paths, strict=True)):
        planned = {run.config_hash for run in plan}
        summaries.append(
            SweepSummary(
                results_path=path,
                planned=len(plan),
                skipped=sum(run.config_hash in done[i] for run in plan),
                finished=0,
                failed=[],
                stale=len({h for h in done[i] if h not in planned}),
            )
        )
        if main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "sweep.json").write_text(
                json.dumps(
                    {"sweep": to_dict(sweep), "quick": quick, "runs": [r.run_id for r in plan]}, indent=2
                )
            )
        own = sum(runs[0][0] == i for runs in waiting.values())
        shared = sum(any(j == i for j, _ in runs[1:]) for runs in waiting.values())
        copied = sum(j == i for j, _, _ in copies)
        log(
            f"sweep {sweep.name}: {len(plan)} runs planned, {summaries[i].skipped} already finished, "
            f"{own + shared + copied} to do"
            + (
                f" ({shared} run for an earlier sweep, {copied} copied from another's results)"
                if shared or copied
                else ""
            )
            + f"; results in {path}"
        )
        if summaries[i].stale:
            log(
                f"note: {path} also holds {summaries[i].stale} finished runs that this sweep file no longer plans"
            )
        # the process count is not part of a run's identity, yet batch_size is per process
        other = sum(r.get("status") == "ok" and r.get("world_size") not in (None, world) for r in files[i])
        other += sum(j == i and row.get("world_size") not in (None, world) for j, _, row in copies)
        if other:
            log(
                f"note: {other} finished runs in {path} ran with another number of processes than this "
                f"launch's {world} (batch_size is per process, so their global batch differs); they "
                "count as finished: delete their rows to run them again here"
            )
    if main_process:
        for i, run, row in copies:
            append_row(paths[i], _copied_row(row, run, sweeps[i].name or ""))
            summaries[i].finished += 1
    if len(sweeps) > 1:
        log(f"{len(todo)} runs to run ({jobs} at a time)")

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        name = "+".join(sweep.name or "" for sweep in sweeps)
        bar = tqdm(total=len(todo), desc=f"sweep {name}", unit="run", dynamic_ncols=True)
    failures = 0

    def record(run: PlannedRun, outcome: tuple[str, Any, float | None, str | None]) -> None:
        nonlocal failures
        status, payload, wall, trace = outcome
        if not main_process:
            return
        if status == "ok":  # finished: the resume checkpoint (weights and AdamW state) is dead weight
            from geodistill.train import RESUME_DIR

            shutil.rmtree(Path(run.config.output_dir) / RESUME_DIR, ignore_errors=True)
            if payload.get("geometry_note"):
                log(f"run {run.run_id}: student not measured against its teacher: {payload['geometry_note']}")
        ran_for = waiting[run.config_hash][0][0]  # the sweep whose folder the run used
        for i, planned in waiting[run.config_hash]:
            if status == "ok":
                row = _row(planned, sweeps[i].name or "", payload, wall)
                summaries[i].finished += 1
            else:
                row = _row(planned, sweeps[i].name or "", None, wall, payload, trace)
                summaries[i].failed.append((planned.run_id, payload))
            if i != ran_for:  # a run two sweeps share: where it ran, and whose row it is (as a copy)
                row.update(output_dir=run.config.output_dir, reused_from=sweeps[ran_for].name or "")
            append_row(paths[i], row)
        if status != "ok":
            failures += 1
            log(f"run {run.run_id} failed: {payload}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ok=bar.n - failures, failed=failures)

    try:
        if in_process:
            for run in todo:
                start = time.perf_counter()
                try:
                    results = runner_for(run)(run.config)
                except Exception as e:
                    outcome = (
                        "error",
                        f"{type(e).__name__}: {e}",
                        time.perf_counter() - start,
                        traceback.format_exc(),
                    )
                else:
                    outcome = ("ok", results, time.perf_counter() - start, None)
                record(run, outcome)
                if launched and outcome[0] != "ok":
                    # a run that failed on some ranks may have left the others waiting in a
                    # collective: stop here (the launcher ends every rank); rerunning resumes
                    raise RuntimeError(
                        f"run {run.run_id} failed on rank {os.environ.get('RANK', '0')}: {outcome[1]}; "
                        "the sweep stops (under a launcher every rank takes part in every run); "
                        "rerun it to go on from here"
                    )
        else:
            _run_processes(todo, runner_for, jobs, record)
    finally:
        if bar is not None:
            bar.close()
        for handle in held:
            if handle is not None:
                handle.close()  # releases the lock
    return summaries


class SweepBusy(OSError):
    """Another process is running this sweep's runs."""


def _lock_sweep(results: Path, name: str) -> Any:
    """An open handle holding an exclusive ``flock`` on ``sweep.lock`` beside ``results`` (None
    where ``fcntl`` is missing); :class:`SweepBusy` when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no guard
        return None
    lock = results.with_name("sweep.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")  # noqa: SIM115 - held open until the sweep ends
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepBusy(
            f"sweep {name!r}: another `geodistill sweep` is running its runs ({lock} is locked); "
            "wait for it to end or stop it (a stopped sweep resumes where it was): two at once "
            "would train the same runs twice"
        ) from None
    return handle


def _finished_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``ok`` rows of a results file, by config hash."""
    return {r.get("config_hash"): r for r in rows if r.get("status") == "ok"}


def _under_current_hashes(
    plans: list[list[PlannedRun]], files: list[list[dict[str, Any]]]
) -> list[list[dict[str, Any]]]:
    """The rows with each ``config_hash`` an older version wrote for a planned run replaced by that
    run's current hash: such a row counts as the run's."""
    former = {h: run.config_hash for plan in plans for run in plan for h in run.former_hashes}
    return [
        [{**r, "config_hash": former.get(r.get("config_hash"), r.get("config_hash"))} for r in rows]
        for rows in files
    ]


def _divide_work(
    plans: list[list[PlannedRun]], files: list[list[dict[str, Any]]]
) -> tuple[
    list[set[str]], list[tuple[int, PlannedRun, dict[str, Any]]], dict[str, list[tuple[int, PlannedRun]]]
]:
    """What each sweep (its plan, the rows of its results.jsonl) has and lacks: the hashes it has
    finished; the runs another sweep finished, to copy (sweep index, run, that row); and the runs to
    do, by hash, each with every (sweep index, run) that plans it, the first of which runs it."""
    files = _under_current_hashes(plans, files)
    done = [set(_finished_rows(rows)) for rows in files]
    finished = {h: r for rows in files for h, r in _finished_rows(rows).items()}
    copies: list[tuple[int, PlannedRun, dict[str, Any]]] = []
    waiting: dict[str, list[tuple[int, PlannedRun]]] = {}
    for i, plan in enumerate(plans):
        for run in plan:
            if run.config_hash in done[i]:
                continue
            if run.config_hash in finished:
                copies.append((i, run, finished[run.config_hash]))
            else:
                waiting.setdefault(run.config_hash, []).append((i, run))
    return done, copies, waiting


def _copied_row(row: dict[str, Any], run: PlannedRun, sweep_name: str) -> dict[str, Any]:
    """Another sweep's row of the same run (same config hash), with this sweep's name and columns;
    ``output_dir`` still says where it ran and ``reused_from`` which sweep's row it is (the first
    sweep's, when that row was itself a copy)."""
    kept = {
        k: v
        for k, v in row.items()
        if (k in _ROW_FIELDS or k.startswith(METRIC_PREFIXES)) and k not in ("error", "traceback")
    }
    return {
        **kept,
        "sweep": sweep_name,
        "reused_from": row.get("reused_from") or row.get("sweep"),
        "run_id": run.run_id,
        **run.values,
        "axes": run.axes,
        "loss_terms": list(run.loss_terms),
    }


def _launched_world_size() -> int:
    """Processes of a torchrun / accelerate launch this process belongs to (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _quiet(message: str) -> None:
    """The log of ranks other than 0: they say nothing."""


def _broadcast_from_rank0(value: Any, cfg: DistillConfig | None) -> Any:
    """``value`` as rank 0 has it, on every rank (initialising the process group as a run would)."""
    import torch.distributed as dist

    from geodistill.train import process_state

    process_state(cfg.train if cfg is not None else DistillConfig().train)
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_processes(
    todo: list[PlannedRun],
    runner_for: Callable[[PlannedRun], Runner],
    jobs: int,
    record: Callable[[PlannedRun, tuple[str, Any, float | None, str | None]], None],
) -> None:
    """At most ``jobs`` worker processes at a time, a fresh one per run."""
    from multiprocessing.connection import wait

    ctx = _worker_context()
    threads = max(1, _cores() // jobs)
    pending = deque(todo)
    teacher_dirs: dict[str, str | None] = {}  # config hash -> its fine-tuned teacher's directory
    # reader -> (process, run, start, the teacher directory it fine-tunes first or None)
    active: dict[Any, tuple[Any, PlannedRun, float, str | None]] = {}
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` stops the workers too

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"stopped by signal {signum}")

        previous = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                # unbuilt teachers' fine-tunes first; no run that waits on a teacher another worker builds
                run = _next_run(pending, {t for *_, t in active.values() if t is not None}, teacher_dirs)
                if run is None:
                    break
                reader, writer = ctx.Pipe(duplex=False)
                cfg_threads = None if run.config.train.threads else threads
                proc = ctx.Process(
                    target=_child,
                    args=(runner_for(run), run.config, cfg_threads, writer, dict(os.environ), os.getpid()),
                    name=f"geodistill-{run.run_id}",
                )
                proc.start()
                writer.close()  # the child holds the only write end: its exit makes the reader ready
                active[reader] = (proc, run, time.perf_counter(), _unbuilt(teacher_dirs[run.config_hash]))
            for reader in wait(list(active)):
                proc, run, start, _ = active.pop(reader)
                try:
                    outcome = reader.recv()
                except EOFError:  # the process died without a word: killed, out of memory, segfault
                    proc.join()
                    code = proc.exitcode
                    why = (
                        f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    )
                    outcome = (
                        "error",
                        f"worker process died ({why}; out of memory?)",
                        time.perf_counter() - start,
                        None,
                    )
                reader.close()
                proc.join()
                record(run, outcome)
    finally:
        for reader, (proc, *_) in active.items():  # interrupted: stop the runs in flight (they resume)
            if proc.is_alive():
                proc.terminate()
            proc.join()
            reader.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _teacher_dir(cfg: DistillConfig) -> str | None:
    """The cache directory of the teacher ``cfg`` fine-tunes before its own run, cached or not
    (None when it uses no fine-tuned teacher)."""
    if not cfg.teacher.finetune:
        return None
    from geodistill.finetune import finetune_config

    return str(Path(finetune_config(cfg).output_dir))


def _unbuilt(directory: str | None) -> str | None:
    """``directory`` when it names a teacher that is not fine-tuned yet, else None."""
    from geodistill.finetune import is_fitted

    return None if directory is None or is_fitted(directory) else directory


def _next_run(
    pending: deque[PlannedRun], building: set[str], dirs: dict[str, str | None] | None = None
) -> PlannedRun | None:
    """Take the next run for a free worker, or None when every pending run would only wait on the
    lock of a teacher that a running worker is fine-tuning.

    A run whose teacher is neither cached nor being fine-tuned goes first: it starts that
    fine-tune now, beside the other workers, rather than at the end of the queue, where the runs
    left would all wait on it with the other workers idle. Otherwise the first run whose teacher
    is ready. ``dirs`` memoises each run's teacher directory by config hash (hashing a teacher's
    config for every pending run at every start would cost more than the scheduling saves).
    """
    dirs = {} if dirs is None else dirs
    ready = None
    for i, run in enumerate(pending):
        if run.config_hash not in dirs:
            dirs[run.config_hash] = _teacher_dir(run.config)
        teacher = _unbuilt(dirs[run.config_hash])
        if teacher is None:
            if ready is None:
                ready = i
        elif teacher not in building:
            del pending[i]
            return run
    if ready is None:
        return None
    run = pending[ready]
    del pending[ready]
    return run


def sweep_main(
    paths: str | Path | list[str | Path],
    overrides: list[str] | None = None,
    *,
    jobs: int = 1,
    quick: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> int:
    """The ``geodistill sweep`` command (one or several sweep files); returns the exit status (1
    when a run failed)."""
    paths = paths if isinstance(paths, list) else [paths]
    sweeps = [load_sweep(path, overrides) for path in paths]
    if dry_run:  # what run_sweeps would do: each sweep's own rows, and those it would copy from the others
        plans = [expand(sweep, quick=quick) for sweep in sweeps]
        files = [read_rows(sweep_dir(sweep, quick=quick) / "results.jsonl") for sweep in sweeps]
        dones, copies, _ = _divide_work(plans, files)
        current = _under_current_hashes(plans, files)
        for i, (sweep, plan, rows, done) in enumerate(zip(sweeps, plans, current, dones, strict=True)):
            # the sweep that ran it (a copy of a copy names the first), as the copied row will say
            copied = {
                run.config_hash: row.get("reused_from") or row.get("sweep") or "?"
                for j, run, row in copies
                if j == i
            }
            failed = {r.get("config_hash") for r in rows if r.get("status") == "error"} - done
            finished = sum(run.config_hash in done for run in plan)
            print(
                f"sweep {sweep.name}: {len(plan)} runs planned, {finished} finished, "
                f"{len(copied)} to copy from another sweep's results, {len(plan) - finished - len(copied)} to run"
            )
            print(f"results: {sweep_dir(sweep, quick=quick) / 'results.jsonl'}\n")
            print(plan_table(plan, done, failed, copied) + "\n")
        return 0
    summaries = run_sweeps(sweeps, quick=quick, jobs=jobs, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 speaks for all
        return 0
    for sweep, summary in zip(sweeps, summaries, strict=True):
        print(
            f"sweep {sweep.name}: {summary.finished} finished now, {summary.skipped} before, "
            f"{len(summary.failed)} failed; results in {summary.results_path}"
        )
        for run_id, error in summary.failed:
            print(f"  failed: {run_id}: {error}", file=sys.stderr)
    if any(summary.failed for summary in summaries):
        print("rerun the same command to retry the failed runs (finished ones are skipped)", file=sys.stderr)
        return 1
    return 0
