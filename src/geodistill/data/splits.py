"""Deterministic, seeded index splits: stratified, grouped, and stratified subsamples.

Pure NumPy helpers shared by the classification and instruction loaders. Every function takes
an explicit ``numpy.random.Generator`` (make one with :func:`rng_for`) and returns sorted
``int64`` index arrays, so the same seed gives the same rows in the same order on every
platform and a different seed gives a different draw.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["allocate", "grouped_split", "rng_for", "stratified_split", "stratified_subsample"]


def rng_for(seed: int, *purpose: str) -> np.random.Generator:
    """A generator for ``seed`` and a purpose string, e.g. ``rng_for(0, "dev carve-out")``.

    Each purpose gets its own stream so that, say, subsampling train never shifts which rows
    were carved off for dev. ``zlib.crc32`` (not ``hash``) keeps it stable across processes.
    Callers leave file paths out of the purpose: moving a file must not change its split.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"split_seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), *(zlib.crc32(p.encode("utf-8")) for p in purpose)])


def allocate(counts: Sequence[int] | np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` into integer shares proportional to ``counts`` (largest-remainder method).

    Shares sum exactly to ``min(total, sum(counts))`` and never exceed ``counts``. Ties in the
    remainder go to the larger count, then to the earlier index, so the result is deterministic.
    """
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    total = min(int(total), n)
    if n == 0 or total <= 0:
        return np.zeros_like(c)
    quota = c * (total / n)
    share = np.minimum(np.floor(quota).astype(np.int64), c)
    order = np.lexsort((np.arange(len(c)), -c, -(quota - share)))  # last key sorts first
    for i in order:
        if share.sum() >= total:
            break
        if share[i] < c[i]:
            share[i] += 1
    return share


def _classes(labels: Sequence[Hashable] | np.ndarray) -> list[np.ndarray]:
    """Indices of each distinct label, classes in first-appearance order (deterministic)."""
    first: dict[Hashable, list[int]] = {}
    for i, y in enumerate(labels):
        first.setdefault(y.item() if isinstance(y, np.generic) else y, []).append(i)
    return [np.asarray(ix, dtype=np.int64) for ix in first.values()]


def stratified_split(
    labels: Sequence[Hashable] | np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into ``len(fractions)`` parts with per-class proportions.

    Within each class the rows are shuffled and shared out by :func:`allocate`, so a class with
    very few rows lands wholly in the largest-fraction part (listed first, by convention train):
    rare classes are never moved out of train. Returns sorted index arrays that cover every row
    exactly once.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) < 2 or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    parts: list[list[np.ndarray]] = [[] for _ in f]
    for idx in _classes(labels):
        perm = idx[rng.permutation(len(idx))]
        cuts = np.cumsum(allocate(f * 1_000_000, len(idx)))[:-1]
        for p, chunk in enumerate(np.split(perm, cuts)):
            parts[p].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def stratified_subsample(
    labels: Sequence[Hashable] | np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` row indices drawn without replacement, class proportions kept (sorted).

    Returns every index when ``n >= len(labels)``.
    """
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes = _classes(labels)
    share = allocate([len(ix) for ix in classes], n)
    picked = [ix[rng.permutation(len(ix))[:k]] for ix, k in zip(classes, share, strict=True)]
    return np.sort(np.concatenate(picked))


def grouped_split(
    groups: Sequence[Hashable] | np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Partition rows so that all rows of one group land in the same part.

    Groups are visited in a seeded random order and their rows laid end to end; a group goes
    to the part whose cumulative-fraction interval contains the group's midpoint. Part sizes
    therefore match ``fractions`` to within half the largest group. Returns sorted index arrays.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) < 2 or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    members = _classes(groups)
    # Sort groups by key first so the draw does not depend on the row order of the input.
    keys = [str(groups[int(ix[0])]) for ix in members]
    members = [members[i] for i in sorted(range(len(members)), key=keys.__getitem__)]
    order = rng.permutation(len(members))
    sizes = np.array([len(members[i]) for i in order], dtype=np.float64)
    mid = (np.cumsum(sizes) - sizes / 2) / max(sizes.sum(), 1.0)
    part_of = np.minimum(np.searchsorted(np.cumsum(f), mid, side="right"), len(f) - 1)
    parts: list[list[np.ndarray]] = [[] for _ in f]
    for g, p in zip(order, part_of, strict=True):
        parts[p].append(members[g])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
