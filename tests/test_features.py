"""Layer maps and pooling: the exact pairs each spec gives, and padding that never counts."""

from __future__ import annotations

import math

import pytest
import torch

from geodistill.features import pool, resolve_layer_pairs

# ----------------------------------------------------------------------------------------------
# layer maps


@pytest.mark.parametrize(
    "n_student, n_teacher, pairs",
    [
        (4, 12, ((1, 3), (2, 6), (3, 9), (4, 12))),  # L_t = 3 L_s: i -> 3i
        (6, 12, ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12))),  # DistilBERT's every other layer
        (3, 6, ((1, 2), (2, 4), (3, 6))),
        # 1.5, 4.5 round half to even: 2 and 4 (not ceil's 2 and 5); pinned, recorded runs used it
        (4, 6, ((1, 2), (2, 3), (3, 4), (4, 6))),
        (2, 3, ((1, 2), (2, 3))),  # 1.5 -> 2
        (4, 4, ((1, 1), (2, 2), (3, 3), (4, 4))),
        (6, 4, ((1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 4))),  # a deeper student: 0.67, 2, 2.67, 3.33
        # over twice as deep: 1/3 rounds to 0, the embeddings; the first layer instead
        (6, 2, ((1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2))),
    ],
)
def test_uniform_map(n_student: int, n_teacher: int, pairs) -> None:
    assert resolve_layer_pairs("uniform", n_student, n_teacher) == pairs


def test_a_model_without_layers_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"losses\[0\]\.layers: student and teacher need at least one layer, got 0 and 6"
    ):
        resolve_layer_pairs("uniform", 0, 6, where="losses[0].layers")


def test_last_and_explicit_pairs() -> None:
    assert resolve_layer_pairs("last", 4, 6) == ((4, 6),)
    assert resolve_layer_pairs(None, 2, 12) == ((2, 12),)
    assert resolve_layer_pairs([[0, 0], [2, 5], [4, 6]], 4, 6) == ((0, 0), (2, 5), (4, 6))
    # negative indices count from the end of the hidden states (-1 = last layer, -(L + 1) = embeddings)
    assert resolve_layer_pairs([[-1, -1], [-5, -7], [-2, 3]], 4, 6) == ((4, 6), (0, 0), (3, 3))


@pytest.mark.parametrize(
    "spec, match",
    [
        ([[5, 1]], r"losses\[1\]\.layers\[0\]: student layer 5 is out of range: the student has 4 layers"),
        ([[1, 2], [1, 7]], r"losses\[1\]\.layers\[1\]: teacher layer 7 is out of range: the teacher has 6"),
        ([[-6, 1]], r"student layer -6 is out of range.*-5\.\.-1"),
        ([[1]], r"losses\[1\]\.layers\[0\]: expected a \[student_layer, teacher_layer\] pair"),
        ([[1, "2"]], r"pair of integers"),
        ([[True, 2]], r"pair of integers"),
        ([], r"losses\[1\]\.layers: empty list"),
        ("middle", r"losses\[1\]\.layers: expected 'last', 'uniform' or a list"),
        (3, r"expected 'last', 'uniform' or a list"),
    ],
)
def test_bad_layer_specs_name_where(spec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_layer_pairs(spec, 4, 6, where="losses[1].layers")


# ----------------------------------------------------------------------------------------------
# pooling


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 4, 5) hidden states and a mask of 4, 2 and 3 valid positions (right padding)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return hidden, mask


def test_pooling_against_hand_computation() -> None:
    hidden, mask = batch()
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    mean = torch.stack([hidden[0, :4].mean(0), hidden[1, :2].mean(0), hidden[2, :3].mean(0)])
    torch.testing.assert_close(pool(hidden, mask, "mean"), mean)
    torch.testing.assert_close(
        pool(hidden, mask, "last"), torch.stack([hidden[0, 3], hidden[1, 1], hidden[2, 2]])
    )
    tokens = torch.cat([hidden[0, :4], hidden[1, :2], hidden[2, :3]])  # row-major valid positions
    torch.testing.assert_close(pool(hidden, mask, "tokens"), tokens)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last", "tokens"])
def test_padding_never_counts(pooling: str) -> None:
    """More padding (with garbage hidden states behind it) leaves every pooled vector as it was."""
    hidden, mask = batch()
    padded = torch.cat([hidden, torch.zeros(3, 5, 5, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    # garbage behind every padding position, those that were already padding included
    g = torch.Generator().manual_seed(1)
    padded[~padded_mask] = 1e3 * torch.randn(int((~padded_mask).sum()), 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pool(padded, padded_mask, pooling), pool(hidden, mask, pooling))


@pytest.mark.parametrize("pooling", ["cls", "mean", "last", "tokens"])
def test_left_padding_pools_the_same_vectors(pooling: str) -> None:
    """Decoder batches pad on the left: every pooling finds the same valid positions."""
    hidden, mask = batch()
    left, left_mask = torch.zeros_like(hidden), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        left[i, 4 - n :], left_mask[i, 4 - n :] = hidden[i, :n], True
        left[i, : 4 - n] = 1e3  # padding positions hold garbage
    torch.testing.assert_close(pool(left, left_mask, pooling), pool(hidden, mask, pooling))


def test_pool_rejects_bad_shapes_and_names() -> None:
    hidden, mask = batch()
    with pytest.raises(ValueError, match=r"pooling must be one of cls, mean, tokens, last"):
        pool(hidden, mask, "max")
    with pytest.raises(ValueError, match=r"hidden must be \(B, T, d\) and mask \(B, T\)"):
        pool(hidden, mask[:, :3], "cls")


def test_mean_pooling_sums_half_precision_without_overflow_and_ignores_nan_padding() -> None:
    """float16 hidden states of size 200 over 512 tokens sum past float16's largest value
    (65504) though their mean is 200; and a NaN behind the mask stays out of the mean."""
    hidden = torch.full((2, 512, 4), 200.0, dtype=torch.float16)
    mask = torch.ones(2, 512, dtype=torch.bool)
    mask[1, 300:] = False
    hidden[1, 400] = math.nan
    got = pool(hidden, mask, "mean")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, torch.full((2, 4), 200.0, dtype=torch.float16))
