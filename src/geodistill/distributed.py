"""Batch-coupled losses over the global batch under data parallelism (DDP, FSDP).

Procrustes, Gram and CKA depend on the whole set of samples, so under data parallelism a loss
computed on each rank's shard ("local" scope, what other distillation tools do) changes meaning
with the number of processes. With ``scope: global`` (the default) every rank computes the
distance of the *global* batch, and gradients flow back to every rank's features.

Two exact routes, chosen per call by the bytes they move (forward; the backward moves the same):

* ``gather``: all-gather the rows of both feature matrices (``N (d_s + d_t)`` values for ``N``
  global rows), then the single-process distance on the concatenation;
* ``stats``: all-reduce the d x d sufficient statistics instead (column sums, squared norms and
  ``X^T Y`` for Procrustes, plus ``X^T X`` and ``Y^T Y`` for Gram and CKA) after centring on the
  global mean: ``d_s + d_t + 2 + d_s d_t`` values (Procrustes) or ``... + d_s^2 + d_t^2``.

Gradient scaling: the collectives' backward sums the identical upstream gradient of every rank,
so each rank's feature gradient is ``world_size`` times its share of the single-process gradient;
DDP's averaging of parameter gradients divides by ``world_size`` again, so the optimiser sees
exactly the single-process gradient of the global-batch loss. Per-example terms need no special
care: the mean over each equal shard, averaged by DDP, is the global mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from geodistill import geometry

__all__ = ["CollectivePlan", "global_distance", "is_distributed", "plan", "world_size"]

KINDS = ("procrustes", "gram", "cka")


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


@dataclass(frozen=True)
class CollectivePlan:
    """Which route a global distance takes and what it moves per call (forward pass)."""

    route: str  # "gather" or "stats"
    values: int  # floats moved per rank in the forward collectives
    bytes: int

    def describe(self) -> str:
        return f"{self.route}: {self.values:,} values ({self.bytes / 2**20:.2f} MiB) per step and layer pair, forward"


def plan(
    kind: str, n_global: int, d_s: int, d_t: int, element_size: int = 4, route: str = "auto"
) -> CollectivePlan:
    """The route for a distance of ``kind`` over ``n_global`` rows (``auto``: the one moving fewer values)."""
    gather = n_global * (d_s + d_t)
    stats = d_s + d_t + 2 + d_s * d_t + (0 if kind == "procrustes" else d_s * d_s + d_t * d_t)
    if route == "auto":
        route = "stats" if stats < gather else "gather"
    elif route not in ("gather", "stats"):
        raise ValueError(f"route must be 'auto', 'gather' or 'stats', got {route!r}")
    values = stats if route == "stats" else gather
    return CollectivePlan(route, values, values * element_size)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums every rank's upstream gradient (it is its own adjoint)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        torch.distributed.all_reduce(g)
        return g


def _all_reduce(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t)


def _row_counts(n_local: int, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(counts, torch.tensor([n_local], device=device))
    return [int(c) for c in counts]


class _AllGather(torch.autograd.Function):
    """Stack every rank's equal-shaped tensor; backward: this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g)  # gloo has no reduce-scatter; the sum of every rank's gradient
        return g[torch.distributed.get_rank()]


def gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    """Concatenate every rank's rows of ``x`` (rank order), differentiably; shards may differ in size."""
    padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - x.shape[0]))  # all_gather needs equal shapes
    parts = _AllGather.apply(padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def global_distance(
    kind: str,
    x: Tensor,
    y: Tensor,
    *,
    angular: bool = False,
    route: str = "auto",
    on_plan: Callable[[CollectivePlan], None] | None = None,
) -> Tensor:
    """The distance of ``kind`` (procrustes, gram, cka = ``1 - CKA``) over all ranks' rows.

    ``x`` (n_r, d_s), ``y`` (n_r, d_t): this rank's rows (matched). Every rank gets the same value.
    Falls back to the single-process distance outside a process group. ``route``: ``auto``
    (fewer bytes), ``gather`` or ``stats``; ``on_plan`` receives the chosen :class:`CollectivePlan`.
    """
    if kind not in KINDS:
        raise ValueError(f"global_distance: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not is_distributed():
        x, y = geometry._check_pair(x, y)
        return _single(kind, x, y, angular)
    for t, name in ((x, "x"), (y, "y")):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    dtype = geometry._compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    counts = _row_counts(x.shape[0], x.device)
    n = sum(counts)
    if n < 2:
        raise ValueError(f"the global batch has {n} row(s); at least 2 are needed to centre")
    chosen = plan(kind, n, x.shape[1], y.shape[1], x.element_size(), route)
    if on_plan is not None:
        on_plan(chosen)
    if chosen.route == "gather":
        return _single(kind, gather_rows(x, counts), gather_rows(y, counts), angular)
    if kind == "procrustes":
        return geometry._procrustes_distance(x, y, angular=angular, reduce=_all_reduce, n=n)
    if kind == "gram":
        return geometry._gram_distance(x, y, reduce=_all_reduce, n=n)
    return 1.0 - geometry._cka(x, y, reduce=_all_reduce, n=n)


def _single(kind: str, x: Tensor, y: Tensor, angular: bool) -> Tensor:
    if kind == "procrustes":
        return geometry._procrustes_distance(x, y, angular=angular)
    if kind == "gram":
        return geometry._gram_distance(x, y)
    return 1.0 - geometry._cka(x, y)
