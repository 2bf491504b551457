"""One decoder distillation step at the paper's OPT shape, per geometry route, relative to KD.

Issue 7's whole-step target: an OPT-1.3B-shaped teacher -> OPT-125m-shaped student (random
weights from the configs: the cost of a step does not depend on the values), batch 8 x 512 tokens,
bf16 autocast over float32 student weights and a bf16 teacher, AdamW (foreach, the trainer's
default), gradient clipping at 1. Every variant takes the same steps on the same batches, the
variants interleaved in a shuffled order on every repeat; only ratios to KD within one run mean
anything (the same KD step moved by 8% between two repeats on an H200, ../shared/PERF.md).

Variants:
  sft                         next-token CE, no teacher
  kd                          teacher forward + token-level forward KL (geodistill.losses.kd_loss)
  kd+<term>                   kd + 0.1 x a geometry distance between the student's and the
                              teacher's last hidden states over every token of the batch
                              (4096 x 768 vs 4096 x 2048): one aligned layer pair
  kd+procrustes               geodistill's default route (Newton-Schulz on CUDA, eigh on the CPU)
  kd+procrustes (eigh)        float64 eigh of the small Gram
  kd+procrustes (ns+compile)  Newton-Schulz steps through torch.compile
  kd+procrustes (svdvals)     the obvious loss: 2 - 2 svdvals(X~^T Y~).sum(), autograd's SVD backward
  kd+gram, kd+cka             the d x d identities

Usage:
  python benchmarks/opt_step.py --out benchmarks/results/opt-step-h100.md     # on a GPU
  python benchmarks/opt_step.py --tiny --repeats 3 --out /tmp/opt-step.md     # a CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from geometry import machine, naive_procrustes, with_method  # the sibling benchmark script

from geodistill import geometry as G
from geodistill.losses import ce_loss, kd_loss

OPT = {  # the published configs' shapes (vocabulary 50272, learned positions, pre-LN)
    "opt-1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192, "num_attention_heads": 32},
    "opt-125m": {"hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072, "num_attention_heads": 12},
}
TINY = {  # a CPU smoke test of the same code
    "teacher": {"hidden_size": 128, "num_hidden_layers": 2, "ffn_dim": 256, "num_attention_heads": 4},
    "student": {"hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128, "num_attention_heads": 4},
}
WEIGHT = 0.1


def opt(shape: dict, vocab: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab,
        word_embed_proj_dim=shape["hidden_size"],
        max_position_embeddings=2048,
        dropout=0.0,
        attention_dropout=0.0,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (1.3B parameters: seconds on a GPU)
        return OPTForCausalLM(cfg).to(dtype=dtype)


def routes() -> dict[str, Callable | None]:
    def naive(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # svdvals has no bf16 kernel
            return naive_procrustes(x.float(), y.float())

    return {
        "sft": None,
        "kd": None,
        "kd+procrustes": G.procrustes_distance,
        "kd+procrustes (eigh)": with_method(G.procrustes_distance, "eigh"),
        "kd+procrustes (ns+compile)": with_method(G.procrustes_distance, "newton-schulz", compile=True),
        "kd+procrustes (svdvals)": naive,
        "kd+gram": G.gram_distance,
        "kd+cka": G.cka_distance,
    }


class Step:
    """One variant: its own student copy and optimiser, stepping on shared batches and teacher."""

    def __init__(self, name: str, term: Callable | None, student: torch.nn.Module, teacher, batches) -> None:
        self.name, self.term, self.teacher, self.batches = name, term, teacher, batches
        self.student = copy.deepcopy(student).train()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-5, foreach=True)
        self.device = next(student.parameters()).device.type

    def __call__(self, i: int) -> float:
        ids = self.batches[i % len(self.batches)]
        features = self.term is not None
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device, dtype=torch.bfloat16):
            if self.name != "sft":
                with torch.no_grad():
                    t_out = self.teacher(input_ids=ids, output_hidden_states=features)
            s_out = self.student(input_ids=ids, output_hidden_states=features)
            if self.name == "sft":
                loss = ce_loss(s_out.logits[:, :-1], ids[:, 1:])
            else:
                loss = kd_loss(s_out.logits, t_out.logits, temperature=1.0)
            if features:
                x = s_out.hidden_states[-1].flatten(0, 1)
                y = t_out.hidden_states[-1].flatten(0, 1)
                loss = loss + WEIGHT * self.term(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=40, help="timed steps per variant (interleaved)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and batch 2 x 32 (a CPU smoke test)")
    ap.add_argument("--out", type=Path, required=True, help="markdown here, JSON beside it")
    args = ap.parse_args()
    vocab = 1000 if args.tiny else 50272
    shapes = (TINY["teacher"], TINY["student"]) if args.tiny else (OPT["opt-1.3b"], OPT["opt-125m"])
    batch, seq = (2, 32) if args.tiny else (args.batch, args.seq)

    teacher = opt(shapes[0], vocab, torch.bfloat16, args.device).eval()
    student = opt(shapes[1], vocab, torch.float32, args.device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=g).to(args.device) for _ in range(4)]
    steps = [Step(name, term, student, teacher, batches) for name, term in routes().items()]
    del student
    for s in steps:  # warm-up: allocations, kernel selection, compilation
        for i in range(3):
            s(i)
        print(f"warmed up {s.name}", flush=True)
    times: dict[str, list[float]] = {s.name: [] for s in steps}
    order = list(steps)
    rng = random.Random(0)
    for r in range(args.repeats):
        rng.shuffle(order)
        for s in order:
            times[s.name].append(s(r))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["kd"]
    # the overhead's spread: the same ratio on each half of the repeats
    halves = {
        k: [statistics.median(v[h::2]) / statistics.median(times["kd"][h::2]) for h in (0, 1)]
        for k, v in times.items()
    }
    what = (
        "tiny OPT models (smoke test)" if args.tiny else "OPT-1.3B-shaped teacher -> OPT-125m-shaped student"
    )
    lines = [
        f"# One distillation step per geometry route, relative to KD ({args.device})",
        "",
        f"Machine: {machine(args.device)}. `python benchmarks/opt_step.py`: {what}, random weights, "
        f"batch {batch} x {seq} tokens, bf16 autocast (float32 student weights, bf16 teacher), AdamW "
        f"(foreach), clipping; geometry terms weight {WEIGHT} on the last hidden states of every token "
        f"({batch * seq} x {shapes[1]['hidden_size']} vs {shapes[0]['hidden_size']}). Median of "
        f"{args.repeats} interleaved steps per variant (shuffled order each round) after 3 warm-up steps; "
        "`halves` is the ratio to KD on the even and the odd repeats alone (its spread is the noise).",
        "",
        "| variant | ms per step | x KD | overhead vs KD | halves |",
        "|---|---:|---:|---:|---|",
    ]
    for k in times:
        h = ", ".join(f"{x:.3f}" for x in halves[k])
        lines.append(
            f"| {k} | {1e3 * med[k]:.2f} | {med[k] / base:.3f} | {100 * (med[k] / base - 1):+.1f}% | {h} |"
        )
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": machine(args.device), "median_seconds": med, "samples": times}, indent=2)
    )


if __name__ == "__main__":
    main()
