"""Evaluate saved models and compare models' representations, from a config's dataset: two
models (``similarity_report``) or every trained student of a sweep against its teacher
(``student_geometry``)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from geodistill.config import ConfigError, DistillConfig

__all__ = [
    "GEOMETRY_SETTINGS",
    "NotMeasured",
    "check_geometry_settings",
    "evaluate_saved",
    "measure_student",
    "similarity_report",
    "student_geometry",
]


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


def _layer(states: list[torch.Tensor], index: int, name: str, model: str) -> torch.Tensor:
    if not -len(states) <= index < len(states):
        raise ValueError(
            f"{name} {index}: {model} has {len(states)} hidden states (0 = embeddings, -1 = last)"
        )
    return states[index]


#: the settings of a measurement against the teacher and their defaults (``geodistill geometry``,
#: a sweep's ``geometry:``)
GEOMETRY_SETTINGS: dict[str, Any] = {
    "split": "test",
    "pooling": "tokens",
    "max_examples": 256,
    "student_layer": -1,
    "teacher_layer": -1,
}


def check_geometry_settings(settings: dict[str, Any], where: str = "geometry") -> dict[str, Any]:
    """``settings`` (some of :data:`GEOMETRY_SETTINGS`' keys) completed with the defaults; a bad key
    or value raises :class:`~geodistill.config.ConfigError` naming ``<where>.<key>``."""
    from geodistill.data.classification import SPLITS
    from geodistill.features import POOLINGS

    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(GEOMETRY_SETTINGS)}, got {settings!r}")
    for key, value in settings.items():
        if key not in GEOMETRY_SETTINGS:
            raise ConfigError(f"{where}.{key}: unknown setting (settings: {', '.join(GEOMETRY_SETTINGS)})")
        if key == "split" and value not in SPLITS:
            raise ConfigError(f"{where}.split: expected train, dev or test, got {value!r}")
        if key == "pooling" and value not in POOLINGS:
            raise ConfigError(f"{where}.pooling: expected one of {', '.join(POOLINGS)}, got {value!r}")
        if key in ("max_examples", "student_layer", "teacher_layer") and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
        if key == "max_examples" and value < 1:
            raise ConfigError(f"{where}.max_examples: expected at least 1, got {value}")
    return {**GEOMETRY_SETTINGS, **settings}


class NotMeasured(Exception):
    """A run whose student cannot be measured against its teacher here; the message says why."""


def measure_student(
    run_dir: str | Path,
    settings: dict[str, Any] | None = None,
    *,
    teacher_states: dict[tuple[str, str], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """A finished run's trained student (``<run_dir>/best``) against the teacher it learnt from:
    ``({measure: value}, the measurement's settings + samples + teacher + seconds)`` for every measure of
    :data:`geodistill.similarity.MEASURES` between the student's hidden state ``student_layer``
    and the teacher's ``teacher_layer`` (0 = embeddings, -1 = last), pooled by ``pooling``, on a
    seeded stratified sample of ``max_examples`` of ``split`` (``data.max_eval``'s sampling: the
    same examples for every run of a data config). ``settings`` are :data:`GEOMETRY_SETTINGS`'
    keys, defaults for those left out. ``teacher_states`` caches the teacher's states across calls.
    Raises :class:`NotMeasured` for a run this machine cannot measure (no checkpoint here, its
    fine-tuned teacher not here, not a classifier, tokens of two tokenizers)."""
    from geodistill import models
    from geodistill.config import from_dict, to_dict
    from geodistill.finetune import fitted_teacher
    from geodistill.similarity import hidden_states, measure_pair
    from geodistill.train import quiet_libraries

    quiet_libraries()  # no per-call bars of weight loading and dataset maps
    start = time.perf_counter()
    s = check_geometry_settings(settings or {}, "measure_student")
    run_dir = Path(run_dir)
    student_dir = run_dir / "best"
    if not (student_dir / "config.json").exists() or not (run_dir / "run.json").exists():
        raise NotMeasured(f"no trained student at {student_dir} on this machine")
    cfg = from_dict(DistillConfig, json.loads((run_dir / "run.json").read_text())["config"])
    if cfg.task != "classification":
        raise NotMeasured(f"task {cfg.task!r}; only classification students are measured")
    # the teacher it distilled from: the named model, or its fine-tuned copy in this cache
    fitted = fitted_teacher(cfg) if cfg.teacher.finetune else cfg.teacher.name
    if fitted is None:
        raise NotMeasured(
            "its fine-tuned teacher is not on this machine (geodistill finetune with the run's config fits it)"
        )
    teacher_name = str(fitted)
    tok_s, tok_t = models.load_tokenizer(str(student_dir)), models.load_tokenizer(teacher_name)
    task = _classification_task(cfg, tok_s, tok_t, max_examples=s["max_examples"])
    if s["pooling"] == "tokens" and task.separate_teacher_inputs:
        raise NotMeasured("pooling 'tokens' needs the student to share the teacher's tokenizer")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = cfg.train.eval_batch_size
    split, pooling = s["split"], s["pooling"]
    teacher_states = {} if teacher_states is None else teacher_states
    key = (
        teacher_name,
        json.dumps([to_dict(cfg.data), s["max_examples"], split, pooling, s["teacher_layer"]], default=str),
    )
    if key not in teacher_states:
        teacher = models.load_classifier(teacher_name, num_labels=task.num_labels).to(device)
        states = hidden_states(teacher, task, split, pooling, batch, teacher=True)
        teacher_states[key] = _layer(states, s["teacher_layer"], "teacher_layer", teacher_name)
        del teacher
    student = models.load_classifier(str(student_dir), num_labels=task.num_labels).to(device)
    states = hidden_states(student, task, split, pooling, batch, teacher=False)
    x = _layer(states, s["student_layer"], "student_layer", str(student_dir))
    y = teacher_states[key]
    if x.shape[0] != y.shape[0]:
        raise RuntimeError(f"{run_dir}: {x.shape[0]} student samples but {y.shape[0]} teacher samples")
    values = measure_pair(x, y)
    # the measurement's own cost, the teacher's states included where computed in this call
    seconds = time.perf_counter() - start
    return values, {**s, "samples": x.shape[0], "teacher": teacher_name, "seconds": seconds}


def student_geometry(
    results: Sequence[str | Path],
    out_dir: str | Path,
    *,
    where: dict[str, list[str]] | None = None,
    progress: bool = True,
    **settings: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each finished run of some sweeps' results against the teacher it learnt from
    (:func:`measure_student` with ``settings``: ``split``, ``pooling``, ``max_examples``,
    ``student_layer``, ``teacher_layer``).

    Each measured run is appended to ``out_dir/geometry.jsonl`` at once: its results row plus
    ``<split>.teacher_cka``, ``<split>.teacher_procrustes``, ``<split>.teacher_procrustes_angular``,
    ``<split>.teacher_gram`` and the measurement's settings (``geometry``), so ``geodistill report``
    compares methods on them, paired by seed as on accuracy; an interrupted call resumes, skipping
    the runs already there. A row that already holds a measurement with these settings (a sweep
    with ``geometry:`` measured it when it finished) is taken as it is, with no checkpoint needed.
    The teacher's states are computed once per teacher and data split. Returns every measured row
    (earlier calls' too) and notes on the runs that could not be measured here (no checkpoint on
    this machine, teacher not fitted here, not a classifier).
    """
    from geodistill.experiments import append_row, read_rows
    from geodistill.stats import GEOMETRY_NAME, merge_results, select_rows

    settings = check_geometry_settings(settings, "student_geometry")
    split = settings["split"]
    rows, _, _ = merge_results(results)
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    if where:
        rows = select_rows(rows, where)
    out = Path(out_dir) / GEOMETRY_NAME
    measured = read_rows(out)
    for r in measured:
        if _settings_of(r) != settings:
            raise ValueError(
                f"{out} holds measurements with other settings ({r.get('geometry')}, asked {settings}); "
                "choose another --out"
            )
    done = {r.get("config_hash") for r in measured}
    todo = [r for r in rows if r.get("config_hash") not in done]
    notes: list[str] = []
    if not todo:
        return measured, notes
    teacher_states: dict[tuple[str, str], torch.Tensor] = {}
    bar = todo
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(todo, desc="student geometry", unit="run", dynamic_ncols=True)
    for row in bar:
        if _settings_of(row) == settings and f"{split}.teacher_procrustes" in row:
            new = row  # measured by its sweep when the run finished
        else:
            try:
                values, meta = measure_student(
                    str(row.get("output_dir")), settings, teacher_states=teacher_states
                )
            except NotMeasured as e:
                notes.append(f"{row.get('run_id')}: {e}")
                continue
            new = {**row, **{f"{split}.teacher_{m}": v for m, v in values.items()}, "geometry": meta}
        append_row(out, new)
        measured.append(new)
    return measured, notes


def _settings_of(row: dict[str, Any]) -> dict[str, Any]:
    """The settings of the measurement a row holds (None for each when it holds none)."""
    return {k: (row.get("geometry") or {}).get(k) for k in GEOMETRY_SETTINGS}
