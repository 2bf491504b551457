"""Exactness and speed of the geometry losses, as ratios measured in one run.

For each shape (n samples, d_s, d_t): forward + backward time of every route, interleaved over
repeats (these machines are noisy: only ratios within one run mean anything), and the relative
error of the value against an independent float64 SVD reference (NumPy on the CPU).

Routes:
  procrustes/naive      2 - 2 * svdvals(X~^T Y~).sum() with autograd's SVD backward (float32)
  procrustes/eigh       geodistill, float64 eigh of the small Gram + deflation (CPU default)
  procrustes/ns         geodistill, float32 Newton-Schulz polar iteration (CUDA default)
  procrustes/ns+compile the same with its steps through torch.compile (train.compile_polar; the
                        warm-up call pays the compilation, which the timings leave out)
  gram/naive            ||X~ X~^T - Y~ Y~^T||_F^2 with n x n matrices (only where n x n fits)
  gram, cka             geodistill (d x d identities, never n x n)

Usage:
  python benchmarks/geometry.py --device cpu --out benchmarks/results/geometry-cpu.md
  python benchmarks/geometry.py --device cuda --out benchmarks/results/geometry-<gpu>.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from geodistill import geometry as G

CPU_SHAPES = [
    (32, 384, 192),
    (2048, 384, 192),
    (4096, 768, 1024),
    (64, 768, 2048),
    (16384, 768, 2048),
    (65536, 384, 384),
]
GPU_SHAPES = [
    (4096, 768, 1024),
    (4096, 768, 2048),
    (16384, 768, 2048),
    (16384, 2048, 4096),
    (64, 768, 2048),
    (65536, 1024, 4096),
]
NAIVE_GRAM_MAX_N = 16384


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (
        f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads "
        f"(torch {torch.__version__}, CPU)"
    )


def naive_normalize(a: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(0, keepdim=True)
    return a / a.norm()


def naive_procrustes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 - 2 * torch.linalg.svdvals(naive_normalize(x).mT @ naive_normalize(y)).sum()


def naive_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xn, yn = naive_normalize(x), naive_normalize(y)
    return (xn @ xn.mT - yn @ yn.mT).square().sum()


def with_method(f: Callable, method: str, compile: bool = False) -> Callable:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with G.polar_method(method, compile=compile):
            return f(x, y)

    return run


def reference(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """float64 NumPy values from the definitions (SVD; d x d identities for Gram/CKA)."""
    xn = x.detach().double().cpu().numpy()
    yn = y.detach().double().cpu().numpy()
    xn = xn - xn.mean(0)
    yn = yn - yn.mean(0)
    xn /= np.linalg.norm(xn)
    yn /= np.linalg.norm(yn)
    m = xn.T @ yn
    nuc = np.linalg.svd(m, compute_uv=False).sum()
    xx, yy = xn.T @ xn, yn.T @ yn
    return {
        "procrustes": 2 - 2 * nuc,
        "gram": float((xx**2).sum() + (yy**2).sum() - 2 * (m**2).sum()),
        "cka": float(1 - (m**2).sum() / (np.linalg.norm(xx) * np.linalg.norm(yy))),
    }


def fwd_bwd_ms(f: Callable, x: torch.Tensor, y: torch.Tensor, device: str) -> tuple[float, float]:
    xg = x.detach().requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    v = f(xg, y)
    v.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000, float(v.detach())


def inputs(n: int, ds: int, dt: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated, anisotropic features (like hidden states): y = x W + noise, graded spectrum."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, ds)
    x = torch.randn(n, ds, generator=g) * scale + 3.0
    w = torch.randn(ds, dt, generator=g) / ds**0.5
    y = x @ w + 0.3 * torch.randn(n, dt, generator=g)
    return x.to(device), y.to(device)


def bench(shapes: list[tuple[int, int, int]], device: str, repeats: int) -> list[dict]:
    rows = []
    for n, ds, dt in shapes:
        x, y = inputs(n, ds, dt, device)
        ref = reference(x, y)
        routes: dict[str, tuple[Callable, str]] = {
            "procrustes/naive": (naive_procrustes, "procrustes"),
            "procrustes/eigh": (with_method(G.procrustes_distance, "eigh"), "procrustes"),
            "procrustes/ns": (with_method(G.procrustes_distance, "newton-schulz"), "procrustes"),
            "procrustes/ns+compile": (
                with_method(G.procrustes_distance, "newton-schulz", compile=True),
                "procrustes",
            ),
            "gram": (G.gram_distance, "gram"),
            "cka": (G.cka_distance, "cka"),
        }
        if n <= NAIVE_GRAM_MAX_N:
            routes["gram/naive"] = (naive_gram, "gram")
        times: dict[str, list[float]] = {k: [] for k in routes}
        values: dict[str, float] = {}
        for name, (f, _) in routes.items():  # warm-up (allocations, kernels)
            _, values[name] = fwd_bwd_ms(f, x, y, device)
        for _ in range(repeats):  # interleaved: drift affects every route alike
            for name, (f, _) in routes.items():
                times[name].append(fwd_bwd_ms(f, x, y, device)[0])
        base = statistics.median(times["procrustes/naive"])
        for name, (_, key) in routes.items():
            med = statistics.median(times[name])
            rel = abs(values[name] - ref[key]) / max(abs(ref[key]), 1e-300)
            rows.append(
                {
                    "n": n,
                    "d_s": ds,
                    "d_t": dt,
                    "route": name,
                    "ms": med,
                    "vs_naive_procrustes": med / base,
                    "value": values[name],
                    "reference": ref[key],
                    "rel_error": rel,
                }
            )
            print(
                f"n={n:6d} {ds:5d}x{dt:<5d} {name:21s} {med:9.2f} ms  x{med / base:6.3f} of naive  rel.err {rel:.1e}",
                flush=True,
            )
    return rows


def peak_memory_check(device: str) -> list[dict]:
    """Gram and CKA at 65,536 tokens: peak extra memory must stay O(n d), not O(n^2)."""
    n, d = 65_536, 4096 if device == "cuda" else 256
    x, y = inputs(n, d, d, device, seed=1)
    out = []
    for name, f in (
        ("gram", G.gram_distance),
        ("cka", G.cka_distance),
        ("procrustes", G.procrustes_distance),
    ):
        xg = x.detach().requires_grad_(True)
        if device == "cuda":
            f(xg, y).backward()  # warm-up, then the measured call
            xg.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            f(xg, y).backward()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1000
            peak = torch.cuda.max_memory_allocated() - base
        else:
            from torch.profiler import ProfilerActivity, profile

            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                f(xg, y).backward()
            ms = (time.perf_counter() - t) * 1000  # under the profiler: an upper bound
            peak = max(e.cpu_memory_usage for e in prof.events())  # largest single allocation
        out.append(
            {
                "distance": name,
                "n": n,
                "d": d,
                "ms": ms,
                "peak_bytes": int(peak),
                "n_by_n_float32_bytes": n * n * 4,
                "input_bytes": n * d * 4,
            }
        )
        print(
            f"{name}: n={n} d={d} {ms:.1f} ms fwd+bwd, peak {peak / 2**20:.0f} MiB (an n x n float32 matrix: {n * n * 4 / 2**30:.0f} GiB)",
            flush=True,
        )
    return out


def to_markdown(rows: list[dict], mem: list[dict], device: str, repeats: int) -> str:
    lines = [
        f"# Geometry losses: forward + backward, {device}",
        "",
        f"Machine: {machine(device)}. Median of {repeats} interleaved repeats after a warm-up; "
        "`x naive` is the time relative to the naive `svdvals` Procrustes loss measured in the same run; "
        "rel. error against a float64 NumPy SVD reference. Inputs: correlated, anisotropic float32 features "
        "(y = x W + noise, x with a spectrum over 2 decades and an offset of 3).",
        "",
        "| n | d_s x d_t | route | ms | x naive | rel. error |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['d_s']} x {r['d_t']} | {r['route']} | {r['ms']:.2f} | {r['vs_naive_procrustes']:.3f} | {r['rel_error']:.1e} |"
        )
    lines += [
        "",
        "Peak memory at 65,536 tokens, forward + backward (largest single allocation on the CPU; peak "
        "extra allocated on CUDA, after a warm-up call), with the time of that call:",
        "",
        "| distance | n | d | ms | peak MiB | inputs MiB | n x n float32 would be |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in mem:
        lines.append(
            f"| {m['distance']} | {m['n']} | {m['d']} | {m['ms']:.1f} | {m['peak_bytes'] / 2**20:.0f} | "
            f"{2 * m['input_bytes'] / 2**20:.0f} | {m['n_by_n_float32_bytes'] / 2**30:.0f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="the first two shapes only (a quick check)")
    p.add_argument("--out", type=Path, help="write markdown here (and JSON beside it)")
    args = p.parse_args()
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.small:
        shapes = shapes[:2]
    rows = bench(shapes, args.device, args.repeats)
    mem = peak_memory_check(args.device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_markdown(rows, mem, args.device, args.repeats))
        args.out.with_suffix(".json").write_text(
            json.dumps({"machine": machine(args.device), "rows": rows, "memory": mem}, indent=2)
        )


if __name__ == "__main__":
    main()
