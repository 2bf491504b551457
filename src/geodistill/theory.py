"""The paper's theory in numbers: its two counterexamples, the D_P <=> D_FG equivalence, and the
synthetic distillation study (Bhattarai et al., arXiv:2509.25253, Sections 3 to 5.1).

Every function here is a small, pure, seeded construction that returns its numbers in a frozen
dataclass; :func:`run_theory` (the ``geodistill theory`` command) runs them all and writes
``report.md``, ``results.json`` and PNG figures. All maths runs in float64 on the CPU through the
distances of :mod:`geodistill.geometry` (each input column-centred and scaled to unit Frobenius norm
inside), so the "exactly zero" claims can be checked to ~1e-15. Nothing here imports transformers;
matplotlib (the ``plots`` extra) and tqdm are optional and imported lazily.

Notation: ``x`` (n, d_s) is the student, ``y`` (n, d_t) a teacher, rows are matched samples.
``X~``, ``Y~`` are the centred, unit-Frobenius versions, ``K_X = X~ X~^T`` their Gram matrices.

* Theorem 1 (CKA is blind to thinly spread geometry): :func:`theorem1_configurations`,
  :func:`theorem1`, :func:`theorem1_closed_form`, :func:`theorem1_sweep`.
* Theorem 2 (zero projected MSE does not fix the geometry): :func:`theorem2`,
  :func:`theorem2_sweep`; and ``D_P = 0 <=> D_FG = 0``, made quantitative by
  ``D_FG / 4 <= D_P <= sqrt(r D_FG)``: :func:`procrustes_gram_equivalence`.
* Section 5.1 (which objective recovers epsilon-orthogonal structure): :func:`make_teacher`,
  :func:`count_eps_orthogonal`, :func:`train_student`, :func:`synthetic_study`.

The paper's own construction code was not available to us; Theorem 1's configuration is
reconstructed from its description (see :func:`theorem1_configurations`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from geodistill.geometry import cka, cka_distance, gram_distance, procrustes_distance

__all__ = [
    "OBJECTIVES",
    "EquivalenceResult",
    "OrthogonalityCount",
    "StudentRun",
    "SyntheticConfig",
    "SyntheticStudyResult",
    "SyntheticTeacher",
    "Theorem1Configuration",
    "Theorem1Result",
    "Theorem2Result",
    "count_eps_orthogonal",
    "make_teacher",
    "procrustes_gram_equivalence",
    "run_theory",
    "synthetic_study",
    "theorem1",
    "theorem1_closed_form",
    "theorem1_configurations",
    "theorem1_sweep",
    "theorem2",
    "theorem2_sweep",
    "train_student",
]

_F64 = torch.float64

#: Training objectives of the synthetic study, in report order.
OBJECTIVES: tuple[str, ...] = ("projection_mse", "cka", "procrustes", "gram")

_OBJECTIVE_LABELS = {
    "projection_mse": "projection MSE",
    "cka": "CKA",
    "procrustes": "Procrustes",
    "gram": "Gram",
}


# --------------------------------------------------------------------------------------------
# small helpers


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _isometry(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A random ``(rows, cols)`` float64 matrix with orthonormal rows (``rows <= cols``), Haar-like."""
    if rows > cols:
        raise ValueError(f"an isometry needs rows <= cols, got ({rows}, {cols})")
    q, r = torch.linalg.qr(torch.randn(cols, rows, generator=gen, dtype=_F64))
    # fixing the signs of diag(R) makes Q Haar-distributed instead of biased by the QR convention
    return (q * torch.sign(torch.diagonal(r))).mT


def _f(t: Tensor) -> float:
    return float(t.detach())


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch single-threaded inside (a context manager or decorator), restoring the caller's
    thread count after.

    Every matrix here is tiny (at most ~1000 x 500): intra-op threads only add synchronisation,
    and on a shared 2-core machine their spin-waits made these functions 4-50x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _centred_cosines(x: Tensor) -> Tensor:
    """Cosine matrix ``(n, n)`` of the rows of ``x`` (n, d) after column centring.

    The distances only ever see centred features (they are translation invariant), so the
    geometry a student can be asked to reproduce is that of the centred rows.
    """
    xc = x.to(_F64) - x.to(_F64).mean(dim=0, keepdim=True)
    xn = xc / torch.linalg.vector_norm(xc, dim=1, keepdim=True).clamp_min(1e-300)
    return xn @ xn.mT


# --------------------------------------------------------------------------------------------
# Theorem 1: CKA cannot tell two teachers apart that Procrustes and Gram separate


@dataclass(frozen=True)
class Theorem1Configuration:
    """The three point clouds of Theorem 1 (float64).

    ``student`` (n, 2); ``teacher_a`` and ``teacher_b`` (n, 2 + k); ``perturbed`` the indices of
    the k rows of ``teacher_b`` lifted out of the plane, row ``perturbed[j]`` along axis ``2 + j``.
    """

    student: Tensor
    teacher_a: Tensor
    teacher_b: Tensor
    perturbed: tuple[int, ...]
    lift: float


@_single_threaded()
def theorem1_configurations(
    n_per_group: int = 100,
    n_perturbed: int | None = None,
    *,
    lift: float = 1.0,
    spread: float = 0.3,
    seed: int = 0,
) -> Theorem1Configuration:
    """Build the paper's Figure 1 configurations (reconstructed from its description).

    * Teacher A: ``n = 2 * n_per_group`` unit vectors in two antiparallel groups in a plane of
      ``R^{d_t}``, ``d_t = 2 + k``: group one at angles ``theta_i`` evenly fanned over
      ``[-spread, spread]`` around the first axis, group two their exact negatives (angle
      ``theta_i + pi``). The configuration is centred by construction.
    * Teacher B: teacher A with ``k = n_perturbed`` rows (a seeded random choice, default half of
      all rows) each moved by ``lift`` along its *own* new axis ``e_{2+j}``, orthogonal to the
      plane and to every other perturbation: ``b_i = a_i + lift * e_{2+j}``. The in-plane
      coordinates of B are exactly those of A.
    * Student: an exact copy of teacher A's configuration in ``d_s = 2 < d_t`` dimensions (its
      in-plane coordinates), so ``CKA(S, A) = 1`` and ``D_P(S, A) = D_FG(S, A) = 0``.

    Because the k perturbations are mutually orthogonal, B's extra variance is spread thinly over
    k directions of variance ``~lift^2 / n`` each. CKA compares spectra through squared
    eigenvalues (``||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)``), where each thin direction counts
    ``O(1/n^2)``; the unit-Frobenius distances see the fraction ``p lift^2 / (1 + p lift^2)`` of
    B's variance (``p = k / n``) that left the student's plane. See :func:`theorem1_closed_form`.
    """
    if n_per_group < 1:
        raise ValueError(f"n_per_group must be >= 1, got {n_per_group}")
    n = 2 * n_per_group
    k = n_per_group if n_perturbed is None else int(n_perturbed)
    if not 0 <= k <= n:
        raise ValueError(f"n_perturbed must be in [0, {n}], got {k}")
    gen = _generator(seed)
    theta = (
        torch.linspace(-spread, spread, n_per_group, dtype=_F64)
        if n_per_group > 1
        else torch.zeros(1, dtype=_F64)
    )
    group = torch.stack([theta.cos(), theta.sin()], dim=1)  # (n_per_group, 2)
    plane = torch.cat([group, -group])  # (n, 2): two antiparallel groups, mean exactly 0
    teacher_a = torch.zeros(n, 2 + k, dtype=_F64)
    teacher_a[:, :2] = plane
    perturbed = tuple(sorted(torch.randperm(n, generator=gen)[:k].tolist()))
    teacher_b = teacher_a.clone()
    for j, i in enumerate(perturbed):
        teacher_b[i, 2 + j] = lift  # a distinct orthogonal direction per perturbed vector
    return Theorem1Configuration(plane.clone(), teacher_a, teacher_b, perturbed, float(lift))


@dataclass(frozen=True)
class Theorem1Result:
    """Similarities of the student S to teachers A and B of :func:`theorem1_configurations`.

    ``cka_gap = CKA(S, A) - CKA(S, B)``; ``procrustes_*`` are ``D_P`` in ``[0, 2]``, ``gram_*``
    are ``D_FG`` in ``[0, 2]``; ``*_teachers`` compare A with B directly.
    """

    n_samples: int
    d_student: int
    d_teacher: int
    n_perturbed: int
    lift: float
    spread: float
    cka_student_a: float
    cka_student_b: float
    cka_gap: float
    procrustes_student_a: float
    procrustes_student_b: float
    gram_student_a: float
    gram_student_b: float
    cka_teachers: float
    procrustes_teachers: float
    gram_teachers: float


@_single_threaded()
def theorem1(
    n_per_group: int = 100,
    perturbed_fraction: float = 0.5,
    *,
    lift: float = 1.0,
    spread: float = 0.3,
    seed: int = 0,
) -> Theorem1Result:
    """Theorem 1 in numbers: ``CKA(S, A) ~= CKA(S, B)`` while ``D_P``, ``D_FG`` separate A from B.

    ``k = round(perturbed_fraction * n)`` rows are lifted (``n = 2 * n_per_group``). With the
    defaults (n = 200, k = 100, lift 1) the CKA gap is ~1e-3 while ``D_P(S, B) ~= 0.36`` and
    ``D_FG(S, B) ~= 0.10`` (both exactly 0 against A).
    """
    n = 2 * n_per_group
    k = round(perturbed_fraction * n)
    c = theorem1_configurations(n_per_group, k, lift=lift, spread=spread, seed=seed)
    s, a, b = c.student, c.teacher_a, c.teacher_b
    cka_a, cka_b = _f(cka(s, a)), _f(cka(s, b))
    return Theorem1Result(
        n_samples=n,
        d_student=s.shape[1],
        d_teacher=a.shape[1],
        n_perturbed=k,
        lift=float(lift),
        spread=float(spread),
        cka_student_a=cka_a,
        cka_student_b=cka_b,
        cka_gap=cka_a - cka_b,
        procrustes_student_a=_f(procrustes_distance(s, a)),
        procrustes_student_b=_f(procrustes_distance(s, b)),
        gram_student_a=_f(gram_distance(s, a)),
        gram_student_b=_f(gram_distance(s, b)),
        cka_teachers=_f(cka(a, b)),
        procrustes_teachers=_f(procrustes_distance(a, b)),
        gram_teachers=_f(gram_distance(a, b)),
    )


def theorem1_closed_form(n: int, k: int, lift: float = 1.0) -> tuple[float, float, float]:
    """Exact ``(CKA(S, B), D_P(S, B), D_FG(S, B))`` of Theorem 1 for ``spread = 0``.

    With all of a group on one unit vector ``u`` (rows ``s_i u``, ``s_i = +-1`` balanced) and
    ``delta = lift``, the centred ``B`` has ``||S^T B||_F^2 = n^2 + k delta^2`` (rank one, so the
    nuclear norm is its square root), ``||B_c||_F^2 = n + k delta^2 (1 - 1/n)`` and
    ``||B_c^T B_c||_F^2 = n^2 + 2 k delta^2 + k delta^4 (1 - 2/n + k/n^2)``; ``||S||_F^2 = n`` and
    ``||S^T S||_F = n``. For ``n -> inf`` at fixed ``p = k / n``:
    ``1 - CKA ~ p delta^4 / (2 n) -> 0`` while ``D_P -> 2 - 2 / sqrt(1 + p delta^2)`` and
    ``D_FG -> (p delta^2 / (1 + p delta^2))^2`` stay put.
    """
    d2 = lift**2
    sb = n**2 + k * d2  # ||S^T B||_F^2
    bb = n + k * d2 * (1 - 1 / n)  # ||B_c||_F^2
    bbf2 = n**2 + 2 * k * d2 + k * d2**2 * (1 - 2 / n + k / n**2)  # ||B_c^T B_c||_F^2
    cka_b = sb / (n * math.sqrt(bbf2))
    d_p = 2 - 2 * math.sqrt(sb) / math.sqrt(n * bb)
    d_fg = 1 + bbf2 / bb**2 - 2 * sb / (n * bb)
    return cka_b, d_p, d_fg


def theorem1_sweep(
    n_per_group_values: Iterable[int] = (5, 10, 25, 50, 100, 250, 500),
    perturbed_fraction: float = 0.5,
    *,
    lift: float = 1.0,
    spread: float = 0.3,
    seed: int = 0,
) -> tuple[Theorem1Result, ...]:
    """:func:`theorem1` over growing sample counts at a fixed perturbed fraction.

    The CKA gap falls like ``1/n`` (``~ p lift^4 / (2 n)``) while ``D_P`` and ``D_FG`` between S
    and B converge to positive constants: with enough samples CKA cannot tell the teachers apart.
    """
    return tuple(
        theorem1(m, perturbed_fraction, lift=lift, spread=spread, seed=seed) for m in n_per_group_values
    )


# --------------------------------------------------------------------------------------------
# Theorem 2: zero projected MSE with a non-orthogonal map, and D_P = 0 <=> D_FG = 0


@dataclass(frozen=True)
class Theorem2Result:
    """A student ``x`` and teacher ``y`` with zero projected MSE but different geometry.

    ``projected_mse = min_W ||x W - y||_F^2 / ||y||_F^2`` (least squares, float64);
    ``map_singular_min/max`` are the extreme singular values of that ``W`` (d_s, d_t), whose
    rows are orthonormal up to scale iff the two are equal; ``procrustes``/``gram``/``cka``
    compare ``x`` with ``y`` directly (no projection).
    """

    n_samples: int
    d_student: int
    d_teacher: int
    condition: float
    projected_mse: float
    map_singular_min: float
    map_singular_max: float
    procrustes: float
    gram: float
    cka: float


@_single_threaded()
def theorem2(
    n: int = 64,
    d_student: int = 8,
    d_teacher: int = 16,
    *,
    condition: float = 10.0,
    seed: int = 0,
) -> Theorem2Result:
    """Theorem 2 in numbers: ``min_W ||X W - Y||^2 = 0`` yet ``D_P(X, Y) > 0`` and ``D_FG(X, Y) > 0``.

    Construction (float64): ``Z`` (n, d_s) centred Gaussian; teacher ``Y = Z B`` with ``B``
    (d_s, d_t) orthonormal rows, so the teacher has rank d_s inside ``R^{d_t}``; student
    ``X = Z C`` with ``C = U diag(sigma) V^T`` (d_s, d_s), ``sigma`` log-spaced from 1 to
    ``condition``. Then ``W = C^{-1} B`` maps the student exactly onto the teacher (the least
    squares fit finds it, residual ~1e-30) but ``Y Y^T = X W W^T X^T`` equals ``X X^T`` (up to
    scale) only when ``W W^T`` is a multiple of the identity, i.e. ``condition = 1``. The
    learned map hides the non-isometric part of the student's geometry; D_P and D_FG, which
    allow only an orthogonal map, do not.
    """
    gen = _generator(seed)
    z = torch.randn(n, d_student, generator=gen, dtype=_F64)
    z = z - z.mean(dim=0, keepdim=True)
    b = _isometry(d_student, d_teacher, gen)
    u = _isometry(d_student, d_student, gen)
    v = _isometry(d_student, d_student, gen)
    sigma = torch.logspace(0.0, math.log10(condition), d_student, dtype=_F64)
    c = u @ torch.diag(sigma) @ v.mT
    x, y = z @ c, z @ b  # (n, d_s), (n, d_t)
    w = torch.linalg.lstsq(x, y).solution  # (d_s, d_t), the best "learned" linear map
    mse = torch.linalg.vector_norm(x @ w - y).square() / torch.linalg.vector_norm(y).square()
    sv = torch.linalg.svdvals(w)
    return Theorem2Result(
        n_samples=n,
        d_student=d_student,
        d_teacher=d_teacher,
        condition=float(condition),
        projected_mse=_f(mse),
        map_singular_min=_f(sv.min()),
        map_singular_max=_f(sv.max()),
        procrustes=_f(procrustes_distance(x, y)),
        gram=_f(gram_distance(x, y)),
        cka=_f(cka(x, y)),
    )


def theorem2_sweep(
    conditions: Iterable[float] = (1.0, 1.5, 2.0, 4.0, 10.0, 100.0),
    *,
    n: int = 64,
    d_student: int = 8,
    d_teacher: int = 16,
    seed: int = 0,
) -> tuple[Theorem2Result, ...]:
    """:func:`theorem2` over the condition number of the map: the projected MSE stays ~0 for all,
    while D_P and D_FG are 0 only at ``condition = 1`` (an isometry) and grow with it."""
    return tuple(theorem2(n, d_student, d_teacher, condition=c, seed=seed) for c in conditions)


@dataclass(frozen=True)
class EquivalenceResult:
    """D_P and D_FG over random pairs of four kinds, and the bounds that tie them together.

    Kinds: ``isometry`` (``y = a x Q + 1 b^T``, Q with orthonormal rows, random scale and shift),
    ``noisy isometry`` (plus Gaussian noise of relative size log-uniform in [1e-3, 1]),
    ``linear`` (``y = x M``, M Gaussian, not orthogonal) and ``independent`` (unrelated y).
    ``gram_bound_ratio = max D_FG / (4 D_P)`` and ``procrustes_bound_ratio = max D_P / sqrt(r D_FG)``
    over pairs with both distances above ``tol``, ``r = min(n - 1, d_s + d_t)``; both are <= 1 by the bounds in
    :func:`procrustes_gram_equivalence`. ``agree`` counts pairs where ``D_P < tol`` and
    ``D_FG < tol`` give the same verdict.
    """

    n_samples: int
    d_student: int
    d_teacher: int
    tol: float
    kinds: tuple[str, ...]
    procrustes: tuple[float, ...]
    gram: tuple[float, ...]
    max_isometry_procrustes: float
    max_isometry_gram: float
    min_other_procrustes: float
    min_other_gram: float
    agree: int
    n_pairs: int
    gram_bound_ratio: float
    procrustes_bound_ratio: float


@_single_threaded()
def procrustes_gram_equivalence(
    pairs_per_kind: int = 50,
    n: int = 32,
    d_student: int = 6,
    d_teacher: int = 10,
    *,
    tol: float = 1e-10,
    seed: int = 0,
) -> EquivalenceResult:
    """Check ``D_P = 0 <=> D_FG = 0`` on random pairs, in float64, with quantitative bounds.

    With ``X~``, ``Y~`` unit-Frobenius and ``Q*`` the optimal Procrustes isometry,
    ``K_X - K_Y = X~ (X~ - Y~Q*)^T + (X~ - Y~Q*) (Y~Q*)^T`` and operator norms are <= 1, so
    ``D_FG <= 4 D_P``. Conversely ``D_P`` is the squared Bures distance between ``K_X`` and
    ``K_Y``, which is <= ``||K_X - K_Y||_*`` (Powers-Stormer) <= ``sqrt(r) ||K_X - K_Y||_F``
    with ``r = rank(K_X - K_Y) <= min(n - 1, d_s + d_t)``, so ``D_P <= sqrt(r D_FG)``. Either
    distance vanishes exactly when the other does.
    """
    gen = _generator(seed)
    kinds: list[str] = []
    d_p: list[float] = []
    d_fg: list[float] = []
    for kind in ("isometry", "noisy isometry", "linear", "independent"):
        for _ in range(pairs_per_kind):
            x = torch.randn(n, d_student, generator=gen, dtype=_F64)
            if kind == "independent":
                y = torch.randn(n, d_teacher, generator=gen, dtype=_F64)
            elif kind == "linear":
                y = x @ torch.randn(d_student, d_teacher, generator=gen, dtype=_F64)
            else:
                scale = 10 ** (4 * float(torch.rand((), generator=gen, dtype=_F64)) - 2)  # 1e-2 .. 1e2
                shift = 10 * torch.randn(1, d_teacher, generator=gen, dtype=_F64)
                y = scale * x @ _isometry(d_student, d_teacher, gen) + shift
                if kind == "noisy isometry":
                    rel = 10 ** (-3 * float(torch.rand((), generator=gen, dtype=_F64)))  # 1e-3 .. 1
                    y = y + rel * scale * torch.randn(n, d_teacher, generator=gen, dtype=_F64)
            kinds.append(kind)
            d_p.append(_f(procrustes_distance(x, y)))
            d_fg.append(_f(gram_distance(x, y)))
    p, g = torch.tensor(d_p, dtype=_F64), torch.tensor(d_fg, dtype=_F64)
    iso = torch.tensor([k == "isometry" for k in kinds])
    r = min(n - 1, d_student + d_teacher)
    # the ratios only mean something above rounding level (isometries give ~1e-16 / ~1e-16)
    pos = (p > tol) & (g > tol)
    return EquivalenceResult(
        n_samples=n,
        d_student=d_student,
        d_teacher=d_teacher,
        tol=tol,
        kinds=tuple(kinds),
        procrustes=tuple(d_p),
        gram=tuple(d_fg),
        max_isometry_procrustes=_f(p[iso].max()),
        max_isometry_gram=_f(g[iso].max()),
        min_other_procrustes=_f(p[~iso].min()),
        min_other_gram=_f(g[~iso].min()),
        agree=int(((p < tol) == (g < tol)).sum()),
        n_pairs=len(kinds),
        gram_bound_ratio=_f((g[pos] / (4 * p[pos])).max()),
        procrustes_bound_ratio=_f((p[pos] / (r * g[pos]).sqrt()).max()),
    )


# --------------------------------------------------------------------------------------------
# Section 5.1: the synthetic distillation study


@dataclass(frozen=True)
class SyntheticConfig:
    """One synthetic study: a teacher with controlled near-orthogonality and the students' training.

    n_vectors: teacher vectors (rows) N; also the student's.
    k_orthogonal: size K of the designed mutually epsilon-orthogonal set (rows 0..K-1).
    rank: the teacher's intrinsic dimension r (K <= r <= d_teacher).
    d_teacher: teacher width d_t; the r-dimensional configuration is embedded isometrically.
    d_student: student width d_s; ``d_s >= r`` lets every geometric objective reach zero.
    eps: orthogonality tolerance: a pair is epsilon-orthogonal when ``|cos| < eps``.
    others_scale: norm scale of the N - K non-orthogonal vectors relative to the designed ones
      (> 1 puts most of the teacher's variance outside the designed set).
    steps, lr: Adam steps and peak learning rate (cosine decay to 0).
    log_every: record the recovered-pair count every this many steps.
    """

    n_vectors: int = 64
    k_orthogonal: int = 12
    rank: int = 16
    d_teacher: int = 32
    d_student: int = 16
    eps: float = 0.1
    others_scale: float = 1.0
    steps: int = 1000
    lr: float = 1e-2
    log_every: int = 10

    def __post_init__(self) -> None:
        if not 2 <= self.k_orthogonal <= self.rank <= self.d_teacher:
            raise ValueError(
                f"need 2 <= k_orthogonal <= rank <= d_teacher, got {self.k_orthogonal}, {self.rank}, {self.d_teacher}"
            )
        if self.n_vectors < self.k_orthogonal + 2:
            raise ValueError(f"n_vectors must exceed k_orthogonal + 1, got {self.n_vectors}")
        if self.d_student < 1 or self.steps < 1 or self.log_every < 1:
            raise ValueError("d_student, steps and log_every must be >= 1")
        if not 0 < self.eps < 1 or self.lr <= 0 or self.others_scale <= 0:
            raise ValueError("need 0 < eps < 1, lr > 0 and others_scale > 0")


@dataclass(frozen=True)
class SyntheticTeacher:
    """The teacher of :func:`make_teacher`: ``features`` (N, d_t) float64, centred; rows
    ``orthogonal`` form the designed epsilon-orthogonal set."""

    features: Tensor
    orthogonal: tuple[int, ...]


@_single_threaded()
def make_teacher(config: SyntheticConfig, seed: int = 0) -> SyntheticTeacher:
    """Teacher vectors with a known set of K mutually epsilon-orthogonal vectors.

    1. K unit vectors with pairwise cosines drawn uniformly from ``[-eps/2, eps/2]`` (rows of
       the Cholesky factor of that cosine matrix, which is positive definite for these sizes),
       so the set is epsilon-orthogonal with slack ``eps/2``, placed in an r-dimensional space.
    2. N - K other vectors, each ``a t_p + b t_q + z`` for two random designed vectors
       (``|a|, |b|`` in [0.5, 1], random signs) plus a component ``z`` in the r - K directions
       the designed set leaves free, scaled by ``others_scale``: these have ``|cos| ~ 0.5`` with
       some designed vector, so they are *not* epsilon-orthogonal to the set.
    3. The other vectors are shifted together so that the rows sum to zero: the distances
       centre their inputs, and shifting only the others keeps the designed cosines exact.
    4. Everything is embedded in ``R^{d_t}`` by a random isometry.
    """
    c = config
    gen = _generator(seed)
    k, m, r = c.k_orthogonal, c.n_vectors - c.k_orthogonal, c.rank
    off = torch.triu((2 * torch.rand(k, k, generator=gen, dtype=_F64) - 1) * (c.eps / 2), diagonal=1)
    cosines = torch.eye(k, dtype=_F64) + off + off.mT
    basis = _isometry(r, r, gen)  # rows: an orthonormal basis of the r-dim space
    designed = torch.linalg.cholesky(cosines) @ basis[:k]  # (K, r) unit rows
    p = torch.randint(0, k, (m,), generator=gen)
    q = (p + torch.randint(1, k, (m,), generator=gen)) % k  # q != p
    a = (0.5 + 0.5 * torch.rand(m, 1, generator=gen, dtype=_F64)) * torch.where(
        torch.rand(m, 1, generator=gen) < 0.5, -1.0, 1.0
    )
    b = (0.5 + 0.5 * torch.rand(m, 1, generator=gen, dtype=_F64)) * torch.where(
        torch.rand(m, 1, generator=gen) < 0.5, -1.0, 1.0
    )
    free = torch.randn(m, r - k, generator=gen, dtype=_F64) * (0.5 / math.sqrt(max(r - k, 1)))
    others = a * designed[p] + b * designed[q] + free @ basis[k:]
    others = c.others_scale * others
    others = others - (designed.sum(0) + others.sum(0)) / m  # rows now sum to exactly zero
    features = torch.cat([designed, others]) @ _isometry(r, c.d_teacher, gen)
    return SyntheticTeacher(features=features, orthogonal=tuple(range(k)))


@dataclass(frozen=True)
class OrthogonalityCount:
    """How much of the teacher's epsilon-orthogonal structure a student keeps (centred cosines).

    pairs_recovered / pairs_total: pairs of the designed set epsilon-orthogonal in the teacher
      that are epsilon-orthogonal in the student too.
    vectors_recovered / vectors_total: designed vectors that keep *all* their epsilon-orthogonal
      relations within the set.
    spurious_pairs: pairs among all N vectors epsilon-orthogonal in the student but not in the teacher.
    mean_cos_error: mean ``|cos_student - cos_teacher|`` over the designed pairs.
    """

    pairs_recovered: int
    pairs_total: int
    vectors_recovered: int
    vectors_total: int
    spurious_pairs: int
    mean_cos_error: float


def count_eps_orthogonal(
    student: Tensor, teacher: Tensor, subset: Sequence[int], eps: float
) -> OrthogonalityCount:
    """Count the teacher's epsilon-orthogonal pairs/vectors (``|cos| < eps``) that ``student`` keeps.

    ``student`` (N, d_s) and ``teacher`` (N, d_t), rows matched; cosines are taken between
    column-centred rows, the only geometry the translation-invariant losses constrain.
    ``subset`` indexes the designed set. See :class:`OrthogonalityCount` for the fields.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher need the same rows, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    cs, ct = _centred_cosines(student.detach()), _centred_cosines(teacher.detach())
    orth_s, orth_t = cs.abs() < eps, ct.abs() < eps
    idx = torch.as_tensor(list(subset), dtype=torch.long)
    n_sub = len(idx)
    upper = torch.triu(torch.ones(n_sub, n_sub, dtype=torch.bool), diagonal=1)
    sub_t, sub_s = orth_t[idx][:, idx], orth_s[idx][:, idx]
    eye = torch.eye(n_sub, dtype=torch.bool)
    kept = (~sub_t | sub_s) | eye  # every teacher-orthogonal relation of the vector holds
    all_upper = torch.triu(torch.ones_like(orth_s), diagonal=1)
    return OrthogonalityCount(
        pairs_recovered=int((sub_t & sub_s & upper).sum()),
        pairs_total=int((sub_t & upper).sum()),
        vectors_recovered=int(kept.all(dim=1).sum()),
        vectors_total=n_sub,
        spurious_pairs=int((orth_s & ~orth_t & all_upper).sum()),
        mean_cos_error=_f((cs[idx][:, idx] - ct[idx][:, idx]).abs()[upper].mean()),
    )


@dataclass(frozen=True)
class StudentRun:
    """One student trained on one objective.

    final_loss: the objective at the last step. count: :class:`OrthogonalityCount` at the end.
    procrustes / gram / cka: final ``D_P``, ``D_FG`` and CKA to the teacher.
    cka_curve: CKA(student, teacher) after every step; loss_curve: the objective at every step.
    count_steps / pairs_curve / vectors_curve: recovered designed pairs and vectors at those steps
      (step 0 is the initialisation).
    steps_to_all: the first logged step from which every designed vector stays recovered to the
      end, or None if that never happens: how fast the objective delivers the geometry.
    """

    objective: str
    final_loss: float
    count: OrthogonalityCount
    procrustes: float
    gram: float
    cka: float
    cka_curve: tuple[float, ...]
    loss_curve: tuple[float, ...]
    count_steps: tuple[int, ...]
    pairs_curve: tuple[int, ...]
    vectors_curve: tuple[int, ...]
    steps_to_all: int | None


def _steps_to_all(steps: Sequence[int], vectors: Sequence[int], total: int) -> int | None:
    first = None
    for step, v in zip(steps, vectors, strict=True):
        # a later drop below `total` resets: we want the step from which it holds to the end
        first = (step if first is None else first) if v == total else None
    return first


def _objective(name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    def projection_mse(x: Tensor, y: Tensor, w: Tensor | None) -> Tensor:
        if w is None:
            raise ValueError("projection_mse needs the learned map w")
        # relative, so the number reads the same whatever the teacher's scale
        return (x @ w - y).square().sum() / y.square().sum()

    table: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
        "projection_mse": projection_mse,
        "cka": lambda x, y, _w: cka_distance(x, y),
        "procrustes": lambda x, y, _w: procrustes_distance(x, y),
        "gram": lambda x, y, _w: gram_distance(x, y),
    }
    if name not in table:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return table[name]


def _progress(iterable: Iterable[int], total: int, desc: str, enabled: bool) -> Iterable[int]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no progress bar then
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


@_single_threaded()
def train_student(
    teacher: SyntheticTeacher,
    objective: str,
    config: SyntheticConfig,
    seed: int = 0,
    *,
    progress: bool = False,
) -> StudentRun:
    """Train a student of width ``d_s`` on one objective by full-batch Adam; float64.

    Parameterisation: the student's N feature vectors are free parameters ``P`` (N, d_s). This
    isolates what each *objective* asks for from what an architecture can express: any
    configuration is reachable, so a student that misses the teacher's geometry misses it
    because its loss does not ask for it. Initialisation ``P0 ~ N(0, 1/d_s)`` comes from
    ``seed`` alone, so every objective starts from the same student. ``projection_mse``
    additionally learns ``W`` (d_s, d_t), ``W0 ~ N(0, 1/d_s)``, and minimises
    ``||P W - Y||_F^2 / ||Y||_F^2`` (FitNets-style); the other objectives are the distances of
    :mod:`geodistill.geometry` between ``P`` and the teacher ``Y``, which need no projection.
    Adam with ``lr`` decayed by a cosine schedule to 0 over ``steps``.
    """
    c = config
    y = teacher.features.to(_F64)
    loss_fn = _objective(objective)
    gen = _generator(seed)
    p = (
        torch.randn(y.shape[0], c.d_student, generator=gen, dtype=_F64) / math.sqrt(c.d_student)
    ).requires_grad_()
    w0 = torch.randn(c.d_student, y.shape[1], generator=gen, dtype=_F64) / math.sqrt(c.d_student)
    w = w0.requires_grad_() if objective == "projection_mse" else None
    params = [p] if w is None else [p, w]
    opt = torch.optim.Adam(params, lr=c.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.steps)
    cka_curve: list[float] = []
    loss_curve: list[float] = []
    count_steps: list[int] = []
    pairs_curve: list[int] = []
    vectors_curve: list[int] = []

    def log(step: int) -> None:
        count = count_eps_orthogonal(p, y, teacher.orthogonal, c.eps)
        count_steps.append(step)
        pairs_curve.append(count.pairs_recovered)
        vectors_curve.append(count.vectors_recovered)

    log(0)
    for step in _progress(range(1, c.steps + 1), c.steps, _OBJECTIVE_LABELS[objective], progress):
        loss = loss_fn(p, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_curve.append(_f(loss))
        with torch.no_grad():
            cka_curve.append(_f(cka(p, y)))
            if step % c.log_every == 0 or step == c.steps:
                log(step)
    with torch.no_grad():
        final = p.detach()
        final_loss = _f(loss_fn(final, y, None if w is None else w.detach()))
        return StudentRun(
            objective=objective,
            final_loss=final_loss,
            count=count_eps_orthogonal(final, y, teacher.orthogonal, c.eps),
            procrustes=_f(procrustes_distance(final, y)),
            gram=_f(gram_distance(final, y)),
            cka=_f(cka(final, y)),
            cka_curve=tuple(cka_curve),
            loss_curve=tuple(loss_curve),
            count_steps=tuple(count_steps),
            pairs_curve=tuple(pairs_curve),
            vectors_curve=tuple(vectors_curve),
            steps_to_all=_steps_to_all(count_steps, vectors_curve, len(teacher.orthogonal)),
        )


@dataclass(frozen=True)
class SyntheticStudyResult:
    """The synthetic study for one config and seed.

    teacher_count: the teacher's own count (the most any student can keep).
    optimum_procrustes / optimum_count: ``D_P`` to the teacher, and the count, of the best
      width-``d_s`` configuration, the teacher's top-``d_s`` principal components. By von
      Neumann's trace inequality and Cauchy-Schwarz,
      ``min_{rank X <= d_s} D_P = 2 - 2 sqrt(sum_{i <= d_s} s_i^2 / sum_i s_i^2)`` (``s_i`` the
      teacher's singular values), attained there; the same configuration maximises CKA. It is 0
      (and the count the teacher's) when ``d_s >= r``.
    runs: one :class:`StudentRun` per objective, in the order asked for.
    """

    config: SyntheticConfig
    seed: int
    teacher_count: OrthogonalityCount
    optimum_procrustes: float
    optimum_count: OrthogonalityCount
    runs: tuple[StudentRun, ...]

    def run(self, objective: str) -> StudentRun:
        """The run trained on ``objective``."""
        for r in self.runs:
            if r.objective == objective:
                return r
        raise KeyError(objective)


@_single_threaded()
def synthetic_study(
    config: SyntheticConfig | None = None,
    seed: int = 0,
    *,
    objectives: Sequence[str] = OBJECTIVES,
    progress: bool = False,
) -> SyntheticStudyResult:
    """Section 5.1: one teacher (:func:`make_teacher`), one student per objective from the same
    initialisation (:func:`train_student`), and how much epsilon-orthogonal structure each keeps."""
    config = config or SyntheticConfig()
    teacher = make_teacher(config, seed)
    y = teacher.features
    own = count_eps_orthogonal(y, y, teacher.orthogonal, config.eps)
    u, sv, _ = torch.linalg.svd(y - y.mean(dim=0, keepdim=True), full_matrices=False)
    k = min(config.d_student, sv.numel())
    best = u[:, :k] * sv[:k]  # (N, d_s or fewer): the teacher's top principal components
    # the student's init seed differs from the teacher's so the student is not built from the
    # teacher's random stream
    runs = tuple(train_student(teacher, o, config, seed + 10_000, progress=progress) for o in objectives)
    return SyntheticStudyResult(
        config=config,
        seed=seed,
        teacher_count=own,
        optimum_procrustes=_f(procrustes_distance(best, y)),
        optimum_count=count_eps_orthogonal(best, y, teacher.orthogonal, config.eps),
        runs=runs,
    )


# --------------------------------------------------------------------------------------------
# report


def _steps_cka_drops(curve: Sequence[float], threshold: float = 1e-6) -> tuple[int, float]:
    """Number of steps where CKA fell by more than ``threshold``, and the largest single fall."""
    drops = [a - b for a, b in itertools.pairwise(curve)]
    big = [d for d in drops if d > threshold]
    return len(big), max([0.0, *drops])


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e4:
        return f"{v:.2e}"
    return f"{v:.4f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean_std(values: Sequence[float], *, counts: bool = False) -> str:
    """``mean ± std`` over seeds (sample std), or the single value; counts with one decimal."""
    t = torch.tensor(list(values), dtype=_F64)
    fmt = (lambda v: f"{v:.1f}") if counts else _fmt
    if len(values) == 1:
        return f"{int(t[0])}" if counts else _fmt(float(t[0]))
    return f"{fmt(float(t.mean()))} ± {fmt(float(t.std()))}"


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _plot_figures(
    out_dir: Path,
    t1_conf: Theorem1Configuration,
    sweep1: Sequence[Theorem1Result],
    equivalence: EquivalenceResult,
    studies: dict[str, list[SyntheticStudyResult]],
) -> dict[str, str]:
    """Write the PNGs and return ``{key: file name}``; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # headless, and never steal a GUI backend from the caller
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    colors = {"projection_mse": "tab:red", "cka": "tab:orange", "procrustes": "tab:blue", "gram": "tab:green"}

    # Theorem 1: the student in its plane, teachers A and B in (plane, out-of-plane lift)
    s, a, b = t1_conf.student.numpy(), t1_conf.teacher_a.numpy(), t1_conf.teacher_b.numpy()
    lifted = (b[:, 2:] ** 2).sum(1) ** 0.5  # each lifted row uses its own axis; drawn on one
    half = s.shape[0] // 2
    fig = plt.figure(figsize=(13, 4.2))
    ax = fig.add_subplot(1, 3, 1)
    for rows, col in ((slice(0, half), "tab:blue"), (slice(half, None), "tab:orange")):
        for v in s[rows]:
            ax.plot([0, v[0]], [0, v[1]], color=col, lw=0.6, alpha=0.6)
    ax.set_aspect("equal")
    ax.set_title("student S (d_s = 2)\n= teacher A's configuration")
    for pos, (mat, lift, title) in enumerate(
        (
            (a, torch.zeros(a.shape[0]).numpy(), f"teacher A (d_t = {a.shape[1]})"),
            (
                b,
                lifted,
                f"teacher B: {len(t1_conf.perturbed)} rows lifted,\neach along its own orthogonal axis",
            ),
        )
    ):
        ax3 = fig.add_subplot(1, 3, pos + 2, projection="3d")
        for i in range(mat.shape[0]):
            col = "tab:blue" if i < half else "tab:orange"
            ax3.plot([0, mat[i, 0]], [0, mat[i, 1]], [0, lift[i]], color=col, lw=0.6, alpha=0.6)
        ax3.set_zlim(0, max(1.0, float(lifted.max())))
        ax3.set_xlabel("plane 1")
        ax3.set_ylabel("plane 2")
        ax3.set_zlabel("out-of-plane")
        ax3.set_title(title)
    fig.tight_layout()
    files["theorem1"] = "theorem1_configurations.png"
    fig.savefig(out_dir / files["theorem1"], dpi=120)
    plt.close(fig)

    # Theorem 1 sweep: the CKA gap vanishes with n while D_P and D_FG stay put
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r.n_samples for r in sweep1]
    ax.loglog(ns, [max(r.cka_gap, 1e-17) for r in sweep1], "o-", label="CKA(S,A) - CKA(S,B)")
    ax.loglog(ns, [r.procrustes_student_b for r in sweep1], "s-", label="D_P(S,B)")
    ax.loglog(ns, [r.gram_student_b for r in sweep1], "^-", label="D_FG(S,B)")
    ax.set_xlabel("samples n (half of them lifted)")
    ax.set_title("Theorem 1: CKA gap ~ 1/n, geometric distances constant")
    ax.legend()
    fig.tight_layout()
    files["theorem1_sweep"] = "theorem1_sweep.png"
    fig.savefig(out_dir / files["theorem1_sweep"], dpi=120)
    plt.close(fig)

    # D_P vs D_FG over random pairs, with the two bounds
    fig, ax = plt.subplots(figsize=(6, 5))
    floor = 1e-17  # exact zeros drawn on the floor of the log axes
    for kind, marker in (("isometry", "o"), ("noisy isometry", "s"), ("linear", "^"), ("independent", "x")):
        sel = [i for i, k in enumerate(equivalence.kinds) if k == kind]
        ax.scatter(
            [max(equivalence.procrustes[i], floor) for i in sel],
            [max(equivalence.gram[i], floor) for i in sel],
            marker=marker,
            s=14,
            label=kind,
        )
    r = min(equivalence.n_samples - 1, equivalence.d_student + equivalence.d_teacher)
    grid = torch.logspace(-9, 0.3, 50, dtype=_F64)
    ax.loglog(grid, 4 * grid, "k--", lw=0.8, label="D_FG = 4 D_P")
    ax.loglog(grid, grid**2 / r, "k:", lw=0.8, label=f"D_FG = D_P^2 / {r}")
    ax.axvline(equivalence.tol, color="grey", lw=0.5)
    ax.axhline(equivalence.tol, color="grey", lw=0.5)
    ax.set_xlabel("Procrustes D_P")
    ax.set_ylabel("Gram D_FG")
    ax.set_title("D_P = 0 exactly when D_FG = 0 (float64)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    files["equivalence"] = "procrustes_vs_gram.png"
    fig.savefig(out_dir / files["equivalence"], dpi=120)
    plt.close(fig)

    # synthetic study: recovered counts per objective (mean over seeds) for each setting
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    for ax, (name, results) in zip(axes[0], studies.items(), strict=True):
        objs = [run.objective for run in results[0].runs]
        for j, metric in enumerate(("vectors_recovered", "pairs_recovered")):
            total = getattr(results[0].teacher_count, metric.replace("recovered", "total"))
            vals = [
                sum(getattr(res.run(o).count, metric) for res in results) / len(results) / max(total, 1)
                for o in objs
            ]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(objs))]
            ax.bar(
                xs,
                vals,
                width=0.38,
                color=[colors[o] for o in objs],
                alpha=1.0 if j == 0 else 0.5,
                label="vectors" if j == 0 else "pairs",
            )
        best = sum(res.optimum_count.vectors_recovered for res in results) / len(results)
        ax.axhline(best / max(results[0].teacher_count.vectors_total, 1), color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(objs)), [_OBJECTIVE_LABELS[o] for o in objs])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction kept")
        ax.set_title(f"{name}, mean of {len(results)} seed(s)", fontsize=9)
    fig.suptitle(
        "teacher's eps-orthogonal structure kept per objective: vectors (solid), pairs (faded); "
        "dashed: best width-d_s configuration",
        fontsize=9,
    )
    fig.tight_layout()
    files["synthetic_counts"] = "synthetic_counts.png"
    fig.savefig(out_dir / files["synthetic_counts"], dpi=120)
    plt.close(fig)

    # CKA over steps while training on Procrustes (the other objectives faint, for reference)
    first = next(iter(studies.values()))[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in first.runs:
        main = run.objective == "procrustes"
        steps = range(1, len(run.cka_curve) + 1)
        ax1.plot(
            steps,
            [1 - v for v in run.cka_curve],
            color=colors[run.objective],
            lw=1.6 if main else 0.8,
            alpha=1.0 if main else 0.45,
            label=f"trained on {_OBJECTIVE_LABELS[run.objective]}",
        )
        ax2.plot(run.count_steps, run.pairs_curve, color=colors[run.objective], lw=1.6 if main else 0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("1 - CKA(student, teacher)")
    ax1.set_title("CKA while training (bold: trained on Procrustes)")
    ax1.legend(fontsize=7)
    ax2.axhline(first.teacher_count.pairs_total, color="k", lw=0.6, ls="--")
    ax2.set_xlabel("Adam step")
    ax2.set_ylabel("teacher eps-orthogonal pairs kept")
    ax2.set_title("recovered eps-orthogonal pairs over training")
    fig.tight_layout()
    files["cka_curve"] = "synthetic_cka_curve.png"
    fig.savefig(out_dir / files["cka_curve"], dpi=120)
    plt.close(fig)
    return files


def _synthetic_settings(quick: bool) -> tuple[dict[str, SyntheticConfig], int]:
    """The study settings ``{name: config}`` and the number of seeds per setting."""
    if quick:
        return {"equal width (d_s = r = 16)": SyntheticConfig(steps=300)}, 1
    return (
        {
            "equal width (d_s = r = 16)": SyntheticConfig(steps=600),
            "narrow student (d_s = 12 < r = 16)": SyntheticConfig(d_student=12, steps=600),
            "anisotropic teacher (others x4, d_s = r)": SyntheticConfig(others_scale=4.0, steps=600),
        },
        5,
    )


def run_theory(out_dir: Path, *, seed: int = 0, quick: bool = False) -> Path:
    """Run every construction and write ``report.md``, ``results.json`` and PNGs to ``out_dir``.

    ``quick=True`` runs one short synthetic setting with one seed (seconds, what the tests
    use); the full run adds a narrow student and an anisotropic teacher, five seeds each
    (``seed`` .. ``seed + 4``). Figures need matplotlib; without it the report says so.
    Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _single_threaded():
        return _run_theory(out_dir, seed, quick)


def _run_theory(out_dir: Path, seed: int, quick: bool) -> Path:
    start = time.perf_counter()

    t1 = theorem1(seed=seed)
    t1_conf = theorem1_configurations(
        t1.n_samples // 2, t1.n_perturbed, lift=t1.lift, spread=t1.spread, seed=seed
    )
    sweep1 = theorem1_sweep(seed=seed)
    closed = [theorem1_closed_form(r.n_samples, r.n_perturbed, r.lift) for r in sweep1]
    t2 = theorem2(seed=seed)
    sweep2 = theorem2_sweep(seed=seed)
    equivalence = procrustes_gram_equivalence(seed=seed)

    settings, n_seeds = _synthetic_settings(quick)
    studies: dict[str, list[SyntheticStudyResult]] = {}
    for name, cfg in settings.items():
        studies[name] = [synthetic_study(cfg, seed + i, progress=True) for i in range(n_seeds)]

    figure_note = ""
    try:
        figures = _plot_figures(out_dir, t1_conf, sweep1, equivalence, studies)
    except ImportError:
        figures = {}
        figure_note = "matplotlib is not installed (`pip install geodistill[plots]`): no figures were drawn."
    elapsed = time.perf_counter() - start

    results = {
        "seed": seed,
        "quick": quick,
        "seconds": elapsed,
        "theorem1": t1,
        "theorem1_sweep": sweep1,
        "theorem1_closed_form_spread0": [
            dict(zip(("cka", "procrustes", "gram"), c, strict=True)) for c in closed
        ],
        "theorem2": t2,
        "theorem2_sweep": sweep2,
        "equivalence": equivalence,
        "synthetic": {
            name: [_study_json(res) for res in results_list] for name, results_list in studies.items()
        },
        "figures": figures,
    }
    (out_dir / "results.json").write_text(json.dumps(_to_jsonable(results), indent=1))
    report = out_dir / "report.md"
    report.write_text(
        _report_text(
            t1, sweep1, closed, t2, sweep2, equivalence, studies, figures, figure_note, seed, quick, elapsed
        )
    )
    return report


def _study_json(res: SyntheticStudyResult) -> dict[str, Any]:
    out = _to_jsonable(res)
    for run in out["runs"]:
        del run["loss_curve"]  # the CKA curve is the one asked for; keep the file small
    return out


def _figure_line(figures: dict[str, str], key: str, alt: str) -> str:
    return f"![{alt}]({figures[key]})\n" if key in figures else ""


def _report_text(
    t1: Theorem1Result,
    sweep1: Sequence[Theorem1Result],
    closed: Sequence[tuple[float, float, float]],
    t2: Theorem2Result,
    sweep2: Sequence[Theorem2Result],
    eq: EquivalenceResult,
    studies: dict[str, list[SyntheticStudyResult]],
    figures: dict[str, str],
    figure_note: str,
    seed: int,
    quick: bool,
    elapsed: float,
) -> str:
    out: list[str] = []
    add = out.append
    add("# The paper's theory in numbers\n")
    add(
        f"Generated by `geodistill theory` (seed {seed}{', quick mode' if quick else ''}, {elapsed:.1f} s). "
        "Bhattarai et al., *Knowledge distillation through geometry-aware representational alignment*, "
        "arXiv:2509.25253. All distances come from `geodistill.geometry` in float64: inputs are column-centred "
        "and scaled to unit Frobenius norm; `D_P = 2 - 2||X^T Y||_*` and `D_FG = ||XX^T - YY^T||_F^2` lie in "
        "[0, 2], CKA in [0, 1]. Raw numbers: `results.json`.\n"
    )
    if figure_note:
        add(f"> {figure_note}\n")

    # Theorem 1
    add("## Theorem 1: CKA cannot tell two different teachers apart\n")
    add(
        f"Teacher A: {t1.n_samples} unit vectors in two antiparallel groups (fanned over ±{t1.spread} rad) in a "
        f"plane of R^{t1.d_teacher}. Teacher B: A with {t1.n_perturbed} vectors each moved by {t1.lift} along "
        f"its *own* new axis, orthogonal to the plane and to the other moves. Student S: A's configuration "
        f"copied exactly in R^{t1.d_student}. A and B have different geometry (B's lifted vectors are no "
        "longer antiparallel to their partners), yet CKA scores S the same against both: B's extra variance "
        "is spread over many orthogonal directions of variance ~1/n each, and CKA, built from squared "
        "eigenvalues, weighs each by ~1/n^2.\n"
    )
    add(
        _table(
            ["", "CKA (higher = closer)", "D_P", "D_FG"],
            [
                ["S vs A", t1.cka_student_a, t1.procrustes_student_a, t1.gram_student_a],
                ["S vs B", t1.cka_student_b, t1.procrustes_student_b, t1.gram_student_b],
                ["A vs B", t1.cka_teachers, t1.procrustes_teachers, t1.gram_teachers],
            ],
        )
        + "\n"
    )
    add(
        f"CKA gap `CKA(S,A) - CKA(S,B)` = {_fmt(t1.cka_gap)}, while D_P goes from "
        f"{_fmt(t1.procrustes_student_a)} to {_fmt(t1.procrustes_student_b)} and D_FG from "
        f"{_fmt(t1.gram_student_a)} to {_fmt(t1.gram_student_b)}.\n"
    )
    # D_FG's limit carries the fan's anisotropy: q = ||S^T S||_F^2 / ||S||_F^4 of the fanned
    # student, whose two covariance eigenvalues are 1/2 +- sin(2 phi) / (4 phi) (q = 1 for phi = 0)
    half = 0.5 * math.sin(2 * t1.spread) / (2 * t1.spread) if t1.spread > 0 else 0.5
    q = (0.5 + half) ** 2 + (0.5 - half) ** 2
    add(
        "**More samples make CKA blinder.** Lifting half the vectors at every n: the CKA gap falls like 1/n "
        "(closed form for zero fan, `1 - CKA ~ p lift^4 / (2n)` with p the lifted fraction), the geometric "
        "distances converge to `2 - 2/sqrt(1 + p lift^2)` and `q (p lift^2 / (1 + p lift^2))^2`, where "
        "`q = ||S^T S||_F^2 / ||S||_F^4` is 1 for zero fan and `(1/2 + c)^2 + (1/2 - c)^2` with "
        f"`c = sin(2 phi) / (4 phi)` for a fan of ±phi ({q:.4f} at ±{t1.spread} rad).\n"
    )
    add(
        _table(
            [
                "n",
                "lifted",
                "CKA gap",
                "D_P(S,B)",
                "D_FG(S,B)",
                "closed-form CKA gap (no fan)",
                "closed-form D_P (no fan)",
            ],
            [
                [
                    r.n_samples,
                    r.n_perturbed,
                    r.cka_gap,
                    r.procrustes_student_b,
                    r.gram_student_b,
                    1 - c[0],
                    c[1],
                ]
                for r, c in zip(sweep1, closed, strict=True)
            ],
        )
        + "\n"
    )
    add(_figure_line(figures, "theorem1", "Theorem 1 configurations"))
    add(_figure_line(figures, "theorem1_sweep", "CKA gap vs n"))

    # Theorem 2
    add("## Theorem 2: zero projected MSE, different geometry\n")
    add(
        f"Teacher `Y = Z B` (n = {t2.n_samples}, rank {t2.d_student} inside R^{t2.d_teacher}, B orthonormal rows); "
        f"student `X = Z C` (R^{t2.d_student}) with C of condition number {t2.condition:g}. The least-squares "
        f"map W gives projected MSE `||XW - Y||^2 / ||Y||^2` = {_fmt(t2.projected_mse)}, but W is far from "
        f"orthogonal (singular values {_fmt(t2.map_singular_min)} .. {_fmt(t2.map_singular_max)}), so "
        "`YY^T = X W W^T X^T` differs from `XX^T`: "
        f"D_P = {_fmt(t2.procrustes)}, D_FG = {_fmt(t2.gram)}, CKA = {_fmt(t2.cka)}. Only an isometric map "
        "(condition 1) carries the geometry:\n"
    )
    add(
        _table(
            ["condition of C", "projected MSE", "W sv min", "W sv max", "D_P", "D_FG", "CKA"],
            [
                [
                    f"{r.condition:g}",
                    r.projected_mse,
                    r.map_singular_min,
                    r.map_singular_max,
                    r.procrustes,
                    r.gram,
                    r.cka,
                ]
                for r in sweep2
            ],
        )
        + "\n"
    )
    add("### D_P = 0 exactly when D_FG = 0\n")
    counts = {k: eq.kinds.count(k) for k in dict.fromkeys(eq.kinds)}
    add(
        f"{eq.n_pairs} random pairs (n = {eq.n_samples}, d_s = {eq.d_student}, d_t = {eq.d_teacher}; "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"). Over isometries (random orthonormal Q, scale and shift) max D_P = {_fmt(eq.max_isometry_procrustes)}, "
        f"max D_FG = {_fmt(eq.max_isometry_gram)}; over all other pairs min D_P = {_fmt(eq.min_other_procrustes)}, "
        f"min D_FG = {_fmt(eq.min_other_gram)}. With threshold {eq.tol:g} the two distances agree on "
        f"{eq.agree}/{eq.n_pairs} pairs. The equivalence is quantitative: `D_FG <= 4 D_P` (max ratio "
        f"{_fmt(eq.gram_bound_ratio)}) and `D_P <= sqrt(r D_FG)`, r = min(n - 1, d_s + d_t), from the Powers-Stormer "
        f"inequality, as D_P is the squared Bures distance between the Gram matrices (max ratio "
        f"{_fmt(eq.procrustes_bound_ratio)}).\n"
    )
    add(_figure_line(figures, "equivalence", "D_P vs D_FG"))

    # synthetic study
    add("## Synthetic study (Section 5.1): which objective recovers epsilon-orthogonal structure\n")
    first_cfg = next(iter(studies.values()))[0].config
    add(
        f"Teacher: N = {first_cfg.n_vectors} vectors of rank r = {first_cfg.rank} in R^{first_cfg.d_teacher}; "
        f"the first K = {first_cfg.k_orthogonal} are mutually eps-orthogonal (|cos| < eps = {first_cfg.eps}; "
        "pairwise cosines drawn within ±eps/2), every other one has |cos| ~ 0.5 with some of them. Students "
        "are N free vectors trained by full-batch Adam (cosine-decayed lr) from the same initialisation on each "
        "objective; projection MSE learns its linear map jointly. Counts use centred cosines (the only geometry "
        "the translation-invariant losses constrain). *Vectors kept*: designed vectors all of whose "
        "eps-orthogonal relations survive; *pairs kept*: designed eps-orthogonal pairs that stay so; "
        "*spurious*: pairs (among all N) eps-orthogonal in the student only; *steps to keep all*: first logged "
        "step from which all K vectors stay kept. The last row is the best any width-d_s student can do for "
        "D_P (and CKA): the teacher's top-d_s principal components.\n"
    )
    for name, results in studies.items():
        cfg = results[0].config
        tc = results[0].teacher_count
        add(
            f"### {name}\n\nd_s = {cfg.d_student}, others_scale = {cfg.others_scale}, {cfg.steps} steps, "
            f"lr {cfg.lr}; {len(results)} seed(s) ({', '.join(str(r.seed) for r in results)})"
            f"{', mean ± std' if len(results) > 1 else ''}. Teacher: {tc.vectors_total} designed vectors, "
            f"{tc.pairs_total} eps-orthogonal pairs among them.\n"
        )
        rows = []
        for obj in (r.objective for r in results[0].runs):
            runs = [res.run(obj) for res in results]
            rows.append(
                [
                    _OBJECTIVE_LABELS[obj],
                    _mean_std([r.count.vectors_recovered for r in runs], counts=True),
                    _mean_std([r.count.pairs_recovered for r in runs], counts=True),
                    _mean_std([r.count.spurious_pairs for r in runs], counts=True),
                    _mean_std([r.count.mean_cos_error for r in runs]),
                    _steps_summary([r.steps_to_all for r in runs]),
                    _mean_std([r.final_loss for r in runs]),
                    _mean_std([r.procrustes for r in runs]),
                    _mean_std([r.gram for r in runs]),
                    _mean_std([r.cka for r in runs]),
                ]
            )
        rows.append(
            [
                f"*width-{cfg.d_student} optimum (top PCs)*",
                _mean_std([r.optimum_count.vectors_recovered for r in results], counts=True),
                _mean_std([r.optimum_count.pairs_recovered for r in results], counts=True),
                _mean_std([r.optimum_count.spurious_pairs for r in results], counts=True),
                _mean_std([r.optimum_count.mean_cos_error for r in results]),
                "-",
                "-",
                _mean_std([r.optimum_procrustes for r in results]),
                "-",
                "-",
            ]
        )
        add(
            _table(
                [
                    "objective",
                    f"vectors kept /{tc.vectors_total}",
                    f"pairs kept /{tc.pairs_total}",
                    "spurious pairs",
                    "mean abs cos error",
                    "steps to keep all",
                    "final loss",
                    "D_P",
                    "D_FG",
                    "CKA",
                ],
                rows,
            )
            + "\n"
        )
        add(_setting_reading(results) + "\n")
    add(_figure_line(figures, "synthetic_counts", "recovered eps-orthogonal structure"))
    add(_figure_line(figures, "cka_curve", "CKA over steps while training on Procrustes"))
    add(
        "**Why.** When the student is wide enough (d_s >= r) the projection-MSE student drives its loss to "
        "~0 while its own angles stay wherever the initialisation and the learned map leave them (Theorem 2: "
        "the map absorbs any invertible distortion), so nothing asks it for the teacher's geometry. "
        "Procrustes and Gram ask for exactly that geometry, and so does CKA at its optimum (CKA = 1 only at "
        "`Y = cXQ`), so with enough steps and width all three end in the same place, and a narrow student "
        "trained on any of them ends near the same best width-d_s configuration. What differs is speed "
        "(the *steps to keep all* column). A likely reason: near its optimum D_P is a plain squared distance "
        "between the two point sets, in which every vector counts equally, whereas D_FG and CKA compare Gram "
        "matrices, in which a direction of variance s^2 is weighted by about s^2, so low-variance structure "
        "is learned last; making the other vectors carry most of the variance (the anisotropic teacher) "
        "slows Gram and CKA more than Procrustes. CKA's own blind spot is Theorem 1: it cannot tell apart "
        "configurations that differ only in thin directions, which a count at convergence does not probe.\n"
    )
    return "\n".join(out)


def _steps_summary(steps: Sequence[int | None]) -> str:
    """Mean ± std of the steps-to-keep-all over seeds that got there, and how many never did."""
    done = [float(s) for s in steps if s is not None]
    never = len(steps) - len(done)
    if not done:
        return "never"
    text = _mean_std(done, counts=True) if len(done) > 1 else str(int(done[0]))
    return text + (f" ({never} never)" if never else "")


def _setting_reading(results: Sequence[SyntheticStudyResult]) -> str:
    """What one setting's numbers say, computed from them (no claim is hard-coded)."""
    objs = [r.objective for r in results[0].runs]
    total = results[0].teacher_count.vectors_total
    mean_vec = {o: sum(res.run(o).count.vectors_recovered for res in results) / len(results) for o in objs}
    parts = [
        "Vectors kept, mean: "
        + ", ".join(f"{_OBJECTIVE_LABELS[o]} {mean_vec[o]:.1f}/{total}" for o in objs)
        + "."
    ]
    if "projection_mse" in objs:
        mse = [res.run("projection_mse").final_loss for res in results]
        parts.append(f"The projection-MSE student ends at relative MSE {_fmt(sum(mse) / len(mse))}.")
    geometric = [o for o in ("procrustes", "gram", "cka") if o in objs]
    reachable = any(res.run(o).steps_to_all is not None for res in results for o in geometric)
    if "procrustes" in geometric and len(geometric) > 1 and reachable:
        others = [o for o in geometric if o != "procrustes"]
        first = sum(
            1
            for res in results
            if res.run("procrustes").steps_to_all is not None
            and all(
                res.run(o).steps_to_all is None
                or res.run("procrustes").steps_to_all <= res.run(o).steps_to_all
                for o in others
            )
        )
        parts.append(
            f"Procrustes kept all {total} vectors no later than "
            + " and ".join(_OBJECTIVE_LABELS[o] for o in others)
            + f" in {first}/{len(results)} seeds."
        )
    best = [r.optimum_procrustes for r in results]
    if max(best) > 1e-9:
        reached = [res.run(o).procrustes - res.optimum_procrustes for res in results for o in geometric]
        parts.append(
            f"No width-{results[0].config.d_student} student can hold the whole geometry (best D_P "
            f"{_mean_std(best)}); the geometric students end within {_fmt(max(reached))} of that optimum."
        )
    drops = [_steps_cka_drops(res.run("procrustes").cka_curve) for res in results if "procrustes" in objs]
    if drops:
        n_drop = sum(d[0] for d in drops)
        parts.append(
            f"CKA while training on Procrustes fell (by > 1e-6) on {n_drop} of "
            f"{len(drops) * results[0].config.steps} steps, largest single fall {_fmt(max(d[1] for d in drops))}"
            + (": no spikes here." if n_drop == 0 else ".")
        )
    return " ".join(parts)
