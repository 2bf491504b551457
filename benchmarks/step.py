"""Compute overhead of every method: time of one whole training step relative to KD, one run.

Each method is set up exactly as `geodistill distill` would (same config, teacher, cached teacher
outputs, student, AdamW), then the trainer's own step function (`geodistill.train._step`: forward,
losses, backward, clipping, optimiser step) is timed on the same fixed batches, the methods
interleaved in a shuffled order on every repeat. These machines are noisy: only the ratios to KD
measured within one run mean anything.

Default: the experiments' setting (Rotten Tomatoes, fine-tuned MiniLM-L6 teacher, 4 x 192 student,
batch 32, up to 64 tokens), the paper's baselines, and geometry terms both on the last layer's CLS
vectors (the experiments' default) and on every token of the batch (the costliest single pair).

Usage:
  python benchmarks/step.py --out benchmarks/results/step-cpu.md            # ~5 minutes on 2 cores
  python benchmarks/step.py --set student.init=layer_subset --set 'student.layers=[1,3,5]' \
      --out benchmarks/results/step-cpu-subset.md                           # the layer-subset student
  python benchmarks/step.py --repeats 3 --out /tmp/step.md                  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

# the sibling benchmark script (this directory is on sys.path when a script here runs)
from geometry import cpu_model

from geodistill import models
from geodistill.cli import resolve_config_path
from geodistill.config import DistillConfig, load_config
from geodistill.parallel import Parallel
from geodistill.train import _accelerator, _optimizer, _step, _to, setup

KD = "{name: kd, temperature: 2.0}"
METHODS = {
    "ft": "[{name: ce}]",
    "kd": f"[{KD}]",
    "kd+pkd": f"[{KD}, {{name: pkd, weight: 0.1}}]",
    "kd+proj_mse": f"[{KD}, {{name: proj_mse, weight: 0.1}}]",
    "kd+cka (cls)": f"[{KD}, {{name: cka, weight: 0.1}}]",
    "kd+procrustes (cls)": f"[{KD}, {{name: procrustes, weight: 0.1}}]",
    "kd+gram (cls)": f"[{KD}, {{name: gram, weight: 0.1}}]",
    "kd+procrustes (tokens)": f"[{KD}, {{name: procrustes, weight: 0.1, pooling: tokens}}]",
    "kd+gram (tokens)": f"[{KD}, {{name: gram, weight: 0.1, pooling: tokens}}]",
    "kd+cka (tokens)": f"[{KD}, {{name: cka, weight: 0.1, pooling: tokens}}]",
    # the paper's other objective, CE + KD + alpha D (experiments/ce)
    "ce+kd+procrustes (cls)": f"[{{name: ce}}, {KD}, {{name: procrustes, weight: 0.1}}]",
    # several layers: the uniform map pairs every student layer with a teacher layer (experiments/layers)
    "kd+procrustes (uniform, tokens)": f"[{KD}, {{name: procrustes, weight: 0.1, layers: uniform, pooling: tokens}}]",
    "kd+gram (uniform, tokens)": f"[{KD}, {{name: gram, weight: 0.1, layers: uniform, pooling: tokens}}]",
    "kd+cka (uniform, tokens)": f"[{KD}, {{name: cka, weight: 0.1, layers: uniform, pooling: tokens}}]",
    "kd+gram (uniform, cls)": f"[{KD}, {{name: gram, weight: 0.1, layers: uniform}}]",
    "kd+cka (uniform, cls)": f"[{KD}, {{name: cka, weight: 0.1, layers: uniform}}]",
    "kd+proj_mse (uniform, cls)": f"[{KD}, {{name: proj_mse, weight: 0.1, layers: uniform}}]",
}
# KD with the other AdamW implementations (the table above uses the default, foreach AdamW)
OPTIMIZERS = {
    "kd, per-tensor AdamW (torch's CPU default)": "per-tensor",
    "kd, fused AdamW (train.fused_optimizer)": "fused",
}


class Bench:
    """One method, set up as the trainer sets it up, ready to take steps."""

    def __init__(self, cfg: DistillConfig, batches: int, optimizer: str = "foreach") -> None:
        train_cfg = replace(cfg.train, fused_optimizer=optimizer == "fused")
        self.run = run = setup(cfg, progress=False)
        self.acc = _accelerator(cfg.train)
        self.par = Parallel(self.acc, cfg.train.parallel)
        self.student, self.optimizer = self.par.wrap(run.student, lambda m: _optimizer(m, train_cfg))
        if optimizer == "per-tensor":
            for group in self.optimizer.param_groups:
                group["foreach"] = False
        device = self.acc.device
        train_set = run.task.dataset("train")
        size = cfg.train.batch_size
        self.batches = [
            _to(run.task.collate([train_set[i] for i in range(b * size, (b + 1) * size)]), device)
            for b in range(batches)
        ]
        self.student.train()

    def teacher_outputs(self, batch):
        objective = self.run.objective
        if not objective.needs_teacher:
            return None
        return self.run.teacher_cache.lookup(batch, objective.teacher_taps(), self.acc.device)

    def step(self, i: int) -> float:
        batch = self.batches[i % len(self.batches)]
        t0 = time.perf_counter()
        _step(
            self.acc,
            self.par,
            self.student,
            self.run.objective,
            [batch],
            self.teacher_outputs,
            self.optimizer,
            self.run.train_cfg,
            self.run.task,
            i + 1,
        )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default="experiments/rt", help="base distillation config (default: experiments/rt)"
    )
    ap.add_argument("--set", action="append", default=[], help="config override, as in geodistill distill")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per method (interleaved)")
    ap.add_argument("--batches", type=int, default=8, help="distinct training batches cycled through")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step-cpu.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    benches = {}
    for name, losses in METHODS.items():
        overrides = [*args.set, f"losses={losses}", f"output_dir=/tmp/geodistill-step-bench/{name}"]
        cfg = load_config(DistillConfig, resolve_config_path(args.config), overrides)
        benches[name] = Bench(cfg, args.batches)
        print(f"set up {name}", flush=True)
    for name, optimizer in OPTIMIZERS.items():
        overrides = [
            *args.set,
            f"losses={METHODS['kd']}",
            f"output_dir=/tmp/geodistill-step-bench/{optimizer}",
        ]
        cfg = load_config(DistillConfig, resolve_config_path(args.config), overrides)
        benches[name] = Bench(cfg, args.batches, optimizer)
        print(f"set up {name}", flush=True)

    for b in benches.values():  # warm-up: allocations, first-call costs
        for i in range(2):
            b.step(i)
    times: dict[str, list[float]] = {name: [] for name in benches}
    order = list(benches)
    rng = random.Random(0)
    for r in range(args.repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(benches[name].step(r))
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["kd"]
    cfg0 = next(iter(benches.values())).run.cfg
    student = next(iter(benches.values())).run.student.model  # the built student: its real shape
    machine = (
        f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [
        f"# Whole training step per method, relative to KD ({device})",
        "",
        f"Machine: {machine}, {device}. `python benchmarks/step.py` (config `{args.config}`"
        + (f", {' '.join(args.set)}" if args.set else "")
        + f"): batch {cfg0.train.batch_size} x up to {cfg0.data.max_length} tokens, "
        f"student {models.num_layers(student)} x {models.hidden_size(student)} (init {cfg0.student.init}), "
        f"teacher {cfg0.teacher.name} with cached outputs. Median of {args.repeats} interleaved steps per "
        "method (shuffled order each round) after 2 warm-up steps; the step is the trainer's own "
        "(forward, every loss term, backward, clipping, AdamW: foreach, bit-identical to torch's per-tensor "
        "CPU default; the last two rows are KD with the other implementations).",
        "",
        "| method | ms per step | x KD | overhead vs KD |",
        "|---|---:|---:|---:|",
    ]
    for name in benches:
        lines.append(
            f"| {name} | {1e3 * med[name]:.1f} | {med[name] / base:.3f} | {100 * (med[name] / base - 1):+.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "device": device, "median_seconds": med, "samples": times}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
