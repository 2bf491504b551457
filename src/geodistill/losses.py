"""Distillation loss terms: pure functions of tensors, and one plain registry of them.

Each function computes in float32 (float64 stays float64) whatever the autocast dtype, and says
in its docstring what it measures, its shapes and its source. The objective is a weighted sum of
named terms (:class:`LossTerm`), each logged on its own.

Geometry terms (``cka``, ``procrustes``, ``gram``) are *batch-coupled*: their value depends on
the whole set of samples, not on a sum over examples. The training loop therefore evaluates them
on the whole optimiser batch (across gradient-accumulation steps and, with ``scope: global``,
across data-parallel ranks), never as an average over micro-batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from geodistill import geometry
from geodistill.config import LOSS_OPTIONS, LossConfig

__all__ = [
    "LOSSES",
    "LossSpec",
    "LossTerm",
    "ce_loss",
    "kd_loss",
    "pkd_loss",
    "proj_mse_loss",
    "resolve_losses",
]


def _up(t: Tensor) -> Tensor:
    """At least float32: half precision is upcast, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy on labels, mean over non-ignored positions. ``logits`` (..., C), ``labels`` (...)."""
    return F.cross_entropy(
        _up(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index
    )


def _kl_rows(s: Tensor, t: Tensor, temperature: float, reverse: bool) -> Tensor:
    """Per-row KL between tempered distributions of float32 logit rows ``s``, ``t`` (N, V) -> (N,)."""
    log_ps = F.log_softmax(_up(s) / temperature, dim=-1)
    log_pt = F.log_softmax(_up(t).to(_up(s).dtype) / temperature, dim=-1)
    log_p, log_q = (log_ps, log_pt) if reverse else (log_pt, log_ps)  # KL(p || q)
    # a class p gives probability 0 (a -inf logit: a masked vocabulary entry) contributes 0, not
    # 0 * inf = NaN; filled before the product so that its gradient is 0, not NaN, too
    zero = log_p.isneginf()
    log_p = log_p.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    mask: Tensor | None = None,
    chunk_rows: int = 1024,
) -> Tensor:
    """Logit distillation (Hinton et al. 2015): ``tau^2 * mean_i KL(p_t(tau) || p_s(tau))``.

    ``direction='reverse'`` uses ``KL(p_s || p_t)`` (MiniLLM/GKD). ``student_logits`` and
    ``teacher_logits`` (..., V) must share the vocabulary; ``mask`` (...) bool selects the
    positions that count (e.g. answer tokens); the mean is over selected positions. The tau^2
    factor keeps gradient magnitudes comparable across temperatures. Rows are processed in chunks
    of ``chunk_rows`` under activation checkpointing, so no float32 (positions x V) softmax of the
    whole batch is ever held: memory is O(chunk_rows x V) beyond the logits themselves.
    Range ``[0, inf)``, 0 iff the tempered distributions agree on every selected position.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ (logit KD needs the same vocabulary/label set)"
        )
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kd: direction must be 'forward' or 'reverse', got {direction!r}")
    v = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v).detach()
    w = None if mask is None else mask.reshape(-1).to(torch.float32)
    if w is not None:
        rows = w.nonzero().squeeze(-1)  # only selected positions: cheaper when most are masked
        s, t, w = s[rows], t[rows], None
    if s.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    reverse = direction == "reverse"
    total = s.new_zeros((), dtype=_up(s).dtype)
    for start in range(0, s.shape[0], chunk_rows):
        sc, tc = s[start : start + chunk_rows], t[start : start + chunk_rows]
        if sc.requires_grad and s.shape[0] > chunk_rows:
            kl = checkpoint(_kl_rows, sc, tc, temperature, reverse, use_reentrant=False)
        else:
            kl = _kl_rows(sc, tc, temperature, reverse)
        total = total + kl.sum()
    return temperature**2 * total / s.shape[0]


def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Patient KD (Sun et al. 2019): ``mean_i || s_i/||s_i|| - t_i/||t_i|| ||^2``.

    ``student`` (n, d) (already projected to the teacher width when the widths differ) and
    ``teacher`` (n, d). Per-sample, so decomposable over micro-batches. Range ``[0, 4]``.
    """
    s = F.normalize(_up(student), dim=-1, eps=1e-12)
    t = F.normalize(_up(teacher), dim=-1, eps=1e-12).to(s.dtype)
    return (s - t).square().sum(-1).mean()


def proj_mse_loss(projected: Tensor, teacher: Tensor) -> Tensor:
    """FitNets/TinyBERT hidden-state loss: ``mean((W x + b - y)^2)`` with ``W`` learned.

    ``projected`` = the student features through the learned linear map (n, d_t); ``teacher``
    (n, d_t). The paper's Theorem 2: this can reach 0 while the geometry differs.
    """
    return F.mse_loss(_up(projected), _up(teacher).to(_up(projected).dtype))


def _procrustes(x: Tensor, y: Tensor, *, angular: bool = False) -> Tensor:
    return geometry.procrustes_distance(x, y, angular=angular)


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs and which options it takes (with defaults)."""

    fn: Callable[..., Tensor]
    inputs: str  # "labels", "logits" or "features"
    coupled: bool  # depends on the whole batch of samples (sample statistics)
    projector: bool  # a learned student-width -> teacher-width linear map is trained with it
    options: dict[str, Any]
    cite: str


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(
        ce_loss, "labels", False, False, LOSS_OPTIONS["ce"], "cross-entropy on gold labels (fine-tuning)"
    ),
    "kd": LossSpec(kd_loss, "logits", False, False, LOSS_OPTIONS["kd"], "Hinton et al. 2015"),
    "pkd": LossSpec(
        pkd_loss,
        "features",
        False,
        True,
        LOSS_OPTIONS["pkd"],
        "Sun et al. 2019 (Patient KD)",
    ),
    "proj_mse": LossSpec(
        proj_mse_loss,
        "features",
        False,
        True,
        LOSS_OPTIONS["proj_mse"],
        "Romero et al. 2015; Jiao et al. 2020",
    ),
    "cka": LossSpec(
        geometry.cka_distance,
        "features",
        True,
        False,
        LOSS_OPTIONS["cka"],
        "Kornblith et al. 2019",
    ),
    "procrustes": LossSpec(
        _procrustes,
        "features",
        True,
        False,
        LOSS_OPTIONS["procrustes"],
        "Bhattarai et al. 2025 (arXiv:2509.25253); Williams et al. 2021",
    ),
    "gram": LossSpec(
        geometry.gram_distance,
        "features",
        True,
        False,
        LOSS_OPTIONS["gram"],
        "Bhattarai et al. 2025",
    ),
}


#: the fields of a loss entry that schedule its weight over training (any term), not options of the loss
SCHEDULE_FIELDS = ("start_step", "warmup_steps")


@dataclass(frozen=True)
class LossTerm:
    """A validated loss entry: its key in logs, weight, spec and resolved options."""

    key: str
    name: str
    weight: float
    spec: LossSpec
    options: dict[str, Any]
    warmup_steps: int = 0
    start_step: int = 0

    @property
    def scheduled(self) -> bool:
        """Whether the weight changes over training (a delayed start or a ramp)."""
        return self.start_step > 0 or self.warmup_steps > 0

    def weight_at(self, step: int) -> float:
        """The term's weight at optimiser step ``step`` (1-based): 0 up to ``start_step``, then a
        linear ramp ``weight * k / warmup_steps`` over its k-th step from there, then ``weight``."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        k = step - self.start_step
        if k <= 0:
            return 0.0
        if self.warmup_steps <= 0 or k >= self.warmup_steps:
            return self.weight
        return self.weight * k / self.warmup_steps

    def __call__(self, *args: Tensor, **kw: Any) -> Tensor:
        extra = {k: v for k, v in self.options.items() if k in ("temperature", "direction", "angular")}
        return self.spec.fn(*args, **kw, **extra)


def resolve_losses(configs: tuple[LossConfig, ...] | list[LossConfig]) -> tuple[LossTerm, ...]:
    """Check every entry (known name, options that apply to it, sane values) and fill defaults.

    Errors name the entry: ``losses[2].temperature does not apply to procrustes``.
    """
    if not configs:
        raise ValueError("losses: the objective is empty; add at least one term, e.g. [{name: ce}]")
    terms: list[LossTerm] = []
    counts: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        where = f"losses[{i}]"
        if cfg.name not in LOSSES:
            raise ValueError(f"{where}.name: unknown loss {cfg.name!r}; known: {', '.join(LOSSES)}")
        spec = LOSSES[cfg.name]
        options = dict(spec.options)
        for f in dataclasses.fields(cfg):
            if f.name in ("name", "weight", *SCHEDULE_FIELDS):
                continue
            value = getattr(cfg, f.name)
            if value is None:
                continue
            if f.name not in spec.options:
                raise ValueError(
                    f"{where}.{f.name} does not apply to {cfg.name} (its options: {', '.join(spec.options) or 'none'})"
                )
            options[f.name] = value
        if cfg.weight < 0:
            raise ValueError(f"{where}.weight must be >= 0, got {cfg.weight}")
        for name in SCHEDULE_FIELDS:
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{name} must be a whole number of steps >= 0, got {value!r}")
        if "temperature" in options and not options["temperature"] > 0:
            raise ValueError(f"{where}.temperature must be > 0, got {options['temperature']}")
        counts[cfg.name] = counts.get(cfg.name, 0) + 1
        key = cfg.name if counts[cfg.name] == 1 else f"{cfg.name}.{counts[cfg.name] - 1}"
        schedule = {name: getattr(cfg, name) for name in SCHEDULE_FIELDS}
        terms.append(LossTerm(key, cfg.name, cfg.weight, spec, options, **schedule))
    return tuple(terms)
