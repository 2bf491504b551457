"""From hidden states to sample matrices: layer maps, pooling and masks.

``hidden_states`` follow the Hugging Face convention: a tuple of ``L + 1`` tensors of shape
``(batch, length, width)``, index 0 the embedding output and index ``i`` the output of layer
``i``. A feature tap pairs one student index with one teacher index and says which vectors are
the samples (``pooling``). Padding never counts: every pooling takes a boolean mask of valid
positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["POOLINGS", "pool", "resolve_layer_pairs"]

POOLINGS = ("cls", "mean", "tokens", "last")


def resolve_layer_pairs(
    spec: Any, n_student: int, n_teacher: int, *, where: str = "layers"
) -> tuple[tuple[int, int], ...]:
    """Turn a layer spec into ``((student_index, teacher_index), ...)``.

    Indices are hidden-state indices: 0 is the embedding output, ``L`` the last layer's.

    * ``'last'`` (or None): ``((L_s, L_t),)``.
    * ``'uniform'``: every student layer ``i = 1..L_s`` with teacher layer ``round(i * L_t / L_s)``,
      Python's ``round`` (half to even): PKD's "skip" map (Sun et al. 2019), which for
      ``L_t = k * L_s`` is ``i -> k * i`` and always ends at the last layers. Where ``i * L_t / L_s``
      falls half-way it goes to the even layer: 4 student layers on 6 give 2, 3, 4, 6 (ceil would
      give 2, 3, 5, 6; floor 1, 3, 4, 6). Kept so because recorded experiments used it. Never 0:
      a student more than twice as deep as its teacher pairs its first layers with layer 1.
    * a list of ``[s, t]`` pairs: explicit indices in ``0..L``, or negative ones counting from
      the end (``-1`` = ``L``, ``-(L + 1)`` = 0), returned non-negative.

    Raises ``ValueError`` naming ``where`` (and the pair) for an index out of range or a malformed spec.
    """
    if spec is None or spec == "last":
        return ((n_student, n_teacher),)
    if n_student < 1 or n_teacher < 1:
        raise ValueError(
            f"{where}: student and teacher need at least one layer, got {n_student} and {n_teacher}"
        )
    if spec == "uniform":
        # max(1, .): a student more than twice as deep as its teacher maps its first layers to the
        # teacher's first layer, not to the embeddings (index 0)
        return tuple((i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1))
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise ValueError(
            f"{where}: expected 'last', 'uniform' or a list of [student, teacher] pairs, got {spec!r}"
        )
    pairs = []
    for k, pair in enumerate(spec):
        if not (
            isinstance(pair, Sequence)
            and len(pair) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            raise ValueError(
                f"{where}[{k}]: expected a [student_layer, teacher_layer] pair of integers, got {pair!r}"
            )
        s, t = (
            _check_index(i, n, f"{where}[{k}]", who)
            for i, n, who in zip(pair, (n_student, n_teacher), ("student", "teacher"), strict=False)
        )
        pairs.append((s, t))
    if not pairs:
        raise ValueError(f"{where}: empty list of layer pairs")
    return tuple(pairs)


def _check_index(i: int, n_layers: int, where: str, who: str) -> int:
    if not -(n_layers + 1) <= i <= n_layers:
        raise ValueError(
            f"{where}: {who} layer {i} is out of range: the {who} has {n_layers} layers, "
            f"valid hidden-state indices are 0..{n_layers} (0 = embeddings) or -{n_layers + 1}..-1"
        )
    return i % (n_layers + 1)


def pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Sample matrix from one layer's hidden states.

    ``hidden`` (B, T, d), ``mask`` (B, T) bool (True = a valid position). Returns:
    ``cls`` (B, d): the first valid position (position 0 under right padding, where BERT-style
    models put [CLS]; the first token after left padding in a decoder batch); ``mean`` (B, d): mean over valid positions; ``last`` (B, d): the
    last valid position (right or left padding); ``tokens`` (N, d): every valid position of the
    batch, N = mask.sum(), in row-major order (so student and teacher rows match when both use
    the same tokenisation and mask).
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool: hidden must be (B, T, d) and mask (B, T), got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.bool()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "cls":
        t = torch.arange(mask.shape[1], device=mask.device)
        first = torch.where(mask, t, mask.shape[1]).amin(1).clamp_max(mask.shape[1] - 1)
        return hidden[rows, first]
    if pooling == "mean":
        # padding filled with 0 (a NaN or inf behind the mask stays out); the sum in at least
        # float32, so a float16 model's few hundred tokens of size 1e2 do not overflow to inf
        valid = hidden.masked_fill(~mask.unsqueeze(-1), 0)
        total = valid.sum(1, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return (total / mask.sum(1, keepdim=True).clamp_min(1)).to(hidden.dtype)
    if pooling == "last":
        t = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, t, -1).amax(1).clamp_min(0)  # (B,) index of the last valid position
        return hidden[rows, last]
    if pooling == "tokens":
        return hidden[mask]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
