"""One explicit training loop on Accelerate, read top to bottom.

    config -> data and models -> features -> losses -> this loop -> results

The teacher is frozen (eval mode, no grad; its outputs cached once per example when possible).
Each optimiser step takes ``grad_accum`` micro-batches. Per-example terms (CE, KD, PKD,
projection MSE) are averaged over the whole step's examples (or answer tokens); batch-coupled
geometry terms (CKA, Procrustes, Gram) are evaluated once on the whole step's samples, with the
gradient fed back to each micro-batch (a first pass without grad collects the features, the
second pass back-propagates their exact gradient: the "gradient cache" technique), so
``batch 8 x accumulation 1`` and ``batch 2 x accumulation 4`` take the same step.

Runs resume exactly (model, projectors, optimiser, scheduler, RNG states, position in the data)
from ``<output_dir>/checkpoint``; every loss term is logged on its own to ``log.jsonl``; a non-
finite loss or gradient stops the run with the last good checkpoint kept. Under fp16 mixed
precision an overflowing gradient is the grad scaler's business (the step is skipped and the loss
scale lowered); only :data:`MAX_OVERFLOW_STEPS` overflows in a row stop the run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from geodistill import __version__
from geodistill.assets import written_whole
from geodistill.config import (
    ConfigError,
    DistillConfig,
    StudentConfig,
    TrainConfig,
    from_dict,
    identity_hash,
    to_dict,
)
from geodistill.distributed import TRAFFIC, global_distance, is_distributed
from geodistill.features import resolve_layer_pairs
from geodistill.geometry import polar_method
from geodistill.losses import LossTerm, _up, resolve_losses
from geodistill.parallel import Parallel, shard_model
from geodistill.tasks import Outputs, Tap

__all__ = ["Run", "Student", "TrainingDiverged", "setup", "train"]


#: the resume checkpoint's folder inside a run's output directory (a sweep deletes it once the run is done)
RESUME_DIR = "checkpoint"


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------
# the trainable module: student + training-only projection heads


@dataclass
class StudentOutputs(Outputs):
    """:class:`Outputs` plus ``projected``: projection head name -> (n, d_t) mapped features. Every
    tensor a loss reads is a field, as DDP finds a forward's outputs by the fields of a dataclass."""

    projected: dict[str, Tensor] = field(default_factory=dict)


def reads_logits(terms: tuple[LossTerm, ...]) -> bool:
    """Whether a term (ce, kd) reads the student's logits, so that every parameter is in the
    loss's graph; feature terms alone leave the head, and any layer above the deepest tap, without
    a gradient."""
    return any(t.spec.inputs in ("labels", "logits") for t in terms)


class Student(nn.Module):
    """The student model plus the projection heads that some losses train with it.

    ``forward(batch)`` returns the student's :class:`StudentOutputs`: the tapped features, and
    ``projected`` features for terms with a learned map (student width -> teacher width). An
    objective of feature terms alone leaves some parameters without a gradient (the head, layers
    above the deepest tap), which DDP then looks for (:class:`Parallel`): it walks back from the
    tensors ``forward`` returns, so the logits come back detached when no term reads them (else the
    head would count as used and DDP wait for its gradient). Only ``model`` is saved as the
    distilled student.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        terms: tuple[LossTerm, ...],
        pairs: dict[str, tuple[tuple[int, int], ...]],
        student_width: int,
        teacher_width: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.logits_read = reads_logits(terms)
        self.projectors = nn.ModuleDict()
        self.projector_taps: dict[str, Tap] = {}  # projector name -> the student tap it maps
        with torch.random.fork_rng(devices=[]):  # heads must not shift the dropout stream: paired runs
            torch.manual_seed(seed + 7919)
            for term in terms:
                if term.spec.projector:
                    for s, t in pairs[term.key]:
                        name = projector_name(term.key, s, t)
                        self.projectors[name] = nn.Linear(student_width, teacher_width)
                        self.projector_taps[name] = (s, term.options["pooling"])
        self.taps: list[Tap] = sorted(
            {(s, term.options["pooling"]) for term in terms if term.key in pairs for s, _ in pairs[term.key]}
        )

    def forward(self, batch: dict[str, Tensor]) -> StudentOutputs:
        out = self.task.forward(self.model, batch, self.taps)
        logits = out.logits
        if logits is not None and not self.logits_read:
            logits = logits.detach()
        return StudentOutputs(
            logits=logits,
            targets=out.targets,
            features=out.features,
            count=out.count,
            projected={
                name: head(out.features[self.projector_taps[name]]) for name, head in self.projectors.items()
            },
        )


def projector_name(key: str, s: int, t: int) -> str:
    # ModuleDict keys may not contain "."; loss keys may ("procrustes.1")
    return f"{key.replace('.', '_')}__{s}__{t}"


# ------------------------------------------------------------------------------------------
# the objective: a weighted sum of named terms


@dataclass
class Objective:
    """Evaluates the named terms on student/teacher :class:`Outputs`; pure (no parameters)."""

    terms: tuple[LossTerm, ...]
    pairs: dict[str, tuple[tuple[int, int], ...]]
    # global terms: label -> {route: its plan, described}, every route a label took (token rows vary)
    collectives: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        return any(t.spec.inputs != "labels" for t in self.terms)

    @property
    def coupled(self) -> tuple[LossTerm, ...]:
        return tuple(t for t in self.terms if t.spec.coupled)

    def teacher_taps(self) -> list[Tap]:
        return sorted(
            {
                (t, term.options["pooling"])
                for term in self.terms
                if term.key in self.pairs
                for _, t in self.pairs[term.key]
            }
        )

    def coupled_student_taps(self) -> list[Tap]:
        return sorted(
            {(s, term.options["pooling"]) for term in self.coupled for s, _ in self.pairs[term.key]}
        )

    def units(self, task: Any, batch: dict[str, Tensor]) -> dict[str, int]:
        """The units each decomposable term of :meth:`per_example` averages over in ``batch``: the
        task's count for ce and kd (examples, or answer tokens), the rows of its sample matrix for
        a feature term (valid tokens with ``tokens`` pooling, else examples). Known before any
        forward pass, so micro-batches and ranks weigh each term exactly."""
        count = task.count(batch)
        return {
            term.key: count if term.name in ("ce", "kd") else task.sample_rows(batch, term.options["pooling"])
            for term in self.terms
            if not term.spec.coupled
        }

    def per_example(self, s: Outputs, t: Outputs | None) -> dict[str, Tensor]:
        """Unweighted values of the decomposable terms, each a mean over its units (:meth:`units`)."""
        values = {}
        for term in self.terms:
            if term.spec.coupled:
                continue
            if term.name == "ce":
                values[term.key] = term(s.logits, s.targets)
            elif term.name == "kd":
                values[term.key] = term(s.logits, t.logits)
            else:  # pkd, proj_mse: learned head from student to teacher width, per layer pair
                pooling = term.options["pooling"]
                vals = [
                    term(s.projected[projector_name(term.key, a, b)], t.features[(b, pooling)])
                    for a, b in self.pairs[term.key]
                ]
                values[term.key] = torch.stack(vals).mean()
        return values

    def batch_coupled(self, s_feats: dict[Tap, Tensor], t_feats: dict[Tap, Tensor]) -> dict[str, Tensor]:
        """Unweighted values of the geometry terms on whole-step sample matrices (mean over pairs)."""
        values = {}
        for term in self.coupled:
            pooling = term.options["pooling"]
            vals = [
                self._coupled(term, s_feats[(a, pooling)], t_feats[(b, pooling)], f"{term.key} {a}->{b}")
                for a, b in self.pairs[term.key]
            ]
            values[term.key] = torch.stack(vals).mean()
        return values

    def _coupled(self, term: LossTerm, x: Tensor, y: Tensor, label: str) -> Tensor:
        """One geometry term; under data parallelism with ``scope: global``, over the global batch."""
        if term.options.get("scope") == "global" and is_distributed():
            return global_distance(
                term.name,
                x,
                y,
                angular=bool(term.options.get("angular", False)),
                on_plan=lambda p: self.collectives.setdefault(label, {}).setdefault(p.route, p.describe()),
            )
        return term(x, y)

    def total(self, values: dict[str, Tensor], step: int) -> Tensor:
        """The weighted sum at optimiser step ``step`` (1-based; a term may start late or ramp up)."""
        return sum(term.weight_at(step) * values[term.key] for term in self.terms if term.key in values)  # type: ignore[return-value]

    def weights_at(self, step: int) -> dict[str, float]:
        """The weights of the scheduled terms at ``step`` (what the training log records)."""
        return {term.key: term.weight_at(step) for term in self.terms if term.scheduled}


# ------------------------------------------------------------------------------------------
# data order


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Data order is a pure function of the seed, so methods trained with the same seed see the same
    examples in the same order (paired comparisons), and a resumed run finds its place by skipping.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardedBatches(Sampler[list[int]]):
    """Micro-batches of an :class:`EpochSampler` order, dealt round-robin to data-parallel ranks.

    With ``world`` ranks, rank ``r`` gets batches ``r, r + world, ...`` of the single-process
    order, so one step of ``world`` ranks x batch ``b`` sees exactly the examples of one
    single-process step with batch ``world x b``. Trailing batches that cannot go to every rank
    are dropped (every rank must take the same number of steps); with one process nothing is.
    Length-grouped batches (``lengths``) are formed at the global batch size ``world x b`` and
    each dealt to the ranks in near-equal parts, for the same equality.
    """

    def __init__(
        self,
        sampler: EpochSampler,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        lengths: list[int] | None = None,
    ) -> None:
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world
        self.lengths = lengths

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _all(self) -> list[list[int]]:
        order = list(self.sampler)
        if self.lengths is None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        steps = length_grouped(
            order, self.lengths, self.batch_size * self.world, self.sampler.seed, self.sampler.epoch
        )
        if self.world == 1:
            return steps
        return [
            part.tolist()
            for step in steps
            if len(step) >= self.world  # a last batch too small to give every rank an example
            for part in np.array_split(np.asarray(step), self.world)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all()
        usable = len(batches) // self.world * self.world
        return iter(batches[self.rank : usable : self.world])

    def __len__(self) -> int:
        if self.lengths is None or self.world == 1:
            return math.ceil(self.sampler.n / self.batch_size) // self.world
        full, rest = divmod(self.sampler.n, self.batch_size * self.world)
        return full + (rest >= self.world)


#: examples per length-sorted group, in batches (as transformers' LengthGroupedSampler)
MEGABATCH = 50


def length_grouped(
    order: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of similar length from a shuffled ``order``, in a shuffled batch order.

    ``order`` is cut into groups of ``MEGABATCH`` batches; each group is sorted by length (longest
    first, ties in shuffled order) and cut into batches; the batches are then shuffled with a
    generator of ``(seed, epoch)``. Every example still appears once per epoch, the order is a pure
    function of seed, epoch and lengths (paired across methods, exact on resume), and batches pad
    to nearly their own examples' length instead of the longest of a random draw.
    """
    group = MEGABATCH * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ------------------------------------------------------------------------------------------
# a prepared run


@dataclass
class Run:
    """Everything a training run needs, built and validated by :func:`setup` before any step."""

    cfg: DistillConfig
    train_cfg: TrainConfig
    output_dir: Path
    task: Any
    student: Student
    teacher: nn.Module | None
    objective: Objective
    tokenizer: Any
    teacher_cache: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _git_revision(where: Path | None = None) -> str | None:
    """The commit geodistill's source came from (short hash), or None outside a git checkout.

    ``-dirty`` is appended when the package's own tracked files differ from that commit, so a row
    run from uncommitted code does not pass for the commit before it; changes elsewhere in the
    repository (results, READMEs) do not count.
    """
    here = where or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if changed else rev or None


def _clear_output_dir(out: Path, cfg: DistillConfig) -> None:
    """Delete the run that ``overwrite`` replaces. Called once setup has validated everything, so
    a config error leaves the old run in place. Every data-parallel rank calls; only the main
    process deletes, and all wait for it before anyone writes."""
    state = process_state(cfg.train)
    if state.is_main_process:
        shutil.rmtree(out)
    state.wait_for_everyone()


def _rehash(prior: dict[str, Any], cls: type) -> str | None:
    """A run.json's config under today's :func:`identity_hash`: a run recorded before the hash
    learnt to leave something out (e.g. loss options spelled out at their default) still resumes."""
    try:
        return identity_hash(from_dict(cls, prior["config"]))
    except (KeyError, TypeError, ValueError):  # ConfigError is a ValueError
        return None


def _output_dir_action(out: Path, cfg: DistillConfig, kind: str) -> str:
    run_file = out / "run.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a directory; choose another output_dir")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    if run_file.exists():
        try:
            prior = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            prior = {}
        digest = identity_hash(cfg)
        if prior.get("kind") == kind and digest in (prior.get("config_hash"), _rehash(prior, type(cfg))):
            return "resume"
        if cfg.overwrite:
            return "overwrite"
        raise ConfigError(
            f"output_dir {out} holds another run (config hash {prior.get('config_hash')}, this one "
            f"{digest}); choose another output_dir or --set overwrite=true"
        )
    if cfg.overwrite:
        return "overwrite"
    raise ConfigError(
        f"output_dir {out} is not empty and holds no geodistill run; choose another output_dir or --set overwrite=true"
    )


def run_metadata(cfg: Any, kind: str) -> dict[str, Any]:
    """Resolved config, its hash, package version and git revision: saved with every run."""
    return {
        "kind": kind,
        "config_hash": identity_hash(cfg),
        "config": to_dict(cfg),
        "version": __version__,
        "git_revision": _git_revision(),
        "torch": torch.__version__,
    }


def quiet_libraries() -> None:
    """Silence per-call progress bars of datasets/transformers (weight loading, map): geodistill
    shows its own bars for the long work."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # also "Writing model shards" in save_pretrained


#: rank r's dropout stream starts from ``seed + 1 + r * DROPOUT_SEED_STRIDE``: far from any other
#: run's seed, and rank 0's is the one-process stream (a prime: distinct mod 2**32 for numpy too)
DROPOUT_SEED_STRIDE = 1_000_000_007


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_student(
    s: StudentConfig,
    *,
    load: Callable[[str], nn.Module],
    teacher_model: Callable[[], nn.Module],
    teacher_config: Callable[[], Any],
    layers_example: str,
    **narrow: Any,
) -> nn.Module:
    """The student that ``s`` describes, every config error naming its field.

    The task supplies how models are made: ``load(name)`` a pretrained model (``init: pretrained``),
    ``teacher_model()`` the teacher's pretrained weights to keep ``s.layers`` of (``layer_subset``),
    ``teacher_config()`` the config a narrow student is shrunk from (``config``), with ``narrow``
    passed on to :func:`geodistill.models.narrow_student` (``task``, ``num_labels``, ``tokenizer``).
    """
    from geodistill import models

    if s.init == "pretrained":
        if not s.name:
            raise ConfigError("student.name: required when student.init is 'pretrained'")
        try:
            return load(s.name)
        except (ValueError, OSError, models.HeadSizeError) as e:  # unknown name, unreadable, another head
            raise ConfigError(f"student.name: {e}") from e
    if s.init == "layer_subset":
        if not s.layers:
            raise ConfigError(
                f"student.layers: required when student.init is 'layer_subset' (e.g. {layers_example})"
            )
        base = teacher_model()
        try:
            return models.layer_subset_student(base, list(s.layers))
        except ValueError as e:
            raise ConfigError(f"student.layers: {e}") from e
    config = teacher_config()
    try:
        return models.narrow_student(
            config,
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            num_heads=s.num_heads,
            intermediate_size=s.intermediate_size,
            architecture=s.architecture,
            **narrow,
        )
    except ValueError as e:
        raise ConfigError(f"student: {e}") from e


def setup(
    cfg: DistillConfig,
    *,
    kind: str = "distill",
    teacher_override: nn.Module | None = None,
    progress: bool = True,
) -> Run:
    """Build and validate a run: every config error surfaces here, before the first step."""
    quiet_libraries()
    out = Path(cfg.output_dir)
    # a directory holding another run is refused now (on every rank alike); one that overwrite
    # replaces is deleted last, after every check below and any teacher fine-tune
    replaces = _output_dir_action(out, cfg, kind) == "overwrite"
    run = _setup(cfg, out, kind=kind, teacher_override=teacher_override, progress=progress)
    metric = cfg.train.select_metric
    if metric is not None and metric not in run.task.dev_metrics:  # else found at the first evaluation
        raise ConfigError(
            f"train.select_metric: {metric!r} is not among the dev metrics {sorted(run.task.dev_metrics)}"
        )
    if replaces:
        _clear_output_dir(out, cfg)
    return run


def _setup(
    cfg: DistillConfig, out: Path, *, kind: str, teacher_override: nn.Module | None, progress: bool
) -> Run:
    from geodistill import models
    from geodistill.data import load_classification
    from geodistill.tasks import ClassificationTask, TeacherCache, cache_file, teacher_fingerprint

    try:
        terms = resolve_losses(cfg.losses)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.task != "classification":
        from geodistill.instruct import setup_instruction

        return setup_instruction(cfg, terms, kind=kind, progress=progress, teacher_override=teacher_override)
    tcfg = cfg.train
    if cfg.teacher.dtype != "float32":
        raise ConfigError(
            f"teacher.dtype: {cfg.teacher.dtype} applies to instruction teachers only; a classification "
            "teacher runs in float32 (its outputs are computed once and cached); leave it at float32"
        )
    if cfg.teacher.shard and tcfg.cache_teacher:
        raise ConfigError(
            "teacher.shard: a classification teacher's outputs are cached (train.cache_teacher: true), computed "
            "once by the main process, so no teacher runs in training to shard; set train.cache_teacher=false "
            "to run it live, sharded across processes"
        )
    data = load_classification(
        cfg.data.name,
        split_seed=cfg.data.split_seed,
        max_train=cfg.data.max_train,
        max_eval=cfg.data.max_eval,
        text_column=cfg.data.text_column,
        text_pair_column=cfg.data.text_pair_column,
        label_column=cfg.data.label_column,
        label_names=cfg.data.label_names,
    )
    num_labels, label_names = len(data.label_names), list(data.label_names)
    objective_needs_teacher = any(t.spec.inputs != "labels" for t in terms)
    has_teacher = teacher_override is not None or objective_needs_teacher

    def load_pretrained(name: str) -> nn.Module:
        return models.load_classifier(name, num_labels=num_labels, label_names=label_names)

    # teacher: fine-tuned on the task once (cached) when asked, frozen. One to be fine-tuned is
    # checked by its architecture (its config: a fine-tuned copy has the same one) until after
    # every check below, so a config error stops the run before the fine-tune (minutes), not after
    teacher_name = cfg.teacher.name
    teacher = teacher_override
    finetune = teacher is None and objective_needs_teacher and cfg.teacher.finetune
    try:
        if teacher is None and objective_needs_teacher and not finetune:
            teacher = load_pretrained(teacher_name)  # before the student's seed, as it always was
        teacher_arch: Any = teacher.config if teacher is not None else None
        if finetune:
            teacher_arch = models.classifier_config(cfg.teacher.name, num_labels, label_names)
        teacher_tok = models.load_tokenizer(cfg.teacher.name)
    except (ValueError, OSError, models.HeadSizeError) as e:  # unknown name, unreadable, another head
        raise ConfigError(f"teacher.name: {e}") from e

    # student: seeded init, sharing the teacher's tokenizer unless pretrained. A narrow student is
    # shrunk from the teacher's config, read without loading weights (a loaded model's new head
    # would draw from the seeded RNG first), so it starts the same with or without a teacher
    seed_everything(tcfg.seed)
    student_model = build_student(
        cfg.student,
        load=load_pretrained,
        teacher_model=lambda: load_pretrained(cfg.teacher.name),
        teacher_config=lambda: (
            teacher_arch
            if teacher_arch is not None
            else models.classifier_config(cfg.teacher.name, num_labels, label_names)
        ),
        layers_example="[0, 2, 4]",
        task="classification",
        num_labels=num_labels,
    )
    tokenizer = models.load_tokenizer(cfg.student.name) if cfg.student.init == "pretrained" else teacher_tok
    _check_max_length(
        cfg.data.max_length,
        student=(student_model.config, tokenizer),
        teacher=(teacher_arch, teacher_tok) if has_teacher else None,
    )
    task = ClassificationTask(data, tokenizer, teacher_tok if has_teacher else None, cfg.data.max_length)

    # feature taps: layer pairs checked against both models
    pairs = feature_pairs(
        terms, student_model, teacher_arch, separate_teacher_inputs=task.separate_teacher_inputs
    )
    if teacher_arch is not None:
        # students are built with the task's labels, as is a loaded or fine-tuned teacher: only a
        # teacher passed in (teacher_override) can have another number
        for i, term in enumerate(terms):
            if term.name == "kd" and teacher_arch.num_labels != student_model.config.num_labels:
                raise ConfigError(
                    f"losses[{i}] (kd): teacher has {teacher_arch.num_labels} labels, student {student_model.config.num_labels}"
                )
    if finetune:
        from geodistill.finetune import finetuned_teacher

        teacher_name = str(finetuned_teacher(cfg, progress=progress))
        teacher = load_pretrained(teacher_name)
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    objective = Objective(terms, pairs)
    student = Student(
        student_model,
        task,
        terms,
        pairs,
        models.hidden_size(student_model),
        models.hidden_size(teacher) if teacher is not None else models.hidden_size(student_model),
        tcfg.seed,
    )

    run = Run(cfg, tcfg, out, task, student, teacher, objective, tokenizer, metadata=run_metadata(cfg, kind))
    if teacher is not None and tcfg.cache_teacher:
        taps = cached_taps(objective.teacher_taps(), teacher, len(task.dataset("train")))
        key = {
            "teacher": teacher_fingerprint(teacher_name, teacher_override),
            "task": task.cache_key(),
            "taps": taps,
        }
        with process_state(tcfg).main_process_first():  # computed once, then read by the other ranks
            run.teacher_cache = TeacherCache.build(
                task,
                teacher,
                taps,
                batch_size=tcfg.eval_batch_size,
                device=torch.device(tcfg.device) if tcfg.device else process_state(tcfg).device,
                path=cache_file("teacher_outputs", key),
                progress=progress,
            )
    return run


#: pooled teacher features of every layer are cached when they take at most this many bytes
POOLED_CACHE_BYTES = 256 * 2**20


def cached_taps(taps: list[Tap], teacher: nn.Module, n_examples: int) -> list[Tap]:
    """The teacher taps to cache: ``taps`` plus the CLS and mean vectors of every layer when small.

    The teacher pass costs the same whichever pooled vectors it keeps, so one cache then serves
    every method, layer map and pooling of a sweep or the demo (KD-only runs build it too) and the
    teacher runs once per task instead of once per tap set. Token taps stay as requested: they are
    n_tokens x d each. Falls back to ``taps`` alone when the pooled vectors of all layers would
    exceed :data:`POOLED_CACHE_BYTES` (large teachers on large training sets).
    """
    from geodistill import models

    n_layers = getattr(getattr(teacher, "config", None), "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        return list(taps)
    layers = n_layers + 1
    pooled_bytes = n_examples * layers * 2 * models.hidden_size(teacher) * 4
    if pooled_bytes > POOLED_CACHE_BYTES:
        return list(taps)
    everything = {(layer, p) for layer in range(layers) for p in ("cls", "mean")} | set(taps)
    return sorted(everything)


def _check_max_length(max_length: int, *, student: tuple[Any, Any], teacher: tuple[Any, Any] | None) -> None:
    """``data.max_length`` within what each model can read: its position embeddings and its
    tokenizer's ``model_max_length`` (a ConfigError naming the key, before any fine-tune; past
    the limit the first long batch fails inside the model's embeddings)."""
    models_ = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    for who, (config, tokenizer) in models_.items():
        limits = {
            "position embeddings": getattr(config, "max_position_embeddings", None),
            "tokenizer's model_max_length": getattr(tokenizer, "model_max_length", None),
        }
        for what, limit in limits.items():
            # transformers says 1e30 for "no limit"
            if isinstance(limit, int) and 0 < limit < 10**9 and max_length > limit:
                raise ConfigError(
                    f"data.max_length: {max_length} tokens is more than the {who} reads ({limit}, its {what})"
                )


def feature_pairs(
    terms: tuple[LossTerm, ...],
    student_model: nn.Module,
    teacher: Any,
    *,
    separate_teacher_inputs: bool = False,
) -> dict[str, tuple[tuple[int, int], ...]]:
    """Layer pairs of every feature term, checked against both models; errors name the loss entry.

    ``teacher``: the teacher model, or only its config (enough to check before it is loaded or
    fine-tuned); None when the run has no teacher.
    """
    from geodistill import models

    pairs: dict[str, tuple[tuple[int, int], ...]] = {}
    for i, term in enumerate(terms):
        if term.spec.inputs != "features":
            continue
        if teacher is None:
            raise ConfigError(f"losses[{i}] ({term.name}) needs a teacher")
        try:
            pairs[term.key] = resolve_layer_pairs(
                term.options["layers"],
                models.num_layers(student_model),
                models.num_layers(teacher),
                where=f"losses[{i}].layers",
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if term.options["pooling"] == "tokens" and separate_teacher_inputs:
            raise ConfigError(f"losses[{i}].pooling: 'tokens' needs student and teacher to share a tokenizer")
    return pairs


# ------------------------------------------------------------------------------------------
# the loop


def _optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norm scales are not decayed
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: the same arithmetic as torch's per-tensor CPU default (bit for bit), in fewer kernels
    impl = {"fused": True} if cfg.fused_optimizer else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, **impl)


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _use_cpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())


def process_state(cfg: TrainConfig):
    """Accelerate's process state (initialises the process group under torchrun / accelerate
    launch). It must be created with the same device choice as the Accelerator: Accelerate only
    recognises a multi-process CPU (gloo) launch when told ``cpu=True``."""
    from accelerate import PartialState

    return PartialState(cpu=_use_cpu(cfg))


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = _use_cpu(cfg)
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if (not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "no"
    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        # Accelerate keeps one precision per process; a process that trains twice (a teacher's
        # fine-tune, then the distillation) may need another: its state is renewed, the process
        # group (PartialState) kept
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mp)


def train(
    run: Run, callbacks: list[Callable[[str, dict[str, Any]], None]] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train ``run.student`` and return the results (also written to ``results.json``)."""
    with polar_method(run.train_cfg.polar, compile=run.train_cfg.compile_polar):
        return _train(run, callbacks, progress)


def _train(
    run: Run, callbacks: list[Callable[[str, dict[str, Any]], None]] | None, progress: bool
) -> dict[str, Any]:
    cfg, out = run.train_cfg, run.output_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = _accelerator(cfg)
    device = acc.device
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())

    train_set = run.task.dataset("train")
    if len(train_set) == 0:
        raise ConfigError(
            f"data.name: the training split of {run.cfg.data.name!r} is empty (after subsampling and filtering)"
        )
    lengths = run.task.lengths("train") if cfg.group_by_length else None
    batches = ShardedBatches(
        EpochSampler(len(train_set), cfg.seed), cfg.batch_size, acc.process_index, acc.num_processes, lengths
    )
    if len(batches) == 0:
        raise ConfigError(
            f"train.batch_size: {len(train_set)} training examples make no batch for each of {acc.num_processes} processes"
        )
    # its own generator: iter(DataLoader) otherwise draws a seed from the global RNG, which would
    # shift the dropout stream of a resumed run
    loader = DataLoader(
        train_set,
        batch_sampler=batches,
        collate_fn=run.task.collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    micro_per_epoch = len(loader)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every

    par = Parallel(acc, cfg.parallel, unused_parameters=not run.student.logits_read)
    if _scaler(acc) is not None and par.fsdp:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a gradient scaler, which the fsdp path does not apply "
            "(its optimiser is not Accelerate's); use bf16 with train.parallel=fsdp"
        )
    student, optimizer = par.wrap(run.student, lambda module: _optimizer(module, cfg))
    scheduler = _schedule(getattr(optimizer, "optimizer", optimizer), cfg, total_steps)
    raw = par.unwrap(student)
    teacher = run.teacher
    sharded_teacher = teacher is not None and run.teacher_cache is None and par.fsdp and run.cfg.teacher.shard
    if teacher is not None and run.teacher_cache is None:
        teacher = shard_model(teacher, device) if sharded_teacher else teacher.to(device)
    objective = run.objective

    # resume
    state = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best": None,
        "best_step": None,
        "train_seconds": 0.0,
        "timed_steps": 0,
    }
    ckpt = out / RESUME_DIR / "state.pt"
    window: dict[str, Any] = {"terms": {}, "comm": []}
    if ckpt.exists():
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
        written_by = len(blob["rng"]) if isinstance(blob["rng"], list) else 1  # one RNG state a rank
        if written_by != acc.num_processes:
            # each rank's place in the data and its dropout stream are per rank: with another
            # number of processes the run would continue on other examples than it would have
            raise ConfigError(
                f"output_dir: {ckpt} was written by a run of {written_by} process(es); resume it with "
                f"{written_by} (this launch has {acc.num_processes}), or give a new output_dir"
            )
        par.load_model_state(raw, blob["student"])
        par.load_optimizer_state(raw, optimizer, blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if _scaler(acc) is not None and "scaler" in blob:  # fp16: the loss scale it had reached
            _scaler(acc).load_state_dict(blob["scaler"])
        state = blob["progress"]
        window = blob.get("log_window") or window  # steps since the last log line (older checkpoints: none)
        rngs = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]
        _set_rng_state(rngs[acc.process_index])
    else:
        # the dropout stream: the same for every method with this seed; each rank draws its own
        # (rank 0 a single process's), else every rank drops the same units of its own rows
        seed_everything(cfg.seed + 1 + DROPOUT_SEED_STRIDE * acc.process_index)
    acc.wait_for_everyone()  # every rank has read the checkpoint before the main process writes
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with written_whole(out / "run.json") as tmp:  # a kill leaves the old file or the new one
            tmp.write_text(json.dumps(run.metadata, indent=2, default=str))
        if ckpt.exists():
            _truncate_log(out / "log.jsonl", state["step"])
        else:
            (out / "log.jsonl").unlink(missing_ok=True)

    def teacher_outputs(batch: dict[str, Tensor]) -> Outputs | None:
        if not objective.needs_teacher:
            return None
        taps = objective.teacher_taps()
        if run.teacher_cache is not None:
            return run.teacher_cache.lookup(batch, taps, device)
        with torch.no_grad():
            out = run.task.forward(teacher, batch, taps, teacher=True)
        if sharded_teacher:  # FSDP keeps a root's parameters gathered after its forward, for a
            teacher.reshard()  # backward that a frozen teacher never has: give the memory back
        return out

    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc=f"{out.name}", dynamic_ncols=True)

    # the steps since the last log line, which the next one averages (kept in checkpoints)
    log_terms: dict[str, list[float]] = {k: list(v) for k, v in window["terms"].items()}
    log_comm: list[float] = list(window["comm"])  # bytes this rank sent per step in global-loss collectives
    overflowed = 0  # fp16: steps in a row whose gradients overflowed (each skipped by the scaler)
    student.train()
    while state["step"] < total_steps:
        batches.set_epoch(state["epoch"])
        it = iter(loader)
        for _ in range(state["batch_in_epoch"]):  # resume: skip what this epoch already consumed
            next(it)
        while state["step"] < total_steps:
            group = []
            for mb in it:
                group.append(_to(mb, device))
                state["batch_in_epoch"] += 1
                if len(group) == cfg.grad_accum:
                    break
            if not group:
                break
            t0, sent = time.perf_counter(), TRAFFIC.bytes
            values, grad_norm = _step(
                acc,
                par,
                student,
                objective,
                group,
                teacher_outputs,
                optimizer,
                cfg,
                run.task,
                state["step"] + 1,
            )
            elapsed = time.perf_counter() - t0
            state["step"] += 1
            state["comm_bytes"] = state.get("comm_bytes", 0.0) + TRAFFIC.bytes - sent
            log_comm.append(TRAFFIC.bytes - sent)
            if state["step"] > 1:  # the first step pays one-off costs (allocation, warm-up)
                state["train_seconds"] += elapsed
                state["timed_steps"] += 1
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            overflowed = 0 if math.isfinite(grad_norm) else overflowed + 1
            scaler = _scaler(acc)
            if bad or (overflowed and (scaler is None or overflowed >= MAX_OVERFLOW_STEPS)):
                what = f"loss term {bad[0]!r} is {values[bad[0]]}" if bad else f"gradient norm is {grad_norm}"
                if not bad and scaler is not None:
                    what += f" for {overflowed} steps in a row (fp16 loss scale now {scaler.get_scale():g})"
                last = (
                    f"the last good checkpoint is {ckpt} (step {torch.load(ckpt, weights_only=False)['progress']['step']})"
                    if ckpt.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(f"step {state['step']}: {what}; training stopped, {last}")
            lr = scheduler.get_last_lr()[0]  # the rate this step used (logged), before the schedule moves on
            # after the divergence check: a diverged first step (never applied) ends with its one-line
            # error, not with torch's warning about a scheduler stepping before its optimizer
            with warnings.catch_warnings():
                if _scaler(acc) is not None:  # its step() swaps optimizer.step, which torch takes for misuse
                    warnings.filterwarnings("ignore", r"Seems like `optimizer.step\(\)` has been overridden")
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
            for k, v in values.items():
                log_terms.setdefault(k, []).append(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            if (state["step"] % cfg.log_every == 0 or state["step"] == total_steps) and acc.is_main_process:
                _log(
                    out,
                    {
                        "step": state["step"],
                        "epoch": state["epoch"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "seconds_per_step": elapsed,
                        **(
                            {"comm_mib_per_step": float(np.mean(log_comm)) / 2**20}
                            if run.objective.collectives
                            else {}
                        ),
                        **{f"loss/{k}": float(np.mean(v)) for k, v in log_terms.items()},
                        **{f"weight/{k}": w for k, w in objective.weights_at(state["step"]).items()},
                    },
                )
                log_terms, log_comm = {}, []
            epoch_end = state["batch_in_epoch"] >= micro_per_epoch
            if (
                state["step"] % eval_every == 0
                or state["step"] == total_steps
                or (cfg.eval_every is None and epoch_end)
            ):
                _evaluate_and_select(run, raw, state, acc, par, device, final=state["step"] == total_steps)
            if (
                state["step"] % save_every == 0
                or state["step"] == total_steps
                or (cfg.save_every is None and epoch_end)
            ):
                log_window = {"terms": log_terms, "comm": log_comm}  # what the next log line averages
                _save_checkpoint(ckpt, raw, optimizer, scheduler, state, acc, par, log_window=log_window)
            for cb in callbacks or []:
                cb("step_end", {"step": state["step"], "values": values})
            if epoch_end:
                break
        if state["batch_in_epoch"] >= micro_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if bar is not None:
        bar.close()
    return _finish(run, raw, state, acc, device)


#: fp16: consecutive overflowing steps (each skipped, the loss scale halved) taken as divergence;
#: a routine overflow recovers in one or two, and 20 halvings take the default scale 65536 below 1
MAX_OVERFLOW_STEPS = 20


def _step(
    acc,
    par: Parallel,
    student,
    objective: Objective,
    group: list[dict[str, Tensor]],
    teacher_outputs,
    optimizer,
    cfg: TrainConfig,
    task: Any,
    step: int,
) -> tuple[dict[str, float], float]:
    """Optimiser step ``step`` (1-based) over the micro-batches in ``group``; returns unweighted term
    values and the gradient norm (before clipping)."""
    t_outs = [teacher_outputs(mb) for mb in group]
    taps = objective.coupled_student_taps()
    # each per-example term averages over its units (examples, answer tokens or valid tokens) of
    # the whole global step; DDP averages gradients over ranks, hence the world size over the
    # global count
    units = [objective.units(task, mb) for mb in group]
    keys = list(units[0])
    totals = {k: float(sum(u[k] for u in units)) for k in keys}
    global_totals = dict(totals)
    if acc.num_processes > 1 and keys:
        n = torch.tensor([totals[k] for k in keys], device=acc.device, dtype=torch.float64)
        torch.distributed.all_reduce(n)
        global_totals = dict(zip(keys, n.tolist(), strict=True))
    shares = {k: acc.num_processes / global_totals[k] for k in keys}
    values: dict[str, float] = {}

    # 1) With several micro-batches, the batch-coupled terms are evaluated once on the whole step's
    #    samples: a pass without grad collects the features (under the same RNG state as pass 2, so
    #    dropout masks match) and their exact gradient is fed back to each micro-batch in pass 2.
    feature_grads: list[dict[Tap, Tensor]] | None = None
    if objective.coupled and len(group) > 1:
        rng = _rng_state()
        feats: list[dict[Tap, Tensor]] = []
        with torch.no_grad(), acc.autocast():
            for mb in group:  # one forward per micro-batch, in pass 2's order: the same dropout draws
                out = student(mb)
                feats.append({k: _up(out.features[k].detach()) for k in taps})
        _set_rng_state(rng)
        leaves = {k: torch.cat([f[k] for f in feats]).requires_grad_(True) for k in taps}
        t_feats = {k: torch.cat([t.features[k] for t in t_outs]) for k in objective.teacher_taps()}
        coupled_vals = objective.batch_coupled(leaves, t_feats)
        grads = torch.autograd.grad(objective.total(coupled_vals, step), list(leaves.values()))
        feature_grads = [{} for _ in group]
        for k, g in zip(leaves, grads, strict=False):
            for i, part in enumerate(torch.split(g, [f[k].shape[0] for f in feats])):
                feature_grads[i][k] = part
        values.update({k: float(v.detach()) for k, v in coupled_vals.items()})

    # 2) Forward with grad per micro-batch; per-example terms weighted by their share of the step.
    for i, (mb, t_out) in enumerate(zip(group, t_outs, strict=False)):
        with par.no_sync(student, skip=i < len(group) - 1):
            with acc.autocast():
                s_out = student(mb)
                per = objective.per_example(s_out, t_out)
                weighted = {k: v * (units[i][k] * shares[k]) for k, v in per.items()}
                loss = objective.total(weighted, step) if per else 0.0
                if feature_grads is not None:
                    # a surrogate whose gradient w.r.t. these features is the whole-step gradient
                    loss = loss + sum((_up(s_out.features[k]) * feature_grads[i][k]).sum() for k in taps)
                elif objective.coupled:
                    coupled_vals = objective.batch_coupled(
                        {k: s_out.features[k] for k in taps}, t_out.features
                    )
                    loss = loss + objective.total(coupled_vals, step)
                    values.update({k: float(v.detach()) for k, v in coupled_vals.items()})
            acc.backward(loss)
        for k, v in per.items():  # this rank's share of the global mean
            values[k] = values.get(k, 0.0) + float(v.detach()) * units[i][k] / global_totals[k]
    if acc.num_processes > 1 and keys:
        # the shares of every rank summed: the global step's values, the same on every rank (one
        # collective, in the same place on each), so the log shows what one process on the global
        # batch would, and every rank takes the same decision below and in the divergence check
        shares_sum = torch.tensor([values[k] for k in keys], device=acc.device, dtype=torch.float64)
        torch.distributed.all_reduce(shares_sum)
        values.update(zip(keys, shares_sum.tolist(), strict=True))
    grad_norm = par.clip(student, cfg.max_grad_norm)
    if all(math.isfinite(v) for v in values.values()) and (
        math.isfinite(grad_norm) or _scaler(acc) is not None
    ):
        # fp16: the grad scaler's step skips an update whose gradients overflowed and lowers its
        # scale (the routine case it exists for); without one a non-finite gradient is never applied
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, grad_norm


def _scaler(acc) -> Any:
    """Accelerate's fp16 GradScaler, or None (float32 and bf16 need no loss scaling)."""
    return getattr(acc, "scaler", None)


def _evaluate_and_select(
    run: Run,
    raw: Student,
    state: dict[str, Any],
    acc,
    par: Parallel,
    device: torch.device,
    final: bool = False,
) -> None:
    """Dev metrics and best-student selection (``best/``). The main process evaluates while the
    others wait; under FSDP every rank takes part in the forwards and the state-dict gathering.

    At the final step the last student's metrics are kept too (``state["last"]``), its test metrics
    measured here when an earlier step was selected: what choosing the best step on dev gained or
    cost against simply stopping, measured on every run."""
    if acc.is_main_process or par.collective_eval:
        batch_size = run.train_cfg.eval_batch_size
        dev = run.task.evaluate(raw.model, "dev", batch_size=batch_size, device=device)
        metric = run.train_cfg.select_metric or run.task.data.metric
        if metric not in dev:
            raise ConfigError(f"train.select_metric: {metric!r} is not among the dev metrics {sorted(dev)}")
        if acc.is_main_process:
            _log(
                run.output_dir,
                {"step": state["step"], "epoch": state["epoch"], **{f"dev/{k}": v for k, v in dev.items()}},
            )
        if state["best"] is None or dev[metric] > state["best"]:
            state["best"], state["best_step"], state["best_dev"] = dev[metric], state["step"], dev
            weights = None
            if par.fsdp:  # gathered in full from the shards
                weights = {
                    k[len("model.") :]: v for k, v in par.model_state(raw).items() if k.startswith("model.")
                }
            if acc.is_main_process:
                _save_student(raw.model, run.tokenizer, run.output_dir / "best", run.metadata, weights)
        if final:  # the selected student's test metrics are measured in _write_results anyway
            test = None
            if state["best_step"] != state["step"]:
                test = run.task.evaluate(raw.model, "test", batch_size=batch_size, device=device)
            state["last"] = {"step": state["step"], "dev": dev, "test": test}
    acc.wait_for_everyone()


def _save_student(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    metadata: dict[str, Any],
    state_dict: dict[str, Tensor] | None = None,
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    (tmp / "geodistill_run.json").write_text(json.dumps(metadata, indent=2, default=str))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def _save_checkpoint(
    path: Path,
    raw: Student,
    optimizer,
    scheduler,
    state: dict[str, Any],
    acc,
    par: Parallel,
    *,
    log_window: dict[str, Any] | None = None,
) -> None:
    """Written once, by the main process, with every rank's RNG state (exact resume under DDP),
    under fp16 the grad scaler's state, and the loss values logged since the last log line (a
    resumed run's next line averages the same steps as an uninterrupted one's)."""
    model_state, optimizer_state = par.model_state(raw), par.optimizer_state(raw, optimizer)  # collective
    rngs = [_rng_state()]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)
    if acc.is_main_process:
        blob = {
            "student": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "progress": dict(state),
            "rng": rngs,
            "log_window": copy.deepcopy(log_window or {"terms": {}, "comm": []}),
        }
        if _scaler(acc) is not None:  # fp16: resume with the loss scale reached, not the initial one
            blob["scaler"] = _scaler(acc).state_dict()
        with written_whole(path) as tmp:
            torch.save(blob, tmp)
    acc.wait_for_everyone()


def _log(out: Path, row: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again) and a
    last line cut short by a kill; the file is replaced whole."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(line)
    with written_whole(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # Windows
        return float("nan")


def _finish(run: Run, raw: Student, state: dict[str, Any], acc, device: torch.device) -> dict[str, Any]:
    """Evaluate the best checkpoint on dev and test (main process); write results.json."""
    results_file = run.output_dir / "results.json"
    if acc.is_main_process:
        _write_results(run, raw, state, acc, device, results_file)
    acc.wait_for_everyone()
    return json.loads(results_file.read_text())


def _write_results(
    run: Run, raw: Student, state: dict[str, Any], acc, device: torch.device, path: Path
) -> None:
    best_dir = run.output_dir / "best"
    best = type(raw.model).from_pretrained(best_dir).to(device)
    cfg = run.train_cfg
    # the best student's dev metrics were measured when it was selected (checkpoints written before
    # they were kept have to measure them again)
    dev = state.get("best_dev") or run.task.evaluate(
        best, "dev", batch_size=cfg.eval_batch_size, device=device
    )
    test = run.task.evaluate(best, "test", batch_size=cfg.eval_batch_size, device=device)
    last = state.get("last")  # None: a checkpoint from before the last step's metrics were kept
    if last is not None and last["step"] == state["best_step"]:  # the last step is the selected one
        last = {**last, "test": test}
    results = {
        **{k: v for k, v in run.metadata.items() if k != "config"},
        "output_dir": str(run.output_dir),
        "student_dir": str(best_dir),
        "steps": state["step"],
        "best_step": state["best_step"],
        "dev": dev,
        "test": test,
        "last": last,
        "metric": cfg.select_metric or run.task.data.metric,
        "seconds_per_step": state["train_seconds"] / max(1, state["timed_steps"]),
        "train_seconds": state["train_seconds"],
        "peak_memory_mb": _peak_memory_mb(),
        "student_parameters": sum(p.numel() for p in raw.model.parameters()),
        "world_size": acc.num_processes,
        # global-scope geometry terms: the route(s) each layer pair took with its planned bytes,
        # and the bytes this rank really sent per step (float64 refinement near 0 included)
        "collectives": {
            label: "; ".join(routes.values()) for label, routes in run.objective.collectives.items()
        },
        "comm_mib_per_step": state.get("comm_bytes", 0.0) / max(1, state["step"]) / 2**20,
    }
    # whole or absent: it is the mark of a finished run that resuming trusts (a kill mid-write must
    # not leave half a file that every later attempt fails to parse)
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))


def distill(cfg: DistillConfig, *, progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    """Set up and train one run from a config; returns its results."""
    return train(setup(cfg, progress=progress), callbacks=callbacks, progress=progress)


def with_output_dir(cfg: DistillConfig, output_dir: str | Path) -> DistillConfig:
    return replace(cfg, output_dir=str(output_dir))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers + fast tokenizers
