"""geodistill.geometry against independent float64 references and the maths' own properties."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from geodistill.geometry import (
    POLAR_METHODS,
    center,
    cka,
    cka_distance,
    gram_distance,
    normalize,
    nuclear_norm,
    polar_method,
    procrustes_distance,
)

METHODS = [m for m in POLAR_METHODS if m != "auto"]  # auto is one of these, chosen by device

# ----------------------------------------------------------------------------------------------
# independent float64 references (NumPy SVD, explicit n x n matrices)


def _ref_normalize(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0, keepdims=True)
    nrm = np.linalg.norm(a)
    return a / nrm if nrm > 0 else a


def ref_all(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every distance from its textbook definition, in float64 NumPy."""
    xn = _ref_normalize(x.detach().double().cpu().numpy())
    yn = _ref_normalize(y.detach().double().cpu().numpy())
    nuc = np.linalg.svd(xn.T @ yn, compute_uv=False).sum()
    kx, ky = xn @ xn.T, yn @ yn.T  # n x n on purpose: an independent route
    hsic = np.sum(kx * ky)
    return {
        "procrustes": 2.0 - 2.0 * nuc,
        # arccos(nuc) in the well-conditioned form, with D_P from the residual of the optimal Q
        "angular": float(np.arccos(np.clip(nuc, -1.0, 1.0))),
        "gram": float(np.sum((kx - ky) ** 2)),
        "cka": float(hsic / (np.linalg.norm(kx) * np.linalg.norm(ky))),
    }


def ref_dd(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The same definitions in their d x d form (for n where n x n matrices do not fit): float64
    NumPy centring and SVD; Gram and CKA from X~^T X~, Y~^T Y~ and X~^T Y~."""
    xn = _ref_normalize(x.detach().double().cpu().numpy())
    yn = _ref_normalize(y.detach().double().cpu().numpy())
    m, xx, yy = xn.T @ yn, xn.T @ xn, yn.T @ yn
    nuc = np.linalg.svd(m, compute_uv=False).sum()
    return {
        "procrustes": 2.0 - 2.0 * nuc,
        "angular": float(np.arccos(np.clip(nuc, -1.0, 1.0))),
        "gram": float(np.sum(xx**2) + np.sum(yy**2) - 2.0 * np.sum(m**2)),
        "cka": float(np.sum(m**2) / (np.linalg.norm(xx) * np.linalg.norm(yy))),
    }


def ours(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {
        "procrustes": procrustes_distance(x, y).item(),
        "angular": procrustes_distance(x, y, angular=True).item(),
        "gram": gram_distance(x, y).item(),
        "cka": cka(x, y).item(),
    }


def _orth(n: int, k: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q.to(dtype)


def make_case(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The input classes named in the acceptance list of the geometry core."""
    g = torch.Generator().manual_seed(abs(hash(name)) % 2**31)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    if name == "n_lt_d":
        x, y = randn(24, 80), randn(24, 100)
    elif name == "n_gt_d":
        x, y = randn(400, 30), randn(400, 30)
    elif name == "ds_ne_dt":
        x, y = randn(300, 48), randn(300, 20)
    elif name == "rank_deficient":  # rank 5 features in 40 dims, both sides
        x, y = randn(200, 5) @ randn(5, 40), randn(200, 5) @ randn(5, 60)
    elif name == "repeated_sv":  # X^T Y with many equal singular values
        u = _orth(300, 40, g)
        x = u[:, :20]
        y = u[:, :20] @ _orth(20, 20, g) + 0.0 * randn(300, 20)
        y = torch.cat([y, u[:, 20:30]], dim=1)
    elif name == "rotated_scaled_shifted":
        y = randn(250, 32)
        x = 3.7 * y @ _orth(32, 32, g) + 11.0
    elif name == "rotated_wider":  # x = y Q with Q (d_t x d_s) having orthonormal rows
        y = randn(250, 16)
        x = -0.5 * y @ _orth(40, 16, g).T + 2.0
    elif name == "identical":
        y = randn(100, 24)
        x = y.clone()
    elif name == "nearly_identical":
        y = randn(300, 24)
        x = y + 1e-4 * randn(300, 24)
    elif name == "constant_column":
        y = randn(120, 16)
        x = randn(120, 12)
        x[:, 3] = 5.0
        y[:, 0] = -1.0
    elif name == "graded_spectrum":  # singular values of the features spread over 8 decades
        s = torch.logspace(0, -8, 30, dtype=torch.float64)
        x = _orth(500, 30, g) * s @ _orth(30, 30, g)
        y = x @ _orth(30, 30, g) + 1e-3 * randn(500, 30) * s
    else:
        raise KeyError(name)
    return x.to(dtype).contiguous(), y.to(dtype).contiguous()


CASES = [
    "n_lt_d",
    "n_gt_d",
    "ds_ne_dt",
    "rank_deficient",
    "repeated_sv",
    "rotated_scaled_shifted",
    "rotated_wider",
    "identical",
    "nearly_identical",
    "constant_column",
    "graded_spectrum",
]
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-9, 1e-12)}
ANGULAR_NEAR_ZERO = {torch.float32: 1e-3, torch.float64: 1e-6}


def assert_within_bound(
    got: dict[str, float], ref: dict[str, float], dtype: torch.dtype, what: object
) -> None:
    """The geometry core's exactness bound, for every key of ``got`` (angular: absolute near 0)."""
    rel, absolute = TOL[dtype]
    for key, value in got.items():
        bound = rel * abs(ref[key]) + absolute
        if key == "angular" and ref[key] < 1e-2:
            bound = max(bound, ANGULAR_NEAR_ZERO[dtype])
        assert abs(value - ref[key]) <= bound, (what, key, value, ref[key])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES)
def test_exact_against_float64_reference(case: str, dtype: torch.dtype, method: str) -> None:
    x, y = make_case(case, dtype)
    with polar_method(method):
        got = ours(x, y)
    ref = ref_all(x, y)
    rel, absolute = TOL[dtype]
    for key in ("procrustes", "gram", "cka"):
        assert abs(got[key] - ref[key]) <= rel * abs(ref[key]) + absolute, (key, got[key], ref[key])
    cka_d = cka_distance(x, y).item()
    assert abs(cka_d - (1 - ref["cka"])) <= rel * abs(1 - ref["cka"]) + absolute
    # the angular form inherits arccos's conditioning near 0 (the reference's own arccos(nuc) is
    # only good to sqrt(eps) there): an absolute bound applies near 0
    bound = max(rel * ref["angular"] + absolute, ANGULAR_NEAR_ZERO[dtype] if ref["angular"] < 1e-2 else 0.0)
    assert abs(got["angular"] - ref["angular"]) <= bound


@pytest.mark.parametrize("case", ["rotated_scaled_shifted", "rotated_wider", "identical"])
def test_isometric_copies_have_zero_distance(case: str) -> None:
    x, y = make_case(case, torch.float64)
    assert procrustes_distance(x, y).item() < 1e-12
    assert procrustes_distance(x, y, angular=True).item() < 1e-6
    assert gram_distance(x, y).item() < 1e-12
    assert cka_distance(x, y).item() < 1e-12


@pytest.mark.parametrize("case", ["nearly_identical", "graded_spectrum"])
def test_small_distances_keep_relative_digits(case: str) -> None:
    # 2 - 2*nuc from float32 products cancels here; the value must keep its relative digits
    x, y = make_case(case, torch.float32)
    ref = ref_all(x, y)
    assert 0 < ref["procrustes"] < 1e-3
    assert procrustes_distance(x, y).item() == pytest.approx(ref["procrustes"], rel=1e-5)
    assert gram_distance(x, y).item() == pytest.approx(ref["gram"], rel=1e-5)
    assert cka_distance(x, y).item() == pytest.approx(1 - ref["cka"], rel=1e-5)


def _offset_features(n: int, seed: int, d: int = 48, d_t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden-state-like float32 features at large n: column offsets up to 3e4, spreads from 1 down
    to 1e-2, and y = x W + noise (so y carries offsets too). A float32 mean is off by a few
    percent of the small spreads here: the centring must not be."""
    g = torch.Generator().manual_seed(seed)
    offset = 3e4 * (2 * torch.rand(d, generator=g, dtype=torch.float64) - 1)
    spread = torch.logspace(0, -2, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * spread + offset
    w = torch.randn(d, d_t, generator=g, dtype=torch.float64) / d**0.5
    y = x @ w + 0.3 * torch.randn(n, d_t, generator=g, dtype=torch.float64)
    return x.float(), y.float()


@pytest.mark.parametrize("n", [65_536, 262_144])
def test_exact_at_large_n_with_offsets(n: int) -> None:
    # before the shifted centring, float32 column sums put Procrustes 2.5x (65,536 rows) to 50x
    # (262,144) outside the bound on inputs like these
    x, y = _offset_features(n, seed=n)
    ref = ref_dd(x, y)
    # both polar routes at 65,536 rows; the centring and the GEMMs they share at 262,144 (CPU default)
    methods = METHODS if n <= 65_536 else ["auto"]
    # far from 0 and from CKA = 1: no recomputation from float64 inputs, the float32 route is tested
    assert 0.3 < ref["procrustes"] < 1.0 and 0.5 < ref["cka"] < 0.9 and ref["gram"] > 0.02
    for method in methods:
        with polar_method(method):
            got = ours(x, y)
        got["cka_distance"] = cka_distance(x, y).item()
        assert_within_bound(got, {**ref, "cka_distance": 1.0 - ref["cka"]}, torch.float32, (n, method))
    # the centred matrix itself: each entry off by its own rounding, not by the column offset's
    xc_ref = x.double() - x.double().mean(0)
    err = (center(x).double() - xc_ref).abs().max(0).values
    assert (err <= 4 * torch.finfo(torch.float32).eps * xc_ref.abs().max(0).values).all()


FUNCTIONS = {
    "procrustes": procrustes_distance,
    "angular": lambda a, b: procrustes_distance(a, b, angular=True),
    "gram": gram_distance,
    "cka": cka,
    "cka_distance": cka_distance,
}


def _ref_values(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    ref = ref_all(x, y)
    return {**ref, "cka_distance": 1.0 - ref["cka"]}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "scale",
    [1e20, 1e-20, 1e30, 1e-30, 1e-38, 2.0**100],
    ids=["1e20", "1e-20", "1e30", "1e-30", "1e-38", "2^100"],
)
def test_scale_invariance_at_extreme_float32_scales(scale: float, method: str) -> None:
    # before the rescaling: x * 1e19 gave a NaN Gram distance and D_P = 2, x * 1e-25 D_P = 2, CKA 0
    x, y = make_case("ds_ne_dt", torch.float32)
    xs = (x.double() * scale).float()  # finite, rounded at the new scale (subnormal at 1e-38)
    assert torch.isfinite(xs).all() and (xs != 0).all()
    ref = _ref_values(xs, y)
    with polar_method(method):
        at_one = {k: f(x, y).item() for k, f in FUNCTIONS.items()}
        for a, b in ((xs, y), (y, xs), (xs, -2 * xs)):
            got = {k: f(a, b).item() for k, f in FUNCTIONS.items()}
            if a is xs and b is y:
                assert_within_bound(got, ref, torch.float32, scale)
                if scale == 2.0**100:  # an exact power of two: the same value as at unit scale
                    assert got == pytest.approx(at_one, rel=1e-6, abs=1e-7)
            elif a is y:
                assert_within_bound(got, ref, torch.float32, ("swapped", scale))  # symmetry
            else:
                assert got["procrustes"] == pytest.approx(0.0, abs=1e-6) and got["cka"] == pytest.approx(1.0)
        for name, f in FUNCTIONS.items():
            xg = xs.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(f(xg, y), xg)
            assert torch.isfinite(gx).all(), (name, scale)


def test_centring_that_overflows_float32_is_rescaled_first() -> None:
    # entries of both signs near float32's largest: the shifted sums overflow unless x is scaled
    # first, and in column 0 one entry of x - mean itself is beyond float32
    g = torch.Generator().manual_seed(12)
    top = 0.9 * torch.finfo(torch.float32).max
    x = torch.randn(300, 48, generator=g, dtype=torch.float64)
    x = x / x.abs().max() * top
    x[:, 0] = -top
    x[5, 0] = top
    big, y = x.float(), torch.randn(300, 20, generator=g)
    assert torch.isfinite(big).all() and not torch.isfinite(big[1:] - big[:1]).all()
    assert_within_bound(
        {k: f(big, y).item() for k, f in FUNCTIONS.items()}, _ref_values(big, y), torch.float32, "big"
    )
    xg = big.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(procrustes_distance(xg, y), xg)
    assert torch.isfinite(gx).all()
    c, ref = center(big).double(), big.double() - big.double().mean(0)
    assert torch.isinf(c[5, 0]) and torch.isfinite(ref[5, 0])  # not representable: inf, not garbage
    c[5, 0] = ref[5, 0]
    assert torch.allclose(c, ref, rtol=1e-6, atol=1e-6 * top)
    assert torch.isfinite(normalize(big)).all()


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-310, 1.7e308])
def test_scale_invariance_at_extreme_float64_scales(scale: float) -> None:
    x, y = make_case("ds_ne_dt", torch.float64)
    xs = x / x.abs().max() * scale if scale > 1e300 else x * scale
    assert torch.isfinite(xs).all()
    ref = _ref_values(xs / scale, y)  # the reference at unit scale: NumPy cannot square these
    assert_within_bound({k: f(xs, y).item() for k, f in FUNCTIONS.items()}, ref, torch.float64, scale)


@pytest.mark.parametrize("where", ["max", "smallest_normal", "tiny_subnormal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_at_their_extreme_values(dtype: torch.dtype, where: str) -> None:
    fi = torch.finfo(dtype)
    target = {
        "max": fi.max,
        "smallest_normal": fi.smallest_normal,
        "tiny_subnormal": 64 * fi.smallest_normal * fi.eps,
    }[where]
    x, y = make_case("ds_ne_dt", torch.float64)
    xh = (x / x.abs().max() * target).to(dtype)  # the largest entry exactly at the target
    yh = (y / y.abs().max() * target).to(dtype)
    assert torch.isfinite(xh).all() and xh.abs().max().item() == pytest.approx(target, rel=1e-2)
    ref = _ref_values(xh, yh)  # the same (rounded) inputs in float64
    for method in METHODS:
        with polar_method(method):
            got = {}
            for name, f in FUNCTIONS.items():
                out = f(xh, yh)
                assert out.dtype == torch.float32 and out.ndim == 0, name
                got[name] = out.item()
        assert_within_bound(got, ref, torch.float32, (dtype, where, method))


# ----------------------------------------------------------------------------------------------
# properties from the maths


def _random_pair(seed: int, n: int = 60, ds: int = 12, dt: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, ds, generator=g, dtype=torch.float64),
        torch.randn(n, dt, generator=g, dtype=torch.float64)
        + torch.randn(n, 1, generator=g, dtype=torch.float64),
    )


DISTANCES = {
    "procrustes": procrustes_distance,
    "angular": lambda a, b: procrustes_distance(a, b, angular=True),
    "gram": gram_distance,
    "cka_distance": cka_distance,
}


@pytest.mark.parametrize("name", list(DISTANCES))
def test_invariance_to_rotation_scale_translation(name: str) -> None:
    f = DISTANCES[name]
    x, y = _random_pair(1)
    g = torch.Generator().manual_seed(7)
    base = f(x, y).item()
    x2 = 0.01 * x @ _orth(12, 12, g) - 42.0
    y2 = 1e3 * y @ _orth(9, 9, g) + torch.randn(1, 9, generator=g, dtype=torch.float64)
    assert f(x2, y2).item() == pytest.approx(base, rel=1e-10, abs=1e-12)
    # a non-isotropic scaling is NOT an invariance: the test must be able to fail
    x3 = x * torch.linspace(0.1, 10, 12, dtype=torch.float64)
    assert abs(f(x3, y).item() - base) > 1e-3


@pytest.mark.parametrize("name", list(DISTANCES))
def test_symmetry_and_range(name: str) -> None:
    f = DISTANCES[name]
    upper = {"procrustes": 2.0, "angular": math.pi / 2, "gram": 2.0, "cka_distance": 1.0}[name]
    for seed in range(5):
        x, y = _random_pair(seed)
        a, b = f(x, y).item(), f(y, x).item()
        assert a == pytest.approx(b, rel=1e-12, abs=1e-14)
        assert 0.0 <= a <= upper
        assert f(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_range_is_reached_by_orthogonal_representations() -> None:
    # x and y living in orthogonal subspaces of the sample space: X^T Y = 0
    g = torch.Generator().manual_seed(3)
    q = _orth(40, 20, g)
    x, y = q[:, :10] - q[:, :10].mean(0), q[:, 10:] - q[:, 10:].mean(0)
    q2 = _orth(40, 21, g)
    basis = q2 - q2.mean(0)  # centred columns, then re-orthonormalise in the centred space
    basis, _ = torch.linalg.qr(basis[:, :20])
    x, y = basis[:, :10], basis[:, 10:]
    assert procrustes_distance(x, y).item() == pytest.approx(2.0, abs=1e-12)
    assert procrustes_distance(x, y, angular=True).item() == pytest.approx(math.pi / 2, abs=1e-7)
    assert cka(x, y).item() == pytest.approx(0.0, abs=1e-12)


def test_triangle_inequality_of_angular_procrustes() -> None:
    g = torch.Generator().manual_seed(11)
    squared_violations = 0
    for _ in range(200):
        n = 30
        base = torch.randn(n, 6, generator=g, dtype=torch.float64)

        def noisy(width: int, base: torch.Tensor = base, n: int = n) -> torch.Tensor:
            # correlated triples make the inequality tight enough to matter
            w = torch.randn(6, width, generator=g, dtype=torch.float64)
            return base @ w + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64)

        a, b, c = noisy(5), noisy(7), noisy(4)
        ang = [procrustes_distance(p, q, angular=True).item() for p, q in ((a, b), (b, c), (a, c))]
        assert ang[0] + ang[1] - ang[2] >= -1e-10
        sq = [procrustes_distance(p, q).item() for p, q in ((a, b), (b, c), (a, c))]
        squared_violations += sq[0] + sq[1] < sq[2]
    # the squared form is not a metric: it must fail somewhere, or this test could not tell
    # the two forms apart
    assert squared_violations > 0


def test_zero_sets_agree() -> None:
    # D_P = 0 iff D_FG = 0: both vanish exactly for isometries, both positive otherwise
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        y = torch.randn(80, 10, generator=g, dtype=torch.float64)
        x = y @ _orth(10, 10, g)
        assert procrustes_distance(x, y).item() < 1e-12 and gram_distance(x, y).item() < 1e-12
        x = x + 1e-3 * torch.randn(80, 10, generator=g, dtype=torch.float64)
        assert procrustes_distance(x, y).item() > 1e-9 and gram_distance(x, y).item() > 1e-12


# ----------------------------------------------------------------------------------------------
# the nuclear norm itself


def _graded(n: int, m: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    k = s.numel()
    return _orth(n, k, g) * s @ _orth(m, k, g).T


@pytest.mark.parametrize(
    "kind",
    ["random", "wide", "rank_deficient", "repeated_and_zero", "graded_12_decades", "identity", "rank_one"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nuclear_norm_against_svd(kind: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    if kind == "random":
        m = torch.randn(70, 50, generator=g, dtype=torch.float64)
    elif kind == "wide":
        m = torch.randn(30, 90, generator=g, dtype=torch.float64)
    elif kind == "rank_deficient":
        m = torch.randn(60, 7, generator=g, dtype=torch.float64) @ torch.randn(
            7, 80, generator=g, dtype=torch.float64
        )
    elif kind == "repeated_and_zero":
        s = torch.cat([torch.ones(20), torch.full((20,), 1e-3), torch.zeros(20)]).double()
        m = _graded(80, 60, s, g)
    elif kind == "graded_12_decades":
        m = _graded(90, 60, torch.logspace(0, -12, 60, dtype=torch.float64), g)
    elif kind == "identity":
        m = torch.eye(40, dtype=torch.float64)
    else:
        m = torch.randn(50, 1, generator=g, dtype=torch.float64) @ torch.randn(
            1, 30, generator=g, dtype=torch.float64
        )
    m = m.to(dtype)
    ref = np.linalg.svd(m.double().numpy(), compute_uv=False).sum()
    got = nuclear_norm(m)
    assert got.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-6  # float32 result rounding only
    assert abs(got.item() - ref) <= rel * ref


def test_nuclear_norm_gradient_is_polar_factor_even_for_repeated_singular_values() -> None:
    g = torch.Generator().manual_seed(4)
    u, v = _orth(12, 12, g), _orth(9, 9, g)
    s = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    m = (u[:, :9] * s @ v.T).requires_grad_(True)
    nuclear_norm(m).backward()
    expected = u[:, :6] @ v[:, :6].T  # U V^T on the range; zero singular values contribute nothing
    assert torch.allclose(m.grad, expected, atol=1e-10)
    # for comparison, svdvals' backward is not defined here
    m2 = m.detach().clone().requires_grad_(True)
    torch.linalg.svdvals(m2).sum().backward()
    assert not torch.isfinite(m2.grad).all() or not torch.allclose(m2.grad, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(20, 5, 7), (6, 10, 12), (9, 4, 4)], ids=["n>d", "n<d", "square"])
@pytest.mark.parametrize("name", [*list(DISTANCES), "cka"])
def test_gradcheck(shape: tuple[int, int, int], name: str, method: str) -> None:
    f = DISTANCES.get(name, cka)
    n, ds, dt = shape
    g = torch.Generator().manual_seed(n * 100 + ds)
    x = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dt, generator=g, dtype=torch.float64, requires_grad=True)
    with polar_method(method):
        assert gradcheck(f, (x, y), eps=1e-6, atol=1e-7)


def test_gradcheck_nuclear_norm() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (8, 3)]:
        m = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        assert gradcheck(nuclear_norm, (m,))


@pytest.mark.parametrize(
    "case",
    [
        "identical",
        "rotated_scaled_shifted",
        "rotated_wider",
        "rank_deficient",
        "n_lt_d",
        "constant_column",
        "nearly_identical",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_finite_everywhere(case: str, dtype: torch.dtype, method: str) -> None:
    x, y = make_case(case, dtype)
    for name, f in FUNCTIONS.items():
        xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        with polar_method(method):
            gx, gy = torch.autograd.grad(f(xg, yg), (xg, yg))
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all(), name


def test_gradient_vanishes_at_the_minimum() -> None:
    x, y = make_case("rotated_scaled_shifted", torch.float64)
    for name in ("procrustes", "gram", "cka_distance"):
        xg = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(DISTANCES[name](xg, y), xg)
        assert gx.abs().max().item() < 1e-10, name


def test_constant_input_is_finite() -> None:
    y = torch.randn(10, 4, dtype=torch.float64)
    x = torch.full((10, 3), 2.5, dtype=torch.float64, requires_grad=True)
    for name, f in DISTANCES.items():
        (gx,) = torch.autograd.grad(f(x, y), x)
        assert torch.isfinite(gx).all(), name
    assert procrustes_distance(x, y).item() == 2.0
    assert cka(x, y).item() == 0.0


# ----------------------------------------------------------------------------------------------
# dtypes, devices, errors, memory


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    x, y = _random_pair(0)
    xh, yh = x.to(dtype), y.to(dtype)
    for name, f in FUNCTIONS.items():
        out = f(xh, yh)
        assert out.dtype == torch.float32 and out.ndim == 0
        ref = f(xh.double(), yh.double()).item()  # same (rounded) inputs, exact arithmetic
        assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-6), name


PUBLIC_SCALARS = {**FUNCTIONS, "nuclear_norm": lambda a, b: nuclear_norm(a.mT @ b)}


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=["f16", "bf16", "f32", "f64"],
)
def test_output_dtype_and_shape_of_every_public_function(dtype: torch.dtype, expected: torch.dtype) -> None:
    x, y = (t.to(dtype) for t in _random_pair(0))
    for name, f in PUBLIC_SCALARS.items():
        out = f(x, y)
        assert out.dtype == expected and out.ndim == 0 and out.device == x.device, name
    for f in (center, normalize):  # the matrices keep their shape, in the compute dtype
        out = f(x)
        assert out.dtype == expected and out.shape == x.shape, f.__name__


def test_mixed_dtypes_promote_to_float64() -> None:
    x, y = _random_pair(0)
    assert procrustes_distance(x.float(), y).dtype == torch.float64


def test_normalize() -> None:
    x, _ = _random_pair(0)
    xn = normalize(x * 3 + 1)
    assert torch.allclose(xn.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-15)
    assert xn.norm().item() == pytest.approx(1.0, rel=1e-14)
    assert torch.allclose(xn, torch.from_numpy(_ref_normalize(x.numpy())), atol=1e-14)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.randn(5), torch.randn(5, 2), r"x must be 2-D.*\(5,\)"),
        (torch.randn(5, 2, 1), torch.randn(5, 2), r"x must be 2-D.*\(5, 2, 1\)"),
        (torch.randn(5, 3), torch.randn(4, 3), r"same number of rows.*\(5, 3\).*\(4, 3\)"),
        (torch.randn(1, 3), torch.randn(1, 3), r"at least 2 rows.*\(1, 3\)"),
        (torch.randn(5, 0), torch.randn(5, 3), r"at least 1 column.*\(5, 0\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.randn(2, 2), r"x of shape \(2, 2\).*NaN"),
        (
            torch.randn(3, 2),
            torch.tensor([[1.0], [float("inf")], [0.0]]),
            r"y of shape \(3, 1\).*NaN or infinite",
        ),
        (torch.randint(0, 3, (4, 2)), torch.randn(4, 2), r"x must be float"),
    ],
)
def test_bad_input_errors(x: torch.Tensor, y: torch.Tensor, match: str) -> None:
    for f in (*DISTANCES.values(), cka):
        with pytest.raises(ValueError, match=match):
            f(x, y)


def test_nuclear_norm_bad_input() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        nuclear_norm(torch.randn(3))
    with pytest.raises(ValueError, match="NaN"):
        nuclear_norm(torch.tensor([[float("nan")]]))


def _peak_cpu_alloc(fn) -> int:
    """Largest single CPU allocation made while running ``fn`` (bytes), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("f", [gram_distance, cka, procrustes_distance], ids=["gram", "cka", "procrustes"])
def test_65536_tokens_without_n_by_n_allocation(f) -> None:
    n, d = 65_536, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    y = torch.randn(n, 24, generator=g)

    def run() -> None:
        f(x, y).backward()

    peak = _peak_cpu_alloc(run)
    assert 0 < peak < n * d * 8 * 4, peak  # a few n x d buffers at most
    assert peak < n * n * 4 // 1000  # an n x n float32 matrix would be 17 GB


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_newton_schulz_polar_factor_and_fallback(dtype: torch.dtype) -> None:
    from geodistill.geometry import _newton_schulz_nuclear_and_polar

    g = torch.Generator().manual_seed(9)
    m = _graded(60, 40, torch.logspace(0, -2, 40, dtype=torch.float64), g).to(dtype)
    nuc, polar = _newton_schulz_nuclear_and_polar(m)
    u, s, vh = np.linalg.svd(m.double().numpy(), full_matrices=False)
    assert abs(nuc.item() - s.sum()) <= (1e-6 if dtype == torch.float32 else 1e-12) * s.sum()
    assert np.abs(polar.double().numpy() - u @ vh).max() < (1e-4 if dtype == torch.float32 else 1e-10)
    # exactly rank-deficient in float64: zero singular values never grow, no convergence -> None
    low = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 20, generator=g, dtype=torch.float64
    )
    assert _newton_schulz_nuclear_and_polar(low) is None
    with polar_method("newton-schulz"):
        assert nuclear_norm(low).item() == pytest.approx(
            np.linalg.svd(low.numpy(), compute_uv=False).sum(), rel=1e-12
        )


def _compiled_route_check(dtype: torch.dtype) -> None:
    """The compiled route's value against float64 and its gradient against the eager iteration."""
    from geodistill import geometry

    rel, absolute = TOL[dtype]
    for case in (
        "n_gt_d",
        "ds_ne_dt",
        "repeated_sv",
        "nearly_identical",
        "graded_spectrum",
        "rank_deficient",
    ):
        x, y = make_case(case, dtype)
        ref = ref_all(x, y)["procrustes"]
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        with polar_method("newton-schulz", compile=True):
            got = procrustes_distance(xs[0], y)
        with polar_method("newton-schulz"):
            eager = procrustes_distance(xs[1], y)
        assert abs(got.item() - ref) <= rel * abs(ref) + absolute, (case, got.item(), ref)
        got.backward()
        eager.backward()
        scale = xs[1].grad.abs().max().item()
        assert (xs[0].grad - xs[1].grad).abs().max().item() <= 1e-4 * scale + 1e-12, case
    assert geometry._POLAR == {"method": "auto", "compile": False}


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)], ids=["f32", "f64"]
)
def test_compiled_newton_schulz_is_exact(dtype: torch.dtype) -> None:
    """polar_method(..., compile=True) runs the torch.compile'd steps and keeps the exactness bound and
    the eager gradient. In a fresh interpreter: whether the compiler works depends on what the process
    imported before (in a long test session, stdlib distutils breaks inductor's setuptools import)."""
    import subprocess
    import sys

    script = (
        "import sys, warnings, torch; sys.path.insert(0, 'tests'); warnings.simplefilter('error', RuntimeWarning)\n"
        "from test_geometry import _compiled_route_check\n"
        "from geodistill import geometry\n"
        f"_compiled_route_check(torch.{str(dtype).split('.')[-1]})\n"
        "assert set(geometry._COMPILED) == {'quintic', 'cubic'}, geometry._COMPILED  # compiled, no fallback\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_compile_failure_falls_back_to_the_eager_steps(monkeypatch) -> None:
    """A compiler that cannot build (no toolchain, a broken import) costs one warning, not the run."""
    from geodistill import geometry

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(geometry, "_COMPILED", {})
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        _compiled_route_check(torch.float32)
    assert "failed" in geometry._COMPILED


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_does_not_lower_the_precision(dtype: torch.dtype, method: str) -> None:
    """Inside ``torch.autocast`` (a mixed-precision forward, where the trainer computes its losses)
    every function gives the same bits as outside it, value and gradient (backward called outside
    the autocast block, as torch recommends). Without the guard its products run in bf16/f16: the
    values move by ~1e-4 to 2e-3 relative."""
    x, y = make_case("ds_ne_dt", torch.float32)
    for name, f in {**FUNCTIONS, "normalize": lambda a, b: normalize(a).square().mean()}.items():
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        with polar_method(method):
            plain = f(xs[0], y)
            with torch.autocast("cpu", dtype=dtype):
                mixed = f(xs[1], y)
        plain.backward()
        mixed.backward()
        assert mixed.dtype == torch.float32 and torch.equal(plain, mixed), (name, plain, mixed)
        assert torch.equal(xs[0].grad, xs[1].grad), name
    with torch.autocast("cpu", dtype=dtype):
        m = x.mT @ y[:, :20]  # a product taken outside the function is the caller's
        assert torch.equal(nuclear_norm(m.float()), nuclear_norm(m.float().clone()))


def test_autocast_query_works_with_the_older_torch_api(monkeypatch) -> None:
    """torch < 2.4 has no device argument to ``is_autocast_enabled`` (pyproject allows 2.1): the
    guard then asks the old per-device queries (patched here only around the query itself, since
    torch 2.13's own ``autocast`` asks the new API)."""
    import warnings

    from geodistill import geometry

    real = torch.is_autocast_enabled

    def old_api(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return real("cuda")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old CPU query, deprecated since
        with monkeypatch.context() as m:
            m.setattr(torch, "is_autocast_enabled", old_api)
            assert not geometry._autocast_enabled("cpu") and not geometry._autocast_enabled("cuda")
        with torch.autocast("cpu", dtype=torch.bfloat16), monkeypatch.context() as m:
            m.setattr(torch, "is_autocast_enabled", old_api)  # (autocast itself asks the new API)
            assert geometry._autocast_enabled("cpu") and not geometry._autocast_enabled("mps")


def test_polar_method_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="polar method"), polar_method("svd"):
        pass


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _NoFloat64On(TorchDispatchMode):
    """Fails any op (forward or backward) that makes a float64 tensor on ``device_type``."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == self.device_type:
                raise AssertionError(f"{func} made a float64 tensor on {t.device}")
        return out


def _device_values(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: f(x, y) for name, f in FUNCTIONS.items()}
    out["nuclear_norm"] = nuclear_norm(m)
    return out


def _check_cuda_against_cpu(dtype: torch.dtype, method: str) -> None:
    for case in (
        "n_gt_d",
        "n_lt_d",
        "ds_ne_dt",
        "nearly_identical",
        "rank_deficient",
        "rotated_scaled_shifted",
    ):
        x, y = (t.to(dtype) for t in make_case(case, torch.float32))
        m = (x.double().mT @ y.double()).to(dtype)  # the same matrix on both devices
        ref = {
            **_ref_values(x, y),
            "nuclear_norm": float(np.linalg.svd(m.double().numpy(), compute_uv=False).sum()),
        }
        xg = x.cuda().requires_grad_(True)
        with polar_method(method):
            cpu = _device_values(x, y, m)
            gpu = _device_values(xg, y.cuda(), m.cuda())
            (grad,) = torch.autograd.grad(gpu["procrustes"] + gpu["gram"] + gpu["cka_distance"], xg)
        for name, value in gpu.items():
            assert value.device.type == "cuda" and value.ndim == 0, (case, name)
            assert value.dtype == cpu[name].dtype == torch.float32, (case, name, value.dtype)
        assert_within_bound({k: v.item() for k, v in gpu.items()}, ref, torch.float32, (case, dtype, method))
        assert_within_bound({k: v.item() for k, v in cpu.items()}, ref, torch.float32, (case, dtype, method))
        assert grad.dtype == dtype and torch.isfinite(grad).all(), case


@cuda
@pytest.mark.parametrize("method", POLAR_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_cuda_values_and_dtypes_match_the_cpu(dtype: torch.dtype, method: str) -> None:
    _check_cuda_against_cpu(dtype, method)


@cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "bf16-autocast"])
@pytest.mark.parametrize("method", POLAR_METHODS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_exact_on_every_input_class(case: str, method: str, autocast: bool) -> None:
    """The exactness bound on the GPU for every input class of the CPU test (rank-deficient,
    repeated singular values, graded spectra, ...), every polar route, also inside a bf16 autocast
    region; the gradient is finite and matches the CPU's."""
    x, y = make_case(case, torch.float32)
    ref = _ref_values(x, y)
    xg = x.cuda().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    with polar_method(method), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        got = {k: f(xg, y.cuda()) for k, f in FUNCTIONS.items()}
        cpu = procrustes_distance(xc, y) + gram_distance(xc, y) + cka_distance(xc, y)
    assert_within_bound({k: v.item() for k, v in got.items()}, ref, torch.float32, (case, method))
    (got["procrustes"] + got["gram"] + got["cka_distance"]).backward()
    cpu.backward()
    assert torch.isfinite(xg.grad).all(), case
    scale = xc.grad.abs().max().item()
    if case in ("n_gt_d", "n_lt_d", "ds_ne_dt", "nearly_identical", "constant_column"):
        # elsewhere the polar factor is not unique (any valid subgradient may be returned) or, with
        # singular values over 8 decades, not determined by float32 inputs beyond ~1e-3
        assert (xg.grad.cpu() - xc.grad).abs().max().item() <= 1e-3 * scale + 1e-9, case


@cuda
@pytest.mark.parametrize("method", POLAR_METHODS)
def test_a_device_without_float64_keeps_float64_on_the_cpu(monkeypatch, method: str) -> None:
    """MPS has no float64: with CUDA made to look like it, no op may put a float64 tensor on the
    device, forward or backward, and the values stay exact (the same code path as on MPS)."""
    from geodistill import geometry

    monkeypatch.setattr(geometry, "_has_float64", lambda device: device.type == "cpu")
    with _NoFloat64On("cuda"):
        _check_cuda_against_cpu(torch.float32, method)
        x, y = make_case("ds_ne_dt", torch.float32)
        xs = (x.double() * 1e20).float().cuda()
        assert_within_bound(
            {k: f(xs, y.cuda()).item() for k, f in FUNCTIONS.items()},
            _ref_values(xs.cpu(), y),
            torch.float32,
            "1e20",
        )
        assert torch.isfinite(normalize(xs)).all() and center(xs).device.type == "cuda"


def test_centring_over_processes_when_one_holds_no_rows() -> None:
    """A data-parallel shard may hold no rows (geodistill.distributed's stats route sends them
    through ``_centre``). Two in-process "ranks" with an all-reduce of their own: with an input far
    outside the scale window (every decision then takes the largest entry), the rank with no rows
    must take part in every reduction, and the one with the rows must get the one-process result."""
    import threading

    from geodistill.geometry import _centre_values

    x = 1e15 * torch.randn(7, 3, generator=torch.Generator().manual_seed(0))  # float32: window 2^40
    shards = [x, x[:0]]
    barrier, slots, out = threading.Barrier(2, timeout=20), [None, None], [None, None]

    def reduce_for(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    def work(rank: int) -> None:
        try:
            out[rank] = _centre_values(shards[rank], "x", reduce_for(rank), rows=7)
        except Exception as e:
            out[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not isinstance(out[1], Exception), out[1]
    assert not isinstance(out[0], Exception), out[0]
    xc, sq, k = out[0]
    xc1, sq1, k1 = _centre_values(x.clone(), "x", None, rows=7)
    assert k == k1 != 0 and out[1][2] == k
    torch.testing.assert_close(xc, xc1, rtol=0, atol=0)
    torch.testing.assert_close(sq, sq1, rtol=0, atol=0)
