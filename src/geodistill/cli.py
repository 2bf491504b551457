"""Command-line interface: parse -> config -> call. Each subcommand is a thin function.

Configs are YAML files (or the name of a config shipped in ``geodistill/configs``) plus
``--set key=value`` overrides; unknown keys are errors. Errors in configs and inputs print one
line naming the field or file and exit with status 2. Status 1 means the command ran but some
result is missing: a run that diverges (NaN/inf) prints one line naming its last good checkpoint,
``sweep`` lists its failed runs, ``geometry`` says that no student was measured. An interrupted
``sweep`` exits with 130. ``GEODISTILL_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_path(name: str | None) -> Path | None:
    """A path as given, or a shipped config by name (``demo`` -> geodistill/configs/demo.yaml)."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    from geodistill.config import ConfigError

    raise ConfigError(
        f"config {name!r} not found (neither a file nor a shipped config; shipped: {', '.join(shipped_configs())})"
    )


def _sweep_files(name: str) -> list[Path]:
    """A sweep file, or every sweep file of a folder (as given or shipped), in name order. A folder
    without .yaml files is not a set of sweeps (``experiments/main`` in a checkout holds results)."""
    if not Path(name).is_file():
        for folder in (Path(name), CONFIG_DIR / name):
            if folder.is_dir() and (files := sorted(folder.glob("*.yaml"))):
                return files
    return [resolve_config_path(name)]


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _main_process() -> bool:
    """False on every rank but 0 of a torchrun / accelerate launch: only rank 0 prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def _load(args: argparse.Namespace) -> Any:
    from geodistill.config import DistillConfig, load_config

    return load_config(DistillConfig, resolve_config_path(args.config), args.set)


def _cmd_theory(args: argparse.Namespace) -> int:
    from geodistill.theory import run_theory

    report = run_theory(Path(args.out), seed=args.seed, quick=args.quick)
    print(f"wrote {report}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from geodistill.train import distill

    cfg = _load(args)
    results = distill(cfg, progress=not args.quiet)
    if not _main_process():
        return 0
    print(
        json.dumps(
            {k: results[k] for k in ("output_dir", "student_dir", "dev", "test", "seconds_per_step")},
            indent=2,
        )
    )
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from geodistill.finetune import finetuned_teacher

    cfg = _load(args)
    path = finetuned_teacher(cfg, progress=not args.quiet)
    if not _main_process():
        return 0
    results = json.loads((path.parent / "results.json").read_text())
    print(json.dumps({"teacher_dir": str(path), "dev": results["dev"], "test": results["test"]}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from geodistill.evaluate_model import evaluate_saved

    cfg = _load(args)
    metrics = evaluate_saved(
        args.model, cfg, splits=args.split, progress=not args.quiet, predictions_dir=args.predictions
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    from geodistill.evaluate_model import similarity_report

    cfg = _load(args)
    paths = similarity_report(
        args.model_a,
        args.model_b,
        cfg,
        Path(args.out),
        split=args.split,
        pooling=args.pooling,
        max_examples=args.max_examples,
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_geometry(args: argparse.Namespace) -> int:
    from geodistill.evaluate_model import student_geometry
    from geodistill.stats import GEOMETRY_NAME, parse_where, write_geometry_summary

    out = Path(args.out) if args.out else Path(args.results[0]).parent / "geometry"
    rows, notes = student_geometry(
        args.results,
        out,
        where=parse_where(args.where),
        split=args.split,
        pooling=args.pooling,
        max_examples=args.max_examples,
        student_layer=args.student_layer,
        teacher_layer=args.teacher_layer,
        progress=not args.quiet,
    )
    for note in notes:
        print(f"geodistill geometry: not measured: {note}", file=sys.stderr)
    if not rows:
        print("geodistill geometry: no student measured", file=sys.stderr)
        return 1
    paths = write_geometry_summary(rows, out, split=args.split, metric=args.metric)
    print(f"{len(rows)} students measured; wrote {out / GEOMETRY_NAME}, " + ", ".join(map(str, paths)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from geodistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, progress=not args.quiet, overrides=args.set)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from geodistill.experiments import sweep_main

    try:
        return sweep_main(
            [path for config in args.config for path in _sweep_files(config)],
            args.set,
            jobs=args.jobs,
            quick=args.quick,
            dry_run=args.dry_run,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(
            "geodistill sweep: interrupted; the same command resumes (finished runs are kept)",
            file=sys.stderr,
        )
        return 130


def _cmd_report(args: argparse.Namespace) -> int:
    from geodistill.stats import parse_where, report

    selection = parse_where(args.where)
    analysis, paths = report(
        args.results, args.out, baseline=args.baseline, metric=args.metric, where=selection
    )
    for c in analysis.comparisons:
        where = ", ".join(f"{k}={v}" for k, v in c.setting.items() if v is not None)
        what = ", ".join(f"{k}={v}" for k, v in c.treatment.items() if v is not None)
        print(f"{where}: {what}: {c.mean_diff:+.2f} {c.unit}, {c.pairs} pairs: {c.verdict_text()}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from geodistill.config import DistillConfig, describe, to_dict

    if args.config or args.set:  # --set alone: the defaults with the overrides, as distill runs them
        import yaml

        print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False))
        return 0
    print("shipped configs: " + ", ".join(shipped_configs()) + "\n")
    for key, default, text in describe(DistillConfig):
        print(f"{key} = {default}\n    {text}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file or shipped config name")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (YAML syntax; list items by index: losses.1.weight=0.5); repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodistill",
        description="Knowledge distillation with geometry-aware representational alignment (Procrustes, Gram, CKA).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="offline end-to-end demo: fine-tune MiniLM, distil students, print a table"
    )
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument(
        "--quick", action="store_true", help="a much smaller run (a minute or two; what the tests run)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override every run's config"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("distill", help="distil a student from a teacher (config + --set overrides)")
    _config_args(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("finetune", help="fine-tune the config's teacher on its task (cached for later runs)")
    _config_args(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a saved model directory on the config's dataset")
    p.add_argument("model", help="model directory (e.g. runs/x/best) or name")
    _config_args(p)
    p.add_argument(
        "--split", action="append", help="splits or evaluation-set names (default dev and test); repeatable"
    )
    p.add_argument(
        "--predictions", default=None, help="instruction tasks: write generated answers to this directory"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("similarity", help="CKA / Procrustes / Gram between every layer pair of two models")
    p.add_argument("model_a", help="first model (directory, offline or hub name)")
    p.add_argument("model_b", help="second model")
    _config_args(p)
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--pooling", default="cls", choices=["cls", "mean", "tokens", "last"])
    p.add_argument(
        "--max-examples",
        type=_positive_int,
        default=512,
        help="examples used (a seeded stratified sample of N of the split, the same for every model)",
    )
    p.add_argument("--out", default="outputs/similarity", help="output directory for the CSV and heatmaps")
    p.set_defaults(func=_cmd_similarity)

    p = sub.add_parser(
        "geometry", help="every trained student of a sweep against its teacher: CKA, Procrustes, Gram"
    )
    p.add_argument(
        "results", nargs="+", help="results.jsonl file(s) of sweeps whose run folders are on this machine"
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=VALUE[,VALUE]",
        help="only these rows; repeatable",
    )
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--pooling", default="tokens", choices=["cls", "mean", "tokens", "last"])
    p.add_argument(
        "--max-examples",
        type=_positive_int,
        default=256,
        help="examples used (a seeded stratified sample of N of the split, the same for every model)",
    )
    p.add_argument(
        "--student-layer", type=int, default=-1, help="student hidden-state index (0 = embeddings, -1 = last)"
    )
    p.add_argument(
        "--teacher-layer", type=int, default=-1, help="teacher hidden-state index (0 = embeddings, -1 = last)"
    )
    p.add_argument(
        "--metric",
        default=None,
        help="metric beside the measures in geometry.md (default: the rows' test metric)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: geometry/ beside the first results file)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_geometry)

    p = sub.add_parser("theory", help="the paper's theorems and synthetic study, in numbers and plots")
    p.add_argument("--out", default="outputs/theory", help="output directory for report.md and PNG figures")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quick", action="store_true", help="smaller synthetic study (seconds, for tests)")
    p.set_defaults(func=_cmd_theory)

    p = sub.add_parser(
        "sweep",
        help="a grid of runs (methods x seeds x alpha x layers x students x tasks) -> results.jsonl; resumable",
    )
    p.add_argument(
        "config",
        nargs="+",
        help="sweep YAML file(s) or shipped sweep config name(s); several run in one pool of --jobs "
        "processes, and a run that more than one plans (the same config) runs once",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep value (YAML syntax: grid.seed=[0,1], base.train.max_steps=100); repeatable",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each its own process)")
    p.add_argument("--quick", action="store_true", help="apply the sweep's quick: overrides (a smoke test)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the planned runs and their state; run nothing"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="paired statistics of a sweep's results.jsonl (or several sweeps') against a baseline: "
        "tables, plots, verdicts",
    )
    p.add_argument(
        "results",
        nargs="+",
        help="results.jsonl written by geodistill sweep; several are one table, their runs paired "
        "across sweeps and told apart by a sweep column (--baseline kd+gram@sweep=tokens_r8)",
    )
    p.add_argument(
        "--baseline",
        default="kd",
        help="baseline method, or method@column=value,... when it has several (kd+procrustes@alpha=1)",
    )
    p.add_argument("--metric", default=None, help="row column to compare (default: test.<the task's metric>)")
    p.add_argument("--out", default=None, help="output directory (default: <results dir>/report)")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=V[,V...]",
        help="only the rows with one of these values in COLUMN (repeatable: all must hold), "
        "e.g. --where split_seed=1,2",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "configs", help="list shipped configs and every config key, or print a resolved config"
    )
    _config_args(p)
    p.set_defaults(func=_cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = int(args.func(args) or 0)
        _close_process_group()
        return code
    except BrokenPipeError:  # `geodistill ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        # config and input errors (data files, labels, layer indices, model directories) and a
        # diverged run: one line naming the culprit; GEODISTILL_DEBUG=1 shows the traceback
        diverged = _diverged(e)
        if os.environ.get("GEODISTILL_DEBUG") or not (diverged or _bad_input(e)):
            raise
        print(f"geodistill {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1 if diverged else 2


def _bad_input(e: BaseException) -> bool:
    from geodistill.assets import AssetError

    # ConfigError is a ValueError; OSError covers missing files, model directories and an
    # output_dir that cannot be written
    return isinstance(e, AssetError | ValueError | OSError)


def _diverged(e: BaseException) -> bool:
    train = sys.modules.get("geodistill.train")  # imported by whatever trained (not for cheap commands)
    return train is not None and isinstance(e, train.TrainingDiverged)


def _one_line(e: BaseException) -> str:
    """The message on one line (libraries' messages, quoted inside ours, may run over several)."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _close_process_group() -> None:
    """Under torchrun / accelerate launch: let every rank finish before the group is torn down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
