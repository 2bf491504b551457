"""Instruction data: Natural Instructions v1 (real, cached), hub mappings offline, local files."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from datasets import Dataset, DatasetDict

from conftest import skip_if_unavailable
from geodistill.data.instructions import (
    FEATURES,
    MINILLM_EVAL_SETS,
    NI_HELDOUT_TASKS,
    _ni_source,
    finish_instructions,
    format_prompt,
    instruction_eval_set,
    instructions_from_hub,
    list_instruction_datasets,
    load_instructions,
    natural_instructions_from_table,
    natural_instructions_tasks,
    parse_natural_instructions,
)

# ---------------------------------------------------------------------------------------------
# Parsing and the S-NI split on a synthetic task directory (independent of the real data)


def _write_task(root: Path, name: str, n: int, prefix: str) -> None:
    examples = [
        {"input": f"{name} input {i}", "target": [f"out {i}", f"alt {i}"] if i % 2 else [f"out {i}"]}
        for i in range(n)
    ]
    examples.append({"input": "no target", "target": [""]})
    (root / name).mkdir()
    spec = {"name": name, "description": "short", "task_prefix": f"  {prefix}  ", "examples": examples}
    (root / name / "task.json").write_text(json.dumps(spec))


@pytest.fixture()
def tiny_ni(tmp_path: Path):
    for k, n in enumerate([30, 80, 12, 50]):
        _write_task(tmp_path, f"subtask00{k + 1}_src{k % 2}_task", n, f"Definition {k}")
    return parse_natural_instructions(tmp_path)


def test_parse_natural_instructions(tiny_ni) -> None:
    table, tasks = tiny_ni
    assert [t["name"] for t in tasks] == [f"subtask00{k}_src{(k - 1) % 2}_task" for k in (1, 2, 3, 4)]
    assert table.num_rows == 30 + 80 + 12 + 50 and all(t["dropped"] == 1 for t in tasks)
    assert tasks[1]["instruction"] == "Definition 1"
    assert (tasks[1]["start"], tasks[1]["stop"]) == (30, 110)
    rows = table.slice(31, 2).to_pylist()
    assert rows[0]["references"] == ["out 1", "alt 1"] and rows[0]["output"] == "out 1"
    assert rows[1]["references"] == ["out 2"]


def test_sni_split_is_task_disjoint_capped_and_seeded(tiny_ni) -> None:
    table, tasks = tiny_ni
    held = ["subtask003_src0_task"]
    kw = {"heldout_tasks": held, "max_per_task": 25, "dev_per_task": 5, "test_per_task": 10}
    data = natural_instructions_from_table(table, tasks, split_seed=0, **kw)
    assert data.splits["train"].features == FEATURES
    assert set(data.splits["test"]["task"]) == set(held)
    assert not set(data.splits["train"]["task"]) & set(held) and not set(data.splits["dev"]["task"]) & set(
        held
    )
    assert Counter(data.splits["train"]["task"]) == {
        "subtask001_src0_task": 25,
        "subtask002_src1_task": 25,
        "subtask004_src1_task": 25,
    }
    assert Counter(data.splits["dev"]["task"]) == dict.fromkeys(Counter(data.splits["train"]["task"]), 5)
    assert len(data.splits["test"]) == 10
    assert not set(data.splits["train"]["input"]) & set(data.splits["dev"]["input"])
    assert data.eval_sets["natural_instructions"]["input"] == data.splits["test"]["input"]
    assert data.splits["train"][0]["instruction"] == "Definition 0"
    # dev does not move when the per-task cap changes; the seed changes the draw
    uncapped = natural_instructions_from_table(table, tasks, split_seed=0, **{**kw, "max_per_task": None})
    assert uncapped.splits["dev"]["input"] == data.splits["dev"]["input"]
    assert len(uncapped.splits["train"]) == 30 + 80 + 50 - 15
    again = natural_instructions_from_table(table, tasks, split_seed=0, **kw)
    other = natural_instructions_from_table(table, tasks, split_seed=1, **kw)
    assert again.splits["train"]["input"] == data.splits["train"]["input"]
    assert other.splits["train"]["input"] != data.splits["train"]["input"]


def test_sni_split_errors(tiny_ni) -> None:
    table, tasks = tiny_ni
    with pytest.raises(ValueError, match=r"unknown Natural Instructions tasks.*nope"):
        natural_instructions_from_table(table, tasks, heldout_tasks=["nope"])
    with pytest.raises(ValueError, match="at least one"):
        natural_instructions_from_table(table, tasks, heldout_tasks=[t["name"] for t in tasks])
    with pytest.raises(ValueError, match="heldout_tasks must be"):
        natural_instructions_from_table(table, tasks, heldout_tasks="some")


# ---------------------------------------------------------------------------------------------
# The real Natural Instructions v1 (parsed once, then read from the user cache)


@pytest.fixture(scope="module")
def ni():
    with skip_if_unavailable():
        return load_instructions("natural_instructions", split_seed=0)


def test_natural_instructions_real(ni) -> None:
    names = natural_instructions_tasks()
    assert len(names) == 61 and set(NI_HELDOUT_TASKS) <= set(names)
    assert len(NI_HELDOUT_TASKS) == 11 and len({_ni_source(t) for t in NI_HELDOUT_TASKS}) == 4
    train, dev, test = (ni.splits[s] for s in ("train", "dev", "test"))
    assert set(test["task"]) == set(NI_HELDOUT_TASKS)
    assert set(train["task"]) == set(names) - set(NI_HELDOUT_TASKS) == set(dev["task"])
    # held-out sources never appear in training
    assert not {_ni_source(t) for t in train["task"]} & {_ni_source(t) for t in NI_HELDOUT_TASKS}
    assert max(Counter(train["task"]).values()) == 1000 and set(Counter(dev["task"]).values()) == {20}
    assert set(Counter(test["task"]).values()) == {100}
    assert len(train) == 35943 and len(dev) == 1000 and len(test) == 1100
    assert "193249 instances" in ni.description
    refs = test["references"]
    assert all(r and r[0] == o for r, o in zip(refs, test["output"], strict=True))
    assert sum(len(r) > 1 for r in refs) > 100  # multi-reference instances are kept
    row = train[0]
    assert row["instruction"].startswith("Definition:") and "Prompt:" in row["instruction"]
    assert set(ni.eval_sets) == {"natural_instructions"}


def test_natural_instructions_determinism_and_caps(ni) -> None:
    again = load_instructions("natural_instructions", split_seed=0, max_train=3000, max_eval=200)
    assert len(again.splits["train"]) == 3000 and len(again.splits["test"]) == 200
    assert len(again.eval_sets["natural_instructions"]) == 200
    assert set(again.splits["train"]["input"]) <= set(ni.splits["train"]["input"])
    assert len(set(again.splits["train"]["task"])) == 50  # stratified by task
    same = load_instructions("natural_instructions", split_seed=0, max_train=3000, max_eval=200)
    assert same.splits["train"]["input"] == again.splits["train"]["input"]
    other = load_instructions("natural_instructions", split_seed=1, max_eval=200)
    assert other.splits["test"]["input"] != again.splits["test"]["input"]


def test_natural_instructions_random_task_split() -> None:
    with skip_if_unavailable():
        a = load_instructions(
            "natural_instructions", split_seed=3, heldout_tasks="random", max_train=100, max_eval=50
        )
    b = load_instructions(
        "natural_instructions", split_seed=4, heldout_tasks="random", max_train=100, max_eval=50
    )
    held = set(a.splits["test"]["task"])
    assert 1 <= len(held) <= 11
    assert not {_ni_source(t) for t in a.splits["train"]["task"]} & {_ni_source(t) for t in held}
    assert held != set(b.splits["test"]["task"]) or a.splits["test"]["input"] != b.splits["test"]["input"]


# ---------------------------------------------------------------------------------------------
# Hub mappings on tiny in-memory data (no download)


def _dolly(n: int) -> DatasetDict:
    cats = ["open_qa", "closed_qa", "summarization", "brainstorming"]
    return DatasetDict(
        train=Dataset.from_dict(
            {
                "instruction": [f"question {i}" for i in range(n)],
                "context": [f"context {i}" if i % 3 == 0 else "" for i in range(n)],
                "response": [f" answer {i} " for i in range(n)],
                "category": [cats[i % 4] for i in range(n)],
            }
        )
    )


def test_dolly_mapping_minillm_protocol() -> None:
    data = instructions_from_hub("databricks/databricks-dolly-15k", _dolly(400), split_seed=0)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 320, "dev": 40, "test": 40}
    row = data.splits["train"][0]
    assert row["task"] in {"open_qa", "closed_qa", "summarization", "brainstorming"}
    assert row["output"] == row["references"][0] and not row["output"].startswith(" ")
    inputs = [set(ds["instruction"]) for ds in data.splits.values()]
    assert not inputs[0] & inputs[1] and not inputs[0] & inputs[2] and not inputs[1] & inputs[2]
    assert Counter(data.splits["test"]["task"]) == dict.fromkeys(
        ["open_qa", "closed_qa", "summarization", "brainstorming"], 10
    )
    big = instructions_from_hub("databricks/databricks-dolly-15k", _dolly(6000), split_seed=1)
    assert len(big.splits["test"]) == 500 and len(big.splits["dev"]) == 500
    assert set(big.eval_sets) == {"databricks-dolly-15k"}


def test_minillm_eval_set_mapping_and_decontamination() -> None:
    raw = Dataset.from_dict(
        {
            "instruction": ["question 3", "Name a colour."],
            "prompt": ["### Instruction ... 3", "### ..."],
            "input": ["context 3", ""],
            "output": [["answer 3", "other 3"], ["red", "blue"]],
        }
    )
    ev = instruction_eval_set("sinst", raw)
    assert ev.features == FEATURES and ev["task"] == ["sinst", "sinst"]
    assert ev["references"][1] == ["red", "blue"] and ev["output"][1] == "red"
    base = instructions_from_hub("dolly", _dolly(100), split_seed=0)
    assert "question 3" in [*base.splits["train"]["instruction"], *base.splits["dev"]["instruction"]]
    done = finish_instructions(base, {"sinst": ev}, max_eval=5)
    assert "question 3" not in [*done.splits["train"]["instruction"], *done.splits["dev"]["instruction"]]
    assert set(done.eval_sets) == {"dolly", "sinst"} and len(done.eval_sets["dolly"]) == 5
    assert "removed" in done.description
    assert set(MINILLM_EVAL_SETS) == {"dolly", "self_inst", "vicuna", "sinst", "uinst"}


def test_mapping_errors() -> None:
    with pytest.raises(ValueError, match=r"x\[train\].*output column.*columns: \['instruction', 'text'\]"):
        instructions_from_hub(
            "x", DatasetDict(train=Dataset.from_dict({"instruction": ["a"], "text": ["b"]}))
        )
    raw = DatasetDict(train=Dataset.from_dict({"instruction": ["a", "b"] * 10, "response": ["c", " "] * 10}))
    with pytest.raises(ValueError, match=r"x\[train\]: row 1: empty 'response'"):
        instructions_from_hub("x", raw, strict=True)
    lenient = instructions_from_hub("x", raw)  # published hub data: dropped and counted
    assert sum(len(d) for d in lenient.splits.values()) == 10 and "10 train rows" in lenient.description
    with pytest.raises(ValueError, match=r"natural_instructions does not take \['n_dev'\]"):
        load_instructions("natural_instructions", n_dev=10)
    with pytest.raises(ValueError, match=r"dolly does not take \['max_per_task'\]"):
        load_instructions("dolly", max_per_task=10)
    with pytest.raises(ValueError, match="keys must be from"):
        load_instructions("natural_instructions", max_train=10, eval_sets={"x": {"repo": "a/b"}})
    with pytest.raises(ValueError, match="unknown instruction dataset"):
        load_instructions("nonsense")


def test_local_jsonl_and_eval_set(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"instruction": f"do {i}", "input": "", "output": [f"done {i}", f"ok {i}"]}) + "\n"
            )
    evp = tmp_path / "ev.json"
    evp.write_text(json.dumps([{"instruction": "do 7", "output": ["done 7"]}]))
    data = load_instructions(str(path), eval_sets={"mine_ev": str(evp)})
    sizes = {k: len(v) for k, v in data.splits.items()}
    in_test = "do 7" in data.splits["test"]["instruction"]
    assert sizes["test"] == 6 and sizes["train"] + sizes["dev"] == 54 - (not in_test)
    assert "do 7" not in [*data.splits["train"]["instruction"], *data.splits["dev"]["instruction"]]
    assert set(data.eval_sets) == {"mine", "mine_ev"} and data.splits["train"][0]["task"] == "mine"
    row = data.splits["train"][0]
    assert row["references"] == [row["output"], row["output"].replace("done", "ok")]  # all references kept


def test_local_jsonl_keeps_raw_line_separators_in_strings(tmp_path: Path) -> None:
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings: they
    end no record, and an error after them names its own line."""
    path = tmp_path / "raw.jsonl"
    rows = [{"instruction": f"do {i}\u2028now", "output": f"done\u2029{i}\x85ok"} for i in range(40)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data = load_instructions(str(path))
    got = {(r["instruction"], r["output"]) for split in data.splits.values() for r in split}
    assert got == {(r["instruction"], r["output"]) for r in rows}
    with open(path, "a", encoding="utf-8") as f:
        f.write("[1, 2]\n")
    with pytest.raises(ValueError, match=r"raw\.jsonl: line 41: expected a JSON object"):
        load_instructions(str(path))


def test_format_prompt_and_registry() -> None:
    with_input = format_prompt("Translate.", "Bonjour")
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    assert "### Input" not in format_prompt("Say hi.", "") and format_prompt("Say hi.").endswith(
        "### Response:\n"
    )
    assert {"natural_instructions", "dolly", "databricks/databricks-dolly-15k"} <= set(
        list_instruction_datasets()
    )
