"""Instruction-following distillation for decoder language models (the paper's OPT/Dolly setting).

    instruction data -> prompts (chat template) + answers -> answer-token logits and features
    -> the same loss terms and loop as classification (:mod:`geodistill.train`) -> generation + ROUGE-L

What is scored: the student reads ``prompt + answer`` and every term sees only the positions that
*predict an answer token* (prompt and padding are masked): cross-entropy on the answer tokens
(SFT), token-level forward or reverse KL against the teacher (``kd``), and the geometry terms on
the hidden states at those same positions (``pooling: tokens``: every answer position is a
sample; ``mean``/``last``: one sample per example, over its answer positions).

Memory: the LM head is applied to the answer positions only (:func:`answer_logits`), so a batch
yields ``(N_answer_tokens, V)`` logits, never ``(B, T, V)``; :func:`geodistill.losses.kd_loss`
then takes the KL over those rows in chunks, so no float32 softmax of the whole batch exists.
Teacher outputs are not cached (``V`` floats per token would not fit on disk for a real run): the
teacher runs live, frozen, in eval mode under ``no_grad``.

Students share the teacher's tokenizer (token-level terms need the same positions):
``layer_subset`` (some of the teacher's blocks), ``config`` (a narrower model of the teacher's
architecture or ``architecture: opt``...), ``pretrained`` (e.g. OPT-1.3B under OPT-13B; its
tokenizer must equal the teacher's, and ``kd`` needs the same vocabulary size).

``teacher.finetune: true`` first fine-tunes the teacher on the task's answers (SFT, cross-entropy
on answer tokens, with ``teacher_train``), cached and reused as for classification: the MiniLLM
protocol fine-tunes its OPT teachers on Dolly. An already instruction-tuned teacher (SmolLM2-
Instruct) takes ``teacher.finetune: false``. The student is initialised from ``teacher.name``
(never from the fine-tuned teacher), so SFT baselines and distilled students start alike.

Evaluation generates answers in batches (left padding) and scores ROUGE-L (``rouge_score``, with
Porter stemming; its tokeniser lower-cases and keeps ASCII letters and digits, see
:func:`geodistill.evaluate.rouge_l`) against every reference (maximum), plus exact match after
SQuAD normalisation (:func:`geodistill.evaluate.exact_match`, meaningful for short answers).
It also scores the reference answers teacher-forced (``answer_logprob``, mean log-probability per
answer token, and ``answer_token_accuracy``): no generation, and much less noise on small sets.
Dev selection during training decodes greedily; the final report follows the configured
decoding, e.g. the MiniLLM protocol (:data:`MINILLM_SAMPLING`: temperature 1, top-p 1, seeds
10..50, mean and std over seeds).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from geodistill.config import ConfigError, DistillConfig, loss_defaults
from geodistill.data.instructions import InstructionData, format_prompt
from geodistill.evaluate import exact_match, rouge_l
from geodistill.features import pool
from geodistill.losses import LossTerm
from geodistill.tasks import Outputs, Tap, map_fingerprint, rows_hash

__all__ = [
    "GREEDY",
    "MINILLM_SAMPLING",
    "GenerationOptions",
    "InstructionTask",
    "InstructionTaskData",
    "answer_logits",
    "answer_vocab",
    "check_answer_logits",
    "encode_prompts",
    "evaluate_saved_lm",
    "generate_answers",
    "generate_eval",
    "generation_options",
    "score_answers",
    "setup_instruction",
    "teacher_answers",
]

IGNORE = -100  # label of prompt and padding positions (torch's cross-entropy ignore_index)


# ------------------------------------------------------------------------------------------
# decoding options


@dataclass(frozen=True)
class GenerationOptions:
    """How answers are decoded at evaluation.

    Greedy (``do_sample=False``) is deterministic; sampling draws with ``temperature`` and
    nucleus ``top_p`` (no top-k), once per seed in ``seeds``; metrics are averaged over seeds.
    Sampled answers are reproducible for a given seed, data and batch size (the batch shares one
    random stream).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: tuple[int, ...] = (0,)
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


GREEDY = GenerationOptions()
MINILLM_SAMPLING = GenerationOptions(do_sample=True, temperature=1.0, top_p=1.0, seeds=(10, 20, 30, 40, 50))
"""The MiniLLM evaluation protocol (Gu et al., 2024; microsoft/LMOps minillm/scripts/opt/eval/
eval_main_*.sh and run_eval.sh): ``--do-sample --top-k 0 --top-p 1.0 --temperature 1.0`` (pure
ancestral sampling), seeds 10, 20, 30, 40, 50, mean ROUGE-L over seeds; prompts of at most 256 and
sequences of at most 512 tokens (our configs: ``max_prompt_length: 256``, ``max_new_tokens: 256``)."""


def generation_options(cfg: DistillConfig) -> GenerationOptions:
    """The report decoding of a config.

    Reads ``data.eval_decoding`` ("greedy" | "sample"), ``data.eval_temperature``,
    ``data.eval_top_p``, ``data.eval_seeds`` when the schema has them (defaults: greedy, 1.0,
    1.0, MiniLLM's seeds 10..50 when sampling) and ``data.max_new_tokens``.
    """
    d = cfg.data
    sample = d.eval_decoding == "sample"
    seeds = tuple(d.eval_seeds or ((10, 20, 30, 40, 50) if sample else (0,)))
    try:
        return GenerationOptions(
            do_sample=sample,
            temperature=float(d.eval_temperature),
            top_p=float(d.eval_top_p),
            seeds=seeds if sample else seeds[:1],
            max_new_tokens=d.max_new_tokens,
        )
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e


# ------------------------------------------------------------------------------------------
# prompts and answers


def _user_turn(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input.strip() else instruction


_SENTINELS = ("Aa", "Zz")  # stand-ins for the user's text that differ from their first character on


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cut_prompt(
    ids: list[int], head: int, tail: int, max_prompt_length: int, specials: set[int]
) -> list[int]:
    """``ids`` cut to ``max_prompt_length`` tokens: the first ``head`` and last ``tail`` tokens
    whole and the middle cut in its middle; when head and tail alone do not fit, the leading
    special tokens (ids in ``specials``) and the last tokens."""
    if len(ids) <= max_prompt_length:
        return ids
    if head + tail < max_prompt_length:
        budget = max_prompt_length - head - tail
        middle = ids[head : len(ids) - tail]
        front = budget // 2
        return ids[:head] + middle[:front] + middle[len(middle) - (budget - front) :] + ids[len(ids) - tail :]
    lead = 0
    while lead < len(ids) and ids[lead] in specials:
        lead += 1
    lead = min(lead, max_prompt_length - 1)
    return ids[:lead] + ids[len(ids) - (max_prompt_length - lead) :]


def encode_prompts(
    tokenizer: Any, instructions: Sequence[str], inputs: Sequence[str], max_prompt_length: int
) -> list[list[int]]:
    """Token ids of each prompt, at most ``max_prompt_length`` of them.

    With a chat template: one user turn (instruction, a blank line, input) and the assistant
    header (``add_generation_prompt=True``); the template writes its own special tokens. Without
    one: :func:`geodistill.data.instructions.format_prompt`, with the tokenizer's usual special
    tokens (OPT's ``</s>`` prefix, Llama's ``<s>``).

    A longer prompt is cut in the middle of its user text (from the instruction's start to the
    input's end): it keeps the template's head whole (the tokenizer's leading special tokens, then
    "Below is an instruction ... ### Instruction:" or the chat header up to the user's text), its
    tail whole (the part that ends with "### Response:" or the assistant header, which the answer
    follows), and of the user text its first and last tokens, half the remaining budget each. The
    head and tail are the tokens the prompt shares with the same template around stand-in text.
    Should head and tail alone not fit, the prompt keeps its leading special tokens and its last
    tokens instead.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))

    def render(instruction: str, input: str) -> str:
        if chat:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": _user_turn(instruction, input)}],
                add_generation_prompt=True,
                tokenize=False,
            )
        return format_prompt(instruction, input)

    def encode(texts: list[str]) -> list[list[int]]:
        # a chat template writes its own special tokens: none from the tokenizer on top
        return [list(p) for p in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]

    ids = encode([render(i, x) for i, x in zip(instructions, inputs, strict=True)])
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    frames: dict[bool, list[list[int]]] = {}  # the template around stand-in text, with and without input
    out = []
    for p, x in zip(ids, inputs, strict=True):
        if len(p) > max_prompt_length:
            shape = bool(x.strip())  # both templates drop the input block when it is blank
            if shape not in frames:
                frames[shape] = encode([render(s, s if shape else "") for s in _SENTINELS])
            head = min(_common_prefix(p, f) for f in frames[shape])
            tail = min(_common_prefix(p[::-1], f[::-1]) for f in frames[shape])
            p = _cut_prompt(p, head, tail, max_prompt_length, specials)
        out.append(p)
    return out


@dataclass(frozen=True)
class InstructionTaskData(InstructionData):
    """:class:`InstructionData` plus what the training loop reads from ``task.data``."""

    metric: str = "rougeL"
    metrics: tuple[str, ...] = ("rougeL", "exact_match")

    @classmethod
    def of(cls, data: InstructionData) -> InstructionTaskData:
        if isinstance(data, cls):
            return data
        return cls(**{f.name: getattr(data, f.name) for f in dataclasses.fields(InstructionData)})


# ------------------------------------------------------------------------------------------
# the answer-only LM head


def answer_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head on selected final hidden states: ``(N, d) -> (N, V)`` in the model's dtype.

    The same map as the model's own forward after its base model: ``lm_head`` (tied or not),
    then Gemma-style ``tanh`` soft-capping when the config asks for it. Architectures that scale
    logits otherwise are caught by :func:`check_answer_logits` at setup.
    """
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _answer_mask(labels: Tensor) -> Tensor:
    """(B, T) labels -> (B, T - 1) bool: position t predicts answer token t + 1."""
    return labels[:, 1:] != IGNORE


def check_answer_logits(model: nn.Module, where: str, *, length: int = 8) -> float:
    """Check on a short sequence that the answer-only path equals the model's full forward.

    Returns the largest absolute difference; raises ``ConfigError`` naming ``where`` when it is
    above float rounding for the model's dtype (an architecture whose logits are more than
    ``lm_head`` + soft-capping of the base model's output).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = (torch.arange(length, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)  # (1, T)
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE
    mask = _answer_mask(labels)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1][mask].float()
        hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        ours = answer_logits(model, hidden.last_hidden_state[:, :-1][mask]).float()
    model.train(was_training)
    diff = float((full - ours).abs().max())
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not diff <= tol * max(1.0, float(full.abs().max())):
        raise ConfigError(
            f"{where}: {type(model).__name__} computes its logits differently from lm_head(base_model(x)) "
            f"(max |difference| {diff:.3g}); its answer-only logits would be wrong, this architecture is not supported"
        )
    return diff


# ------------------------------------------------------------------------------------------
# the task adapter


class InstructionTask:
    """Instruction following with a decoder LM: the adapter :mod:`geodistill.train` drives.

    Training rows are ``prompt + answer + EOS`` (right padding; no EOS after a teacher's answer
    cut at its token limit, :meth:`replace_answers`); labels are ``-100`` on the prompt and
    padding. Outputs are per answer token: ``logits`` (N, V), ``targets`` (N,), ``count = N``.
    Evaluation generates answers (left padding) and scores ROUGE-L and exact match, and scores
    the reference answers teacher-forced (log-probability and token accuracy).

    Args:
        data: train/dev/test splits and evaluation sets (:func:`geodistill.data.load_instructions`).
        tokenizer: the tokenizer shared by teacher and student (needs an EOS token).
        max_length: prompt + answer tokens per training row (answers are cut at the end).
        max_prompt_length: prompt tokens, longer prompts cut in the middle (:func:`encode_prompts`);
            must be below ``max_length``.
        report: decoding of the test split and evaluation sets (dev is always greedy).
        max_new_tokens: answer tokens generated at evaluation.
        progress: show progress bars while generating.
    """

    kind = "instruction"
    separate_teacher_inputs = False  # one tokenizer: token positions of teacher and student agree

    def __init__(
        self,
        data: InstructionData,
        tokenizer: Any,
        *,
        max_length: int,
        max_prompt_length: int,
        max_new_tokens: int = 64,
        report: GenerationOptions | None = None,
        progress: bool = True,
    ) -> None:
        if not 0 < max_prompt_length < max_length:
            raise ConfigError(
                f"data.max_prompt_length ({max_prompt_length}) must be positive and below data.max_length "
                f"({max_length}), which also holds the answer"
            )
        if tokenizer.eos_token_id is None:
            raise ConfigError("teacher.name: its tokenizer has no EOS token to end answers with")
        self.data = InstructionTaskData.of(data)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.select = dataclasses.replace(GREEDY, max_new_tokens=max_new_tokens)
        self.report = report or self.select
        self.progress = progress
        self._tokenized: dict[str, Any] = {}
        self._unended: dict[str, frozenset[int]] = {}  # rows whose answer was cut: no EOS after it

    @property
    def dev_metrics(self) -> tuple[str, ...]:
        """The names :meth:`evaluate` returns on dev (what ``train.select_metric`` may name)."""
        names = ["rougeL", "exact_match", "answer_logprob", "answer_token_accuracy"]
        if len(self.select.seeds) > 1:
            names += ["rougeL_std", *(f"rougeL@seed{s}" for s in self.select.seeds)]
        return tuple(names)

    # -- data

    def rows(self, split: str) -> Any:
        """The raw split (train/dev/test) or evaluation set, in the instruction schema."""
        if split in self.data.splits:
            return self.data.splits[split]
        if split in self.data.eval_sets:
            return self.data.eval_sets[split]
        raise ValueError(
            f"unknown split {split!r}; splits: {list(self.data.splits)}, evaluation sets: {list(self.data.eval_sets)}"
        )

    def replace_answers(
        self, split: str, answers: Sequence[str], ended: Sequence[bool] | None = None
    ) -> None:
        """Train on other answers (e.g. the teacher's, sequence-level KD); references follow.

        ``ended[j]``: whether answer ``j`` is whole, so that its training row ends with EOS; an
        answer cut at a token limit gets none (the student should not learn to stop there). Default:
        all whole.
        """
        ds = self.rows(split)
        if len(answers) != len(ds):
            raise ValueError(f"{len(answers)} answers for {len(ds)} rows of {split!r}")
        if ended is not None and len(ended) != len(ds):
            raise ValueError(f"{len(ended)} ended flags for {len(ds)} rows of {split!r}")
        if ended is None or all(ended):
            self._unended.pop(split, None)
        else:
            self._unended[split] = frozenset(j for j, e in enumerate(ended) if not e)
        ds = ds.remove_columns(["output", "references"])
        ds = ds.add_column("output", list(answers)).add_column("references", [[a] for a in answers])
        splits = dict(self.data.splits)
        splits[split] = ds.cast(self.data.splits[split].features)
        from datasets import DatasetDict

        self.data = dataclasses.replace(self.data, splits=DatasetDict(splits))
        self._tokenized.pop(split, None)

    def dataset(self, split: str) -> Any:
        """Tokenised rows: ``input_ids`` (prompt + answer + EOS), ``labels`` (-100 on the prompt), ``idx``.

        An answer that :meth:`replace_answers` marked as cut (not ended) gets no EOS, unless it is
        empty (every row keeps an answer token).
        """
        if split not in self._tokenized:
            ds = self.rows(split)
            eos = self.tokenizer.eos_token_id
            unended = self._unended.get(split, frozenset())

            def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
                prompts = encode_prompts(
                    self.tokenizer, batch["instruction"], batch["input"], self.max_prompt_length
                )
                answers = self.tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
                ids, labels = [], []
                for j, p, a in zip(indices, prompts, answers, strict=True):
                    end = [eos] if j not in unended or not a else []
                    a = [*a, *end][: self.max_length - len(p)]  # >= 1 token: len(p) < max_length
                    ids.append(p + a)
                    labels.append([IGNORE] * len(p) + a)
                return {"input_ids": ids, "labels": labels}

            fingerprint = map_fingerprint(
                ds,
                encode,
                [self.tokenizer],
                prompts=[
                    f.__code__
                    for f in (encode_prompts, _cut_prompt, _common_prefix, _user_turn, format_prompt)
                ],
                max_prompt_length=self.max_prompt_length,
                max_length=self.max_length,
                unended=sorted(unended),
            )
            ds = ds.map(
                encode,
                batched=True,
                with_indices=True,
                remove_columns=ds.column_names,
                new_fingerprint=fingerprint,
            )
            ds = ds.add_column("idx", list(range(len(ds))))
            ds.set_format("python")
            self._tokenized[split] = ds
        return self._tokenized[split]

    def count(self, batch: dict[str, Tensor]) -> int:
        """Units the per-token losses average over: answer tokens (known before any forward pass)."""
        return int(_answer_mask(batch["labels"]).sum())

    def sample_rows(self, batch: dict[str, Tensor], pooling: str) -> int:
        """Rows of a ``pooling`` sample matrix of ``batch``: its answer tokens for ``tokens``, else
        one per example."""
        return self.count(batch) if pooling == "tokens" else int(batch["labels"].shape[0])

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Right-pad rows into ``input_ids``, ``attention_mask``, ``labels`` (B, T) and ``idx`` (B,)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, fill: int) -> Tensor:
            return torch.tensor([r[key] + [fill] * (length - len(r[key])) for r in rows])

        ids = padded("input_ids", pad)
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": padded("labels", IGNORE),
            "idx": torch.tensor([r["idx"] for r in rows]),
        }

    # -- the forward pass the losses see

    def forward(
        self, model: nn.Module, batch: dict[str, Tensor], taps: Iterable[Tap], *, teacher: bool = False
    ) -> Outputs:
        """Answer-token logits, targets and tapped features of ``model`` on ``batch``.

        ``logits`` (N, V) and ``targets`` (N,) at the N positions that predict answer tokens;
        ``features[(layer, pooling)]``: ``tokens`` (N, d), ``mean``/``last`` (B, d) over each
        example's answer positions. The LM head runs on those N rows only.
        """
        taps = list(taps)
        out = model.base_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=bool(taps),
            use_cache=False,
        )
        mask = _answer_mask(batch["labels"])  # (B, T - 1)
        logits = answer_logits(model, out.last_hidden_state[:, :-1][mask])  # (N, V)
        feats = {(layer, p): pool(out.hidden_states[layer][:, :-1], mask, p) for layer, p in taps}
        if teacher:  # a bf16/fp16 teacher: the geometry terms compute in float32 anyway
            feats = {k: v.float() for k, v in feats.items()}
        targets = batch["labels"][:, 1:][mask]  # (N,)
        return Outputs(logits=logits, targets=targets, features=feats, count=int(targets.numel()))

    # -- evaluation

    def prompts(self, split: str) -> tuple[list[list[int]], list[list[str]]]:
        """Prompt ids and references of a split or evaluation set."""
        ds = self.rows(split)
        ids = encode_prompts(self.tokenizer, ds["instruction"], ds["input"], self.max_prompt_length)
        return ids, [list(r) for r in ds["references"]]

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: str,
        *,
        batch_size: int,
        device: torch.device,
        options: GenerationOptions | None = None,
        predictions_dir: str | Path | None = None,
    ) -> dict[str, float]:
        """ROUGE-L and exact match (fractions) of generated answers on ``split``, and the
        teacher-forced scores of its reference answers (:meth:`answer_likelihood`).

        ``dev`` decodes greedily (checkpoint selection); other splits use ``self.report``.
        ``test`` also scores every other evaluation set, as ``<name>/rougeL`` etc. With
        ``predictions_dir``, the answers go to ``<predictions_dir>/<split>.jsonl``.
        """
        opts = options or (self.select if split == "dev" else self.report)
        out = generate_eval(
            model,
            self.tokenizer,
            self.rows(split),
            options=opts,
            batch_size=batch_size,
            device=device,
            max_prompt_length=self.max_prompt_length,
            progress=self.progress,
            desc=split,
            predictions_file=None if predictions_dir is None else Path(predictions_dir) / f"{split}.jsonl",
        )
        out.update(self.answer_likelihood(model, split, batch_size=batch_size, device=device))
        if split == "test":
            test = self.data.splits["test"]
            for name, ds in self.data.eval_sets.items():
                if ds is test or len(ds) == 0:
                    continue
                extra = self.evaluate(
                    model,
                    name,
                    batch_size=batch_size,
                    device=device,
                    options=opts,
                    predictions_dir=predictions_dir,
                )
                out.update({f"{name}/{k}": v for k, v in extra.items()})
        return out

    @torch.no_grad()
    def answer_likelihood(
        self, model: nn.Module, split: str, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Teacher-forced scores of the reference answers (``output`` + EOS, as in training) on ``split``.

        ``answer_logprob``: mean log-probability per answer token in nats (higher is better; minus
        it is the NLL, ``exp(-answer_logprob)`` the perplexity); ``answer_token_accuracy``: the
        fraction of answer tokens that are the model's top-1 prediction. One forward per batch, no
        generation: cheap, and on a few hundred examples far less noisy than ROUGE-L.
        """
        rows = sorted(self.dataset(split), key=lambda r: len(r["input_ids"]))  # less padding
        if not rows:
            raise ValueError(f"{split}: no examples to evaluate")
        was_training = model.training
        model.eval()
        logprob, correct, count = 0.0, 0, 0
        for start in range(0, len(rows), batch_size):
            batch = self.collate(rows[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = self.forward(model, batch, ())
            logits = out.logits.float()
            logprob += float(torch.log_softmax(logits, dim=-1).gather(1, out.targets[:, None]).sum())
            correct += int((logits.argmax(dim=-1) == out.targets).sum())
            count += out.count
        model.train(was_training)
        return {"answer_logprob": logprob / count, "answer_token_accuracy": correct / count}

    def cache_key(self) -> dict[str, Any]:
        """What determines the tokenised training rows."""
        return {
            "data": self.data.name,
            "description": self.data.description,
            "n_train": len(self.data.splits["train"]),
            "train_rows": rows_hash(self.data.splits["train"]),
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "tokenizer": type(self.tokenizer).__name__,
            "vocab": len(self.tokenizer),
            "chat_template": getattr(self.tokenizer, "chat_template", None),
        }


# ------------------------------------------------------------------------------------------
# generation and scoring


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    options: GenerationOptions = GREEDY,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Decode an answer for every prompt (token ids), in batches with left padding.

    Prompts are batched longest first (less padding); answers come back in the input order,
    special tokens removed, whitespace stripped. Generation stops at EOS (the tokenizer's and
    the model's generation-config EOS ids) or after ``options.max_new_tokens``. The decoding is
    ``options`` and transformers' global defaults only: the model's ``generation_config`` (a
    checkpoint's repetition penalty, minimum length, top-k...) is set aside during the call.
    Sampling draws from a stream seeded with ``seed``; the caller's RNG state is restored
    afterwards, so evaluating mid-training does not shift the training run's random stream.
    """
    return _generate(
        model,
        tokenizer,
        prompts,
        options=options,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=desc,
    )[0]


def _generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    options: GenerationOptions,
    seed: int,
    batch_size: int,
    device: torch.device | None,
    progress: bool,
    desc: str,
) -> tuple[list[str], list[bool]]:
    """:func:`generate_answers`, and for each answer whether it ended with EOS (False: cut at
    ``options.max_new_tokens``)."""
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature if options.do_sample else 1.0,
        top_p=options.top_p if options.do_sample else 1.0,
        top_k=0 if options.do_sample else None,  # 0: no top-k cut (MiniLLM samples the full nucleus)
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    ended: list[bool] = [False] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    # generate() fills every field that `config` leaves None from model.generation_config, e.g. a
    # checkpoint's repetition_penalty, no_repeat_ngram_size, min_new_tokens or suppress_tokens
    # (transformers 5 has no switch for this): a bare one stands in for the call
    model_config = model.generation_config
    model.generation_config = type(model_config)()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for chunk in batches:
                length = max(len(prompts[i]) for i in chunk)
                ids = torch.tensor([[pad] * (length - len(prompts[i])) + list(prompts[i]) for i in chunk])
                mask = torch.tensor([[0] * (length - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
                )
                new = out[:, length:]  # (B, <= max_new_tokens); after EOS only padding
                stopped = torch.isin(new, torch.tensor(eos, device=new.device)).any(dim=1).tolist()
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, text, stop in zip(chunk, texts, stopped, strict=True):
                    answers[i], ended[i] = text.strip(), bool(stop)
    finally:
        model.generation_config = model_config
        model.train(was_training)
    return answers, ended


def score_answers(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-L F (max over references) and exact match, as fractions in [0, 1]."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    return {
        "rougeL": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)])),
        "exact_match": float(
            np.mean([exact_match(p, r) for p, r in zip(predictions, references, strict=True)])
        ),
    }


def generate_eval(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    options: GenerationOptions = MINILLM_SAMPLING,
    batch_size: int = 16,
    device: torch.device | None = None,
    max_prompt_length: int = 384,
    progress: bool = True,
    desc: str = "generate",
    predictions_file: str | Path | None = None,
) -> dict[str, float]:
    """Generation metrics of ``model`` on an instruction dataset, one decoding run per seed.

    Returns ``rougeL`` and ``exact_match`` (means over seeds), and with several seeds also
    ``rougeL_std`` (over seeds, ddof 1) and per-seed values ``rougeL@seed<s>``. With
    ``predictions_file``, writes one JSON line per example (instruction, input, references,
    answers per seed). ``dataset`` has the instruction schema (instruction, input, references).
    """
    prompts = encode_prompts(tokenizer, dataset["instruction"], dataset["input"], max_prompt_length)
    references = [list(r) for r in dataset["references"]]
    if not prompts:
        raise ValueError(f"{desc}: no examples to evaluate")
    per_seed, answers = {}, {}
    for seed in options.seeds:
        answers[seed] = generate_answers(
            model,
            tokenizer,
            prompts,
            options=options,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=f"{desc} (seed {seed})" if len(options.seeds) > 1 else desc,
        )
        per_seed[seed] = score_answers(answers[seed], references)
    out = {k: float(np.mean([m[k] for m in per_seed.values()])) for k in ("rougeL", "exact_match")}
    if len(per_seed) > 1:
        out["rougeL_std"] = float(np.std([m["rougeL"] for m in per_seed.values()], ddof=1))
        out.update({f"rougeL@seed{s}": m["rougeL"] for s, m in per_seed.items()})
    if predictions_file is not None:
        path = Path(predictions_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for j in range(len(prompts)):
                row = {
                    "instruction": dataset[j]["instruction"],
                    "input": dataset[j]["input"],
                    "references": references[j],
                    "answers": {str(s): answers[s][j] for s in options.seeds},
                }
                f.write(json.dumps(row) + "\n")
    return out


# ------------------------------------------------------------------------------------------
# sequence-level KD: the teacher's answers as training targets (optional)


def teacher_answers(
    teacher: nn.Module,
    task: InstructionTask,
    *,
    batch_size: int,
    device: torch.device,
    path: Path | None = None,
    progress: bool = True,
) -> tuple[list[str], list[bool]]:
    """The teacher's greedy answers to every training prompt (Kim & Rush 2016, sequence-level KD),
    and for each whether it ended with EOS (False: cut at ``task.select.max_new_tokens``).

    Generated once and stored as JSON at ``path`` (keyed by the caller on teacher, data and
    prompt settings), ``{"answers": [...], "ended": [...]}``, so every run of a sweep trains on
    the same targets. A file of the older format, a bare list of answers, reads as answers that
    all ended (what training assumed of them then).
    """
    if path is not None:
        from geodistill.assets import file_lock, written_whole

        with file_lock(path.with_name(path.name + ".lock")):  # concurrent runs generate them once
            if not path.exists():
                answers, ended = teacher_answers(
                    teacher, task, batch_size=batch_size, device=device, progress=progress
                )
                with written_whole(path) as tmp:
                    tmp.write_text(json.dumps({"answers": answers, "ended": ended}))
                return answers, ended
            stored = json.loads(path.read_text())
            if isinstance(stored, list):
                return stored, [True] * len(stored)
            return stored["answers"], stored["ended"]
    prompts, _ = task.prompts("train")
    return _generate(
        teacher,
        task.tokenizer,
        prompts,
        options=task.select,
        seed=0,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="teacher answers (cached once)",
    )


# ------------------------------------------------------------------------------------------
# building a run


def _load_data(cfg: DistillConfig) -> InstructionData:
    from geodistill.data import load_instructions

    d = cfg.data
    options: dict[str, Any] = {}
    if d.max_per_task is not None:
        options["max_per_task"] = d.max_per_task
    eval_sets = d.eval_sets
    try:
        return load_instructions(
            d.name,
            split_seed=d.split_seed,
            max_train=d.max_train,
            max_eval=d.max_eval,
            eval_sets=eval_sets,
            **options,
        )
    except ValueError as e:
        raise ConfigError(f"data.name: {e}") from e


def _width(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def _instruction_terms(cfg: DistillConfig, terms: tuple[LossTerm, ...]) -> tuple[LossTerm, ...]:
    """Feature terms without a pooling default to ``tokens``; ``cls`` is refused.

    Position 0 of a decoder prompt is BOS or the same system-prompt token for every example: a
    constant sample matrix, whose centred geometry is empty.
    """
    out = []
    for i, term in enumerate(terms):
        if term.spec.inputs == "features":
            if cfg.losses[i].pooling is None:
                pooling = loss_defaults(term.name, "instruction")["pooling"]  # tokens
                term = dataclasses.replace(term, options={**term.options, "pooling": pooling})
            elif term.options["pooling"] == "cls":
                raise ConfigError(
                    f"losses[{i}].pooling: 'cls' is the first prompt token of a decoder (the same for every "
                    "example); use tokens (every answer position), mean or last"
                )
        out.append(term)
    return tuple(out)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def setup_instruction(
    cfg: DistillConfig,
    terms: tuple[LossTerm, ...],
    *,
    kind: str = "distill",
    progress: bool = True,
    teacher_override: nn.Module | None = None,
) -> Any:
    """Build and validate an instruction-following run (a :class:`geodistill.train.Run`).

    Called by :func:`geodistill.train.setup` for ``task: instruction`` after the output directory
    and loss entries are checked. Every config error surfaces here, before the first step, naming
    its field. ``teacher_override``: an already loaded teacher (then ``teacher.finetune`` and
    ``teacher.dtype`` do not apply; ``teacher.name`` still gives the tokenizer and the student).
    """
    from transformers import AutoConfig

    from geodistill import models
    from geodistill.tasks import cache_file, teacher_fingerprint
    from geodistill.train import (
        Objective,
        Run,
        Student,
        build_student,
        feature_pairs,
        run_metadata,
        seed_everything,
    )

    tcfg = cfg.train
    if cfg.data.max_new_tokens < 1:
        raise ConfigError(f"data.max_new_tokens must be >= 1, got {cfg.data.max_new_tokens}")
    report = generation_options(cfg)
    data = _load_data(cfg)
    terms = _instruction_terms(cfg, terms)
    needs_teacher = any(t.spec.inputs != "labels" for t in terms)
    seq_kd = cfg.data.answers == "teacher"
    device = torch.device(tcfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # teacher: optionally fine-tuned on the answers first (cached), frozen, in its configured dtype
    teacher_name = cfg.teacher.name
    try:
        teacher_tok = models.load_tokenizer(cfg.teacher.name)
    except (ValueError, OSError) as e:
        raise ConfigError(f"teacher.name: {e}") from e
    teacher = teacher_override
    if teacher is not None:
        teacher.eval().requires_grad_(False)  # a teacher passed in is used as given, frozen
    wants_teacher = teacher is None and (needs_teacher or seq_kd)
    finetune = wants_teacher and cfg.teacher.finetune

    def load_teacher(name: str) -> nn.Module:
        try:
            model = models.load_causal_lm(name, dtype=_dtype(cfg.teacher.dtype))
        except (ValueError, OSError) as e:
            raise ConfigError(f"teacher.name: {e}") from e
        return model.eval().requires_grad_(False)

    def teacher_config() -> Any:
        try:
            return AutoConfig.from_pretrained(models.resolve_model(cfg.teacher.name))
        except (ValueError, OSError) as e:
            raise ConfigError(f"teacher.name: {e}") from e

    if wants_teacher and not finetune:
        teacher = load_teacher(teacher_name)
    # what the checks below compare the student with: the teacher, or, before its fine-tune (minutes),
    # its config (the fine-tuned teacher has the same architecture), so config errors stop the run first
    teacher_arch: Any = teacher if teacher is not None else (teacher_config() if finetune else None)

    # student: seeded init, sharing the teacher's tokenizer
    seed_everything(tcfg.seed)
    s = cfg.student

    def load_pretrained(name: str) -> nn.Module:
        return models.load_causal_lm(name)

    def teacher_weights() -> nn.Module:
        # the loaded teacher is the pretrained one in float32 unless fine-tuned, cast or overridden
        reuse = (
            teacher is not None
            and teacher_override is None
            and teacher_name == cfg.teacher.name
            and cfg.teacher.dtype == "float32"
        )
        return teacher if reuse else models.load_causal_lm(cfg.teacher.name)

    student_model = build_student(
        s,
        load=load_pretrained,
        teacher_model=teacher_weights,
        teacher_config=teacher_config,
        layers_example="[0, 6, 12, 18, 24, 29]",
        task="causal-lm",
        tokenizer=teacher_tok,
    )
    tokenizer = teacher_tok
    if s.init == "pretrained":
        tokenizer = models.load_tokenizer(s.name)
        if (teacher_arch is not None or seq_kd) and tokenizer.get_vocab() != teacher_tok.get_vocab():
            raise ConfigError(
                f"student.name: {s.name!r} has another tokenizer than teacher.name {cfg.teacher.name!r}; "
                "token-level distillation needs one tokenizer"
            )
    student_model.float().requires_grad_(True)
    check_answer_logits(student_model, "student")

    def check_teacher(arch: Any) -> dict[str, tuple[tuple[int, int], ...]]:
        """Vocabulary and layer checks against the teacher (or its config), naming the loss entry."""
        if isinstance(arch, nn.Module):
            check_answer_logits(arch, "teacher.name")
        for i, term in enumerate(terms):
            if term.name == "kd" and arch is not None:
                vt, vs = answer_vocab(arch), answer_vocab(student_model)
                if vt != vs:
                    raise ConfigError(
                        f"losses[{i}] (kd): the teacher's logits cover {vt} tokens, the student's {vs}; "
                        "logit KD needs identical vocabularies (a student of the teacher's family, or drop kd)"
                    )
        return feature_pairs(terms, student_model, arch)

    pairs = check_teacher(teacher_arch)
    task = InstructionTask(
        data,
        tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        max_new_tokens=cfg.data.max_new_tokens,
        report=report,
        progress=progress,
    )
    if finetune:
        from geodistill.finetune import finetuned_teacher

        teacher_name = str(finetuned_teacher(cfg, progress=progress))
        teacher = load_teacher(teacher_name)
        pairs = check_teacher(teacher)

    if seq_kd:
        assert teacher is not None
        key = {
            "teacher": teacher_fingerprint(teacher_name, teacher_override),
            "dtype": cfg.teacher.dtype,
            "task": task.cache_key(),
            "max_new_tokens": cfg.data.max_new_tokens,
            "format": 2,  # 2: prompts cut in the middle (no longer from the left); whether each answer ended
        }
        answers, ended = teacher_answers(
            teacher.to(device),
            task,
            batch_size=tcfg.eval_batch_size,
            device=device,
            path=cache_file("teacher_answers", key).with_suffix(".json"),
            progress=progress,
        )
        task.replace_answers("train", answers, ended)
        teacher.cpu()
        if not needs_teacher:
            teacher = None

    objective = Objective(terms, pairs)
    student = Student(
        student_model,
        task,
        terms,
        pairs,
        _width(student_model),
        _width(teacher) if teacher is not None else _width(student_model),
        tcfg.seed,
    )
    metadata = run_metadata(cfg, kind)
    metadata["data_description"] = task.data.description
    return Run(
        cfg, tcfg, Path(cfg.output_dir), task, student, teacher, objective, tokenizer, metadata=metadata
    )


def answer_vocab(model: Any) -> int:
    """Width of a causal LM's logits: rows of its output embedding; for a config (a model not yet
    loaded), its ``vocab_size``, which those rows are built with."""
    if isinstance(model, nn.Module):
        return int(model.get_output_embeddings().weight.shape[0])
    config = model.get_text_config() if hasattr(model, "get_text_config") else model
    return int(config.vocab_size)


# ------------------------------------------------------------------------------------------
# evaluating a saved model


def evaluate_saved_lm(
    model: str,
    cfg: DistillConfig,
    splits: list[str] | None = None,
    *,
    predictions_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Generation metrics of a saved causal LM (directory, offline or hub name) on the config's data.

    ``splits`` are split names (dev, test) or evaluation-set names; default dev and test (test
    includes every evaluation set). Dev decodes greedily; the rest with the config's report
    decoding (:func:`generation_options`). With ``predictions_dir``, each split's answers go to
    ``<predictions_dir>/<split>.jsonl``.
    """
    from geodistill import models
    from geodistill.train import quiet_libraries

    quiet_libraries()
    tokenizer = models.load_tokenizer(model)
    net = models.load_causal_lm(model)
    device = torch.device(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)
    task = InstructionTask(
        _load_data(cfg),
        tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        max_new_tokens=cfg.data.max_new_tokens,
        report=generation_options(cfg),
        progress=progress,
    )
    return {
        split: task.evaluate(
            net, split, batch_size=cfg.train.eval_batch_size, device=device, predictions_dir=predictions_dir
        )
        for split in splits or ["dev", "test"]
    }
