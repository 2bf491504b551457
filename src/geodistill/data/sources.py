"""Where raw rows come from: local .csv/.tsv/.jsonl/.json files and the Hugging Face hub.

Shared by :mod:`geodistill.data.classification` and :mod:`geodistill.data.instructions`. Both
readers fail with a one-line ``ValueError`` that names the file (and row) or the hub dataset.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

__all__ = ["HUB_SPEC_KEYS", "SUFFIXES", "hub_kwargs", "load_hub", "load_hub_dict", "read_records"]

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
HUB_SPEC_KEYS = ("path", "name", "data_files", "data_dir", "split", "revision")

csv.field_size_limit(sys.maxsize)  # 20 Newsgroups posts exceed csv's 128 kB default (also for Orange .tab)


def read_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Read a .csv/.tsv/.jsonl/.json file into (column names, [(row number, record)]).

    Row numbers are file line numbers for csv/tsv/jsonl and 1-based record positions for json.
    CSV follows RFC 4180 quoting; TSV fields are not quoted (as in GLUE's .tsv files). JSON is a
    list of objects or an object of equal-length lists. Blank lines are skipped.

    Raises:
        ValueError: missing, unreadable, non-UTF-8 or empty file, malformed row or JSON, a row
            with the wrong number of fields; the message names the file and the row.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not content.strip():
        raise ValueError(f"{path}: file is empty")
    records: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".csv", ".tsv"):
        delim, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
        # Lines end at \n or \r only, not where str.splitlines also splits (\x0b, \x0c, \x1c-\x1e,
        # U+0085, U+2028, U+2029): csv.writer and pandas leave those unquoted inside fields.
        reader = csv.reader(io.StringIO(content, newline=""), delimiter=delim, quoting=quoting)
        try:
            columns = [h.strip() for h in next(reader)]
            if len(set(columns)) != len(columns):
                raise ValueError(f"{path}: duplicate column names in header {columns}")
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(columns):
                    raise ValueError(
                        f"{path}: row {reader.line_num}: {len(row)} fields, header has {len(columns)}"
                    )
                records.append((reader.line_num, dict(zip(columns, row, strict=True))))
        except csv.Error as e:
            raise ValueError(f"{path}: row {reader.line_num}: malformed {suffix[1:]} ({e})") from None
    elif suffix == ".jsonl":
        # Records end at "\n" only (read_text has made "\r\n" one): json.dumps(ensure_ascii=False)
        # writes U+2028 and U+0085 raw inside strings, where str.splitlines would split.
        for n, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
        columns = list(dict.fromkeys(k for _, r in records for k in r))
    else:
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            lengths = {k: len(v) for k, v in obj.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{path}: columns have different lengths {lengths}")
            obj = [dict(zip(obj, values, strict=True)) for values in zip(*obj.values(), strict=True)]
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a list of objects or an object of equal-length lists")
        for n, rec in enumerate(obj, start=1):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: record {n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
        columns = list(dict.fromkeys(k for _, r in records for k in r))
    if not records:
        raise ValueError(f"{path}: no data rows")
    return columns, records


def hub_kwargs(spec: str | Mapping[str, Any], *, split: str | None = None) -> dict[str, Any]:
    """The ``datasets.load_dataset`` arguments of a spec, checked without loading anything.

    A spec is ``"owner/name[:config]"`` or a dict whose keys come from :data:`HUB_SPEC_KEYS`
    (path, name, data_files, data_dir, split, revision) and include "path"; ``split`` fills in a
    missing "split".
    """
    if isinstance(spec, str):
        path, _, config = spec.partition(":")
        kwargs: dict[str, Any] = {"path": path, **({"name": config} if config else {})}
    else:
        bad = [k for k in spec if k not in HUB_SPEC_KEYS]
        if bad or "path" not in spec:
            raise ValueError(
                f"hub dataset spec {dict(spec)}: keys must be from {HUB_SPEC_KEYS} and include 'path'"
            )
        kwargs = dict(spec)
    if split is not None:
        kwargs.setdefault("split", split)
    return kwargs


def load_hub(spec: str | Mapping[str, Any], *, split: str | None = None) -> Dataset | DatasetDict:
    """``datasets.load_dataset`` for a spec (see :func:`hub_kwargs`). Needs hub access (or a
    local HF cache)."""
    from datasets import load_dataset

    kwargs = hub_kwargs(spec, split=split)
    try:
        return load_dataset(**kwargs)
    except Exception as e:  # offline, unknown repo, bad config or file: one line naming the dataset
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        shown = spec if isinstance(spec, str) else kwargs
        raise ValueError(f"could not load {shown!r} from the Hugging Face hub: {msg}") from e


def load_hub_dict(spec: str | Mapping[str, Any]) -> DatasetDict:
    """:func:`load_hub` for a whole dataset (all splits); fails unless it is a ``DatasetDict``."""
    raw = load_hub(spec)
    if not isinstance(raw, DatasetDict):
        raise ValueError(f"{spec}: expected a DatasetDict from load_dataset, got {type(raw).__name__}")
    return raw
