"""Every 30-pair verdict of the committed experiments on one page, under one Holm family.

Each experiment's report corrects for the comparisons it makes itself (3 to 27); read side by side,
those verdicts overstate what the whole set shows. This script takes every committed cell with 30
pairs (3 splits x 10 seeds) from the experiments' own ``results.jsonl`` files, compares each
objective with its baseline as ``geodistill report`` does (paired over split and seed, 95% bootstrap
interval, paired t-test), corrects all of them together with Holm, and writes the tables between
the ``glance`` markers of ``experiments/README.md``.

    python experiments/glance.py           # rewrite the block
    python experiments/glance.py --check   # exit 1 when the block is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geodistill.experiments import read_rows
from geodistill.stats import Comparison, analyse, holm, verdict

HERE = Path(__file__).resolve().parent
START, END = "<!-- glance: start (python experiments/glance.py) -->", "<!-- glance: end -->"
PAIRS = 30  # issue 4's floor: 3 splits x 10 seeds
ALPHA = 0.05

TASKS = {"rotten_tomatoes": "Rotten Tomatoes", "reuters_r8": "Reuters R8", "multiemo": "MultiEmo"}
STUDENTS = {"narrow": "4 x 192", "subset-3": "subset-3"}
KD_TERMS = ["kd+procrustes", "kd+gram", "kd+cka", "kd+proj_mse", "kd+pkd", "ft"]
KD_HEADER = ["Procrustes", "Gram", "CKA", "projection MSE", "PKD", "FT (labels only)"]


@dataclass(frozen=True)
class Cell:
    """One comparison: rows of ``experiment`` matching ``where`` (and ``method``) against its baseline."""

    experiment: str
    method: str
    where: dict[str, Any] = field(default_factory=dict)
    baseline: str = "kd"


@dataclass
class Line:
    """One table line: where it stands (task, student, features) and its cells by column."""

    task: str
    student: str
    features: str
    cells: dict[str, Cell]


@dataclass
class Table:
    """A titled table: its lines and its columns (a cell's key in ``Line.cells``, the header text)."""

    title: str
    columns: list[tuple[str, str]]
    lines: list[Line]


def _kd_cells(experiment: str, methods: list[str], **where: Any) -> dict[str, Cell]:
    return {m: Cell(experiment, m, where) for m in methods}


def _grid(layers: str, pooling: str) -> dict[str, Cell]:
    """A cell of experiments/layers_grid (the narrow student on Rotten Tomatoes, 3 maps x 3 poolings)."""
    return _kd_cells("layers_grid", KD_TERMS[:3], layers=layers, pooling=pooling)


def _fixed(experiment: str, method: str) -> dict[str, Cell]:
    """A method that fixes its features in its name (``kd+procrustes/last-tokens``), in column Procrustes."""
    return {"kd+procrustes": Cell(experiment, method)}


TERMS3 = KD_TERMS[:3]
RT, R8, ME = "rotten_tomatoes", "reuters_r8", "multiemo"

#: alpha = 0.1 for every feature term, KD at T = 2, 300 (Rotten Tomatoes) or the task's steps
KD_TABLE = [
    Line(RT, "narrow", "last layer, CLS", _kd_cells("main", KD_TERMS)),
    Line(RT, "narrow", "last layer, mean", _grid("last", "mean")),
    Line(
        RT,
        "narrow",
        "last layer, every token",
        {**_grid("last", "tokens"), "kd+proj_mse": Cell("tokens_mse", "kd+proj_mse", {"alpha": 0.1})},
    ),
    Line(RT, "narrow", "uniform map, CLS", _grid("uniform", "cls")),
    Line(RT, "narrow", "uniform map, mean", _grid("uniform", "mean")),
    Line(RT, "narrow", "uniform map, every token", _grid("uniform", "tokens")),
    Line(RT, "narrow", "middle layers, CLS", _grid("[[2,3]]", "cls")),
    Line(RT, "narrow", "middle layers, mean", _grid("[[2,3]]", "mean")),
    Line(RT, "narrow", "middle layers, every token", _grid("[[2,3]]", "tokens")),
    Line(RT, "subset-3", "last layer, CLS", _kd_cells("subset", KD_TERMS)),
    Line(RT, "subset-3", "last layer, every token", _kd_cells("subset_tokens", TERMS3)),
    Line(RT, "subset-3", "uniform map, CLS", _kd_cells("subset_layers_cls", TERMS3)),
    Line(RT, "subset-3", "uniform map, every token", _kd_cells("subset_layers", [*TERMS3, "kd+proj_mse"])),
    Line(R8, "narrow", "last layer, CLS", _kd_cells("tasks", KD_TERMS, task=R8)),
    Line(R8, "narrow", "last layer, every token", _kd_cells("tokens_r8", TERMS3)),
    Line(R8, "narrow", "uniform map, CLS", _kd_cells("layers_cls_tasks", TERMS3, task=R8)),
    Line(R8, "narrow", "uniform map, every token", _kd_cells("layers_tasks", TERMS3, task=R8)),
    Line(R8, "subset-3", "last layer, CLS", _kd_cells("subset_r8", KD_TERMS)),
    Line(R8, "subset-3", "last layer, every token", _fixed("subset_r8_cells", "kd+procrustes/last-tokens")),
    Line(R8, "subset-3", "uniform map, CLS", _fixed("subset_r8_cells", "kd+procrustes/uniform-cls")),
    Line(R8, "subset-3", "uniform map, every token", _kd_cells("subset_tasks", TERMS3, task=R8)),
    Line(ME, "narrow", "last layer, CLS", _kd_cells("tasks", KD_TERMS, task=ME)),
    Line(ME, "narrow", "last layer, every token", _kd_cells("tokens_multiemo", TERMS3)),
    Line(ME, "narrow", "uniform map, CLS", _kd_cells("layers_cls_tasks", TERMS3, task=ME)),
    Line(ME, "narrow", "uniform map, every token", _kd_cells("layers_tasks", TERMS3, task=ME)),
    Line(ME, "subset-3", "uniform map, every token", _kd_cells("subset_tasks", ["kd+procrustes"], task=ME)),
]

#: the same objective with a larger weight on the feature term (token-level cells, where dev chose 1)
ALPHA1_TABLE = [
    Line(
        RT,
        "narrow",
        "last layer, every token",
        {
            **{m: Cell("tokens_alpha_splits", m, {"alpha": 1.0}) for m in TERMS3},
            "kd+proj_mse": Cell("tokens_mse", "kd+proj_mse", {"alpha": 1.0}),
        },
    ),
    Line(
        RT,
        "narrow",
        "uniform map, every token",
        {m: Cell("layers_tokens_terms", f"{m}-a1") for m in [*TERMS3, "kd+proj_mse"]},
    ),
    Line(
        RT,
        "narrow",
        "last layer, every token, weight ramped over 150 steps",
        {"kd+proj_mse": Cell("tokens_mse_warmup", "kd+proj_mse-ramp150", {"alpha": 1.0})},
    ),
    Line(
        RT,
        "narrow",
        "last layer, every token, term off for the first 150 steps",
        {"kd+proj_mse": Cell("tokens_mse_delay", "kd+proj_mse-delay150", {"alpha": 1.0})},
    ),
    Line(RT, "subset-3", "uniform map, every token", {m: Cell("subset_layers", f"{m}-a1") for m in TERMS3}),
]

#: the paper's other objective: CE + KD + 0.1 x D against CE + KD
CE_TERMS = ["ce+kd+procrustes", "ce+kd+gram", "ce+kd+cka", "ce+kd+proj_mse", "ce+kd+pkd"]
CE_TABLE = [
    Line(RT, "narrow", "last layer, CLS", {m: Cell("ce", m, baseline="ce+kd") for m in CE_TERMS}),
    Line(
        RT,
        "narrow",
        "last layer, every token",
        {m: Cell("ce_tokens", m, baseline="ce+kd") for m in ("ce+kd+procrustes", "ce+kd+gram", "ce+kd+cka")},
    ),
    Line(R8, "subset-3", "last layer, CLS", {m: Cell("subset_r8", m, baseline="ce+kd") for m in CE_TERMS}),
]
#: CE + KD + 1 x D on the uniform map's tokens (experiments/ce_layers_tokens, subset_ce_layers)
CE_ALPHA1_TABLE = [
    Line(
        RT,
        "narrow",
        "uniform map, every token",
        {
            m: Cell("ce_layers_tokens", f"{m}-a1", baseline="ce+kd")
            for m in ("ce+kd+procrustes", "ce+kd+gram", "ce+kd+cka")
        },
    ),
    Line(
        RT,
        "subset-3",
        "uniform map, every token",
        {
            "ce+kd+procrustes": Cell("subset_ce_layers", "ce+kd+procrustes-a1", baseline="ce+kd"),
            "ce+kd+gram": Cell("subset_ce_layers", "ce+kd+gram-a1", baseline="ce+kd"),
            "ce+kd+cka": Cell("subset_ce_layers", "ce+kd+cka-a1", baseline="ce+kd"),
        },
    ),
]

KD_COLUMNS = list(zip(KD_TERMS, KD_HEADER, strict=True))

#: the last layer's tokens on Rotten Tomatoes over five alphas (experiments/tokens_alpha_high), and
#: projection MSE on the same tokens at 0.01 to 10 (experiments/tokens_mse_low and tokens_mse)
ALPHAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
ALPHA_TABLE = [
    Line(
        RT,
        "narrow",
        f"last layer, every token: {label}",
        {str(a): Cell("tokens_alpha_high", m, {"alpha": a}) for a in ALPHAS[2:]},
    )
    for m, label in zip(TERMS3, KD_HEADER[:3], strict=True)
] + [
    Line(
        RT,
        "narrow",
        "last layer, every token: projection MSE",
        {
            **{str(a): Cell("tokens_mse_low", "kd+proj_mse", {"alpha": a}) for a in (0.01, 0.03)},
            **{str(a): Cell("tokens_mse", "kd+proj_mse", {"alpha": a}) for a in (0.1, 1.0, 10.0)},
        },
    )
]

TABLES = [
    Table("KD + 0.1 x D against KD", KD_COLUMNS, KD_TABLE),
    Table("KD + 1 x D against KD", KD_COLUMNS[:4], ALPHA1_TABLE),
    Table("KD + alpha x D against KD, by alpha", [(str(a), f"alpha {a:g}") for a in ALPHAS], ALPHA_TABLE),
    Table("CE + KD + 0.1 x D against CE + KD", list(zip(CE_TERMS, KD_HEADER[:5], strict=True)), CE_TABLE),
    Table(
        "CE + KD + 1 x D against CE + KD",
        list(zip(CE_TERMS[:3], KD_HEADER[:3], strict=True)),
        CE_ALPHA1_TABLE,
    ),
]


def _matches(row: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def _chosen(cell: Cell, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cell's rows and its baseline's (in the cell's task, when it names one)."""
    shared = {k: v for k, v in cell.where.items() if k == "task"}
    return [
        r
        for r in rows
        if (r["method"] == cell.method and _matches(r, cell.where))
        or (r["method"] == cell.baseline and _matches(r, shared))
    ]


def compare(cell: Cell, rows: list[dict[str, Any]], metric: str) -> Comparison:
    """The cell's paired comparison with its baseline (the rows of one setting; ``analyse`` pairs them)."""
    return _compare_chosen(cell, _chosen(cell, rows), metric)


def _compare_chosen(cell: Cell, chosen: list[dict[str, Any]], metric: str) -> Comparison:
    comps = analyse(chosen, metric=metric, baseline=cell.baseline).comparisons
    if len(comps) != 1 or comps[0].pairs != PAIRS:
        found = [(c.treatment, c.pairs) for c in comps]
        raise SystemExit(f"{cell}: expected one comparison over {PAIRS} pairs, found {found}")
    return comps[0]


def render(metric: str = "test.accuracy") -> str:
    """The markdown block: one table per objective, verdicts under Holm over every distinct comparison
    on the page (a cell shown twice, e.g. alpha = 1 in two tables, is one comparison: the same runs)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def rows(name: str) -> list[dict[str, Any]]:
        if name not in cache:
            cache[name] = [r for r in read_rows(HERE / name / "results.jsonl") if r["status"] == "ok"]
        return cache[name]

    cells = {
        (t, i, m): cell
        for t, table in enumerate(TABLES)
        for i, line in enumerate(table.lines)
        for m, cell in line.cells.items()
    }
    runs: dict[tuple[int, int, str], frozenset[str]] = {}
    distinct: dict[frozenset[str], Comparison] = {}
    for key, cell in cells.items():
        chosen = _chosen(cell, rows(cell.experiment))
        runs[key] = frozenset(r["config_hash"] for r in chosen)
        if runs[key] not in distinct:
            distinct[runs[key]] = _compare_chosen(cell, chosen, metric)
    adjusted = dict(zip(distinct, holm([c.p_t for c in distinct.values()]), strict=True))

    verdicts = {same: verdict(c, float(adjusted[same]), alpha=ALPHA) for same, c in distinct.items()}

    def text(key: tuple[int, int, str]) -> str:
        diff = f"{distinct[runs[key]].mean_diff:+.2f}"
        return {"win": f"**{diff}** win", "loss": f"*{diff}* loss", "tie": diff}[verdicts[runs[key]]]

    out = [
        f"The committed cells with {PAIRS} pairs (3 splits x 10 seeds), {metric} in points: the mean paired "
        "difference to the baseline; **win** and *loss* where the 95% bootstrap interval excludes 0 and the paired "
        f"t-test holds after Holm over all {len(distinct)} distinct comparisons on this page (each experiment's report corrects "
        "over its own few, so a handful of its wins are ties here). Blank: not run over 30 pairs. Alpha is the weight "
        "of the feature term D; 4 x 192 is the narrow student, subset-3 a 3-layer student initialised from the teacher's blocks 1, 3 and 5 (0-based).",
        "",
    ]
    for t, table in enumerate(TABLES):
        out += [f"**{table.title}**", ""]
        out.append("| task | student | features | " + " | ".join(h for _, h in table.columns) + " | from |")
        out.append("|---|---|---|" + "---:|" * len(table.columns) + "---|")
        for i, line in enumerate(table.lines):
            cells = [text((t, i, key)) if key in line.cells else "" for key, _ in table.columns]
            sources = sorted({c.experiment for c in line.cells.values()})
            links = ", ".join(f"[{e}]({e}/README.md)" for e in sources)
            out.append(
                f"| {TASKS[line.task]} | {STUDENTS[line.student]} | {line.features} | "
                + " | ".join(cells)
                + f" | {links} |"
            )
        out.append("")
    tally = list(verdicts.values())
    out.append(
        f"{tally.count('win')} wins, {tally.count('tie')} ties and {tally.count('loss')} losses over "
        f"{len(distinct)} comparisons."
    )
    return "\n".join(out)


def splice(readme: str, block: str) -> str:
    """``readme`` with the text between the glance markers replaced by ``block``."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"experiments/README.md lacks the markers {START!r} ... {END!r}")
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README block is out of date")
    args = parser.parse_args(argv)
    path = HERE / "README.md"
    readme = path.read_text()
    new = splice(readme, render())
    if args.check:
        if new != readme:
            print("experiments/README.md: the glance block is out of date; run python experiments/glance.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
