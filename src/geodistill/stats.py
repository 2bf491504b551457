"""Statistics of a sweep: paired comparisons against a baseline, tables, plots and plain verdicts.

Rows come from ``results.jsonl`` (:mod:`geodistill.experiments`); each row says which of its columns
are the *treatment* (``method`` and placeholders such as ``alpha``, ``layers``), the *setting* (task,
student, other swept config keys) and the *replicates* (``seed``, ``split_seed``). A group is one
treatment in one setting; its replicates give mean, std and n. Every treatment is compared with the
baseline treatment of the same setting on the replicates both have (paired: the trainer fixes
the student's initialisation, the data order and the dropout stream by seed, identically across
methods, labels-only FT included):

* difference of means in points (a metric whose values all lie in [0, 1] is a fraction, reported
  as percentages; any other metric, e.g. a log-probability, keeps its own units),
* its 95% percentile bootstrap interval (10,000 resamples of the paired differences, seeded),
* paired t-test and Wilcoxon signed-rank p-values, each Holm-corrected over the comparisons of the
  setting (one family per setting and test),
* the minimum detectable effect: the true difference a two-sided paired t-test at alpha = 0.05 finds
  with 80% power, given the observed std of the paired differences and the number of pairs,
* the number of seeds that 80% power at a 0.5-point difference would need.

Verdict: ``win`` when the interval lies above 0 and the Holm-adjusted t-test p < 0.05, ``loss``
symmetrically, otherwise ``tie`` (with the MDE beside it; said "not significant after Holm
correction" rather than "no detectable difference" when the observed difference is at least the MDE).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# a results row's metric columns: the selected (best-on-dev) student's, then the last step's
METRIC_PREFIXES = ("dev.", "test.", "last_dev.", "last_test.")
# the measures `geodistill geometry` adds to each row (the student's representations against its
# teacher's on a split, one per geodistill.similarity.MEASURES): in their own units, never percent,
# and for the distances lower is better (closer to the teacher)
TEACHER_MEASURES = {
    "teacher_cka": "higher",
    "teacher_procrustes": "lower",
    "teacher_procrustes_angular": "lower",
    "teacher_gram": "lower",
}
GEOMETRY_NAME = "geometry.jsonl"  # what `geodistill geometry` writes, one row per measured student


def _teacher_measure(metric: str) -> str | None:
    """``"higher"`` / ``"lower"`` (which is better) for a measure against the teacher, else None."""
    return TEACHER_MEASURES.get(metric.rpartition(".")[2])


def _measures_note(rows: list[dict[str, Any]], metric: str) -> str | None:
    """Where a report on another metric reads rows that also carry measures against the teacher
    (a sweep with ``geometry:``, or ``geometry.jsonl``): which, and how to compare methods on them."""
    if _teacher_measure(metric):
        return None
    columns = sorted({k for r in rows for k in r if _teacher_measure(k) and r.get(k) is not None})
    if not columns:
        return None
    runs = sum(any(r.get(k) is not None for k in columns) for r in rows)
    example = next((c for c in columns if c.endswith("teacher_procrustes")), columns[0])
    return (
        f"{runs} of the {len(rows)} runs also carry measures of the student against its teacher "
        f"({', '.join(columns)}); `--metric {example}` compares methods on one."
    )


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one (a distance to the teacher)."""
    return _teacher_measure(metric) == "lower"


__all__ = [
    "GEOMETRY_NAME",
    "TEACHER_MEASURES",
    "Analysis",
    "Comparison",
    "Group",
    "PairingError",
    "StatsError",
    "analyse",
    "bootstrap_mean_ci",
    "holm",
    "lower_is_better",
    "merge_results",
    "minimum_detectable_effect",
    "paired_power",
    "report",
    "seeds_for_power",
    "write_geometry_summary",
    "write_report",
]

GEOMETRY_TERMS = ("procrustes", "gram", "cka")


class StatsError(ValueError):
    """The results cannot be analysed as asked (unknown metric, ambiguous baseline, mixed configs)."""


class PairingError(StatsError):
    """A paired test was asked of runs that share no replicate (seed, split seed)."""


# ------------------------------------------------------------------------------------------
# the statistics, pure functions


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order; NaNs stay NaN and do not count.

    With the m finite p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``
    (1-based ranks). Rejecting where ``p_adj < alpha`` controls the family-wise error rate at alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out


def bootstrap_mean_ci(
    x: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (resampled with replacement, seeded)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan)
    if len(x) == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def paired_power(n: int, sd: float, delta: float, *, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs, std of differences ``sd``, true mean
    difference ``delta``: ``P(|T| > t_{1-alpha/2, n-1})`` with ``T ~ t'(n - 1, delta sqrt(n) / sd)``
    (noncentral t)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 1.0 if delta != 0 else alpha
    df = n - 1
    nc = abs(delta) * math.sqrt(n) / sd  # the power is symmetric in delta
    crit = stats.t.ppf(1 - alpha / 2, df)
    near = float(stats.nct.sf(crit, df, nc))
    far = float(stats.nct.cdf(-crit, df, nc))  # scipy gives NaN where this tail underflows
    if not math.isfinite(near):  # pragma: no cover - scipy's nct outside its range: normal approximation
        near = float(stats.norm.sf(crit - nc))
    return near + (far if math.isfinite(far) else 0.0)


def minimum_detectable_effect(n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference that a two-sided paired t-test (level ``alpha``) with ``n``
    pairs and std of differences ``sd`` detects with probability ``power``; same units as ``sd``.
    NaN for fewer than 2 pairs, and when the differences do not vary (the t-test is undefined)."""
    from scipy.optimize import brentq

    if n < 2 or not math.isfinite(sd) or sd == 0:
        return math.nan
    hi = sd
    while paired_power(n, sd, hi, alpha=alpha) < power:
        hi *= 2
    return float(brentq(lambda d: paired_power(n, sd, d, alpha=alpha) - power, 0.0, hi, xtol=1e-10 * sd))


def seeds_for_power(
    sd: float, delta: float = 0.5, *, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000
) -> int | None:
    """Smallest number of pairs for which the paired t-test detects ``delta`` with ``power``, given
    the std of differences ``sd``; None if more than ``max_n`` would be needed, or sd is unknown
    or 0 (then the spread that power depends on has not been seen)."""
    if not math.isfinite(sd) or sd == 0:
        return None
    if paired_power(2, sd, delta, alpha=alpha) >= power:
        return 2
    lo, hi = 2, 4  # power grows with n: double, then bisect
    while paired_power(hi, sd, delta, alpha=alpha) < power:
        if hi >= max_n:
            return None
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if paired_power(mid, sd, delta, alpha=alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


#: differences (in points) this close are equal: float rounding of the same example counts
_ROUNDING = 1e-9


def _no_spread(diffs: np.ndarray) -> bool:
    """Whether the paired differences are all equal up to float rounding (the same gain on every
    pair, e.g. 4 / 1288 computed as two different differences of accuracies)."""
    return bool(np.ptp(diffs) <= _ROUNDING * max(1.0, float(np.abs(diffs).max())))


def _paired_tests(diffs: np.ndarray) -> tuple[float, float]:
    """Two-sided p-values of the paired t-test and the Wilcoxon signed-rank test on differences."""
    from scipy import stats

    if len(diffs) < 2:
        return (math.nan, math.nan)
    all_zero = bool(np.all(np.abs(diffs) <= _ROUNDING))
    if _no_spread(diffs):
        # t is 0/0 or +-inf: the exact sign-flip test stands in (all n signs alike: p = 2 / 2^n)
        p_t = 1.0 if all_zero else min(1.0, 2.0 ** (1 - len(diffs)))
    else:
        p_t = float(stats.ttest_1samp(diffs, 0.0).pvalue)  # == ttest_rel(a, b) with diffs = a - b
    if all_zero:
        p_w = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                p_w = float(stats.wilcoxon(diffs).pvalue)
            except ValueError:
                p_w = math.nan
    return (p_t, p_w)


# ------------------------------------------------------------------------------------------
# groups and comparisons


@dataclass
class Group:
    """One treatment in one setting, over its replicates; values in percent (or the metric's units)."""

    setting: dict[str, Any]
    treatment: dict[str, Any]
    values: dict[tuple, float]  # replicate -> metric (percent, or the metric's own units)
    run_dirs: list[Path] = field(default_factory=list)
    loss_terms: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))

    @property
    def std(self) -> float:
        return float(np.std(list(self.values.values()), ddof=1)) if self.n > 1 else math.nan

    @property
    def geometry(self) -> bool:
        terms = self.loss_terms or tuple(str(self.treatment.get("method", "")).replace("+", " ").split())
        return any(any(g in t for g in GEOMETRY_TERMS) for t in terms)


@dataclass
class Comparison:
    """A treatment against the baseline of its setting, on their common replicates (in ``unit``)."""

    setting: dict[str, Any]
    treatment: dict[str, Any]
    baseline: dict[str, Any]
    pairs: int
    unpaired: int  # runs of either group without a partner, left out
    unpaired_baseline: int  # of those, the baseline's
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    p_t: float
    p_wilcoxon: float
    mde: float
    seeds_needed: int | None
    geometry: bool
    # the same at Holm's strictest level, alpha / m for m comparisons in the setting: what the
    # smallest p-value must beat for a win (the others face alpha / (m - 1), ..., alpha)
    mde_holm: float = math.nan
    seeds_needed_holm: int | None = None
    p_t_holm: float = math.nan
    p_wilcoxon_holm: float = math.nan
    verdict: str = ""  # win / loss / tie / too few pairs
    unit: str = "points"  # percentage points; "units" for a metric that is not a fraction

    def verdict_text(self) -> str:
        if self.verdict == "tie" and self.sd_diff == 0:
            return "tie (the paired differences do not vary: no test, MDE undefined)"
        if self.verdict == "tie":
            if math.isfinite(self.mde) and self.mde > 0 and abs(self.mean_diff) >= self.mde:
                # as large as the t-test could detect alone, but not significant after Holm (or the
                # interval touches 0): a candidate effect, not a finding
                return (
                    f"tie (not significant after Holm correction; MDE = {_num(self.mde, unit=self.unit)} "
                    f"{self.unit})"
                )
            return f"tie (no detectable difference; MDE = {_num(self.mde, unit=self.unit)} {self.unit})"
        if self.verdict == "too few pairs":
            return f"no test ({self.pairs} pair{'s' if self.pairs != 1 else ''}; need at least 2)"
        return self.verdict


@dataclass
class Analysis:
    """Everything the report shows."""

    metric: str
    baseline: str
    columns: dict[str, list[str]]  # treatment / setting / replicate
    groups: list[Group]
    comparisons: list[Comparison]
    rows_used: int
    rows_failed: list[str]  # run ids of error rows without a later success
    notes: list[str]
    delta: float = 0.5
    alpha: float = 0.05
    power: float = 0.8
    percent: bool = True  # values are fractions shown in percent; False: the metric's own units
    lower_is_better: bool = False  # a distance: a negative difference is the win

    @property
    def unit(self) -> str:
        return "points" if self.percent else "units"

    @property
    def metric_label(self) -> str:
        """The metric's name with its unit where it has one: ``test.accuracy (%)``."""
        return f"{self.metric} (%)" if self.percent else self.metric


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v


def _same(value: Any, wanted: str) -> bool:
    if str(value) == wanted or _cell(value) == wanted:
        return True
    try:
        return value is not None and float(value) == float(wanted)
    except (TypeError, ValueError):
        return False


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    cols: dict[str, list[str]] = {"treatment": [], "setting": [], "replicate": []}
    for row in rows:
        for kind, names in (row.get("axes") or {}).items():
            for name in names:
                if kind in cols and name not in cols[kind]:
                    cols[kind].append(name)
    if not cols["treatment"]:  # rows written by something else: the obvious columns
        cols["treatment"] = ["method"] + (["alpha"] if any(r.get("alpha") is not None for r in rows) else [])
        cols["setting"] = ["task"] if any("task" in r for r in rows) else []
        cols["replicate"] = [c for c in ("seed", "split_seed") if any(c in r for r in rows)]
    if "method" not in cols["treatment"]:
        cols["treatment"].insert(0, "method")
    return cols


def _resolve_metric(rows: list[dict[str, Any]], metric: str | None) -> str:
    available = sorted({k for r in rows for k in r if k.startswith(METRIC_PREFIXES)})
    if metric is None:
        names = {r.get("metric") for r in rows if r.get("metric")}
        if len(names) != 1:
            raise StatsError(
                f"the rows name {'several metrics ' + str(sorted(names)) if names else 'no metric'}; "
                f"choose one with --metric (available: {', '.join(available) or 'none'})"
            )
        metric = f"test.{names.pop()}"
    if metric not in available and f"test.{metric}" in available:
        metric = f"test.{metric}"
    if metric not in available:
        raise StatsError(f"metric {metric!r} is in no row (available: {', '.join(available) or 'none'})")
    return metric


def _collapsed_note(rows: list[dict[str, Any]], metric: str, cols: dict[str, list[str]]) -> str | None:
    """A note naming the runs whose classifier gave every example of the metric's split one class
    (``<split>.top_class_share`` of 1: a collapsed student), per group; None when there are none.
    Rows written before the diagnostic existed have no share and are not counted."""
    split = metric.rpartition(".")[0]
    share = f"{split}.top_class_share"
    measured: dict[str, list[bool]] = {}
    for row in rows:
        if row.get(share) is not None and row.get(metric) is not None:
            label = _label({c: row.get(c) for c in cols["treatment"] + cols["setting"]}) or "the results"
            measured.setdefault(label, []).append(float(row[share]) >= 1.0)
    bad = {label: flags for label, flags in measured.items() if any(flags)}
    if not bad:
        return None
    total = sum(sum(flags) for flags in bad.values())
    runs = sum(len(flags) for flags in measured.values())
    each = "; ".join(f"{label}: {sum(flags)} of {len(flags)}" for label, flags in sorted(bad.items()))
    return (
        f"Collapsed runs: {total} of the {runs} runs with a {share} predict one class for every {split} "
        f"example ({each}); their {metric} is that class's share, not a learned classifier's."
    )


def _parse_baseline(spec: str) -> tuple[str, dict[str, str]]:
    """``kd`` or ``kd+procrustes@alpha=1,layers=last``."""
    name, _, rest = spec.partition("@")
    extra = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise StatsError(f"--baseline {spec!r}: expected method@column=value,..., got {item!r}")
        k, v = item.split("=", 1)
        extra[k.strip()] = v.strip()
    return name.strip(), extra


def parse_where(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["split_seed=1,2", "task=rte"]`` -> ``{"split_seed": ["1", "2"], "task": ["rte"]}``."""
    where: dict[str, list[str]] = {}
    for spec in specs:
        column, sep, values = spec.partition("=")
        column = column.strip()
        wanted = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not column or not wanted:
            raise StatsError(f"--where {spec!r}: expected column=value[,value...], e.g. split_seed=1,2")
        if column in where:
            raise StatsError(f"--where names {column!r} twice; list its values once: {column}=a,b")
        where[column] = wanted
    return where


def select_rows(rows: list[dict[str, Any]], where: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The rows whose every named column has one of its listed values (the numbers compared as
    numbers: ``alpha=1`` matches 1.0). A column that no row has is an error, not an empty report."""
    for column, wanted in where.items():
        if not any(column in r for r in rows):
            known = sorted({k for r in rows for k in r if not k.startswith(METRIC_PREFIXES)})
            raise StatsError(
                f"--where {column}=...: no row has a column {column!r} (columns: {', '.join(known)})"
            )
        if not any(_same(r.get(column), v) for r in rows for v in wanted):
            seen = sorted({_cell(r.get(column)) for r in rows if column in r})
            raise StatsError(
                f"--where {column}={','.join(wanted)}: no row has that value (values: {', '.join(seen)})"
            )
    return [r for r in rows if all(any(_same(r.get(c), v) for v in vs) for c, vs in where.items())]


def describe_where(where: dict[str, list[str]]) -> str:
    return "; ".join(f"{c} in {{{', '.join(vs)}}}" for c, vs in where.items())


def analyse(
    rows: list[dict[str, Any]],
    *,
    metric: str | None = None,
    baseline: str = "kd",
    resamples: int = 10_000,
    seed: int = 0,
    delta: float = 0.5,
    alpha: float = 0.05,
    power: float = 0.8,
    results_dir: Path | None = None,
    treatment_extra: Sequence[str] = (),
) -> Analysis:
    """Groups, paired comparisons with the baseline, Holm corrections and verdicts.

    ``treatment_extra`` names row columns that also tell treatments apart (``sweep`` when the rows
    come from several sweeps: :func:`merge_results`).

    Raises :class:`PairingError` when a treatment and its baseline share no replicate, and
    :class:`StatsError` for an unknown metric, a missing or ambiguous baseline, or two different
    configurations in the same group and replicate (a results file mixing sweeps).
    """
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    succeeded = {r.get("config_hash") for r in ok}
    failed = sorted(
        {
            str(r.get("run_id"))
            for r in rows
            if r.get("status") == "error" and r.get("config_hash") not in succeeded
        }
    )
    if not ok:
        raise StatsError("no finished runs (status ok) in the results")
    metric = _resolve_metric(ok, metric)
    cols = _columns(ok)
    cols["treatment"] += [c for c in treatment_extra if c not in cols["treatment"]]
    notes: list[str] = []

    groups: dict[tuple, Group] = {}
    hashes: dict[tuple, str] = {}
    missing = 0
    found = [float(r[metric]) for r in ok if r.get(metric) is not None and math.isfinite(float(r[metric]))]
    # fractions -> percent; anything else (and a measure against the teacher) as it is
    percent = _teacher_measure(metric) is None and all(0.0 <= v <= 1.0 for v in found)
    lower = lower_is_better(metric)
    scale, unit = (100.0, "points") if percent else (1.0, "units")
    for row in ok:
        value = row.get(metric)
        if value is None or not math.isfinite(float(value)):
            missing += 1
            continue
        setting = {c: row.get(c) for c in cols["setting"]}
        treatment = {c: row.get(c) for c in cols["treatment"]}
        rep = tuple(_hashable(row.get(c)) for c in cols["replicate"])
        key = (tuple(_hashable(v) for v in setting.values()), tuple(_hashable(v) for v in treatment.values()))
        group = groups.setdefault(key, Group(setting, treatment, {}, [], tuple(row.get("loss_terms") or ())))
        digest = str(row.get("config_hash"))
        if rep in group.values and hashes.get((*key, rep)) != digest:
            raise StatsError(
                f"{_label(treatment)} in {_label(setting) or 'the results'} has two different runs for "
                f"replicate {dict(zip(cols['replicate'], rep, strict=True))} (config hashes "
                f"{hashes[(*key, rep)]} and {digest}): the file mixes configurations (from an edited sweep file?); "
                "keep one configuration's rows or give the edited sweep another output_dir"
            )
        if rep not in group.values:
            group.run_dirs.append(_run_dir(row, results_dir))
        hashes[(*key, rep)] = digest
        group.values[rep] = scale * float(value)  # a repeated row: the last
    if missing:
        notes.append(f"{missing} finished run(s) have no value for {metric} and were left out.")
    collapsed = _collapsed_note(ok, metric, cols)
    if collapsed:
        notes.append(collapsed)
    measured = _measures_note(ok, metric)
    if measured:
        notes.append(measured)

    base_name, base_extra = _parse_baseline(baseline)
    if not any(g.treatment.get("method") == base_name for g in groups.values()):
        methods = sorted({str(g.treatment.get("method")) for g in groups.values()})
        raise StatsError(f"baseline {base_name!r} is not among the methods ({', '.join(methods)})")

    comparisons: list[Comparison] = []
    by_setting: dict[tuple, list[Group]] = {}
    for (skey, _), g in groups.items():
        by_setting.setdefault(skey, []).append(g)
    for members in by_setting.values():
        bases = [
            g
            for g in members
            if g.treatment.get("method") == base_name
            and all(_same(g.treatment.get(k), v) for k, v in base_extra.items())
        ]
        where = _label(members[0].setting) or "the results"
        if not bases:
            notes.append(f"{where}: no runs of the baseline {baseline!r}, so no comparisons.")
            continue
        if len(bases) > 1:
            raise StatsError(
                f"baseline {baseline!r} is ambiguous in {where}: "
                + "; ".join(_label(b.treatment) for b in bases)
                + f". Name one, e.g. --baseline '{_baseline_spec(bases[0].treatment)}'"
            )
        base = bases[0]
        family: list[Comparison] = []
        for g in members:
            if g is base:
                continue
            family.append(_compare(g, base, cols, resamples, seed, delta, alpha, power))
        p_t = holm([c.p_t for c in family])
        p_w = holm([c.p_wilcoxon for c in family])
        # m as holm() counts it: a comparison without a test (fewer than 2 pairs) is not in the family
        strict = alpha / max(1, sum(math.isfinite(c.p_t) for c in family))
        for c, pt, pw in zip(family, p_t, p_w, strict=True):
            c.p_t_holm, c.p_wilcoxon_holm = float(pt), float(pw)
            c.unit = unit
            c.mde_holm = minimum_detectable_effect(c.pairs, c.sd_diff, alpha=strict, power=power)
            c.seeds_needed_holm = seeds_for_power(c.sd_diff, delta, alpha=strict, power=power)
            c.verdict = verdict(c, float(pt), alpha=alpha, lower_is_better=lower)
        comparisons.extend(family)
    return Analysis(
        metric=metric,
        baseline=baseline,
        columns=cols,
        groups=list(groups.values()),
        comparisons=comparisons,
        rows_used=sum(g.n for g in groups.values()),
        rows_failed=failed,
        notes=notes,
        delta=delta,
        alpha=alpha,
        power=power,
        percent=percent,
        lower_is_better=lower,
    )


def verdict(c: Comparison, p_t_adjusted: float, *, alpha: float = 0.05, lower_is_better: bool = False) -> str:
    """The report's rule: ``win`` when the bootstrap interval lies above 0 and the (Holm-)adjusted
    t-test p is below ``alpha``, ``loss`` for the mirror image, ``tie`` otherwise; ``too few pairs``
    below 2 pairs. With ``lower_is_better`` (a distance) an interval below 0 is the win.
    ``p_t_adjusted`` is the caller's: the report adjusts within a setting, other tables
    (experiments/glance.py) over a larger family."""
    if c.pairs < 2:
        return "too few pairs"
    if p_t_adjusted < alpha and (c.ci_low > 0 or c.ci_high < 0):
        return "win" if (c.ci_low > 0) != lower_is_better else "loss"
    return "tie"


def _compare(
    g: Group,
    base: Group,
    cols: dict[str, list[str]],
    resamples: int,
    seed: int,
    delta: float,
    alpha: float,
    power: float,
) -> Comparison:
    common = [r for r in base.values if r in g.values]
    if not common:
        reps = ", ".join(cols["replicate"]) or "replicate"

        def show(group: Group) -> str:
            return str(sorted((list(r) for r in group.values), key=str))

        raise PairingError(
            f"cannot pair {_label(g.treatment)} with the baseline {_label(base.treatment)} in "
            f"{_label(g.setting) or 'the results'}: they share no ({reps}); the method has {show(g)}, "
            f"the baseline {show(base)}. Paired tests need both run on the same seeds."
        )
    diffs = np.array([g.values[r] - base.values[r] for r in common])
    # differences equal to float rounding have no spread: std 0 (no MDE), as the tests treat them
    sd = (0.0 if _no_spread(diffs) else float(np.std(diffs, ddof=1))) if len(diffs) > 1 else math.nan
    lo, hi = bootstrap_mean_ci(diffs, resamples=resamples, seed=seed)
    p_t, p_w = _paired_tests(diffs)
    return Comparison(
        setting=g.setting,
        treatment=g.treatment,
        baseline=base.treatment,
        pairs=len(common),
        unpaired=g.n + base.n - 2 * len(common),
        unpaired_baseline=base.n - len(common),
        mean_diff=float(diffs.mean()),
        sd_diff=sd,
        ci_low=lo,
        ci_high=hi,
        p_t=p_t,
        p_wilcoxon=p_w,
        mde=minimum_detectable_effect(len(common), sd, alpha=alpha, power=power),
        seeds_needed=seeds_for_power(sd, delta, alpha=alpha, power=power),
        geometry=g.geometry,
    )


def _run_dir(row: dict[str, Any], results_dir: Path | None) -> Path:
    out = Path(str(row.get("output_dir") or ""))
    if (not out.is_absolute() or not out.exists()) and results_dir is not None and row.get("run_id"):
        moved = results_dir / "runs" / str(row["run_id"])  # the sweep directory was moved or copied
        if moved.exists() and not out.exists():
            return moved
    return out


# ------------------------------------------------------------------------------------------
# formatting


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _num(v: float, signed: bool = False, unit: str = "points") -> str:
    """Two decimals for percentage points; four for a metric in its own units (a CKA or Procrustes
    difference of 0.002 is real and must not print as 0.00)."""
    if v is None or not math.isfinite(v):
        return "n/a"
    digits = 2 if unit == "points" else 4
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _p(v: float) -> str:
    """Four decimals; more where four would round onto the 0.05 line (p = 0.04996 beside a win
    must not read 0.0500)."""
    if not math.isfinite(v):
        return "n/a"
    if v < 1e-4:
        return "<0.0001"
    text = f"{v:.4f}"
    return f"{v:.6f}" if text == "0.0500" and v != 0.05 else text


def _p_is(v: float) -> str:
    """``p = 0.0123`` or ``p < 0.0001``, for prose."""
    s = _p(v)
    return f"p < {s[1:]}" if s.startswith("<") else f"p = {s}"


def _label(d: dict[str, Any]) -> str:
    """``kd+procrustes (alpha=1, layers=last)``; ``task=rte, student=small``."""
    if "method" in d:
        extra = ", ".join(f"{k}={_cell(v)}" for k, v in d.items() if k != "method" and v is not None)
        return f"{d['method']}" + (f" ({extra})" if extra else "")
    return ", ".join(f"{k}={_cell(v)}" for k, v in d.items() if v is not None)


def _baseline_spec(treatment: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={_cell(v)}" for k, v in treatment.items() if k != "method" and v is not None)
    return str(treatment["method"]) + (f"@{extra}" if extra else "")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


#: the report's non-ASCII characters and those that OT1 fonts print as other glyphs (``<`` as ¡)
_LATEX_SYMBOLS = {
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "<": r"$<$",
    ">": r"$>$",
    "×": r"$\times$",
}


def _tex(text: str) -> str:
    """``text`` as LaTeX that pdflatex compiles without extra packages: specials escaped, the
    report's symbols in math mode."""
    return "".join(_LATEX_ESCAPES.get(ch) or _LATEX_SYMBOLS.get(ch, ch) for ch in text)


def _latex(header: list[str], rows: list[list[str]], caption: str, label: str) -> str:
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(caption)}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{" + "l" * len(header) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(_tex(c) for c in r) + r" \\" for r in rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines)


def _key_cells(a: Analysis, setting: dict[str, Any], treatment: dict[str, Any]) -> list[str]:
    return [_cell(setting.get(c)) for c in a.columns["setting"]] + [
        _cell(treatment.get(c)) for c in a.columns["treatment"]
    ]


def _group_table(a: Analysis) -> tuple[list[str], list[list[str]]]:
    header = [
        *a.columns["setting"],
        *a.columns["treatment"],
        "n",
        f"{a.metric_label} mean ± std",
    ]
    rows = []
    for g in _sorted_groups(a):
        std = f" ± {_num(g.std, unit=a.unit)}" if g.n > 1 else ""
        rows.append([*_key_cells(a, g.setting, g.treatment), str(g.n), f"{_num(g.mean, unit=a.unit)}{std}"])
    return header, rows


def _comparison_table(a: Analysis, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    header = [
        *a.columns["setting"],
        *a.columns["treatment"],
        "pairs",
        f"Δ ({a.unit})",
        "95% CI",
        "t-test p (Holm)",
        "Wilcoxon p (Holm)",
        f"MDE, {a.unit} (at Holm's α/m)",
        f"seeds for {a.power:.0%} power at {a.delta:g} (Holm)",
        "verdict",
    ]
    rows = []
    for c in a.comparisons:
        rows.append(
            [
                *_key_cells(a, c.setting, c.treatment),
                str(c.pairs),
                _num(c.mean_diff, True, a.unit),
                f"[{_num(c.ci_low, True, a.unit)}, {_num(c.ci_high, True, a.unit)}]",
                _p(c.p_t_holm),
                _p(c.p_wilcoxon_holm),
                f"{_num(c.mde, unit=a.unit)} ({_num(c.mde_holm, unit=a.unit)})",
                f"{_seeds(c.seeds_needed)} ({_seeds(c.seeds_needed_holm)})",
                c.verdict if latex else c.verdict_text(),
            ]
        )
    return header, rows


def _seeds(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _sorted_groups(a: Analysis) -> list[Group]:
    def key(g: Group) -> tuple:
        return (
            tuple(_cell(g.setting.get(c)) for c in a.columns["setting"]),
            str(g.treatment.get("method")) != a.baseline.partition("@")[0],
            tuple((_sortable(g.treatment.get(c))) for c in a.columns["treatment"]),
        )

    return sorted(a.groups, key=key)


def _sortable(v: Any) -> tuple:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, _cell(v))


def _verdict_lines(a: Analysis) -> list[str]:
    lines = []
    settings: dict[str, list[Comparison]] = {}
    for c in a.comparisons:
        settings.setdefault(_label(c.setting) or "all runs", []).append(c)
    for where, comps in settings.items():
        lines.append(f"### {where}\n")
        for c in comps:
            lines.append(
                f"- **{_label(c.treatment)}** vs {_label(c.baseline)}: **{c.verdict_text()}**: "
                f"{_num(c.mean_diff, True, a.unit)} {a.unit} (95% CI {_num(c.ci_low, True, a.unit)} to "
                f"{_num(c.ci_high, True, a.unit)}), "
                f"paired t-test {_p_is(c.p_t_holm)}, Wilcoxon {_p_is(c.p_wilcoxon_holm)} (Holm), "
                f"{c.pairs} pairs"
                + (
                    "."
                    if c.verdict == "tie"
                    else f", MDE {_num(c.mde, unit=a.unit)} {a.unit} ({_num(c.mde_holm, unit=a.unit)} at Holm's α/m)."
                )
            )
        lines.append("")
    return lines


def _summary_sentences(a: Analysis) -> list[str]:
    out = []
    for geometry, who in (
        (True, "Geometry losses (objectives with a Procrustes, Gram or CKA term)"),
        (False, "Other methods"),
    ):
        comps = [c for c in a.comparisons if c.geometry == geometry]
        if not comps:
            continue
        counts = {v: sum(c.verdict == v for c in comps) for v in ("win", "tie", "loss", "too few pairs")}
        text = (
            f"{who} against {a.baseline}: win in {counts['win']}, tie in {counts['tie']} and lose in "
            f"{counts['loss']} of {len(comps)} comparisons"
        )
        if counts["too few pairs"]:
            text += f" ({counts['too few pairs']} without a test: fewer than 2 pairs)"
        wins = [_label(c.treatment) + f" ({_label(c.setting)})" for c in comps if c.verdict == "win"]
        losses = [_label(c.treatment) + f" ({_label(c.setting)})" for c in comps if c.verdict == "loss"]
        if wins:
            text += ". Wins: " + "; ".join(wins)
        if losses:
            text += ". Losses: " + "; ".join(losses)
        out.append(text + ".")
    return out


# ------------------------------------------------------------------------------------------
# figures


def _figure_groups(a: Analysis) -> list[tuple[str, list[Group], list[Comparison]]]:
    """(setting label, its groups, its comparisons), in a stable order."""
    out: dict[str, tuple[str, list[Group], list[Comparison]]] = {}
    for g in _sorted_groups(a):
        key = _label(g.setting)
        out.setdefault(key, (key, [], []))[1].append(g)
    for c in a.comparisons:
        out[_label(c.setting)][2].append(c)
    return list(out.values())


def _plot(a: Analysis, out_dir: Path, seed: int, resamples: int) -> list[tuple[str, str]]:
    """Write the PNGs; returns ``(file name, caption)`` pairs. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # headless, and never steal a GUI backend from the caller
    import matplotlib.pyplot as plt

    figures: list[tuple[str, str]] = []
    settings = _figure_groups(a)
    colours = {"win": "tab:green", "loss": "tab:red", "tie": "tab:gray", "too few pairs": "lightgray"}

    def name(kind: str, i: int) -> str:
        return f"{kind}.png" if len(settings) == 1 else f"{kind}-{i + 1}.png"

    for i, (where, groups, comps) in enumerate(settings):
        verdicts = {json.dumps(c.treatment, sort_keys=True, default=str): c.verdict for c in comps}
        # per-method bars with 95% bootstrap intervals of the mean
        longest = max(len(_label(g.treatment)) for g in groups)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(groups) + 2), 3 + 0.07 * longest))
        means = [g.mean for g in groups]
        cis = [bootstrap_mean_ci(list(g.values.values()), resamples=resamples, seed=seed) for g in groups]
        err = np.array(
            [
                [m - lo for m, (lo, _) in zip(means, cis, strict=True)],
                [hi - m for m, (_, hi) in zip(means, cis, strict=True)],
            ]
        )
        bar_colours = [
            colours.get(verdicts.get(json.dumps(g.treatment, sort_keys=True, default=str), ""), "tab:blue")
            for g in groups
        ]
        ax.bar(range(len(groups)), means, yerr=err, color=bar_colours, capsize=3)
        ax.set_xticks(range(len(groups)), [_label(g.treatment) for g in groups], rotation=45, ha="right")
        ax.set_ylabel(a.metric_label)
        lo = min(lo for lo, _ in cis)
        hi = max(hi for _, hi in cis)
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{where}\nblue: baseline; green/red/gray: win/loss/tie vs {a.baseline}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / name("bars", i), dpi=120)
        plt.close(fig)
        figures.append((name("bars", i), f"{where}: mean {a.metric} per treatment, 95% bootstrap intervals"))

        # alpha curves: one line per treatment without alpha; the baseline as a band
        alpha_groups = [g for g in groups if _is_number(g.treatment.get("alpha"))]
        if len({g.treatment["alpha"] for g in alpha_groups}) >= 2:
            fig, ax = plt.subplots(figsize=(5.5, 4))
            lines: dict[str, list[Group]] = {}
            for g in alpha_groups:
                rest = {k: v for k, v in g.treatment.items() if k != "alpha"}
                lines.setdefault(_label(rest), []).append(g)
            for lbl, members in lines.items():
                members.sort(key=lambda g: float(g.treatment["alpha"]))
                xs = [float(g.treatment["alpha"]) for g in members]
                ys = [g.mean for g in members]
                ci = [
                    bootstrap_mean_ci(list(g.values.values()), resamples=resamples, seed=seed)
                    for g in members
                ]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[
                        [y - c[0] for y, c in zip(ys, ci, strict=True)],
                        [c[1] - y for y, c in zip(ys, ci, strict=True)],
                    ],
                    marker="o",
                    capsize=3,
                    label=lbl,
                )
            for g in groups:
                if comps and g.treatment == comps[0].baseline:
                    ax.axhline(g.mean, color="k", ls="--", lw=1, label=f"{_label(g.treatment)} (baseline)")
            xs_all = [float(g.treatment["alpha"]) for g in alpha_groups]
            if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
                ax.set_xscale("log")
            ax.set_xlabel("alpha (weight of the feature term)")
            ax.set_ylabel(a.metric_label)
            ax.set_title(where, fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / name("alpha", i), dpi=120)
            plt.close(fig)
            figures.append((name("alpha", i), f"{where}: {a.metric} against alpha (95% bootstrap intervals)"))

        # loss-term curves: mean over replicates of every logged term
        curves, logged = _loss_curves(groups)
        runs = sum(len(g.run_dirs) for g in groups)
        if curves:
            fig = _loss_curve_figure(plt, curves, where)
            fig.savefig(out_dir / name("loss_curves", i), dpi=120)
            plt.close(fig)
            over = (
                "replicates" if logged == runs else f"the {logged} of {runs} runs whose log.jsonl is at hand"
            )
            figures.append(
                (name("loss_curves", i), f"{where}: each loss term over training, mean over {over}")
            )
        elif runs:
            note = (
                f"{where or 'all runs'}: no loss-term curves: none of its {runs} runs' log.jsonl is at hand "
                "(in the sweep's runs/ folder, next to results.jsonl or at each row's output_dir)"
            )
            if note not in a.notes:  # the report's notes (a second report from one analysis: once)
                a.notes.append(note)

    # layer ablation: difference to the baseline per layer map (rows: everything else)
    cells: dict[tuple[str, str], Comparison] = {}
    for c in a.comparisons:
        layers = c.treatment.get("layers", c.setting.get("layers"))
        if layers is None:
            continue
        row = _label({k: v for k, v in c.treatment.items() if k != "layers"})
        rest = {k: v for k, v in c.setting.items() if k != "layers"}
        if len(settings) > 1 and rest:
            row += f" | {_label(rest)}"
        cells[(row, _cell(layers))] = c
    if cells:
        rows = sorted({r for r, _ in cells})
        cols = sorted({c for _, c in cells})
        most = max(c.pairs for c in cells.values())
        grid = np.array(
            [[cells[(r, c)].mean_diff if (r, c) in cells else np.nan for c in cols] for r in rows]
        )
        fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(cols) + 3), max(2.5, 0.45 * len(rows) + 1.5)))
        bound = float(np.nanmax(np.abs(grid))) or 1.0
        # blue where the method is better than the baseline, whichever way the metric points
        im = ax.imshow(
            grid, cmap="RdBu_r" if a.lower_is_better else "RdBu", vmin=-bound, vmax=bound, aspect="auto"
        )
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        for (r, c), v in np.ndenumerate(grid):
            if math.isfinite(v):
                text, bold = _layer_cell_text(cells[(rows[r], cols[c])], most)
                dark = abs(v) > 0.6 * bound
                ax.text(
                    c,
                    r,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if dark else "k",
                    fontweight="bold" if bold else "normal",
                )
        fig.colorbar(im, ax=ax, label=f"Δ {a.metric} vs {a.baseline} ({a.unit})")
        ax.set_xlabel("layer map")
        ax.set_title(f"bold: win or loss (Holm); n: pairs, where fewer than {most}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "layers.png", dpi=120, bbox_inches="tight")  # keeps the colour bar label whole
        plt.close(fig)
        figures.append(("layers.png", f"layer ablation: mean difference to {a.baseline} ({a.unit})"))
    return figures


def _layer_cell_text(c: Comparison, most: int) -> tuple[str, bool]:
    """A layer-ablation heatmap cell: the mean difference, the pairs when fewer than the grid's most
    (an interim cell), and whether to set it bold (a win or a loss after Holm)."""
    text = _num(c.mean_diff, True, c.unit) + (f"\nn={c.pairs}" if c.pairs < most else "")
    return text, c.verdict in ("win", "loss")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _loss_curve_figure(
    plt: Any, curves: dict[str, dict[str, tuple[list[int], list[float]]]], title: str
) -> Any:
    """One panel per loss term; each treatment keeps one colour in every panel, and one legend
    below the panels names every treatment (a term only some treatments log, e.g. ``cka``, must
    not hide the others or shift their colours)."""
    from matplotlib.lines import Line2D

    terms = sorted({t for per in curves.values() for t in per})
    # tab10 while it lasts, then tab20; past 20 treatments the line style changes too
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    style = {
        lbl: {"color": palette[k % len(palette)], "linestyle": ("-", "--", ":", "-.")[k // len(palette) % 4]}
        for k, lbl in enumerate(curves)
    }
    fig, axes = plt.subplots(
        1, len(terms), figsize=(4 * len(terms), 3.8), squeeze=False, layout="constrained"
    )
    for ax, term in zip(axes[0], terms, strict=True):
        for lbl, per in curves.items():
            if term in per:
                steps, values = per[term]
                ax.plot(steps, values, label=lbl, **style[lbl])
        ax.set_title(f"loss/{term}", fontsize=9)
        ax.set_xlabel("step")
    handles = [Line2D([], [], label=lbl, **style[lbl]) for lbl in curves]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def _loss_curves(groups: list[Group]) -> tuple[dict[str, dict[str, tuple[list[int], list[float]]]], int]:
    """treatment label -> term -> (steps, mean over the runs that logged that step); and how many
    runs had a log to read (results copied from another machine come without theirs)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    logged = 0
    for g in groups:
        per_term: dict[str, dict[int, list[float]]] = {}
        for run_dir in g.run_dirs:
            log = run_dir / "log.jsonl"
            if not log.is_file():
                continue
            logged += 1
            for line in log.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "step" not in entry:
                    continue
                for k, v in entry.items():
                    if k.startswith("loss/") and isinstance(v, int | float) and math.isfinite(v):
                        per_term.setdefault(k[5:], {}).setdefault(int(entry["step"]), []).append(float(v))
        if per_term:
            out[_label(g.treatment)] = {
                term: (sorted(steps), [float(np.mean(steps[s])) for s in sorted(steps)])
                for term, steps in per_term.items()
            }
    return out, logged


# ------------------------------------------------------------------------------------------
# the report


def write_report(
    a: Analysis,
    out_dir: str | Path,
    *,
    source: str = "",
    selection: str = "",
    seed: int = 0,
    resamples: int = 10_000,
) -> dict[str, Path]:
    """Write ``report.md``, ``tables.tex``, ``summary.json`` and PNG figures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        figures = _plot(a, out, seed, resamples)
        figure_note = ""
    except ImportError:
        figures, figure_note = (
            [],
            "matplotlib is not installed (`pip install geodistill[plots]`): no figures.",
        )

    g_header, g_rows = _group_table(a)
    c_header, c_rows = _comparison_table(a)
    reps = ", ".join(a.columns["replicate"]) or "(none)"
    settings = ", ".join(a.columns["setting"]) or "(none)"
    md = [
        f"# Sweep report: {a.metric}",
        "",
        f"Source: `{source}`"
        + (f" (only the rows with {selection})" if selection else "")
        + f"; {a.rows_used} finished runs used"
        + (f", {len(a.rows_failed)} failed run(s) left out" if a.rows_failed else "")
        + f". Metric `{a.metric}` "
        + (
            "in percent"
            if a.percent
            else "in its own units ("
            + (
                "a measure against the teacher, from `geodistill geometry`"
                if _teacher_measure(a.metric)
                else "its values are not all in [0, 1], so not a fraction"
            )
            + ")"
        )
        + f"; baseline `{a.baseline}`.",
        "",
        f"Runs are paired on ({reps}) within each setting ({settings}): the same seed means the same "
        f"initialisation, data order and dropout for every method. Differences are in {a.unit} (method "
        f"minus baseline) with 95% percentile bootstrap intervals ({resamples:,} resamples of the paired "
        "differences). p-values are two-sided, Holm-corrected over the comparisons of each setting. "
        f"**win**: interval {'below 0 (lower is better for this metric)' if a.lower_is_better else 'above 0'} "
        f"and Holm-adjusted t-test p < {a.alpha:g}; **loss**: the mirror "
        "image; otherwise **tie**, with the minimum detectable effect (MDE): the true difference the "
        f"paired t-test would find with {a.power:.0%} power at these many pairs and this spread.",
        "",
        "## Verdicts",
        "",
        *(_summary_sentences(a) or ["No comparisons (see the notes)."]),
        "",
        *_verdict_lines(a),
        "## Results per group",
        "",
        _markdown(g_header, g_rows),
        "",
        f"## Differences to {a.baseline}",
        "",
        _markdown(c_header, c_rows) if c_rows else "No comparisons.",
        "",
        "## Statistical power",
        "",
        f"MDE: the smallest true mean difference a two-sided paired t-test (level {a.alpha:g}) detects "
        f"with {a.power:.0%} power, from the observed std of the paired differences and the number of "
        f"pairs (noncentral t). Seeds needed: pairs for {a.power:.0%} power at a {a.delta:g}-{a.unit[:-1]} "
        "difference with that std. Holm: the same at level alpha / m for the m comparisons of the "
        "setting, the level the smallest of their p-values must beat for a win (a conservative bound: "
        "the others face alpha / (m - 1), ..., alpha).",
        "",
        _markdown(
            [
                *a.columns["setting"],
                *a.columns["treatment"],
                "pairs",
                "std of differences",
                "MDE",
                "MDE (Holm)",
                f"seeds for {a.delta:g} {a.unit}",
                f"seeds for {a.delta:g} {a.unit} (Holm)",
            ],
            [
                [
                    *_key_cells(a, c.setting, c.treatment),
                    str(c.pairs),
                    _num(c.sd_diff, unit=a.unit),
                    _num(c.mde, unit=a.unit),
                    _num(c.mde_holm, unit=a.unit),
                    _seeds(c.seeds_needed),
                    _seeds(c.seeds_needed_holm),
                ]
                for c in a.comparisons
            ],
        )
        if a.comparisons
        else "No comparisons.",
        "",
        "## Figures",
        "",
        *([f"![{cap}]({name})\n\n*{cap}*\n" for name, cap in figures] or [figure_note or "No figures."]),
    ]
    notes = list(a.notes)
    if a.rows_failed:
        notes.append("Failed runs (error rows, not used): " + ", ".join(a.rows_failed) + ".")
    unpaired = [c for c in a.comparisons if c.unpaired]
    for c in unpaired:
        own = c.unpaired - c.unpaired_baseline
        where = f" ({_label(c.setting)})" if c.setting else ""
        notes.append(
            f"{_label(c.treatment)} vs {_label(c.baseline)}{where}: {c.unpaired} run(s) without a partner "
            f"left out ({own} of {_label(c.treatment)}, {c.unpaired_baseline} of the baseline); "
            "its Δ is over the pairs only, so not the difference of the two means in the table of groups."
        )
    if any(0 < c.pairs <= 5 for c in a.comparisons):
        notes.append(
            "With 5 or fewer pairs the Wilcoxon test cannot reach p < 0.05 (its smallest p is 2/2^n)."
        )
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    paths = {"markdown": out / "report.md", "latex": out / "tables.tex", "json": out / "summary.json"}
    paths["markdown"].write_text("\n".join(md) + "\n")

    tex_c_header, tex_c_rows = _comparison_table(a, latex=True)
    paths["latex"].write_text(
        "% needs \\usepackage{booktabs}\n"
        + _latex(
            g_header,
            g_rows,
            f"{a.metric_label}, mean ± std over replicates.",
            "tab:groups",
        )
        + "\n\n"
        + _latex(
            tex_c_header,
            tex_c_rows,
            f"Difference to {a.baseline} in {a.unit}, 95% bootstrap CI, Holm-corrected paired tests.",
            "tab:comparisons",
        )
        + "\n"
    )
    summary = {"source": source, "selection": selection or None, **_summary(a)}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for name, _ in figures:
        paths[name] = out / name
    return paths


def _finite(v: float) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _summary(a: Analysis) -> dict[str, Any]:
    return {
        "metric": a.metric,
        "unit": "percent" if a.percent else "metric",
        "baseline": a.baseline,
        "columns": a.columns,
        "groups": [
            {**g.setting, **g.treatment, "n": g.n, "mean": g.mean, "std": _finite(g.std)}
            for g in _sorted_groups(a)
        ],
        "comparisons": [
            {
                "setting": c.setting,
                "treatment": c.treatment,
                "baseline": c.baseline,
                "pairs": c.pairs,
                "unpaired": c.unpaired,
                "unpaired_baseline": c.unpaired_baseline,
                "mean_diff": c.mean_diff,
                "ci": [_finite(c.ci_low), _finite(c.ci_high)],
                "sd_diff": _finite(c.sd_diff),
                "p_t": _finite(c.p_t),
                "p_wilcoxon": _finite(c.p_wilcoxon),
                "p_t_holm": _finite(c.p_t_holm),
                "p_wilcoxon_holm": _finite(c.p_wilcoxon_holm),
                "mde": _finite(c.mde),
                "seeds_needed": c.seeds_needed,
                "mde_holm": _finite(c.mde_holm),
                "seeds_needed_holm": c.seeds_needed_holm,
                "verdict": c.verdict,
                "geometry": c.geometry,
            }
            for c in a.comparisons
        ],
        "failed_runs": a.rows_failed,
        "notes": a.notes,
    }


def merge_results(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str], bool]:
    """The rows of several results files as one table, to pair runs across sweeps on the same
    replicates (e.g. a multi-layer cell against the last layer's, or CLS against every token).

    Each row keeps its sweep's name in ``sweep`` (the file's folder name for a row without one).
    A run that several files hold (the same config hash: a KD row one sweep reused from another, or
    a copied results file) counts once, from the first file that holds it. Returns the rows, notes
    for the report, and whether they come from more than one sweep (then ``sweep`` is a treatment
    column: the same method in two sweeps is two treatments, e.g.
    ``--baseline kd+procrustes@sweep=tokens_r8``).
    """
    from geodistill.experiments import read_rows

    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}  # config hash of a finished run -> the file it was taken from
    dropped: dict[tuple[str, str], int] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} not found")
        for row in read_rows(path):
            row = {**row, "sweep": row.get("sweep") or path.parent.name}
            # resolve where its run's logs are now (loss curves), relative to its own file
            row["output_dir"] = str(_run_dir(row, path.parent))
            digest = str(row.get("config_hash"))
            if row.get("status", "ok") == "ok" and row.get("config_hash") is not None:
                if digest in seen:
                    key = (str(path), seen[digest])
                    dropped[key] = dropped.get(key, 0) + 1
                    continue
                seen[digest] = str(path)
            rows.append(row)
    notes = [
        f"{n} finished run(s) of {later} are also in {first} (same config hash) and count once, from {first}."
        for (later, first), n in dropped.items()
    ]
    return rows, notes, len({r["sweep"] for r in rows}) > 1


def report(
    results_path: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    baseline: str = "kd",
    metric: str | None = None,
    seed: int = 0,
    resamples: int = 10_000,
    where: dict[str, list[str]] | None = None,
) -> tuple[Analysis, dict[str, Path]]:
    """Read a results.jsonl, analyse it and write the report (default: ``<its dir>/report``).

    Several results files are analysed as one table (:func:`merge_results`): runs of different
    sweeps pair on their common replicates, and the sweep's name tells their treatments apart.
    ``where`` keeps only the rows with the given column values (see :func:`select_rows`), e.g. the
    data splits that did not choose a hyper-parameter; the report's source line names the filter.
    """
    paths = [Path(results_path)] if isinstance(results_path, str | Path) else [Path(p) for p in results_path]
    if not paths:
        raise StatsError("no results file given")
    rows, merge_notes, several = merge_results(paths)
    if where:
        rows = select_rows(rows, where)
    a = analyse(
        rows,
        metric=metric,
        baseline=baseline,
        seed=seed,
        resamples=resamples,
        treatment_extra=("sweep",) if several else (),
    )
    a.notes += merge_notes
    out = Path(out_dir) if out_dir is not None else paths[0].parent / "report"
    return a, write_report(
        a,
        out,
        source=", ".join(map(str, paths)),
        selection=describe_where(where) if where else "",
        seed=seed,
        resamples=resamples,
    )


def write_geometry_summary(
    rows: list[dict[str, Any]], out_dir: Path, *, split: str, metric: str | None = None
) -> list[Path]:
    """``geometry.md`` (per treatment: runs, mean ``metric``, each measure's mean and range, and
    the correlation of CKA with ``metric`` across its runs) and ``geometry.png`` (the Procrustes
    distance against CKA, and ``metric`` against CKA, one point per student). Rows as written by
    :func:`geodistill.evaluate_model.student_geometry`; ``metric`` defaults to the rows' test
    metric. Returns the written paths."""
    if not rows:
        raise StatsError("no measured students to summarise")
    metric = _resolve_metric(rows, metric)
    cols = _columns(rows)
    # a column with one value in every row (the task of a one-task study) says nothing in a label
    keys = [
        c
        for c in cols["setting"] + cols["treatment"]
        if c == "method" or len({_cell(r.get(c)) for r in rows}) > 1
    ]
    # the same treatment from two sweeps (two cells that share a method name) stays two groups
    sweeps_of: dict[str, set[Any]] = {}
    for r in rows:
        sweeps_of.setdefault(_label({k: r.get(k) for k in keys}), set()).add(r.get("sweep"))
    if any(len(s) > 1 for s in sweeps_of.values()):
        keys = ["sweep", *keys]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_label({k: r.get(k) for k in keys}) or "all runs", []).append(r)
    names = [f"{split}.{m}" for m in TEACHER_MEASURES]
    cka_name, procrustes_name = names[0], names[1]
    settings = rows[0].get("geometry", {})
    table = []
    for label, members in sorted(groups.items()):
        values = {m: np.array([float(r[m]) for r in members]) for m in names}
        acc = np.array([float(r.get(metric, math.nan)) for r in members])
        ok = np.isfinite(acc)
        r_text = "n/a"
        if ok.sum() >= 3 and acc[ok].std() > 0 and values[cka_name][ok].std() > 0:
            r_text = f"{np.corrcoef(values[cka_name][ok], acc[ok])[0, 1]:+.2f}"
        table.append(
            [label, str(len(members)), f"{np.nanmean(acc):.4f}" if ok.any() else "n/a"]
            + [f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]" for v in values.values()]
            + [r_text]
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "geometry.md"]
    try:
        paths.append(_geometry_figure(groups, out_dir, cka_name, procrustes_name, metric))
        figure = f"![students against their teachers]({paths[1].name})"
    except ImportError:
        figure = "matplotlib is not installed (`pip install geodistill[plots]`): no figure."
    text = [
        "# Trained students against their teachers",
        "",
        f"Each student's hidden state {settings.get('student_layer')} against its teacher's "
        f"{settings.get('teacher_layer')} (-1 = last) on a seeded stratified sample of "
        f"{settings.get('max_examples')} examples of {split} (the same for every student of a data "
        f"split), pooling {settings.get('pooling')!r}: CKA (a similarity: 1 = the same "
        "geometry up to scale), the Procrustes distance 2 - 2||X^T Y||_*, its angle (radians) and "
        "the Gram distance (0 = the same geometry). Mean [min, max] over the runs; r: Pearson "
        f"correlation of CKA with {metric} over the group's runs. Paired comparisons: "
        f"`geodistill report {GEOMETRY_NAME} --metric {procrustes_name}` (or another measure).",
        "",
        _markdown(
            ["group", "runs", metric]
            + [m.partition(".")[2].removeprefix("teacher_") for m in names]
            + ["r(CKA, metric)"],
            table,
        ),
        "",
        figure,
    ]
    paths[0].write_text("\n".join(text) + "\n")
    return paths


def _geometry_figure(
    groups: dict[str, list[dict[str, Any]]], out_dir: Path, cka_name: str, procrustes_name: str, metric: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for label, members in sorted(groups.items()):
        cka = [float(r[cka_name]) for r in members]
        (points,) = left.plot(
            cka,
            [float(r[procrustes_name]) for r in members],
            "o",
            alpha=0.75,
            label=f"{label} ({len(members)})",
        )
        right.plot(
            cka, [float(r.get(metric, math.nan)) for r in members], "o", alpha=0.75, color=points.get_color()
        )
    left.set_xlabel("CKA with the teacher (higher: closer)")
    left.set_ylabel("Procrustes distance to the teacher (lower: closer)")
    left.set_title("two measures of the same students")
    right.set_xlabel("CKA with the teacher")
    right.set_ylabel(metric)
    right.set_title(f"{metric} against CKA")
    fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    path = out_dir / "geometry.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
