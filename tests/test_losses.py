"""Loss terms against closed forms written here in float64, their gradients, and the registry.

KD is ``tau^2 * mean_i KL(p_t(tau) || p_s(tau))`` (forward; ``reverse`` swaps the arguments of
KL), PKD the mean squared distance of unit-normalised rows, projection MSE the mean squared error,
CE the mean negative log-likelihood over non-ignored positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from geodistill.config import LossConfig
from geodistill.losses import ce_loss, kd_loss, pkd_loss, proj_mse_loss, resolve_losses


def softmax64(z: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(z / tau) row by row, written out: exp of the shifted row over its sum."""
    e = torch.exp((z.double() - z.double().max(-1, keepdim=True).values) / tau)
    return e / e.sum(-1, keepdim=True)


def kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row: sum_j p_j log(p_j / q_j)."""
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_kd_is_tau_squared_times_forward_kl(logits, tau: float) -> None:
    s, t = logits
    expected = tau**2 * kl64(softmax64(t, tau), softmax64(s, tau)).mean()
    assert kd_loss(s, t, temperature=tau).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_direction(logits) -> None:
    s, t = logits
    forward = kd_loss(s, t, temperature=2.0)
    reverse = kd_loss(s, t, temperature=2.0, direction="reverse")
    assert forward.item() == pytest.approx(4 * kl64(softmax64(t, 2), softmax64(s, 2)).mean().item(), rel=1e-5)
    assert reverse.item() == pytest.approx(4 * kl64(softmax64(s, 2), softmax64(t, 2)).mean().item(), rel=1e-5)
    assert abs(forward.item() - reverse.item()) > 1e-2  # KL is not symmetric: the test can tell them apart
    # swapping the models swaps the directions
    assert kd_loss(t, s, temperature=2.0, direction="reverse").item() == pytest.approx(
        forward.item(), rel=1e-6
    )


def test_kd_gradient_is_tau_times_the_probability_gap(logits) -> None:
    """d/dz_s of tau^2 KL(p_t || p_s) averaged over N rows is tau * (p_s - p_t) / N."""
    s, t = logits
    s = s.double().requires_grad_(True)
    tau = 2.0
    kd_loss(s, t.double(), temperature=tau).backward()
    expected = tau * (softmax64(s.detach(), tau) - softmax64(t, tau)) / s.shape[0]
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t.double(), temperature=0.7, direction="reverse"),
        (s.detach().clone().requires_grad_(True),),
    )


def test_kd_zero_iff_tempered_distributions_agree(logits) -> None:
    s, _ = logits
    shift = torch.randn(6, 1, generator=torch.Generator().manual_seed(1))
    assert kd_loss(s, s + shift, temperature=3.0).abs().item() < 1e-6  # softmax ignores a per-row shift
    assert kd_loss(s, 2 * s, temperature=3.0).item() > 1e-3


def test_kd_mask_chunks_and_precision(logits) -> None:
    s, t = logits
    mask = torch.tensor([True, False, True, True, False, True])
    masked = kd_loss(s, t, temperature=2.0, mask=mask)
    assert masked.item() == pytest.approx(kd_loss(s[mask], t[mask], temperature=2.0).item(), rel=1e-6)
    # rows in chunks under activation checkpointing: the same value and gradient as one pass
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    whole, chunked = kd_loss(a, t, temperature=2.0), kd_loss(b, t, temperature=2.0, chunk_rows=4)
    whole.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad)
    # half-precision logits are scored in float32
    half = kd_loss(s.bfloat16(), t.bfloat16(), temperature=2.0)
    assert half.dtype == torch.float32
    assert kd_loss(s[:0], t[:0]).item() == 0.0
    with pytest.raises(ValueError, match="same vocabulary"):
        kd_loss(s, t[:, :4])


def test_pkd_is_the_distance_of_unit_rows() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    by_hand = (
        sum(sum((s[i, j] / s[i].norm() - t[i, j] / t[i].norm()) ** 2 for j in range(7)) for i in range(5)) / 5
    )
    assert pkd_loss(s, t).item() == pytest.approx(float(by_hand), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(s.double(), t.double(), dim=-1)
    assert pkd_loss(s, t).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    scale = torch.rand(5, 1, generator=g) * 10 + 0.1
    assert pkd_loss(s * scale, t).item() == pytest.approx(pkd_loss(s, t).item(), rel=1e-5)  # row scale
    assert pkd_loss(s, 3 * s).item() < 1e-10 and pkd_loss(s, -s).item() == pytest.approx(4.0)  # range [0, 4]


def test_proj_mse_is_the_mean_squared_error() -> None:
    p = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert proj_mse_loss(p, y).item() == pytest.approx((1 + 0 + 4 + 4) / 4)
    assert proj_mse_loss(p, p).item() == 0.0
    assert proj_mse_loss(p.bfloat16(), y).dtype == torch.float32


def test_ce_is_the_mean_negative_log_likelihood(logits) -> None:
    s, _ = logits
    labels = torch.tensor([0, 4, -100, 2, 1, -100])
    p = softmax64(s, 1.0)
    kept = [i for i in range(6) if labels[i] != -100]
    expected = -sum(math.log(p[i, labels[i]]) for i in kept) / len(kept)
    assert ce_loss(s, labels).item() == pytest.approx(expected, rel=1e-5)
    # (batch, length, C) logits with (batch, length) labels: the same mean over positions
    assert ce_loss(s.reshape(2, 3, 5), labels.reshape(2, 3)).item() == pytest.approx(expected, rel=1e-5)


def test_resolve_losses_fills_defaults_keys_and_names_errors() -> None:
    terms = resolve_losses(
        [LossConfig(name="kd", temperature=2.0), LossConfig(name="procrustes"), LossConfig(name="procrustes")]
    )
    assert [t.key for t in terms] == ["kd", "procrustes", "procrustes.1"]
    assert terms[0].options == {"temperature": 2.0, "direction": "forward"}
    assert terms[1].options["layers"] == "last" and terms[1].options["pooling"] == "cls"
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert terms[0](s, t).item() == pytest.approx(kd_loss(s, t, temperature=2.0).item())  # options applied
    with pytest.raises(ValueError, match=r"losses\[1\]\.temperature does not apply to pkd"):
        resolve_losses([LossConfig(name="ce"), LossConfig(name="pkd", temperature=2.0)])
    with pytest.raises(ValueError, match=r"losses\[0\]\.weight must be >= 0"):
        resolve_losses([LossConfig(name="ce", weight=-1.0)])
    with pytest.raises(ValueError, match="the objective is empty"):
        resolve_losses([])


def test_a_term_ramps_its_weight_over_its_warmup_steps() -> None:
    """``warmup_steps: N`` applies to any term: weight x step / N at steps 1..N, the weight after;
    0 (the default) is the full weight from step 1; a bad value names its entry."""
    kd, proj, ce = resolve_losses(
        [
            LossConfig(name="kd", temperature=2.0),
            LossConfig(name="proj_mse", weight=2.0, warmup_steps=4),
            LossConfig(name="ce", warmup_steps=0),
        ]
    )
    assert [proj.weight_at(k) for k in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [kd.weight_at(k) for k in (1, 2, 100)] == [1.0, 1.0, 1.0] == [ce.weight_at(k) for k in (1, 2, 100)]
    assert "warmup_steps" not in proj.options  # a weight schedule, not an option of the loss
    with pytest.raises(ValueError, match="steps count from 1"):
        proj.weight_at(0)
    for bad in (-1, 1.5, True):
        with pytest.raises(
            ValueError, match=r"losses\[1\]\.warmup_steps must be a whole number of steps >= 0"
        ):
            resolve_losses([LossConfig(name="ce"), LossConfig(name="gram", warmup_steps=bad)])
    # start_step: off for S steps, then the ramp counts from there
    (late,) = resolve_losses([LossConfig(name="gram", weight=2.0, start_step=3, warmup_steps=2)])
    assert [late.weight_at(k) for k in range(1, 8)] == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0]
    (off,) = resolve_losses([LossConfig(name="gram", weight=2.0, start_step=2)])
    assert [off.weight_at(k) for k in range(1, 5)] == [0.0, 0.0, 2.0, 2.0]
    assert late.scheduled and off.scheduled and proj.scheduled and not kd.scheduled
    for bad in (-1, 2.0, False):
        with pytest.raises(ValueError, match=r"losses\[0\]\.start_step must be a whole number of steps >= 0"):
            resolve_losses([LossConfig(name="gram", start_step=bad)])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_with_minus_inf_logits_is_finite_and_exact(logits, direction: str) -> None:
    """A class with a -inf logit (a masked vocabulary entry) has probability 0: it adds nothing
    to KL(p || q) where p gives it 0, and the loss equals KD over the other classes."""
    s, t = (x.double() for x in logits)
    s[:, 0] = t[:, 0] = -math.inf  # masked in both: every direction is finite
    t[:, 1] = -math.inf  # the teacher alone rules out class 1: KL(p_t || p_s) stays finite
    if direction == "reverse":  # the student alone rules it out instead
        s[:, 1], t[:, 1] = -math.inf, logits[1][:, 1].double()
    s.requires_grad_(True)
    loss = kd_loss(s, t, temperature=2.0, direction=direction)
    p, q = (s.detach(), t) if direction == "reverse" else (t, s.detach())
    kept = torch.ones(5, dtype=torch.bool)
    kept[[0, 1]] = False
    pp, qq = softmax64(p[:, kept], 2.0), softmax64(q, 2.0)[:, kept]
    expected = 4 * (pp * (pp.log() - qq.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    loss.backward()
    assert torch.isfinite(s.grad).all()
