"""Writing similarity results: the CSV always, heatmaps when matplotlib is there, a warning when not."""

from __future__ import annotations

import csv
import sys

from geodistill.similarity import MEASURES, write_similarity

ROWS = [
    {"layer_a": a, "layer_b": b, "n": 8, **{m: 0.1 * (a + b) for m in MEASURES}}
    for a in range(2)
    for b in range(3)
]


def test_without_matplotlib_the_csv_is_written_and_one_line_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = write_similarity(ROWS, tmp_path)
    assert paths == [tmp_path / "similarity.csv"] and not list(tmp_path.glob("*.png"))
    with open(paths[0]) as f:
        assert len(list(csv.DictReader(f))) == len(ROWS)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib is not installed" in err and "similarity.csv" in err
