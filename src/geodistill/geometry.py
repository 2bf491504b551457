"""Representational distances between two sets of matched feature vectors.

Pure tensor maths: nothing here knows about models or distillation. Every distance takes
``x`` of shape ``(n, d_s)`` and ``y`` of shape ``(n, d_t)`` whose rows are matched samples (or
tokens); the widths may differ. Each matrix is column-centred and scaled to unit Frobenius norm
inside the function (written ``X~`` and ``Y~`` below), so every distance is invariant to
translation and isotropic scaling of either input, and to orthogonal transforms of its columns.

Numerics, shared by every function:

* half-precision inputs are computed in float32, float64 stays float64; the result is a 0-dim
  tensor of that compute dtype on the input's device;
* centring: the column sums are taken of the input minus its first row, so that their rounding is
  relative to the spread of each column rather than its offset, and combined with that shift in
  float64; the mean is then subtracted from the shifted rows. A float32 mean of columns with
  offsets 1e4 and spreads 1e-2 is off by a few percent of the spread, which would break the
  exactness bound at large n;
* the column sums and squared Frobenius norms are float64 values: accumulated in float64 on
  CUDA; on the CPU as torch's float32 cascade sums (a few eps of the sum of ``|terms|`` whatever
  n; float64 accumulation costs 5-7x there), over blocks combined in float64 for the norms; on
  MPS in float32. The tests hold every function to the bound at n = 262,144 with such offsets;
* scale: where the root mean square of a centred input leaves [2^-40, 2^40] (float32;
  [2^-400, 2^400] in float64), it is rescaled by an exact power of two before any square or
  product, so every finite input (float32 at 1e+-20 or 1e-38, float16/bfloat16 at their extreme
  values) gives the value of the same input at unit scale;
* the ``n x d`` products (``X^T Y`` and friends) run in the compute dtype, so the cost is that of
  one GEMM (its float32 accumulation over n = 262,144 centred rows stays inside the bound); the
  small ``d x d`` (or ``n x n`` when ``n < d``) decomposition runs in float64;
* MPS has no float64: there the float64 statistics and the decomposition run on the CPU;
* autocast is off inside every function: under ``torch.autocast`` a float32 matrix product would
  run in bfloat16 or float16 (relative error ~1e-3), so a loss computed inside a mixed-precision
  forward keeps the same bound (the autocast dtype only decides the inputs' dtype); call
  ``backward`` outside the autocast block, as torch recommends (the trainer does), or the
  backward's products run in the autocast dtype;
* no ``n x n`` matrix is ever formed for the Gram distance or CKA, and no SVD backward is used:
  the gradient of the nuclear norm is the polar factor ``U V^T`` of the same decomposition.

Reference: Bhattarai et al., "Knowledge distillation through geometry-aware representational
alignment", arXiv:2509.25253 (2025); Williams et al., "Generalized shape metrics on neural
representations", NeurIPS 2021; Kornblith et al., "Similarity of neural network representations
revisited", ICML 2019.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "POLAR_METHODS",
    "center",
    "cka",
    "cka_distance",
    "gram_distance",
    "normalize",
    "nuclear_norm",
    "polar_method",
    "procrustes_distance",
]

_F64 = torch.float64
_EPS64 = torch.finfo(_F64).eps
# Eigenvalues of the Gram below this fraction of the largest are re-resolved on their own scale
# (singular values below 1e-4 of the largest): a float64 eigh resolves lambda only to
# eps * lambda_max, i.e. sigma only to sqrt(eps) * sigma_max, while an SVD gets eps * sigma_max.
_DEFLATE_BELOW = 1e-8
_MAX_DEFLATIONS = 4
# A distance computed in float32 (centring and GEMMs) is exact to ~1e-7 of its largest term; when
# the distance is below this fraction of its terms, that cancellation would cost relative digits,
# so it is recomputed from the float64-cast inputs (exact: only the float32 arithmetic was not).
_REFINE_BELOW = 0.05


# --------------------------------------------------------------------------------------------
# validation and normalisation


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 asks per kind of device, without an argument
        if device == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device == "cuda" and torch.is_autocast_enabled()


def _autocast_off(fn: Callable) -> Callable:
    """Run ``fn`` with autocast disabled on its tensors' devices and the CPU (where float64
    statistics may be computed): autocast would turn every float32 product into a bfloat16 or
    float16 one, outside the exactness bound."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        devices = {a.device.type for a in args if isinstance(a, Tensor)} | {"cpu"}
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                if _autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return _F64 if any(t.dtype == _F64 for t in tensors) else torch.float32


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not (x.is_floating_point() and x.dtype in (torch.float16, torch.bfloat16, torch.float32, _F64)):
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (samples) to be centred, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 column, got shape {tuple(x.shape)}")
    # finiteness is checked in _centre, from the column sums it computes anyway (a full scan costs
    # as much as a GEMM pass at large n)


def _nonfinite_error(x: Tensor, name: str) -> ValueError:
    if bool(torch.isfinite(x).all()):  # with a reduce: the rows of another process are not finite
        return ValueError(f"{name}: the rows of another process contain NaN or infinite values")
    return ValueError(f"{name} of shape {tuple(x.shape)} contains NaN or infinite values")


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    _check_matrix(x, "x")
    _check_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows (matched samples), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    dtype = _compute_dtype(x, y)
    return x.to(dtype), y.to(dtype)


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(t, 0))`` whose gradient is 0 (a subgradient) where ``t <= 0`` instead of inf."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        r = t.clamp_min(0).sqrt()
        ctx.save_for_backward(r)
        return r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return torch.where(r > 0, g / (2 * r.clamp_min(torch.finfo(r.dtype).tiny)), torch.zeros_like(g))


Reduce = Callable[[Tensor], Tensor]

# Root-mean-square window of a centred input (power-of-two bounds) inside which its squares and the
# GEMMs neither overflow nor lose digits to underflow; outside it the centred input is rescaled.
_RMS_WINDOW = {torch.float32: 2.0**40, _F64: 2.0**400}
# A finite input whose centring overflows is first multiplied by this power of two (exact).
_PRESCALE = {torch.float32: -64, _F64: -512}


def _has_float64(device: torch.device) -> bool:
    return device.type != "mps"


def _float64_device(device: torch.device) -> torch.device:
    # MPS has no float64: the float64 statistics and the small decomposition run on the CPU there.
    return device if _has_float64(device) else torch.device("cpu")


def _as_f64(t: Tensor) -> Tensor:
    return t.to(device=_float64_device(t.device), dtype=_F64)


def _sum64(t: Tensor, dim: int) -> Tensor:
    """Sum of ``t`` over ``dim`` (kept), as float64 on the float64 device.

    On the CPU (and MPS) the sum runs in ``t``'s dtype: torch's CPU sum is a cascade summation,
    off by a few eps times the sum of ``|terms|`` whatever the length (measured: at most 4.4 eps
    over 1M rows), while accumulating in float64 there costs 5-7x as much. Elsewhere it
    accumulates in float64 (cheap on a GPU, and no reliance on how a device orders a float32 sum).
    """
    acc = _F64 if t.device.type != "cpu" and _has_float64(t.device) else t.dtype
    return _as_f64(t.sum(dim=dim, keepdim=True, dtype=acc))


# On the CPU the sum of squares goes through blocks this large: a temporary of a whole n x d
# matrix costs more in fresh pages than the arithmetic (measured 3-4x at 65,536 x 384).
_SQUARES_BLOCK = 1 << 16


def _sum_squares64(t: Tensor) -> Tensor:
    """``||t||_F^2`` as float64 on the float64 device, accumulated as :func:`_sum64` does; on the
    CPU, float32 cascade sums of blocks of ``_SQUARES_BLOCK`` entries added in float64."""
    if t.device.type != "cpu":
        return _sum64(t.square().flatten(), 0)[0]
    flat = t.reshape(-1)
    if flat.numel() <= _SQUARES_BLOCK:
        return _as_f64(flat.square().sum())
    return torch.stack([block.square().sum() for block in flat.split(_SQUARES_BLOCK)]).sum(dtype=_F64)


def _times_pow2(t: Tensor, k: int) -> Tensor:
    """``t * 2**k``, exact (two factors, so that no factor overflows a float64)."""
    half = k // 2
    for e in (half, k - half):
        if e:
            t = t * 2.0**e
    return t


def _centre_values(
    x: Tensor, name: str, reduce: Reduce | None, rows: int, prescaled: bool = False
) -> tuple[Tensor, Tensor, int]:
    """The forward of :class:`_Centre` (no autograd): ``(xc, sq, k)``."""
    total = reduce if reduce is not None else (lambda t: t)
    shift = x[:1] if x.shape[0] else x.new_zeros(1, x.shape[1])
    shift64 = _as_f64(shift)
    xc = x - shift  # (n, d); centred in place below: one n x d buffer
    colsum = total(_sum64(xc, 0) + x.shape[0] * shift64)  # (1, d) float64
    xc.add_((shift64 - colsum / rows).to(device=x.device, dtype=x.dtype))
    sq = total(_sum_squares64(xc))  # () float64
    window = _RMS_WINDOW[x.dtype]
    ms = sq / (rows * x.shape[1])
    # one host sync for both checks (NaN fails every comparison)
    if bool((torch.isfinite(colsum).all() & (ms >= window**-2) & (ms <= window**2)).item()):
        return xc, sq, 0
    if not bool(torch.isfinite(colsum).all()):
        bad = torch.isfinite(x).logical_not().sum()
        if reduce is not None:
            bad = total(_as_f64(bad))
        if float(bad) > 0:
            raise _nonfinite_error(x, name)
        return _prescaled_centre(x, name, reduce, rows, prescaled)  # the shifted sums overflowed
    # a process with no rows takes part with 0 (the inf norm of an empty tensor raises)
    big = torch.linalg.vector_norm(xc, ord=math.inf) if xc.numel() else xc.new_zeros(())
    if reduce is not None:
        big = total(_as_f64(big))  # a sum of the processes' largest entries: one power of two for all
    big = float(big)
    if big == 0.0:  # a constant input: exact zeros
        return xc, sq, 0
    if math.isinf(big):
        return _prescaled_centre(x, name, reduce, rows, prescaled)  # x - mean overflowed
    k = -math.frexp(big)[1]
    xc = _times_pow2(xc, k)
    return xc, total(_sum_squares64(xc)), k


def _prescaled_centre(
    x: Tensor, name: str, reduce: Reduce | None, rows: int, prescaled: bool
) -> tuple[Tensor, Tensor, int]:
    if prescaled:  # cannot happen: after the prescale every sum fits
        raise ValueError(f"{name} of shape {tuple(x.shape)} could not be centred without overflow")
    k0 = _PRESCALE[x.dtype]
    xc, sq, k = _centre_values(_times_pow2(x, k0), name, reduce, rows, prescaled=True)
    return xc, sq, k + k0


class _Centre(torch.autograd.Function):
    """``(2^k (x - mean), ||2^k (x - mean)||_F^2, k)`` for ``x`` (n, d): see :func:`_centre`.

    Backward: with ``P`` the centring (subtract the column means, over every process's rows),
    ``g_x = 2^k P (g_xc + 2 g_sq xc)``; written by hand so that forward and backward each
    allocate one n x d buffer (autograd's composition allocates five, and on the CPU fresh pages
    cost more than the arithmetic).
    """

    @staticmethod
    def forward(ctx, x: Tensor, name: str, reduce: Reduce | None, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        xc, sq, k = _centre_values(x.detach(), name, reduce, rows)
        ctx.save_for_backward(xc)
        ctx.reduce, ctx.rows, ctx.k = reduce, rows, k
        k_out = torch.tensor(k)
        ctx.mark_non_differentiable(k_out)
        return xc, sq, k_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx, g_xc: Tensor | None, g_sq: Tensor | None, _: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (xc,) = ctx.saved_tensors
        if g_xc is None and g_sq is None:
            return None, None, None, None
        if g_sq is not None:
            g_sq = g_sq.to(device=xc.device, dtype=xc.dtype)
            if ctx.reduce is not None:  # the upstream gradient of the global norm from every process
                g_sq = ctx.reduce(g_sq)
            twice = 2.0 * g_sq
            g = xc * twice if g_xc is None else torch.addcmul(g_xc, xc, twice)  # a new buffer
        else:
            g = g_xc  # autograd's: not to be written to
        colsum = g.sum(dim=0, keepdim=True)
        if ctx.reduce is not None:
            colsum = ctx.reduce(colsum)
        gx = g.sub_(colsum / ctx.rows) if g is not g_xc else g - colsum / ctx.rows
        return _times_pow2(gx, ctx.k), None, None, None


def _centre(
    x: Tensor, name: str = "x", reduce: Reduce | None = None, n: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Column-centre ``x`` (n, d): ``(2^k (x - mean), 2^k ||x - mean||_F, k)``, the norm in float64.

    Exactness: the column sums are taken of ``x`` minus its first row, so their rounding is
    relative to the spread of the columns, not to their offset (a float32 mean of columns with
    offsets 1e4 and spreads 1e-2 is off by a few percent of the spread; shifted, by ~1e-7 of it),
    and combined with the shift in float64; the mean is subtracted from the shifted rows, which
    leaves each centred entry with its own rounding only (a constant column centres to exact
    zeros). The squared norm is a float64 sum of block sums (see :func:`_sum64`).

    Scale: ``k`` is 0 unless the root mean square of the centred entries lies outside
    ``_RMS_WINDOW``, where the squares or the GEMMs over n would overflow or lose digits to
    underflow; then the centred input is multiplied by the power of two ``2^k`` that brings its
    largest entry to [1/2, 1) (exact), which leaves every scale-invariant quantity unchanged. An
    input whose centring itself overflows is first multiplied by ``2^_PRESCALE``. NaN or inf
    anywhere makes the column sums non-finite: that is the input check, at no extra pass.

    ``reduce`` (with ``n``, the total row count) sums over samples held elsewhere, e.g. an
    all-reduce across data-parallel ranks: ``x`` is then this process's shard of the rows. Forward
    it is applied to float64 tensors: the column sums ``(1, d)`` and the squared norm ``()``, and
    only where the checks fail also to a float64 count of non-finite values, a float64 largest
    entry and the rescaled float64 squared norm (every decision is taken on reduced values, so all
    processes take the same path). Backward, in ``x``'s dtype, to the column sums of the gradient
    ``(1, d)`` and, where the norm is used, to the gradient of the squared norm ``()``.
    """
    xc, sq, k = _Centre.apply(x, name, reduce, n if reduce is not None else x.shape[0])
    # sqrt with a zero subgradient at 0, so a constant input gives zeros, not NaN gradients
    return xc, _SafeSqrt.apply(sq), int(k)


@_autocast_off
def center(x: Tensor) -> Tensor:
    """Subtract the column means: ``x - 1 mean(x)``; shape ``(n, d)`` -> ``(n, d)``.

    Computed in float32 (float64 for float64 input); the column sums are taken of ``x`` minus its
    first row and combined in float64, so each entry carries only its own rounding, however large
    the offset of its column.
    """
    _check_matrix(x, "x")
    xc, _, k = _centre(x.to(_compute_dtype(x)))
    return _times_pow2(xc, -k)


@_autocast_off
def normalize(x: Tensor, eps: float = 1e-30) -> Tensor:
    """Column-centre ``x`` and scale it to unit Frobenius norm: ``X~ = Xc / ||Xc||_F``.

    Shape ``(n, d)`` -> ``(n, d)``. A constant matrix (zero norm) maps to zeros; ``eps`` guards
    the division.
    """
    _check_matrix(x, "x")
    xc, nrm, _ = _centre(x.to(_compute_dtype(x)))
    return xc / nrm.clamp_min(eps).to(device=xc.device, dtype=xc.dtype)


# --------------------------------------------------------------------------------------------
# the nuclear norm and its polar factor


def _svd_by_eigh(a: Tensor, depth: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a float64 ``a`` (p, q), p >= q, as ``(s, B, V)`` with ``B = a V = U diag(s)``.

    ``V`` comes from ``eigh(a^T a)`` and the singular values are the column norms of ``a V``
    (accurate to eps * s_max, unlike ``sqrt(eigenvalue)`` which is only good to
    sqrt(eps) * s_max). Eigenvectors whose eigenvalue is below ``_DEFLATE_BELOW * lambda_max``
    are resolved again from ``a V_small`` on their own scale (recursively), which brings graded
    spectra to SVD accuracy at eigh cost.
    """
    q = a.shape[1]
    try:
        lam, v = torch.linalg.eigh(a.mT @ a)
    except RuntimeError:  # eigh did not converge: take the slower, always-converging SVD
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s, u * s, vh.mT
    b = a @ v
    s = torch.linalg.vector_norm(b, dim=0)
    smax = s.max()
    if smax == 0 or depth >= _MAX_DEFLATIONS:
        return s, b, v
    small = lam <= _DEFLATE_BELOW * lam[-1]  # eigh sorts ascending
    m = int(small.sum())
    if m == 0 or float(s[small].max()) <= q * _EPS64 * float(smax):
        return s, b, v  # the small block is zero to working precision
    s_sub, b_sub, v_sub = _svd_by_eigh(b[:, :m], depth + 1)
    s = torch.cat([s_sub, s[m:]])
    b = torch.cat([b_sub, b[:, m:]], dim=1)
    v = torch.cat([v[:, :m] @ v_sub, v[:, m:]], dim=1)
    return s, b, v


def _nuclear_and_polar(m: Tensor, polar_dtype: torch.dtype = _F64) -> tuple[Tensor, Tensor]:
    """``(||m||_*, U V^T)`` of a float64 matrix ``m`` (k1, k2).

    The polar factor keeps only singular values above ``max(k1, k2) * eps * s_max`` (the rest
    are zero to working precision); any such choice is a valid (sub)gradient of the nuclear norm.
    It is only a gradient, so its last GEMM runs in ``polar_dtype`` (the caller's precision).
    """
    transpose = m.shape[0] < m.shape[1]
    a = m.mT if transpose else m
    s, b, v = _svd_by_eigh(a)
    tol = max(a.shape) * _EPS64 * s.max()
    inv = torch.where(s > tol, 1.0 / s.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(s))
    polar = (b * inv).to(polar_dtype) @ v.to(polar_dtype).mT  # (p, q) = U V^T on the numerical range
    return s.sum(), polar.mT if transpose else polar


# Newton-Schulz polar iteration (matmuls only: the fast route on GPUs, where eigh/svd are slow).
# Quintic steps grow small singular values quickly (coefficients of Jordan et al.'s Muon, which
# map [0, 1] into about [0.7, 1.2] in a few steps), cubic steps then converge quadratically to 1.
_NS_QUINTIC = (3.4445, -4.7750, 2.0315)
_NS_QUINTIC_STEPS = 8
_NS_MAX_CUBIC_STEPS = 40
_NS_CHECK_EVERY = 2
# Once ||X^T X - I||_F <= 1e-3 every |1 - p_i| <= 5e-4; each cubic step squares the error
# (e -> 1.5 e^2), so two more steps leave ~1e-12 in exact arithmetic: float32 rounding (~1e-7)
# is then the only error. A tighter Frobenius test would sit below float32's noise floor.
_NS_TOL = 1e-3
_NS_FINAL_STEPS = 2
_POLAR: dict[str, str | bool] = {"method": "auto", "compile": False}
POLAR_METHODS = ("auto", "eigh", "newton-schulz")


@contextlib.contextmanager
def polar_method(method: str, *, compile: bool = False):
    """Choose how the nuclear norm's decomposition is computed, within a ``with`` block.

    ``"auto"`` (default): Newton-Schulz on CUDA devices, eigh elsewhere; ``"eigh"``: float64
    eigendecomposition with deflation (any device); ``"newton-schulz"``: float32 polar iteration
    with a convergence test, falling back to eigh when it does not converge (rank-deficient or
    extremely ill-conditioned inputs). All are exact to the geometry core's bound.

    ``compile=True`` runs the Newton-Schulz steps through ``torch.compile`` (two graphs with
    dynamic shapes per dtype, compiled on first use: seconds to a minute, once per process). The
    convergence test and the fallback are unchanged, so the result keeps the same bound; the eigh
    route is not compiled (its cost is the float64 decomposition itself).
    """
    if method not in POLAR_METHODS:
        raise ValueError(f"polar method must be one of {', '.join(map(repr, POLAR_METHODS))}, got {method!r}")
    old = dict(_POLAR)
    _POLAR.update(method=method, compile=bool(compile))
    try:
        yield
    finally:
        _POLAR.update(old)


def _use_newton_schulz(m: Tensor) -> bool:
    method = _POLAR["method"]
    return method == "newton-schulz" or (method == "auto" and m.device.type == "cuda")


def _ns_quintic(x: Tensor, eye: Tensor) -> Tensor:
    """The quintic Newton-Schulz steps: small singular values grow to about [0.7, 1.2]."""
    qa, qb, qc = _NS_QUINTIC
    for _ in range(_NS_QUINTIC_STEPS):
        g = x.mT @ x
        x = x @ (qa * eye + g @ (qb * eye + qc * g))
    return x


def _ns_cubic(x: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
    """``(||x^T x - I||_F, x (1.5 I - 0.5 x^T x))``: the residual of ``x`` and one cubic step."""
    g = x.mT @ x
    return torch.linalg.vector_norm(g - eye), x @ (1.5 * eye - 0.5 * g)


_COMPILED: dict[str, Callable] = {}


def _compiled_or_eager(name: str, eager: Callable) -> Callable:
    """``torch.compile(eager)``, falling back to ``eager`` (with one warning) if compiling fails:
    the compiler depends on the process (a C++ toolchain on the CPU, Triton on a GPU, even which
    modules were imported before it), the maths does not."""
    compiled = torch.compile(eager, fullgraph=True, dynamic=True)

    def run(*args: Tensor) -> Tensor | tuple[Tensor, ...]:
        if "failed" in _COMPILED:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as e:  # any compiler failure; a maths error would recur in eager
            _COMPILED["failed"] = eager
            warnings.warn(
                f"torch.compile of the Newton-Schulz steps failed ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); running them uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            return eager(*args)

    run.__name__ = f"compiled_{name}"
    return run


def _ns_steps() -> tuple[Callable, Callable]:
    """The step functions, compiled (once per process) when ``polar_method(..., compile=True)``."""
    if not _POLAR["compile"]:
        return _ns_quintic, _ns_cubic
    if "quintic" not in _COMPILED:
        _COMPILED["quintic"] = _compiled_or_eager("quintic", _ns_quintic)
        _COMPILED["cubic"] = _compiled_or_eager("cubic", _ns_cubic)
    return _COMPILED["quintic"], _COMPILED["cubic"]


def _newton_schulz_nuclear_and_polar(m: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(||m||_*, U V^T)`` by a float32 (or float64) polar iteration; ``None`` if not converged.

    Works on the smaller side: for ``a`` (p, q), p >= q, ``X <- X f(X^T X)`` with ``X_0 = a /
    ||a||_F``. The iterates keep ``a``'s singular vectors and push every singular value to 1, so
    ``X -> U V^T``; once ``||X^T X - I||_F <= _NS_TOL``, two more steps reach working
    precision. The nuclear norm is ``tr(X^T a) = sum_i p_i sigma_i`` (float64 sum). A zero
    singular value stays zero in exact arithmetic, so a rank-deficient input converges only if
    rounding noise grows into those directions (harmless: they carry no singular value, and
    ``y V_perp = 0`` in the gradient), or not at all within the step budget: then the caller
    falls back to :func:`_nuclear_and_polar`.
    """
    transpose = m.shape[0] < m.shape[1]
    a = m.mT if transpose else m
    work = torch.float64 if a.dtype == _F64 else torch.float32
    a = a.to(work)
    scale = torch.linalg.vector_norm(a)
    if float(scale) == 0.0:
        return None
    eye = torch.eye(a.shape[1], device=a.device, dtype=work)
    quintic, cubic = _ns_steps()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would cap the accuracy at ~1e-3
    try:
        x = quintic(a / scale, eye)
        converged = False
        for step in range(_NS_MAX_CUBIC_STEPS):
            residual, x_next = cubic(x, eye)
            if step % _NS_CHECK_EVERY == 0 and float(residual) <= _NS_TOL:
                converged = True
                break
            x = x_next
        if converged:  # x_next is the first of the final steps
            x = x_next
            for _ in range(_NS_FINAL_STEPS - 1):
                x = cubic(x, eye)[1]
    finally:
        torch.set_float32_matmul_precision(previous)
    if not converged:
        return None
    nuc = (_as_f64(x) * _as_f64(a)).sum()
    return nuc, (x.mT if transpose else x)


class _NuclearNorm(torch.autograd.Function):
    """``||m||_*`` in float64 with gradient ``g * U V^T`` (no SVD backward, no 1/(s_i - s_j))."""

    @staticmethod
    def forward(ctx, m: Tensor) -> Tensor:
        result = _newton_schulz_nuclear_and_polar(m.detach()) if _use_newton_schulz(m) else None
        if result is None:
            result = _nuclear_and_polar(_as_f64(m.detach()), polar_dtype=m.dtype)
        nuc, polar = result
        ctx.save_for_backward(polar.to(device=m.device, dtype=m.dtype))
        return nuc  # float64, on the float64 device

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (polar,) = ctx.saved_tensors
        return g.to(device=polar.device, dtype=polar.dtype) * polar


class _NuclearNormXtY(torch.autograd.Function):
    """``||x^T y||_*`` for ``x`` (n, d_s), ``y`` (n, d_t) with ``n <= min(d_s, d_t)``.

    Never forms the ``d_s x d_t`` product: with thin QR factorisations ``x^T = Q1 R1`` and
    ``y^T = Q2 R2`` (float64), ``x^T y = Q1 (R1 R2^T) Q2^T`` has the singular values of the
    ``n x n`` core ``C = R1 R2^T``. With ``P_c`` the polar factor of ``C``, the gradients are
    ``y P^T = R2^T P_c^T Q1^T`` and ``x P = R1^T P_c Q2^T``. Cost O(n^2 d).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        q1, r1 = torch.linalg.qr(_as_f64(x.detach()).mT)
        q2, r2 = torch.linalg.qr(_as_f64(y.detach()).mT)
        nuc, pc = _nuclear_and_polar(r1 @ r2.mT)
        ctx.save_for_backward(q1, r1, q2, r2, pc)
        ctx.out = (x.device, x.dtype, y.dtype)
        return nuc  # float64, on the float64 device

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        q1, r1, q2, r2, pc = ctx.saved_tensors
        device, x_dtype, y_dtype = ctx.out
        g = g.to(device=q1.device, dtype=_F64)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = (g * (r2.mT @ pc.mT) @ q1.mT).to(device=device, dtype=x_dtype)
        if ctx.needs_input_grad[1]:
            gy = (g * (r1.mT @ pc) @ q2.mT).to(device=device, dtype=y_dtype)
        return gx, gy


def _nuclear_norm_xty(xc: Tensor, yc: Tensor) -> Tensor:
    """``||xc^T yc||_*`` in float64 on the cheaper side: ``n x n`` core when n is the smallest."""
    if xc.shape[0] <= min(xc.shape[1], yc.shape[1]):
        return _NuclearNormXtY.apply(xc, yc)
    return _NuclearNorm.apply(xc.mT @ yc)


@_autocast_off
def nuclear_norm(m: Tensor) -> Tensor:
    """Nuclear norm ``||m||_* = sum_i sigma_i(m)`` of a 2-D tensor ``m`` (k1, k2).

    Exact to float64 working precision (absolute error ~ k * eps * sigma_max), computed from an
    eigendecomposition of the smaller Gram with deflation of its small eigenvalues. Its gradient is
    the polar factor ``U V^T`` (restricted to the numerical range of ``m``): finite for repeated
    and zero singular values, where ``torch.linalg.svdvals``'s backward returns NaN.

    Returns a 0-dim tensor in float32 (float64 for float64 input). Range ``[0, inf)``.
    """
    if not isinstance(m, Tensor) or m.ndim != 2:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"nuclear_norm expects a 2-D tensor, got {shape}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"m of shape {tuple(m.shape)} contains NaN or infinite values")
    if m.numel() == 0:
        return m.new_zeros((), dtype=_compute_dtype(m))
    dtype = _compute_dtype(m)
    return _result(_NuclearNorm.apply(m.to(dtype)), m.device, dtype)


# --------------------------------------------------------------------------------------------
# distances


def _result(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # the dtype first: a float64 statistic kept on the CPU for an MPS input cannot go there as float64
    return t.to(dtype=dtype).to(device=device)


def _clamp_keep_grad(t: Tensor, lo: float, hi: float) -> Tensor:
    # Rounding can push a distance a hair outside its range; clamp the value but keep the
    # gradient of the unclamped expression (a plain clamp would zero it exactly where x ~ y).
    return t + (t.clamp(lo, hi) - t).detach()


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    # num / den, and 0 (with zero gradient) where den == 0, i.e. for a constant input
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def procrustes_distance(x: Tensor, y: Tensor, *, angular: bool = False) -> Tensor:
    """Procrustes distance between the normalised representations ``X~`` and ``Y~``.

    ``D_P = min_Q ||X~ - Y~ Q||_F^2 = 2 - 2 ||X~^T Y~||_*`` over orthonormal ``Q`` (zero-padding
    the narrower side, so ``d_s != d_t`` needs no learned projection). Range ``[0, 2]``; 0 iff
    ``Y~ = X~ Q`` for an isometry ``Q``. With ``angular=True`` returns the metric
    ``arccos(||X~^T Y~||_*)`` in ``[0, pi/2]``, which satisfies the triangle inequality; it is
    evaluated as ``2 asin(sqrt(D_P) / 2)`` so that it stays accurate near 0, with gradient 0
    (a subgradient) exactly at ``D_P = 0``.

    A distance (symmetric), invariant to translation, isotropic scaling and orthogonal transforms
    of either input. ``x`` (n, d_s), ``y`` (n, d_t) -> 0-dim tensor. Paper: eq. for D_P in
    arXiv:2509.25253; Williams et al. (2021).
    """
    x, y = _check_pair(x, y)
    return _result(_procrustes_distance(x, y, angular=angular), x.device, x.dtype)


@_autocast_off
def _procrustes_distance(
    x: Tensor, y: Tensor, *, angular: bool = False, reduce: Reduce | None = None, n: int | None = None
) -> Tensor:
    """Body of :func:`procrustes_distance` on checked inputs; ``reduce``/``n`` as in :func:`_centre`."""
    dist = _procrustes(x, y, reduce, n)
    if x.dtype != _F64 and float(dist.detach()) < _REFINE_BELOW * 2.0:
        dist = _procrustes(_as_f64(x), _as_f64(y), reduce, n)
    dist = _clamp_keep_grad(dist, 0.0, 2.0)
    if angular:
        dist = 2.0 * torch.asin((_SafeSqrt.apply(dist) / 2.0).clamp_max(math.sqrt(0.5)))
    return dist


def _procrustes(x: Tensor, y: Tensor, reduce: Reduce | None = None, n: int | None = None) -> Tensor:
    xc, nx, _ = _centre(x, "x", reduce, n)
    yc, ny, _ = _centre(y, "y", reduce, n)
    # with reduce: the d_s x d_t cross-covariance summed over every process's rows
    nuc = _nuclear_norm_xty(xc, yc) if reduce is None else _NuclearNorm.apply(reduce(xc.mT @ yc))
    return 2.0 - 2.0 * _safe_ratio(nuc, nx * ny)


def _fro64(m: Tensor) -> Tensor:
    return torch.linalg.vector_norm(_as_f64(m))


def _products(xc: Tensor, yc: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(X^T X, Y^T Y, X^T Y)`` of centred inputs, summed by ``reduce`` when given."""
    out = (xc.mT @ xc, yc.mT @ yc, xc.mT @ yc)
    return out if reduce is None else tuple(reduce(m) for m in out)  # type: ignore[return-value]


def gram_distance(x: Tensor, y: Tensor) -> Tensor:
    """Feature Gram matrix distance ``D_FG = ||X~ X~^T - Y~ Y~^T||_F^2``.

    Evaluated through the ``d x d`` identity
    ``||X~^T X~||_F^2 + ||Y~^T Y~||_F^2 - 2 ||X~^T Y~||_F^2`` (never an ``n x n`` matrix; memory
    O(d^2 + n d)). Range ``[0, 2]``; 0 iff ``Y~ = X~ Q`` for an isometry ``Q`` (the same zero set
    as the Procrustes distance). A distance, invariant to translation, isotropic scaling and
    orthogonal transforms of either input. ``x`` (n, d_s), ``y`` (n, d_t) -> 0-dim tensor.
    Paper: D_FG in arXiv:2509.25253.
    """
    x, y = _check_pair(x, y)
    return _result(_gram_distance(x, y), x.device, x.dtype)


@_autocast_off
def _gram_distance(x: Tensor, y: Tensor, *, reduce: Reduce | None = None, n: int | None = None) -> Tensor:
    """Body of :func:`gram_distance` on checked inputs; ``reduce``/``n`` as in :func:`_centre`."""
    dist, scale = _gram(x, y, reduce, n)
    if x.dtype != _F64 and float(dist.detach()) < _REFINE_BELOW * float(scale):
        dist, _ = _gram(_as_f64(x), _as_f64(y), reduce, n)
    return _clamp_keep_grad(dist, 0.0, 2.0)


def _gram(x: Tensor, y: Tensor, reduce: Reduce | None = None, n: int | None = None) -> tuple[Tensor, Tensor]:
    """``(D_FG, ||X~^T X~||^2 + ||Y~^T Y~||^2)`` in float64 from products in ``x.dtype``."""
    xc, nx, _ = _centre(x, "x", reduce, n)
    yc, ny, _ = _centre(y, "y", reduce, n)
    a, b, c = _products(xc, yc, reduce)
    nx2, ny2 = nx.square(), ny.square()
    xx = _safe_ratio(_fro64(a).square(), nx2.square())
    yy = _safe_ratio(_fro64(b).square(), ny2.square())
    xy = _safe_ratio(_fro64(c).square(), nx2 * ny2)
    return xx + yy - 2.0 * xy, (xx + yy).detach()


def cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment (Kornblith et al. 2019), a similarity in ``[0, 1]``.

    ``CKA = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred ``X``, ``Y`` (d x d
    form, never ``n x n``). 1 iff ``Y = c X Q`` for an isometry ``Q``; invariant to translation,
    isotropic scaling and orthogonal transforms, but not a metric: the paper's Theorem 1 builds
    teachers of different geometry with the same CKA. Returns 0 for a constant input.
    ``x`` (n, d_s), ``y`` (n, d_t) -> 0-dim tensor.
    """
    x, y = _check_pair(x, y)
    return _result(_cka(x, y), x.device, x.dtype)


@_autocast_off
def _cka(x: Tensor, y: Tensor, *, reduce: Reduce | None = None, n: int | None = None) -> Tensor:
    """Linear CKA on checked inputs, refined where ``1 - cka`` would cancel."""
    sim = _cka_value(x, y, reduce, n)
    if x.dtype != _F64 and 1.0 - float(sim.detach()) < _REFINE_BELOW:
        sim = _cka_value(_as_f64(x), _as_f64(y), reduce, n)
    return _clamp_keep_grad(sim, 0.0, 1.0)


def _cka_value(x: Tensor, y: Tensor, reduce: Reduce | None = None, n: int | None = None) -> Tensor:
    xc, _, _ = _centre(x, "x", reduce, n)
    yc, _, _ = _centre(y, "y", reduce, n)
    a, b, c = _products(xc, yc, reduce)
    return _safe_ratio(_fro64(c).square(), _fro64(a) * _fro64(b))


def cka_distance(x: Tensor, y: Tensor) -> Tensor:
    """``1 - cka(x, y)``, in ``[0, 1]``; 0 iff ``Y = c X Q``. Same shapes and numerics as :func:`cka`."""
    x, y = _check_pair(x, y)
    return _result(1.0 - _cka(x, y), x.device, x.dtype)
