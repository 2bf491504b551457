"""Instruction-following data as ``datasets.DatasetDict`` with splits "train", "dev", "test".

Every loader returns an :class:`InstructionData` whose splits and evaluation sets share one
schema (:data:`FEATURES`): ``task: str``, ``instruction: str``, ``input: str`` (may be empty),
``output: str`` (the reference answer used as the training target) and ``references:
list[str]`` (every reference, ``output`` first, for ROUGE against multiple references).

Sources (``load_instructions(name)``):

* ``natural_instructions`` (default, offline): Natural Instructions v1 (Mishra et al., 2022),
  the 61 tasks shipped in the BIG-bench 1.0.0 sdist, in the Super-NaturalInstructions protocol:
  train and dev on held-in tasks, test on held-out tasks (:data:`NI_HELDOUT_TASKS`).
* ``dolly`` = ``databricks/databricks-dolly-15k`` (hub) in the MiniLLM protocol, and any hub
  ``owner/name[:config]`` or local ``.jsonl``/``.json`` file with instruction/input/output-like
  columns. Named evaluation sets (``eval_sets``) can be hub datasets, e.g. the five MiniLLM sets
  (``eval_sets="minillm"``). The mapping (:func:`instructions_from_hub`,
  :func:`instruction_eval_set`) takes an already loaded dataset, so it is testable offline.

Prompt formatting belongs to the collator (the tokenizer's chat template); :func:`format_prompt`
is the plain-text fallback for tokenizers without one.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
from datasets import Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable

from geodistill.assets import ASSETS, asset_path, cache_dir
from geodistill.data.sources import hub_kwargs, load_hub, load_hub_dict, read_records
from geodistill.data.splits import rng_for, stratified_subsample

__all__ = [
    "FEATURES",
    "INSTRUCTION_DATASETS",
    "MINILLM_EVAL_SETS",
    "NI_HELDOUT_TASKS",
    "InstructionData",
    "finish_instructions",
    "format_prompt",
    "instruction_eval_set",
    "instructions_from_hub",
    "list_instruction_datasets",
    "load_instructions",
    "natural_instructions_from_table",
    "natural_instructions_tasks",
    "parse_natural_instructions",
]

FEATURES = Features(
    {
        "task": Value("string"),
        "instruction": Value("string"),
        "input": Value("string"),
        "output": Value("string"),
        "references": List(Value("string")),
    }
)
COLUMNS = tuple(FEATURES)


@dataclass(frozen=True)
class InstructionData:
    """Instruction data: train/dev/test splits plus named evaluation sets, all in :data:`FEATURES`.

    Attributes:
        name: the name it was loaded under.
        splits: ``DatasetDict`` with "train", "dev", "test".
        eval_sets: named evaluation sets for generation metrics (ROUGE-L); always includes the
            test split under ``name``'s short form (e.g. "natural_instructions", "dolly").
        description: source, preprocessing, split procedure and sizes, in words.
    """

    name: str
    splits: DatasetDict
    eval_sets: dict[str, Dataset]
    description: str

    def sizes(self) -> dict[str, int]:
        """Rows per split and per evaluation set (the latter prefixed ``eval/``)."""
        out = {k: len(v) for k, v in self.splits.items()}
        out.update({f"eval/{k}": len(v) for k, v in self.eval_sets.items()})
        return out


def format_prompt(instruction: str, input: str = "") -> str:
    """Plain-text prompt for tokenizers without a chat template (Alpaca / MiniLLM wording).

    The generation target follows the returned string directly. The Input block is left out
    when ``input`` is empty, as in MiniLLM's data processing.
    """
    if input.strip():
        return (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def _from_columns(cols: Mapping[str, list[Any]]) -> Dataset:
    return Dataset.from_dict({c: cols[c] for c in COLUMNS}, features=FEATURES)


def _from_arrow(table: pa.Table) -> Dataset:
    return Dataset(InMemoryTable(table.select(list(COLUMNS))), info=DatasetInfo(features=FEATURES))


def _subsample(ds: Dataset, cap: int | None, seed: int, *purpose: str) -> Dataset:
    """Seeded subsample of at most ``cap`` rows, stratified by task."""
    if cap is None or cap >= len(ds):
        return ds
    return ds.select(stratified_subsample(list(ds["task"]), cap, rng_for(seed, *purpose)))


# ---------------------------------------------------------------------------------------------
# Natural Instructions v1 (BIG-bench natural_instructions), S-NI protocol

NI_MEMBER = "bigbench/benchmark_tasks/natural_instructions"
NI_CACHE_VERSION = 1  # bump when the parsed layout changes

NI_HELDOUT_TASKS: tuple[str, ...] = (
    "subtask001_quoref_question_generation",
    "subtask002_quoref_answer_generation",
    "subtask022_cosmosqa_passage_inappropriate_binary",
    "subtask023_cosmosqa_question_generation",
    "subtask024_cosmosqa_answer_generation",
    "subtask025_cosmosqa_incorrect_answer_generation",
    "subtask043_essential_terms_answering_incomplete_questions",
    "subtask044_essential_terms_identifying_essential_words",
    "subtask059_ropes_story_generation",
    "subtask060_ropes_question_generation",
    "subtask061_ropes_answer_generation",
)
"""Default held-out (test) tasks: every task of four source datasets (Quoref, CosmosQA, Essential
Terms, ROPES), 11 of 61. Holding out whole sources keeps test passages out of training (e.g.
Quoref question generation and answer generation share passages) and still covers the NI
categories: question generation, answer generation, classification, incorrect-answer generation
and others. The other 50 tasks (MC-TACO, DROP, Winogrande, QASC, MultiRC, misc) are held in."""


def _ni_source(task: str) -> str:
    """Source dataset of an NI task name, e.g. "subtask043_essential_terms_..." -> "essential_terms"."""
    word = task.split("_")[1]
    if word in ("misc", "miscellaneous", "miscellaenous"):  # the task names spell it three ways
        return "misc"
    return "essential_terms" if word == "essential" else word


def parse_natural_instructions(directory: str | Path) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Parse BIG-bench's ``natural_instructions/subtask*/task.json`` files.

    Returns an Arrow table with columns ``task``, ``input``, ``output``, ``references`` (rows
    grouped by task, tasks in name order) and one dict per task: ``name``, ``instruction``,
    ``start``, ``stop`` (its row range), ``dropped`` (instances without a non-empty target).

    The instruction is the task's ``task_prefix``: the human-written definition with "Things to
    avoid", "Emphasis/Caution" and the short "Prompt" line, as the crowd workers saw it.
    References are the targets with empty strings removed; ``output`` is the first of them.
    """
    directory = Path(directory)
    files = sorted(directory.glob("subtask*/task.json"))
    if not files:
        raise ValueError(f"{directory}: no subtask*/task.json files")
    cols: dict[str, list[Any]] = {"task": [], "input": [], "output": [], "references": []}
    tasks: list[dict[str, Any]] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            spec = json.load(fh)
        name = f.parent.name
        instruction = str(spec.get("task_prefix") or spec.get("description") or "").strip()
        if not instruction or not isinstance(spec.get("examples"), list):
            raise ValueError(f"{f}: no task_prefix/description or no examples list")
        start, dropped = len(cols["task"]), 0
        for ex in spec["examples"]:
            target = ex.get("target")
            refs = [t for t in ([target] if isinstance(target, str) else target or []) if str(t).strip()]
            if not refs:
                dropped += 1
                continue
            cols["task"].append(name)
            cols["input"].append(str(ex["input"]))
            cols["output"].append(str(refs[0]))
            cols["references"].append([str(r) for r in refs])
        tasks.append(
            {
                "name": name,
                "instruction": instruction,
                "start": start,
                "stop": len(cols["task"]),
                "dropped": dropped,
            }
        )
    schema = pa.schema([("task", pa.string()), ("input", pa.string()), ("output", pa.string()),
                        ("references", pa.list_(pa.string()))])  # fmt: skip
    return pa.table(cols, schema=schema), tasks


def _ni_cached() -> tuple[pa.Table, list[dict[str, Any]]]:
    """The parsed NI table, from an Arrow file in the user cache (parsed on first use).

    Parsing the 160 MB of JSON takes ~2 s and building datasets from it ~4 s; the memory-mapped
    Arrow file opens in milliseconds. The file name carries the archive checksum and a layout
    version, so a new archive or parser never reads a stale cache.
    """
    key = f"natural_instructions_v1-{ASSETS['bigbench'].sha256[:12]}-{NI_CACHE_VERSION}.arrow"
    path = cache_dir() / "datasets" / key
    if not path.exists():
        table, tasks = parse_natural_instructions(asset_path("bigbench", NI_MEMBER))
        table = table.replace_schema_metadata({"tasks": json.dumps(tasks)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        feather.write_feather(table, tmp, compression="uncompressed")
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    table = feather.read_table(path, memory_map=True)
    tasks = json.loads(table.schema.metadata[b"tasks"])
    return table, tasks


def natural_instructions_tasks() -> list[str]:
    """Names of the 61 Natural Instructions v1 tasks, in order."""
    return [t["name"] for t in _ni_cached()[1]]


def _resolve_heldout(heldout_tasks: Sequence[str] | str, names: Sequence[str], split_seed: int) -> list[str]:
    if heldout_tasks == "default":
        chosen = list(NI_HELDOUT_TASKS)
    elif heldout_tasks == "random":
        # Whole sources in seeded order, greedily, up to the default's size: no source in both.
        by_source: dict[str, list[str]] = {}
        for n in names:
            by_source.setdefault(_ni_source(n), []).append(n)
        order = rng_for(split_seed, "natural_instructions", "heldout").permutation(sorted(by_source))
        chosen = []
        for s in order:
            if len(chosen) + len(by_source[s]) <= len(NI_HELDOUT_TASKS):
                chosen += by_source[s]
    elif isinstance(heldout_tasks, str):
        raise ValueError(
            f"heldout_tasks must be 'default', 'random' or a list of task names, got {heldout_tasks!r}"
        )
    else:
        chosen = list(heldout_tasks)
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise ValueError(f"unknown Natural Instructions tasks {unknown}; see natural_instructions_tasks()")
    if not chosen or len(set(chosen)) == len(names):
        raise ValueError("heldout_tasks must hold out at least one task and keep at least one")
    return sorted(set(chosen))


def natural_instructions_from_table(
    table: pa.Table,
    tasks: Sequence[Mapping[str, Any]],
    *,
    split_seed: int = 0,
    heldout_tasks: Sequence[str] | str = "default",
    max_per_task: int | None = 1000,
    dev_per_task: int = 20,
    test_per_task: int | None = 100,
) -> InstructionData:
    """S-NI split of a parsed NI table (:func:`parse_natural_instructions`).

    Held-in tasks: each task's instances are shuffled (seeded per task); the first
    ``dev_per_task`` go to dev, the next ``max_per_task`` (None: all) to train, so dev never
    changes with ``max_per_task`` and never overlaps train. Held-out tasks: ``test_per_task``
    (None: all) seeded instances each go to test (S-NI evaluates 100 per task).
    """
    for arg, v in (("max_per_task", max_per_task), ("test_per_task", test_per_task)):
        if v is not None and v < 1:
            raise ValueError(f"{arg} must be >= 1 or None, got {v}")
    if dev_per_task < 0:
        raise ValueError(f"dev_per_task must be >= 0, got {dev_per_task}")
    names = [t["name"] for t in tasks]
    heldout = _resolve_heldout(heldout_tasks, names, split_seed)
    pick: dict[str, list[np.ndarray]] = {"train": [], "dev": [], "test": []}
    codes: dict[str, list[np.ndarray]] = {"train": [], "dev": [], "test": []}
    for code, t in enumerate(tasks):
        n = t["stop"] - t["start"]
        perm = t["start"] + rng_for(split_seed, "natural_instructions", t["name"]).permutation(n)
        if t["name"] in heldout:
            parts = {"test": perm[:test_per_task]}
        else:
            stop = None if max_per_task is None else dev_per_task + max_per_task
            parts = {"dev": perm[:dev_per_task], "train": perm[dev_per_task:stop]}
        for split, idx in parts.items():
            pick[split].append(np.sort(idx))
            codes[split].append(np.full(len(idx), code))
    instructions = pa.array([t["instruction"] for t in tasks], pa.string())
    splits = {}
    for split in ("train", "dev", "test"):
        idx = np.concatenate(pick[split]) if pick[split] else np.zeros(0, np.int64)
        sub = table.take(pa.array(idx, pa.int64()))
        code = np.concatenate(codes[split]) if codes[split] else np.zeros(0, np.int64)
        sub = sub.append_column("instruction", instructions.take(pa.array(code, pa.int64())))
        splits[split] = _from_arrow(sub)
    dsd = DatasetDict(splits)
    held_in = [n for n in names if n not in heldout]
    sizes = ", ".join(f"{s} {len(d)}" for s, d in dsd.items())
    description = (
        f"Natural Instructions v1 (Mishra et al., 2022): {len(names)} tasks, {table.num_rows} instances "
        f"from the BIG-bench 1.0.0 sdist ({sum(t['dropped'] for t in tasks)} without a target dropped). "
        f"instruction = the task's definition + things to avoid + emphasis + prompt; output = first "
        f"reference, references = all. Super-NaturalInstructions protocol: {len(held_in)} held-in tasks "
        f"for train/dev, {len(heldout)} held-out tasks for test "
        f"({'default list NI_HELDOUT_TASKS' if heldout_tasks == 'default' else heldout_tasks!r}: "
        f"{', '.join(heldout)}). Per held-in task: {dev_per_task} dev, then up to {max_per_task} train; "
        f"per held-out task up to {test_per_task} test (seeded, split_seed={split_seed}). Sizes: {sizes}."
    )
    return InstructionData(
        name="natural_instructions",
        splits=dsd,
        eval_sets={"natural_instructions": dsd["test"]},
        description=description,
    )


def _load_natural_instructions(
    *,
    split_seed: int,
    heldout_tasks: Sequence[str] | str = "default",
    max_per_task: int | None = 1000,
    dev_per_task: int = 20,
    test_per_task: int | None = 100,
) -> InstructionData:
    table, tasks = _ni_cached()
    return natural_instructions_from_table(
        table,
        tasks,
        split_seed=split_seed,
        heldout_tasks=heldout_tasks,
        max_per_task=max_per_task,
        dev_per_task=dev_per_task,
        test_per_task=test_per_task,
    )


# ---------------------------------------------------------------------------------------------
# Hub and local instruction data (Dolly, MiniLLM evaluation sets, anything similar)

INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")
INPUT_COLUMNS = ("input", "context")
OUTPUT_COLUMNS = ("references", "output", "response", "completion", "answer")  # references: our own schema
TASK_COLUMNS = ("task", "category")

DOLLY_HUB_PATH = "databricks/databricks-dolly-15k"

MINILLM_EVAL_SETS: dict[str, dict[str, str]] = {
    "dolly": {"path": "MiniLLM/dolly", "data_files": "valid.jsonl"},
    "self_inst": {"path": "MiniLLM/self-inst", "data_files": "valid.jsonl"},
    "vicuna": {"path": "MiniLLM/Vicuna", "data_files": "valid.jsonl"},
    "sinst": {"path": "MiniLLM/sinst", "data_files": "11_/valid.jsonl"},
    "uinst": {"path": "MiniLLM/uinst", "data_files": "11_/valid.jsonl"},
}
"""The MiniLLM paper's evaluation sets as released by its authors on the hub (``valid.jsonl``
with instruction/input/output; S-NI and UnNI restricted to references of >= 11 words, as in the
paper). Note: MiniLLM/dolly is a 500-example subset of dolly-15k; train on ``dolly`` with this
set only after decontamination (done by :func:`load_instructions`)."""


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _as_text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} holds {type(value).__name__}, expected a string")
    return value


def _map_rows(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], where: str, task: str, *, strict: bool
) -> tuple[Dataset, int]:
    """Records with instruction/input/output-like keys -> (a :data:`FEATURES` dataset, rows dropped).

    ``output`` may be a string or a list of references. A row without an instruction or without
    a non-empty reference is an error when ``strict`` (the user's own files) and is dropped and
    counted otherwise (published hub data, which we cannot fix).
    """
    ins = _first(columns, INSTRUCTION_COLUMNS)
    out = _first(columns, OUTPUT_COLUMNS)
    inp, tsk = _first(columns, INPUT_COLUMNS), _first(columns, TASK_COLUMNS)
    if ins is None or out is None:
        raise ValueError(
            f"{where}: needs an instruction column {list(INSTRUCTION_COLUMNS)} and an output column "
            f"{list(OUTPUT_COLUMNS)} (columns: {list(columns)})"
        )
    cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    dropped = 0
    for i, r in enumerate(rows):
        at = f"{where}: row {i}"
        instruction = _as_text(r.get(ins), at, ins).strip()
        target = r.get(out)
        refs = [target] if isinstance(target, str) else list(target or [])
        refs = [x for x in (_as_text(x, at, out).strip() for x in refs) if x]
        if not instruction or not refs:
            if strict:
                raise ValueError(f"{at}: empty {ins if not instruction else out!r}")
            dropped += 1
            continue
        cols["task"].append(_as_text(r.get(tsk), at, tsk) if tsk else task)
        cols["instruction"].append(instruction)
        cols["input"].append(_as_text(r.get(inp), at, inp).strip() if inp else "")
        cols["output"].append(refs[0])
        cols["references"].append(refs)
    return _from_columns(cols), dropped


def instruction_eval_set(name: str, ds: Dataset) -> Dataset:
    """Map one loaded evaluation set (a hub ``Dataset``) to :data:`FEATURES`.

    Rows without an instruction or a reference are dropped; ``task`` is the set's ``task`` or
    ``category`` column, else ``name``.
    """
    return _map_rows(ds, ds.column_names, name, task=name, strict=False)[0]


def _holdout(ds: Dataset, n_dev: int, n_test: int, seed: int) -> tuple[dict[str, Dataset], str]:
    """Seeded test and dev draws (stratified by task) from a single split; the rest is train."""
    n_test_eff = min(n_test, len(ds) // 10)
    n_dev_eff = min(n_dev, len(ds) // 10)
    if n_test_eff == 0 and n_dev_eff == 0:
        return {"train": ds, "dev": ds.select([]), "test": ds.select([])}, "train as published"
    tasks = list(ds["task"])
    test = stratified_subsample(tasks, n_test_eff, rng_for(seed, "test"))
    rest = np.setdiff1d(np.arange(len(ds)), test)
    dev = rest[stratified_subsample([tasks[i] for i in rest.tolist()], n_dev_eff, rng_for(seed, "dev"))]
    train = np.setdiff1d(rest, dev)
    how = (
        f"seeded draws stratified by task: test {n_test_eff}, dev {n_dev_eff}, train the remaining "
        f"{len(train)} (split_seed={seed})"
    )
    return {"train": ds.select(train), "dev": ds.select(np.sort(dev)), "test": ds.select(test)}, how


def instructions_from_hub(
    name: str,
    raw: DatasetDict,
    *,
    split_seed: int = 0,
    n_dev: int = 500,
    n_test: int = 500,
    eval_name: str | None = None,
    strict: bool = False,
) -> InstructionData:
    """Map a loaded ``DatasetDict`` (e.g. ``load_dataset("databricks/databricks-dolly-15k")``).

    Columns: instruction <- instruction/prompt/question; input <- input/context (optional);
    output/references <- output/response/completion/answer (a string or a list); task <-
    task/category (else ``name``). Published validation and test splits are used as they are
    (validation becomes test when there is no test); what is missing is drawn from train, seeded
    and stratified by task: ``n_test`` test and ``n_dev`` dev rows, each at most 10 % of train.
    Dolly has only train: 500/500 held out is the MiniLLM protocol. The test split is also
    ``eval_sets[eval_name]`` (default: the last part of ``name``). Rows without instruction or
    output raise with ``strict`` (local files), else are dropped and counted in the description.
    """
    if "train" not in raw:
        raise ValueError(f"{name}: no 'train' split (splits: {list(raw)})")
    dev_key = _first(list(raw), ("validation", "dev", "valid", "val"))
    used = ["train", *([dev_key] if dev_key else []), *(["test"] if "test" in raw else [])]
    mapped, notes = {}, []
    for s in used:
        ds = raw[s]
        mapped[s], dropped = _map_rows(ds, ds.column_names, f"{name}[{s}]", task=name, strict=strict)
        if dropped:
            notes.append(f"{dropped} {s} rows without instruction or output dropped")
    ignored = [s for s in raw if s not in used]
    if ignored:
        notes.append(f"splits {ignored} ignored")
    test = mapped.get("test")
    dev = mapped.get(dev_key) if dev_key else None
    if test is None and dev is not None:
        test, dev = dev, None
        notes.append(f"test = the published {dev_key!r} split")
    held, how = _holdout(
        mapped["train"], 0 if dev is not None else n_dev, 0 if test is not None else n_test, split_seed
    )
    splits = {"train": held["train"], "dev": dev if dev is not None else held["dev"]}
    splits["test"] = test if test is not None else held["test"]
    if test is not None and dev is not None:
        how = "as published"
    how = "; ".join([*notes, how])
    dsd = DatasetDict(splits)
    short = eval_name or name.rsplit("/", 1)[-1].split(":")[0]
    sizes = ", ".join(f"{s} {len(d)}" for s, d in dsd.items())
    return InstructionData(
        name=name,
        splits=dsd,
        eval_sets={short: dsd["test"]},
        description=f"{name}: splits {how}. Sizes: {sizes}.",
    )


def _is_local_file(spec: str | Mapping[str, Any]) -> bool:
    """Whether an evaluation-set spec names a local .jsonl/.json file (else it is a hub spec)."""
    return isinstance(spec, str) and Path(spec).suffix.lower() in (".jsonl", ".json")


def _load_eval_set(name: str, spec: str | Mapping[str, Any]) -> Dataset:
    if _is_local_file(spec):
        columns, records = read_records(Path(spec))
        return _map_rows([r for _, r in records], columns, spec, task=name, strict=True)[0]
    ds = load_hub(spec, split="train")
    if isinstance(ds, DatasetDict):  # a spec with split=None
        raise ValueError(f"eval set {name!r}: {spec} has several splits {list(ds)}; name one with 'split'")
    return instruction_eval_set(name, ds)


def _load_dolly(*, split_seed: int, n_dev: int = 500, n_test: int = 500) -> InstructionData:
    raw = load_hub_dict(DOLLY_HUB_PATH)
    data = instructions_from_hub(DOLLY_HUB_PATH, raw, split_seed=split_seed, n_dev=n_dev, n_test=n_test)
    desc = (
        f"databricks-dolly-15k (hub {DOLLY_HUB_PATH}): instruction, input = context, output = response, "
        f"task = category. MiniLLM protocol (Gu et al., 2024): {data.description.split(': ', 1)[1]}"
    )
    return replace(data, name="dolly", eval_sets={"dolly": data.splits["test"]}, description=desc)


def _load_local(path: str, *, split_seed: int, n_dev: int = 500, n_test: int = 500) -> InstructionData:
    p = Path(path)
    files = {}
    if p.is_dir():
        for split, stems in {
            "train": ("train",),
            "validation": ("dev", "validation"),
            "test": ("test",),
        }.items():
            found = [p / f"{s}{x}" for s in stems for x in (".jsonl", ".json") if (p / f"{s}{x}").is_file()]
            if len(found) > 1:
                raise ValueError(f"{p}: several {split} files: {[f.name for f in found]}")
            if found:
                files[split] = found[0]
    else:
        files["train"] = p
    raw = {}
    for split, f in files.items():
        columns, records = read_records(f)
        raw[split] = _map_rows([r for _, r in records], columns, str(f), task=p.stem, strict=True)[0]
    return instructions_from_hub(
        str(path),
        DatasetDict(raw),
        split_seed=split_seed,
        n_dev=n_dev,
        n_test=n_test,
        eval_name=p.stem,
        strict=True,
    )


INSTRUCTION_DATASETS: dict[str, Callable[..., InstructionData]] = {
    "natural_instructions": _load_natural_instructions,
    "dolly": _load_dolly,
    DOLLY_HUB_PATH: _load_dolly,
}
"""Registered names -> loader ``(*, split_seed, **options) -> InstructionData``."""


def list_instruction_datasets() -> list[str]:
    """Registered names (local .jsonl/.json paths and hub ``owner/name`` also work)."""
    return sorted(INSTRUCTION_DATASETS)


def _key(instruction: str, input: str) -> str:
    return re.sub(r"\s+", " ", f"{instruction}\n{input}").strip().lower()


def load_instructions(
    name: str = "natural_instructions",
    *,
    split_seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    eval_sets: Mapping[str, str | Mapping[str, Any]] | str | None = None,
    heldout_tasks: Sequence[str] | str | None = None,
    max_per_task: int | None = None,
    dev_per_task: int | None = None,
    test_per_task: int | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
) -> InstructionData:
    """Load instruction data by registered name, hub name or local .jsonl/.json path.

    Args:
        name: "natural_instructions" (offline default), "dolly", a hub ``owner/name[:config]``,
            a local .jsonl/.json file, or a directory with train/dev/test .jsonl files.
        split_seed: seeds every draw (held-out instances, subsamples, "random" task split).
        max_train, max_eval: seeded caps (stratified by task) on train and on dev, test and
            every evaluation set.
        eval_sets: extra named evaluation sets: ``{"name": spec}`` where spec is a hub name
            ``owner/name[:config]``, a dict of ``load_dataset`` arguments (path, name, data_files,
            data_dir, split, revision) or a local .jsonl/.json path; or "minillm" for
            :data:`MINILLM_EVAL_SETS`. Train and dev rows whose (instruction, input) appears in
            any evaluation set are removed (decontamination), and counted in the description.
        heldout_tasks, max_per_task, dev_per_task, test_per_task: natural_instructions only
            (defaults "default", 1000, 20, 100; see :func:`natural_instructions_from_table`).
        n_dev, n_test: hub and local data with only a train split (default 500 each).

    Raises:
        ValueError: unknown name, options that do not apply to ``name``, unreadable files,
            missing columns, empty instructions or outputs.
    """
    for arg, v in (("max_train", max_train), ("max_eval", max_eval)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    rng_for(split_seed)  # validates the seed before any loading
    options = {
        "heldout_tasks": heldout_tasks,
        "max_per_task": max_per_task,
        "dev_per_task": dev_per_task,
        "test_per_task": test_per_task,
        "n_dev": n_dev,
        "n_test": n_test,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if name in INSTRUCTION_DATASETS:
        loader: Callable[..., InstructionData] = INSTRUCTION_DATASETS[name]
    elif Path(name).exists() or Path(name).suffix.lower() in (".jsonl", ".json"):

        def loader(*, split_seed: int, n_dev: int = 500, n_test: int = 500) -> InstructionData:
            return _load_local(name, split_seed=split_seed, n_dev=n_dev, n_test=n_test)

    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name):

        def loader(*, split_seed: int, n_dev: int = 500, n_test: int = 500) -> InstructionData:
            raw = load_hub_dict(name)
            return instructions_from_hub(name, raw, split_seed=split_seed, n_dev=n_dev, n_test=n_test)

    else:
        raise ValueError(
            f"unknown instruction dataset {name!r}: not registered ({', '.join(list_instruction_datasets())}), "
            "not a .jsonl/.json path, not a hub name owner/name[:config]"
        )
    accepted = set(inspect.signature(loader).parameters) - {"split_seed"}
    bad = sorted(set(options) - accepted)
    if bad:
        raise ValueError(f"{name} does not take {bad} (it takes {sorted(accepted)})")
    if eval_sets == "minillm":
        eval_sets = MINILLM_EVAL_SETS
    elif isinstance(eval_sets, str):
        raise ValueError(f"eval_sets must be a mapping or 'minillm', got {eval_sets!r}")
    for spec in (eval_sets or {}).values():  # every option is checked before any data is read
        if not _is_local_file(spec):
            hub_kwargs(spec)
    data = loader(split_seed=split_seed, **options)
    extra = {k: _load_eval_set(k, spec) for k, spec in (eval_sets or {}).items()}
    return finish_instructions(data, extra, split_seed=split_seed, max_train=max_train, max_eval=max_eval)


def finish_instructions(
    data: InstructionData,
    extra_eval_sets: Mapping[str, Dataset],
    *,
    split_seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> InstructionData:
    """Add evaluation sets (decontaminating train/dev against them) and apply the caps."""
    clash = [k for k in extra_eval_sets if k in data.eval_sets]
    eval_sets = dict(data.eval_sets)
    splits = dict(data.splits)
    notes = []
    if extra_eval_sets:
        # The default test set keeps its name; an extra set of the same name (e.g. MiniLLM's
        # 500 Dolly test prompts) replaces it as the named evaluation set.
        eval_sets.update(extra_eval_sets)
        seen = {
            _key(i, x)
            for ds in extra_eval_sets.values()
            for i, x in zip(ds["instruction"], ds["input"], strict=True)
        }
        for s in ("train", "dev"):
            ds = splits[s]
            keep = [
                j
                for j, (i, x) in enumerate(zip(ds["instruction"], ds["input"], strict=True))
                if _key(i, x) not in seen
            ]
            if len(keep) < len(ds):
                notes.append(f"{len(ds) - len(keep)} {s} rows found in the evaluation sets were removed")
                splits[s] = ds.select(keep)
        notes.append(
            f"evaluation sets added: {sorted(extra_eval_sets)}" + (f" (replacing {clash})" if clash else "")
        )
    test_ds = splits["test"]
    splits["train"] = _subsample(splits["train"], max_train, split_seed, "subsample", "train")
    for s in ("dev", "test"):
        splits[s] = _subsample(splits[s], max_eval, split_seed, "subsample", s)
    eval_sets = {
        k: splits["test"] if v is test_ds else _subsample(v, max_eval, split_seed, "subsample", "eval", k)
        for k, v in eval_sets.items()
    }
    if max_train is not None or max_eval is not None:
        notes.append(f"subsampled (seeded, by task; max_train={max_train}, max_eval={max_eval})")
    if not notes:
        return data
    sizes = ", ".join(
        [f"{k} {len(v)}" for k, v in splits.items()] + [f"eval/{k} {len(v)}" for k, v in eval_sets.items()]
    )
    return replace(
        data,
        splits=DatasetDict(splits),
        eval_sets=eval_sets,
        description=f"{data.description} Then: {'; '.join(notes)}. Sizes now: {sizes}.",
    )
