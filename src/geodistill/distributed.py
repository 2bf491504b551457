"""Batch-coupled losses over the global batch under data parallelism (DDP, FSDP).

Procrustes, Gram and CKA depend on the whole set of samples, so under data parallelism a loss
computed on each rank's shard ("local" scope, what other distillation tools do) changes meaning
with the number of processes. With ``scope: global`` (the default) every rank computes the
distance of the *global* batch, and gradients flow back to every rank's features.

Two exact routes, chosen per call by the bytes they move, forward and backward together:

* ``gather``: all-gather the rows of both feature matrices (``m (d_s + d_t)`` values a rank for
  ``m`` rows on the largest shard), then the single-process distance on the concatenation; the
  backward all-reduces the gradient of the gathered student rows (``W m d_s`` values);
* ``stats``: all-reduce the d x d sufficient statistics instead (column sums, squared norms and
  ``X^T Y`` for Procrustes, plus ``X^T X`` and ``Y^T Y`` for Gram and CKA) after centring on the
  global mean: ``d_s + d_t + 2`` values in float64 (column sums and norms) and ``d_s d_t``
  (Procrustes) or ``d_s d_t + d_s^2 + d_t^2`` in the features' dtype; the
  backward all-reduces the gradients of the student's statistics (``d_s + 1 + d_s d_t``, plus
  ``d_s^2`` for Gram; CKA's ``d_s + d_s d_t + d_s^2``).

Bytes are counted as a ring implementation sends them from each rank: ``2 (W - 1) / W`` times an
all-reduced tensor, ``(W - 1) / W`` times an all-gather's result. :func:`plan` estimates them to
choose the route; :data:`TRAFFIC` counts what every collective of this module really sent, which
is more than the plan when a float32 distance falls below 5 % of its range and is recomputed in
float64 (a second, float64 round of statistics; see :mod:`geodistill.geometry`).

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

__all__ = ["TRAFFIC", "CollectivePlan", "Traffic", "global_distance", "is_distributed", "plan", "world_size"]

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


def _ring_bytes(op: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends for a collective under a ring algorithm: ``nbytes`` is the all-reduced
    tensor's size, or the size of an all-gather's whole result."""
    return (2.0 if op == "all_reduce" else 1.0) * (world - 1) / world * nbytes


class Traffic:
    """Bytes this process has sent in the global losses' collectives (forward and backward), as
    :func:`_ring_bytes` counts them. The trainer reads the difference over each step."""

    def __init__(self) -> None:
        self.bytes = 0.0

    def add(self, op: str, t: Tensor) -> None:
        self.bytes += _ring_bytes(op, t.numel() * t.element_size(), world_size())


#: every collective of this module is counted here
TRAFFIC = Traffic()


@dataclass(frozen=True)
class CollectivePlan:
    """Which route a global distance takes and the bytes a rank sends for it per call."""

    route: str  # "gather" or "stats"
    forward_bytes: float
    backward_bytes: float  # with gradients for the student's features (x), none for the teacher's

    @property
    def bytes(self) -> float:
        return self.forward_bytes + self.backward_bytes

    def describe(self) -> str:
        return (
            f"{self.route}: {self.bytes / 2**20:.3g} MiB sent a rank per step and layer pair "
            f"({self.forward_bytes / 2**20:.3g} forward, {self.backward_bytes / 2**20:.3g} backward)"
        )


def plan(
    kind: str,
    n_global: int,
    d_s: int,
    d_t: int,
    element_size: int = 4,
    route: str = "auto",
    *,
    world: int = 2,
    max_rows: int | None = None,
) -> CollectivePlan:
    """The route for a distance of ``kind`` over ``n_global`` rows split over ``world`` ranks
    (``max_rows`` on the largest shard; default an even split); ``auto`` takes the one sending
    fewer bytes, forward and backward together. Both include the row-count exchange."""
    if route not in ("auto", "gather", "stats"):
        raise ValueError(f"route must be 'auto', 'gather' or 'stats', got {route!r}")
    m = max_rows if max_rows is not None else -(-n_global // world)
    counts = _ring_bytes("all_gather", 8 * world, world)  # the int64 row counts
    squares = 0 if kind == "procrustes" else 1
    routes = {
        "gather": (
            counts + _ring_bytes("all_gather", world * m * (d_s + d_t) * element_size, world),
            _ring_bytes("all_reduce", world * m * d_s * element_size, world),
        ),
        "stats": (  # column sums and squared norms are reduced in float64 (geometry._centre)
            counts
            + _ring_bytes("all_reduce", (d_s + d_t + 2) * 8, world)
            + _ring_bytes(
                "all_reduce", (d_s * d_t + squares * (d_s * d_s + d_t * d_t)) * element_size, world
            ),
            # CKA normalises by the products, not by the norms: no gradient reaches the norm
            _ring_bytes(
                "all_reduce", (d_s + (kind != "cka") + d_s * d_t + squares * d_s * d_s) * element_size, world
            ),
        ),
    }
    if route == "auto":
        route = min(routes, key=lambda r: sum(routes[r]))
    return CollectivePlan(route, *routes[route])


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums every rank's upstream gradient (it is its own adjoint)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        TRAFFIC.add("all_reduce", out)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        TRAFFIC.add("all_reduce", g)
        torch.distributed.all_reduce(g)
        return g


def _all_reduce(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t)


def _row_counts(n_local: int, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    TRAFFIC.add("all_gather", torch.empty(world_size(), dtype=torch.long, device="meta"))
    torch.distributed.all_gather(counts, torch.tensor([n_local], device=device))
    return [int(c) for c in counts]


class _AllGather(torch.autograd.Function):
    """Stack every rank's equal-shaped tensor; backward: this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        TRAFFIC.add("all_gather", torch.empty((world_size(), *t.shape), dtype=t.dtype, device="meta"))
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.contiguous().clone()
        TRAFFIC.add("all_reduce", g)
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
    (fewer bytes), ``gather`` or ``stats``; ``on_plan`` receives the chosen :class:`CollectivePlan`
    (what is really sent, refinement included, is counted in :data:`TRAFFIC`).
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
    chosen = plan(
        kind, n, x.shape[1], y.shape[1], x.element_size(), route, world=len(counts), max_rows=max(counts)
    )
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
