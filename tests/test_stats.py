"""Sweep statistics: Holm by hand, MDE against simulation, verdicts on synthetic effects, the report.

Synthetic results mimic results.jsonl rows: a seed effect shared by every method (what pairing
removes) plus a known method effect and small noise.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from geodistill.experiments import append_row
from geodistill.stats import (
    PairingError,
    StatsError,
    _p_is,
    analyse,
    bootstrap_mean_ci,
    holm,
    minimum_detectable_effect,
    paired_power,
    report,
    seeds_for_power,
    write_report,
)

AXES = {"treatment": ["method", "alpha"], "setting": ["task"], "replicate": ["seed", "split_seed"]}


def rows_for(
    effects: dict[tuple[str, float | None], float],
    seeds: range | list[int] = range(20),
    noise: float = 0.003,
    rng_seed: int = 0,
    task: str = "rte",
    seed_spread: float = 0.02,
) -> list[dict[str, Any]]:
    """One row per (method, alpha) and seed: accuracy = 0.7 + seed effect + method effect + noise
    (fractions: an effect of 0.01 is one point)."""
    rng = np.random.default_rng(rng_seed)
    seed_effect = {s: rng.normal(0, seed_spread) for s in seeds}
    rows = []
    for (method, alpha), effect in effects.items():
        for s in seeds:
            acc = 0.7 + seed_effect[s] + effect + rng.normal(0, noise)
            rows.append(
                {
                    "run_id": f"{method}-{alpha}-{s}",
                    "config_hash": f"{method}|{alpha}|{s}|{task}",
                    "status": "ok",
                    "method": method,
                    "alpha": alpha,
                    "task": task,
                    "seed": s,
                    "split_seed": 0,
                    "axes": AXES,
                    "loss_terms": ["kd", "procrustes"] if "procrustes" in method else ["kd"],
                    "metric": "accuracy",
                    "test.accuracy": acc,
                    "dev.accuracy": acc + 0.01,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------
# the statistics


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> raised to 0.06 (monotone)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    out = holm([0.02, math.nan, 0.01])  # NaN (no test) is not part of the family
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert holm([]).shape == (0,)


def test_holm_agrees_with_the_definition_on_random_p_values() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, size=7)
    order = np.argsort(p)
    m = len(p)
    expected = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        expected[i] = running
    np.testing.assert_allclose(holm(p), expected)


@pytest.mark.parametrize(("n", "sd"), [(5, 1.0), (10, 0.7), (20, 2.0)])
def test_mde_has_the_stated_power_in_simulation(n: int, sd: float) -> None:
    mde = minimum_detectable_effect(n, sd)
    assert paired_power(n, sd, mde) == pytest.approx(0.8, abs=1e-6)
    rng = np.random.default_rng(n)
    diffs = rng.normal(mde, sd, size=(20_000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.015)  # binomial sd ~0.003


def test_mde_approaches_the_normal_formula_for_many_pairs() -> None:
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert minimum_detectable_effect(2000, 1.5) == pytest.approx(z * 1.5 / math.sqrt(2000), rel=2e-3)
    assert minimum_detectable_effect(1, 1.0) != minimum_detectable_effect(1, 1.0)  # NaN: no test
    assert math.isnan(minimum_detectable_effect(10, 0.0))  # no spread: the t-test is undefined


def test_seeds_for_power() -> None:
    # Cohen's d = 0.5 with a paired t-test needs 34 pairs for 80% power (G*Power: 34)
    assert seeds_for_power(1.0, 0.5) == 34
    for sd in (0.3, 1.0, 2.5):
        n = seeds_for_power(sd, 0.5)
        assert paired_power(n, sd, 0.5) >= 0.8 and (n == 2 or paired_power(n - 1, sd, 0.5) < 0.8)
    assert seeds_for_power(0.0, 0.5) is None  # a spread never seen says nothing about power
    assert seeds_for_power(100.0, 0.5, max_n=1000) is None


def test_bootstrap_interval_is_seeded_and_covers_the_mean() -> None:
    x = np.random.default_rng(3).normal(1.0, 1.0, size=30)
    lo, hi = bootstrap_mean_ci(x, seed=5)
    assert (lo, hi) == bootstrap_mean_ci(x, seed=5)
    assert lo < x.mean() < hi
    se = x.std(ddof=1) / math.sqrt(len(x))  # close to the normal interval for n = 30
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


# ------------------------------------------------------------------------------------------
# comparisons and verdicts


def test_known_effects_give_win_tie_and_loss() -> None:
    rows = rows_for(
        {
            ("kd", None): 0.0,
            ("kd+procrustes", 1): 0.01,  # +1 point
            ("kd+gram", 1): 0.0,  # identical in expectation
            ("kd+cka", 1): -0.01,  # -1 point
        }
    )
    a = analyse(rows, baseline="kd", resamples=2000)
    assert a.metric == "test.accuracy"
    by = {c.treatment["method"]: c for c in a.comparisons}
    assert {k: c.verdict for k, c in by.items()} == {
        "kd+procrustes": "win",
        "kd+gram": "tie",
        "kd+cka": "loss",
    }
    win = by["kd+procrustes"]
    assert win.pairs == 20 and win.unpaired == 0
    assert win.mean_diff == pytest.approx(1.0, abs=0.25)  # points
    assert win.ci_low > 0 and win.p_t_holm < 0.05 and win.p_wilcoxon_holm < 0.05
    assert by["kd+gram"].verdict_text().startswith("tie (no detectable difference; MDE = ")
    # paired: the shared seed effect (sd 2 points) does not enter; the MDE reflects the noise only
    assert by["kd+gram"].mde < 0.5
    # at Holm's strictest level (alpha / 3 here) the same pairs detect less: a larger MDE, more seeds
    for c in by.values():
        assert c.mde_holm == pytest.approx(
            minimum_detectable_effect(c.pairs, c.sd_diff, alpha=0.05 / 3), rel=1e-9
        )
        assert c.mde_holm > c.mde * 1.1 and c.seeds_needed_holm > c.seeds_needed
    # the reported p-values are scipy's paired tests, Holm-corrected over the three comparisons
    base = [r["test.accuracy"] * 100 for r in rows if r["method"] == "kd"]
    p_raw = {
        m: sps.ttest_rel([r["test.accuracy"] * 100 for r in rows if r["method"] == m], base).pvalue
        for m in by
    }
    for m, c in by.items():
        assert c.p_t == pytest.approx(p_raw[m], rel=1e-6)
    np.testing.assert_allclose([by[m].p_t_holm for m in by], holm([p_raw[m] for m in by]))
    groups = {g.treatment["method"]: g for g in a.groups}
    assert groups["kd"].n == 20 and groups["kd"].mean == pytest.approx(70, abs=1.5)


def test_differences_without_spread_use_the_exact_sign_flip_test() -> None:
    """The same gain on every pair (here 4 of 1288 test examples, equal only to float rounding)
    has no t statistic; the exact sign-flip test (p = 2 / 2^n) decides: 2 pairs are no evidence,
    12 are."""
    from geodistill.stats import _paired_tests

    counts = np.array([890, 895, 930, 905, 918, 921, 899, 927, 915, 910, 922, 917])
    diffs = (counts + 4) / 1288 * 100 - counts / 1288 * 100  # as the report computes them
    assert np.ptp(diffs[:2]) > 0  # not bit-equal
    assert _paired_tests(diffs[:2]) == (0.5, 0.5)
    p_t, p_w = _paired_tests(diffs)
    assert p_t == 2.0**-11 and p_w < 0.001
    assert _paired_tests(diffs - diffs)[0] == 1.0
    rows = rows_for({("kd", None): 0.0}, seeds=[0, 1])
    gain = [dict(r, method="kd+gram", alpha=1, config_hash=r["config_hash"] + "x") for r in rows]
    for r in gain:
        r["test.accuracy"] = r["test.accuracy"] + 4 / 1288
    (c,) = analyse(rows + gain, resamples=500).comparisons
    assert c.p_t == 0.5 and c.verdict == "tie"
    # and no spread for the MDE either: not an MDE of 1e-14 points from the rounding, nor a seed count
    assert c.sd_diff == 0 and math.isnan(c.mde) and c.seeds_needed is None and c.seeds_needed_holm is None
    assert c.verdict_text() == "tie (the paired differences do not vary: no test, MDE undefined)"


def test_holm_mde_counts_only_the_comparisons_with_a_test() -> None:
    """A comparison with one pair has no p-value and is not in Holm's family (holm() leaves it
    out), so it must not make the MDE at Holm's level stricter: one tested comparison is a family
    of one, and its Holm MDE is its plain MDE."""
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.01}, seeds=range(8))
    one = rows_for({("kd+gram", 1): 0.01}, seeds=[0])
    by = {c.treatment["method"]: c for c in analyse(rows + one, resamples=200).comparisons}
    assert by["kd+gram"].verdict == "too few pairs" and math.isnan(by["kd+gram"].p_t)
    p = by["kd+procrustes"]
    assert p.p_t_holm == p.p_t  # a family of one
    assert p.mde_holm == pytest.approx(p.mde) and p.seeds_needed_holm == p.seeds_needed


def test_identical_runs_tie_with_zero_difference() -> None:
    rows = rows_for({("kd", None): 0.0})
    twin = [dict(r, method="kd+procrustes", alpha=1, config_hash=r["config_hash"] + "x") for r in rows]
    (c,) = analyse(rows + twin, resamples=500).comparisons
    assert c.verdict == "tie" and c.mean_diff == 0 and c.p_t == 1.0 and c.p_wilcoxon == 1.0
    # no spread: the t-test is undefined, so no power and no MDE are claimed (not "MDE = 0")
    assert c.sd_diff == 0 and math.isnan(c.mde) and c.seeds_needed is None
    assert c.verdict_text() == "tie (the paired differences do not vary: no test, MDE undefined)"
    # a difference the t-test alone could detect but Holm's correction leaves insignificant is not
    # called "no detectable difference"
    from dataclasses import replace

    big = replace(c, mean_diff=-3.71, mde=0.99, p_t_holm=0.06, sd_diff=1.0)
    assert big.verdict_text() == "tie (not significant after Holm correction; MDE = 0.99 points)"
    assert (
        replace(c, mean_diff=0.5, mde=0.99, sd_diff=1.0)
        .verdict_text()
        .startswith("tie (no detectable difference")
    )


def test_a_metric_that_is_not_a_fraction_keeps_its_units(tmp_path: Path) -> None:
    """A log-probability (negative, in nats) is neither scaled to percent nor called "points"."""
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.01})
    for r in rows:
        r["test.answer_logprob"] = -3.0 + 10 * (r["test.accuracy"] - 0.7)  # +0.1 nats for +1 point
    a = analyse(rows, metric="test.answer_logprob", resamples=500)
    (c,) = a.comparisons
    assert not a.percent and a.unit == "units" and c.unit == "units"
    assert c.mean_diff == pytest.approx(0.1, abs=0.03)  # nats, not 100 x nats
    kd = next(g for g in a.groups if g.treatment["method"] == "kd")
    assert kd.mean == pytest.approx(np.mean([r["test.answer_logprob"] for r in rows if r["method"] == "kd"]))
    assert c.verdict == "win" and "points" not in c.verdict_text()
    assert analyse(rows, resamples=100).percent  # accuracy: a fraction, in percent
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, paths = report(path, tmp_path / "report", metric="test.answer_logprob", resamples=200)
    md = paths["markdown"].read_text()
    assert "in its own units" in md and "Δ (units)" in md and "points" not in md and "(%)" not in md


def test_small_differences_in_a_metrics_own_units_are_printed(tmp_path: Path) -> None:
    """A CKA gain of 0.0024 is real (a metric in [0, 1], not percent): the report's tables and
    verdicts must not round it, its interval or its MDE to 0.00."""
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.0})
    for r in rows:
        r["test.teacher_cka"] = 0.6 + (r["test.accuracy"] - 0.7) + (0.0024 if r["method"] != "kd" else 0.0)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, paths = report(path, tmp_path / "report", metric="test.teacher_cka", resamples=200)
    (c,) = a.comparisons
    assert c.mean_diff == pytest.approx(0.0024, abs=0.002)
    md = paths["markdown"].read_text()
    assert f"{c.mean_diff:+.4f} units (95% CI {c.ci_low:+.4f} to {c.ci_high:+.4f})" in md
    assert f"| {c.sd_diff:.4f} | {c.mde:.4f} |" in md  # the power table
    assert "+0.00 " not in md and "0.00 |" not in md
    assert json.loads(paths["json"].read_text())["unit"] == "metric"


def test_distances_to_the_teacher_are_better_lower_and_never_percent(tmp_path: Path) -> None:
    """`geodistill geometry`'s measures: a smaller Procrustes distance to the teacher is the win
    (its interval below 0), a larger one the loss; CKA keeps higher-is-better; both in their own
    units although their values lie in [0, 1]; the summary table and figure are written."""
    from geodistill.similarity import MEASURES
    from geodistill.stats import TEACHER_MEASURES, lower_is_better, write_geometry_summary

    assert set(TEACHER_MEASURES) == {f"teacher_{m}" for m in MEASURES}
    assert [m for m in TEACHER_MEASURES if lower_is_better(f"test.{m}")] == [
        "teacher_procrustes",
        "teacher_procrustes_angular",
        "teacher_gram",
    ]
    assert not lower_is_better("test.accuracy")
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.01, ("kd+cka", 1): -0.01})
    for r in rows:  # closer to the teacher where accuracy is higher: distance falls, CKA rises
        r["test.teacher_procrustes"] = 1.0 - 5 * (r["test.accuracy"] - 0.7)
        r["test.teacher_cka"] = 0.4 + 5 * (r["test.accuracy"] - 0.7)
        r["test.teacher_procrustes_angular"] = 1.0
        r["test.teacher_gram"] = 0.3
        r["geometry"] = {
            "split": "test",
            "pooling": "tokens",
            "max_examples": 256,
            "student_layer": -1,
            "teacher_layer": -1,
        }
    a = analyse(rows, metric="test.teacher_procrustes", resamples=500)
    by = {c.treatment["method"]: c for c in a.comparisons}
    assert a.lower_is_better and not a.percent and by["kd+procrustes"].unit == "units"
    assert by["kd+procrustes"].mean_diff == pytest.approx(-0.05, abs=0.01)  # units, not x 100
    assert by["kd+procrustes"].ci_high < 0 and by["kd+procrustes"].verdict == "win"
    assert by["kd+cka"].ci_low > 0 and by["kd+cka"].verdict == "loss"
    a = analyse(rows, metric="test.teacher_cka", resamples=500)
    assert not a.lower_is_better and not a.percent
    assert not any("also carry measures" in n for n in a.notes)
    (note,) = [n for n in analyse(rows, resamples=50).notes if "also carry measures" in n]
    assert (
        note.startswith(f"{len(rows)} of the {len(rows)} runs")
        and "--metric test.teacher_procrustes`" in note
    )
    assert {c.treatment["method"]: c.verdict for c in a.comparisons} == {
        "kd+procrustes": "win",
        "kd+cka": "loss",
    }
    paths = write_geometry_summary(rows, tmp_path, split="test")
    md = paths[0].read_text()
    assert "| kd | 20 |" in md and "kd+procrustes (alpha=1)" in md  # one task: not in the labels
    assert "r(CKA, metric)" in md and "test.accuracy" in md and "seeded stratified sample of 256" in md
    assert "+1.00 |" in md  # CKA is an exact linear function of accuracy here
    assert paths[1].name == "geometry.png" and paths[1].stat().st_size > 1000
    # the same method measured from two sweeps' runs: two groups, named by their sweep
    for r in rows:
        r["sweep"] = "a"
    other = [{**r, "sweep": "b", "test.teacher_gram": 0.9} for r in rows if r["method"] == "kd"]
    md = write_geometry_summary(rows + other, tmp_path / "two", split="test")[0].read_text()
    assert "| kd (sweep=a) | 20 |" in md and "| kd (sweep=b) | 20 |" in md and "0.900 [0.900, 0.900]" in md


def test_unpaired_runs_are_refused_clearly() -> None:
    rows = rows_for({("kd", None): 0.0}, seeds=range(5)) + rows_for(
        {("kd+procrustes", 1): 0.01}, seeds=range(5, 10)
    )
    with pytest.raises(
        PairingError, match=r"cannot pair kd\+procrustes \(alpha=1\) with the baseline kd.*share no"
    ):
        analyse(rows)


def test_partly_paired_runs_use_the_common_seeds(tmp_path: Path) -> None:
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.01}, seeds=range(6))
    rows = [r for r in rows if not (r["method"] == "kd" and r["seed"] == 5)]
    a = analyse(rows, resamples=500)
    (c,) = a.comparisons
    assert c.pairs == 5 and c.unpaired == 1 and c.unpaired_baseline == 0  # kd lost seed 5
    md = write_report(a, tmp_path / "report")["markdown"].read_text()
    assert (
        "kd+procrustes (alpha=1) vs kd (task=rte): 1 run(s) without a partner left out "
        "(1 of kd+procrustes (alpha=1), 0 of the baseline); its Δ is over the pairs only"
    ) in md


def test_last_step_metric_is_reported_from_the_rows_that_have_it() -> None:
    """``last_test.*`` (the last step's student) is a metric like ``test.*``; rows written before
    it was kept are left out of that report, not read as zeros."""
    rows = rows_for({("kd", None): 0.0, ("kd+procrustes", 1): 0.01}, seeds=range(8))
    for r in rows:
        if r["seed"] >= 2:
            r["last_test.accuracy"] = r["test.accuracy"] - 0.005
    a = analyse(rows, metric="last_test.accuracy", resamples=200)
    (c,) = a.comparisons
    assert a.metric == "last_test.accuracy" and c.pairs == 6
    kd = next(g for g in a.groups if g.treatment["method"] == "kd")
    assert kd.mean == pytest.approx(
        100 * np.mean([r["last_test.accuracy"] for r in rows if r["method"] == "kd" and r["seed"] >= 2])
    )


def test_report_names_the_collapsed_runs_of_the_metrics_split(tmp_path: Path) -> None:
    """Runs whose student gave every example of the metric's split one class (top_class_share 1)
    are counted per group in a note; a share below 1 or another split's collapse is not; rows
    without the diagnostic (written before it existed) are neither counted nor called collapsed."""
    rows = rows_for({("kd", None): 0.0, ("kd+proj_mse", 1): -0.1}, seeds=range(6))
    for r in rows:
        r["test.top_class_share"] = 1.0 if r["method"] == "kd+proj_mse" and r["seed"] < 4 else 0.6
        r["dev.top_class_share"] = 1.0 if r["method"] == "kd" and r["seed"] == 0 else 0.9
    del rows[-1]["test.top_class_share"]
    note = "Collapsed runs: 4 of the 11 runs with a test.top_class_share predict one class for every test example"
    (got,) = [n for n in analyse(rows, resamples=200).notes if n.startswith("Collapsed")]
    assert got.startswith(note) and "(kd+proj_mse (alpha=1, task=rte): 4 of 5);" in got
    (dev,) = [
        n for n in analyse(rows, metric="dev.accuracy", resamples=200).notes if n.startswith("Collapsed")
    ]
    assert "1 of the 12 runs" in dev and "(kd (task=rte): 1 of 6);" in dev and "proj_mse" not in dev
    for r in rows:
        r.pop("test.top_class_share", None)
    assert not [n for n in analyse(rows, resamples=200).notes if n.startswith("Collapsed")]
    md = write_report(analyse(rows, metric="dev.accuracy", resamples=200), tmp_path, resamples=200)[
        "markdown"
    ]
    assert "Collapsed runs: 1 of the 12" in md.read_text()


def test_single_pair_gives_no_test() -> None:
    (c,) = analyse(rows_for({("kd", None): 0, ("kd+gram", 1): 0.01}, seeds=[0]), resamples=100).comparisons
    assert c.verdict == "too few pairs" and math.isnan(c.p_t) and math.isnan(c.mde)


def test_errors_name_the_problem() -> None:
    rows = rows_for(
        {("kd", None): 0.0, ("kd+procrustes", 1): 0.01, ("kd+procrustes", 10): 0.0}, seeds=range(3)
    )
    with pytest.raises(StatsError, match=r"metric 'test\.f1' is in no row"):
        analyse(rows, metric="test.f1")
    with pytest.raises(StatsError, match="baseline 'pkd' is not among the methods"):
        analyse(rows, baseline="pkd")
    with pytest.raises(StatsError, match=r"ambiguous.*--baseline 'kd\+procrustes@alpha=1'"):
        analyse(rows, baseline="kd+procrustes")
    a = analyse(rows, baseline="kd+procrustes@alpha=10", resamples=100)
    assert {c.treatment["method"] for c in a.comparisons} == {"kd", "kd+procrustes"}
    mixed = [*rows, dict(rows[0], config_hash="another", run_id="other")]
    with pytest.raises(StatsError, match="two different runs"):
        analyse(mixed)
    assert analyse(rows, metric="dev.accuracy", resamples=100).metric == "dev.accuracy"


def test_holm_family_is_per_setting_and_error_rows_are_left_out() -> None:
    rows = rows_for({("kd", None): 0, ("kd+procrustes", 1): 0.01}, task="rte") + rows_for(
        {("kd", None): 0, ("kd+procrustes", 1): 0.01, ("kd+gram", 1): 0.0}, task="mrpc", rng_seed=1
    )
    rows.append({**rows[0], "status": "error", "config_hash": "broken", "run_id": "broken-run", "error": "x"})
    a = analyse(rows, resamples=500)
    assert a.rows_failed == ["broken-run"]
    rte = [c for c in a.comparisons if c.setting["task"] == "rte"]
    mrpc = [c for c in a.comparisons if c.setting["task"] == "mrpc"]
    assert len(rte) == 1 and rte[0].p_t_holm == pytest.approx(rte[0].p_t)  # a family of one
    np.testing.assert_allclose([c.p_t_holm for c in mrpc], holm([c.p_t for c in mrpc]))


# ------------------------------------------------------------------------------------------
# the report


def write_results(tmp_path: Path) -> Path:
    """A sweep's results.jsonl with alpha and layer axes and per-run log.jsonl files."""
    axes = {
        "treatment": ["method", "alpha", "layers"],
        "setting": ["task"],
        "replicate": ["seed", "split_seed"],
    }
    effects = {("kd", None, None): 0.0}
    for alpha in (0.1, 1, 10):
        for layers in ("last", "uniform"):
            effects[("kd+procrustes", alpha, layers)] = 0.004 * math.log10(alpha) + (
                0.005 if layers == "last" else 0
            )
    rng = np.random.default_rng(0)
    path = tmp_path / "sweep" / "results.jsonl"
    for seed in range(6):
        seed_effect = rng.normal(0, 0.02)
        for (method, alpha, layers), effect in effects.items():
            run_id = f"{method}-{alpha}-{layers}-{seed}"
            out = tmp_path / "sweep" / "runs" / run_id
            out.mkdir(parents=True)
            terms = ["kd", "procrustes"] if alpha else ["kd"]
            with open(out / "log.jsonl", "w") as f:
                for step in (10, 20, 30):
                    f.write(
                        json.dumps({"step": step, **{f"loss/{t}": 1.0 / step + seed for t in terms}}) + "\n"
                    )
                f.write(json.dumps({"step": 30, "dev/accuracy": 0.7}) + "\n")
            append_row(
                path,
                {
                    "run_id": run_id,
                    "config_hash": run_id,
                    "status": "ok",
                    "method": method,
                    "alpha": alpha,
                    "layers": layers,
                    "task": "rotten_tomatoes",
                    "seed": seed,
                    "split_seed": 0,
                    "axes": axes,
                    "loss_terms": terms,
                    "metric": "accuracy",
                    "test.accuracy": 0.75 + seed_effect + effect + rng.normal(0, 0.002),
                    "output_dir": str(out),
                },
            )
    append_row(
        path, {"run_id": "kd-dead", "config_hash": "dead", "status": "error", "method": "kd", "error": "boom"}
    )
    return path


def test_layer_heatmap_cells_mark_verdicts_and_interim_pairs(tmp_path: Path) -> None:
    """A heatmap cell is bold for a win or a loss and names its pairs when it has fewer than the
    grid's most (an interim cell beside finished ones)."""
    from dataclasses import replace

    from geodistill.stats import _layer_cell_text

    a, _ = report(write_results(tmp_path), tmp_path / "report", baseline="kd", resamples=200)
    c = replace(a.comparisons[0], mean_diff=0.704, pairs=30, verdict="win")
    assert _layer_cell_text(c, 30) == ("+0.70", True)
    assert _layer_cell_text(replace(c, verdict="loss", mean_diff=-1.2), 30) == ("-1.20", True)
    assert _layer_cell_text(replace(c, verdict="tie", pairs=12), 30) == ("+0.70\nn=12", False)


def test_report_writes_markdown_latex_and_figures(tmp_path: Path) -> None:
    path = write_results(tmp_path)
    a, paths = report(path, tmp_path / "report", baseline="kd", resamples=500)
    assert len(a.comparisons) == 6 and all(c.pairs == 6 for c in a.comparisons)
    for key in ("markdown", "latex", "json", "bars.png", "alpha.png", "layers.png", "loss_curves.png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    for name in ("bars.png", "alpha.png", "layers.png", "loss_curves.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    for text in (
        "## Verdicts",
        "Geometry losses (objectives with a Procrustes, Gram or CKA term) against kd: win in",
        "## Results per group",
        "## Differences to kd",
        "## Statistical power",
        "MDE, points (at Holm's α/m)",
        "seeds for 80% power at 0.5 (Holm)",
        "MDE (Holm)",
        "![",
        "kd-dead",
        "paired on (seed, split_seed)",
    ):
        assert text in md, text
    kd_mean = np.mean([g.mean for g in a.groups if g.treatment["method"] == "kd"])
    assert f"{kd_mean:.2f} ± " in md  # percentages with 2 decimals
    assert re.search(r"paired t-test p = \d\.\d{4}, Wilcoxon p = \d\.\d{4} \(Holm\)", md)
    assert _p_is(3e-7) == "p < 0.0001" and _p_is(0.01234) == "p = 0.0123"  # not "p = <0.0001"
    assert _p_is(0.04996) == "p = 0.049960" and _p_is(0.05004) == "p = 0.050040"  # not on the line
    assert _p_is(0.05) == "p = 0.0500"
    tex = paths["latex"].read_text()
    assert (
        r"\begin{tabular}" in tex
        and r"\toprule" in tex
        and r"kd+procrustes" in tex
        and r"test.accuracy (\%)" in tex
    )
    # pdflatex without extra packages: nothing outside ASCII (α, Δ, ±), and < and > only in math
    # mode (OT1 fonts print a bare < as ¡)
    assert tex.isascii() and r"Holm's $\alpha$/m" in tex
    assert re.search(r"(?<!\$)[<>]", tex.replace("$<$", "").replace("$>$", "")) is None
    assert "(500 resamples of the paired differences)" in md  # the count this report used
    summary = json.loads(paths["json"].read_text())
    assert {c["verdict"] for c in summary["comparisons"]} <= {"win", "tie", "loss"}
    assert summary["failed_runs"] == ["kd-dead"]
    assert "mean over replicates" in md
    # results copied from another machine come without their logs: the caption says how many it used
    n_runs = sum(len(g.run_dirs) for g in a.groups)
    (tmp_path / "sweep" / "runs" / "kd-None-None-0" / "log.jsonl").unlink()
    _, paths = report(path, tmp_path / "report2", baseline="kd", resamples=50)
    assert (
        f"mean over the {n_runs - 1} of {n_runs} runs whose log.jsonl is at hand"
        in paths["markdown"].read_text()
    )


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from geodistill.cli import main

    path = write_results(tmp_path)
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "method=kd+procrustes, alpha=10, layers=last" in out and "pairs" in out
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", str(path), "--metric", "test.f1"]) == 2
    assert "test.f1" in capsys.readouterr().err


def test_report_where_keeps_only_the_named_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--where split_seed=1,2: the comparisons use exactly those replicates, the report says so,
    and a column or value that no row has is an error naming what there is."""
    from geodistill.cli import main

    rows = []
    for split in (0, 1, 2):
        # split 0 carries a large effect, splits 1 and 2 none: the filter must change the estimate
        rows += [
            {
                **r,
                "split_seed": split,
                "run_id": f"{r['run_id']}-{split}",
                "config_hash": f"{r['config_hash']}|{split}",
            }
            for r in rows_for(
                {("kd", None): 0.0, ("kd+gram", 0.1): 0.05 if split == 0 else 0.0},
                seeds=range(6),
                rng_seed=split,
            )
        ]
    path = tmp_path / "results.jsonl"
    for r in rows:
        append_row(path, r)
    full, _ = report(path, tmp_path / "all", resamples=200)
    fresh, paths = report(path, tmp_path / "fresh", resamples=200, where={"split_seed": ["1", "2"]})
    (c_all,), (c_fresh,) = full.comparisons, fresh.comparisons
    assert c_all.pairs == 18 and c_fresh.pairs == 12
    kd = {(r["seed"], r["split_seed"]): r["test.accuracy"] for r in rows if r["method"] == "kd"}
    expect = np.mean(
        [
            100 * (r["test.accuracy"] - kd[r["seed"], r["split_seed"]])
            for r in rows
            if r["method"] == "kd+gram" and r["split_seed"] > 0
        ]
    )
    assert c_fresh.mean_diff == pytest.approx(expect, abs=1e-9)
    assert c_all.mean_diff > c_fresh.mean_diff + 1.0
    assert "(only the rows with split_seed in {1, 2})" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["selection"] == "split_seed in {1, 2}"
    # the CLI flag, and its errors
    assert main(["report", str(path), "--out", str(tmp_path / "cli"), "--where", "split_seed=1,2"]) == 0
    assert "12 pairs" in capsys.readouterr().out
    assert main(["report", str(path), "--where", "fold=1"]) == 2
    assert "no row has a column 'fold'" in capsys.readouterr().err
    assert main(["report", str(path), "--where", "split_seed=7"]) == 2
    assert "values: 0, 1, 2" in capsys.readouterr().err
    assert main(["report", str(path), "--where", "split_seed"]) == 2
    assert "column=value" in capsys.readouterr().err


def test_loss_curve_figure_keeps_each_treatment_one_colour_and_names_all(tmp_path: Path) -> None:
    """A term only some treatments log (here ``cka``, sorted first) must neither drop the others
    from the legend nor shift their colours from panel to panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geodistill.stats import _loss_curve_figure

    steps = [10, 20, 30]
    curves = {
        "kd": {"kd": (steps, [0.9, 0.5, 0.3])},
        "kd+cka": {"kd": (steps, [0.8, 0.5, 0.3]), "cka": (steps, [0.4, 0.2, 0.1])},
        "kd+procrustes": {"kd": (steps, [0.7, 0.4, 0.2]), "procrustes": (steps, [0.5, 0.3, 0.2])},
    }
    fig = _loss_curve_figure(plt, curves, "task=rt")
    try:
        assert [ax.get_title() for ax in fig.axes] == ["loss/cka", "loss/kd", "loss/procrustes"]
        colour: dict[str, set[str]] = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                colour.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
        assert set(colour) == set(curves) and all(len(c) == 1 for c in colour.values())
        assert len({next(iter(c)) for c in colour.values()}) == 3  # three treatments, three colours
        (legend,) = fig.legends
        shown = {
            t.get_text(): matplotlib.colors.to_hex(h.get_color())
            for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
        }
        assert shown == {lbl: next(iter(c)) for lbl, c in colour.items()}
        fig.savefig(tmp_path / "curves.png")  # the constrained layout with the legend outside draws
    finally:
        plt.close(fig)
    many = {f"kd+procrustes (alpha={k})": {"kd": (steps, [1.0, 0.5, 0.1 * k])} for k in range(25)}
    fig = _loss_curve_figure(plt, many, "task=rt")
    try:
        drawn = {
            (matplotlib.colors.to_hex(line.get_color()), line.get_linestyle())
            for line in fig.axes[0].get_lines()
        }
        assert len(drawn) == 25  # past ten treatments colours do not repeat; past twenty the style changes
    finally:
        plt.close(fig)


def test_report_says_why_loss_curves_are_missing(tmp_path: Path) -> None:
    """Rows whose runs' logs are gone (a committed results file without its runs/): the report
    says there are no loss curves and why, instead of leaving the figure out silently."""
    rows = [
        dict(r, output_dir=str(tmp_path / "gone" / r["run_id"]))
        for r in rows_for({("kd", None): 0.0, ("kd+gram", 1): 0.0}, seeds=range(3))
    ]
    a = analyse(rows, resamples=200)
    md = write_report(a, tmp_path / "report")["markdown"].read_text()
    assert "no loss-term curves: none of its 6 runs' log.jsonl is at hand" in md
    assert not (tmp_path / "report" / "loss_curves.png").exists()


def test_report_pairs_runs_across_sweeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several results files are one table: the same method in two sweeps is two treatments told
    apart by ``sweep``, paired on their common replicates; a run both files hold (the same config
    hash: a reused KD row) counts once; one file alone gets no sweep column."""
    from geodistill.cli import main

    # sweep "cls": KD and Gram; sweep "tokens": the same KD runs (reused) and its own Gram, 1 point up
    cls_rows = rows_for({("kd", None): 0.0, ("kd+gram", 0.1): 0.0}, seeds=range(8), rng_seed=1)
    tok_rows = [dict(r, sweep="tokens") for r in cls_rows if r["method"] == "kd"]
    tok_rows += [
        dict(r, sweep="tokens", run_id=r["run_id"] + "-tok", config_hash=r["config_hash"] + "|tokens")
        for r in rows_for({("kd+gram", 0.1): 0.01}, seeds=range(8), rng_seed=2)
    ]
    paths = [tmp_path / "cls" / "results.jsonl", tmp_path / "tokens" / "results.jsonl"]
    for path, rows in zip(paths, (cls_rows, tok_rows), strict=True):
        for r in rows:
            append_row(path, r)  # the cls rows have no sweep column: the folder names it

    a, out = report(paths, tmp_path / "both", resamples=200)
    assert a.columns["treatment"] == ["method", "alpha", "sweep"]
    kd = [g for g in a.groups if g.treatment["method"] == "kd"]
    assert len(kd) == 1 and kd[0].n == 8 and kd[0].treatment["sweep"] == "cls"
    assert {c.treatment["sweep"] for c in a.comparisons} == {"cls", "tokens"}
    assert any("8 finished run(s)" in n and "count once" in n for n in a.notes)

    # the tokens sweep's Gram against the cls sweep's, on the same seeds
    a, _ = report(
        paths,
        tmp_path / "gram",
        resamples=200,
        baseline="kd+gram@sweep=cls",
        where={"method": ["kd+gram"]},
    )
    (c,) = a.comparisons
    gram = {
        (r.get("sweep", "cls"), r["seed"]): r["test.accuracy"]
        for r in cls_rows + tok_rows
        if r["method"] == "kd+gram"
    }
    expect = np.mean([100 * (gram["tokens", s] - gram["cls", s]) for s in range(8)])
    assert c.pairs == 8 and c.treatment["sweep"] == "tokens"
    assert c.mean_diff == pytest.approx(expect, abs=1e-9) and c.mean_diff > 0.5
    assert "Source: `" + str(paths[0]) + ", " + str(paths[1]) + "`" in out["markdown"].read_text()

    single, _ = report(paths[1], tmp_path / "one", resamples=200)
    assert "sweep" not in single.columns["treatment"]
    assert (
        main(
            [
                "report",
                *map(str, paths),
                "--out",
                str(tmp_path / "cli"),
                "--where",
                "method=kd+gram",
                "--baseline",
                "kd+gram@sweep=cls",
            ]
        )
        == 0
    )
    assert "sweep=tokens" in capsys.readouterr().out
    assert main(["report", str(paths[0]), str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err


def _glance() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "glance.py"
    spec = importlib.util.spec_from_file_location("glance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["glance"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_experiments_glance_is_current_and_agrees_with_the_reports() -> None:
    """experiments/README.md's glance block is what experiments/glance.py renders from the committed
    rows, and its cells are the reports' own comparisons (same pairs, mean, interval and p-value);
    a cell without 30 pairs is refused."""
    glance = _glance()
    assert glance.main(["--check"]) == 0
    root = Path(__file__).resolve().parents[1] / "experiments"
    summary = json.loads((root / "main" / "report" / "summary.json").read_text())
    rows = [r for r in glance.read_rows(root / "main" / "results.jsonl") if r["status"] == "ok"]
    for method in ("kd+procrustes", "kd+gram", "kd+pkd"):
        ours = glance.compare(glance.Cell("main", method), rows, "test.accuracy")
        (theirs,) = [c for c in summary["comparisons"] if c["treatment"] == {"method": method}]
        assert ours.pairs == theirs["pairs"] == 30
        assert ours.mean_diff == pytest.approx(theirs["mean_diff"], abs=1e-9)
        assert [ours.ci_low, ours.ci_high] == pytest.approx(theirs["ci"], abs=1e-9)
        assert ours.p_t == pytest.approx(theirs["p_t"], rel=1e-9)
    with pytest.raises(SystemExit, match="expected one comparison over 30 pairs"):
        glance.compare(glance.Cell("main", "kd+nothing"), rows, "test.accuracy")
    # the top-level README quotes the page's count of distinct comparisons by hand: it must agree
    (count,) = re.findall(r"over (\d+) comparisons\.", glance.render())
    readme = (root.parent / "README.md").read_text()
    assert re.findall(r"(\d+) distinct comparisons", readme) == [count]
