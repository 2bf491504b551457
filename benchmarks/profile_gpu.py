"""Where one geometry loss call spends its time, and what cheaper polar steps would cost in exactness.

A probe for the next GPU session (issue 7): the H100 run of 2026-12-05 (`results/geometry-h100.md`)
had the Gram distance at 4.1 ms for n = 64 rows, where its arithmetic takes microseconds, so a
call has a fixed cost of a few ms (about 300 operator launches and 10 host syncs per forward +
backward, counted on the CPU; the float64 refinement pass doubles them when the distance is below
5% of its terms). This script prints, at 4,096 x 768 x 2,048 (the OPT step's pair):

* the floor: centring + X^T Y forward + backward alone;
* Procrustes (Newton-Schulz) with its quintic steps in float32, TF32 and bf16 (the cubic steps,
  the convergence test and the fallback unchanged): time, error on these inputs, and which of the
  geometry core's input classes (tests/test_geometry.py) leave the 1e-5 bound;
* Gram and CKA times; a profiler table (kernel time and CPU time) of Procrustes and Gram.

Usage: python benchmarks/profile_gpu.py [--device cpu --shape 512 96 256]   (CPU: a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from geometry import fwd_bwd_ms, inputs, reference  # the sibling benchmark script
from torch.profiler import ProfilerActivity, profile

from geodistill import geometry as G

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_geometry as T  # the input classes and the bound of the core's tests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[4096, 768, 2048], metavar=("N", "D_S", "D_T"))
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    x, y = inputs(*args.shape, dev)
    ref = reference(x, y)

    def fwd_bwd(f):
        xg = x.detach().requires_grad_(True)
        v = f(xg, y)
        v.backward()
        return v

    def ms(f) -> float:
        for _ in range(3):
            fwd_bwd(f)
        return statistics.median(fwd_bwd_ms(f, x, y, dev)[0] for _ in range(args.repeats))

    def floor(a, b):
        return ((a - a.mean(0)).mT @ (b - b.mean(0))).square().sum()

    print(f"{dev}, n x d_s x d_t = {args.shape}")
    print(f"floor (centring + X^T Y, fwd+bwd): {ms(floor):.3f} ms")

    eager = G._ns_quintic

    def tf32(a, eye):
        torch.set_float32_matmul_precision("high")
        try:
            return eager(a, eye)
        finally:
            torch.set_float32_matmul_precision("highest")

    def bf16(a, eye):
        return eager(a, eye) if a.dtype != torch.float32 else eager(a.bfloat16(), eye.bfloat16()).float()

    try:
        for name, quintic in (("float32", eager), ("tf32", tf32), ("bf16", bf16)):
            G._ns_quintic = quintic
            with G.polar_method("newton-schulz"):
                t = ms(G.procrustes_distance)
                err = abs(fwd_bwd(G.procrustes_distance).item() - ref["procrustes"]) / ref["procrustes"]
                out = []
                for case in T.CASES:
                    a, b = T.make_case(case, torch.float32)
                    got = {k: f(a.to(dev), b.to(dev)).item() for k, f in T.FUNCTIONS.items()}
                    try:
                        T.assert_within_bound(got, T._ref_values(a, b), torch.float32, case)
                    except AssertionError:
                        out.append(case)
            print(
                f"procrustes, quintic steps in {name}: {t:.3f} ms, rel. error {err:.1e}, out of bound: {out or 'none'}"
            )
    finally:
        G._ns_quintic = eager
    print(f"gram {ms(G.gram_distance):.3f} ms, cka {ms(G.cka_distance):.3f} ms")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for name, f in (("procrustes", G.procrustes_distance), ("gram", G.gram_distance)):
        with profile(activities=activities) as prof:
            for _ in range(5):
                fwd_bwd(f)
            sync()
        table = prof.key_averages()
        print(f"== {name} (5 calls)")
        if dev == "cuda":
            print(table.table(sort_by="device_time_total", row_limit=12, max_name_column_width=50))
        print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
