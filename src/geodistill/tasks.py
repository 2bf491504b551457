"""Task adapters: how a task's batches are built, run through a model, scored and evaluated.

The training loop is task-agnostic; it sees :class:`Outputs` only. A classification task scores one
row of logits per example; an instruction task scores the answer tokens (see
:mod:`geodistill.instruct`). Features are pooled here, from the hidden states, with padding
masked out, so nothing below :mod:`geodistill.losses` knows about models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from geodistill.evaluate import classification_metrics
from geodistill.features import pool

__all__ = ["ClassificationTask", "Outputs", "Tap", "TeacherCache"]

Tap = tuple[int, str]  # (hidden-state index, pooling)


@dataclass
class Outputs:
    """What the losses need from one forward pass.

    ``logits`` (n, C) rows to score with ``targets`` (n,) (``-100`` = ignore); ``features`` maps a
    tap to its sample matrix; ``count`` is the number of units the per-example losses average over
    (examples, or answer tokens), used to weight micro-batches exactly.
    """

    logits: Tensor | None
    targets: Tensor | None
    features: dict[Tap, Tensor] = field(default_factory=dict)
    count: int = 0


def _model_inputs(batch: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[prefix + k] for k in keys if prefix + k in batch}


def map_fingerprint(ds: Any, encode: Any, tokenizers: Iterable[Any], **settings: Any) -> str:
    """The fingerprint of ``ds.map(encode, ...)`` (``datasets`` names cached map results by it):
    the source's fingerprint, ``encode``'s code, each tokenizer and ``settings``. ``datasets`` would
    otherwise dill-hash ``encode`` with its whole closure (the task, its data and tokenizers) on
    every call: ~0.3 s per tokenizer per split, more than the rest of a short run's data setup."""
    from datasets.fingerprint import Hasher

    return Hasher.hash([ds._fingerprint, encode.__code__, [_tokenizer_hash(t) for t in tokenizers], settings])


def rows_hash(ds: Any) -> str:
    """A digest of what a split holds (every column, in row order): two splits that a seed or a
    subsample drew differently differ here even where their descriptions agree (a published split
    subsampled with another ``split_seed`` says the same words)."""
    h = hashlib.sha256()
    for col in sorted(ds.column_names):
        h.update(json.dumps([col, ds[col]], default=str).encode())
    return h.hexdigest()[:16]


_TOKENIZER_HASHES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _tokenizer_hash(tokenizer: Any) -> str:
    """``datasets``' hash of ``tokenizer``, computed once per tokenizer object (tokenizers are
    not changed once a task holds them)."""
    from datasets.fingerprint import Hasher

    try:
        return _TOKENIZER_HASHES[tokenizer]
    except KeyError:
        value = _TOKENIZER_HASHES[tokenizer] = Hasher.hash(tokenizer)
        return value
    except TypeError:  # neither hashable nor weakly referable: hash it every time
        return Hasher.hash(tokenizer)


class ClassificationTask:
    """Sequence classification: one example -> one row of logits; features pooled per example
    (``cls``, ``mean``, ``last``) or per valid token (``tokens``)."""

    kind = "classification"

    def __init__(
        self, data: Any, student_tokenizer: Any, teacher_tokenizer: Any | None, max_length: int
    ) -> None:
        self.data = data
        self.tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = max_length
        # a teacher with another vocabulary gets its own input ids ("t_" columns)
        self.separate_teacher_inputs = teacher_tokenizer is not None and (
            teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
        )
        self._tokenized: dict[str, Any] = {}

    @property
    def num_labels(self) -> int:
        return len(self.data.label_names)

    def lengths(self, split: str, *, teacher: bool = False) -> list[int]:
        """Token count of every example of ``split`` (the teacher's own ids when it has them)."""
        key = "t_input_ids" if teacher and self.separate_teacher_inputs else "input_ids"
        return [len(ids) for ids in self.dataset(split)[key]]

    def dataset(self, split: str) -> Any:
        """Tokenised split with columns input_ids, attention_mask[, token_type_ids], labels, idx."""
        if split not in self._tokenized:
            if split not in self.data.splits:
                raise ValueError(f"split {split!r}: the data has {', '.join(map(repr, self.data.splits))}")
            ds = self.data.splits[split]
            ds = ds.add_column("idx", list(range(len(ds))))

            def encode(batch: dict[str, list]) -> dict[str, list]:
                texts = (batch["text"], batch["text_pair"]) if self.data.is_pair else (batch["text"],)
                out = dict(self.tokenizer(*texts, truncation=True, max_length=self.max_length))
                if self.separate_teacher_inputs:
                    t = self.teacher_tokenizer(*texts, truncation=True, max_length=self.max_length)
                    out.update({f"t_{k}": v for k, v in t.items()})
                out["labels"] = batch["label"]
                return out

            keep = {"idx"}
            tokenizers = (
                [self.tokenizer, self.teacher_tokenizer] if self.separate_teacher_inputs else [self.tokenizer]
            )
            fingerprint = map_fingerprint(
                ds, encode, tokenizers, pair=self.data.is_pair, max_length=self.max_length
            )
            ds = ds.map(
                encode,
                batched=True,
                remove_columns=[c for c in ds.column_names if c not in keep],
                new_fingerprint=fingerprint,
            )
            ds.set_format("python")
            self._tokenized[split] = ds
        return self._tokenized[split]

    def count(self, batch: dict[str, Tensor]) -> int:
        """Units the per-example losses average over: examples."""
        return int(batch["labels"].shape[0])

    def sample_rows(self, batch: dict[str, Tensor], pooling: str) -> int:
        """Rows of the student's ``pooling`` sample matrix of ``batch``: its valid tokens for
        ``tokens``, else one per example."""
        return int(batch["attention_mask"].sum()) if pooling == "tokens" else self.count(batch)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of tokenised rows into tensors (right padding)."""
        out: dict[str, Tensor] = {
            "labels": torch.tensor([r["labels"] for r in rows]),
            "idx": torch.tensor([r["idx"] for r in rows]),
        }
        prefixes = ("", "t_") if self.separate_teacher_inputs else ("",)
        for prefix in prefixes:
            tok = self.teacher_tokenizer if prefix else self.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            length = max(len(r[prefix + "input_ids"]) for r in rows)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if prefix + key not in rows[0]:
                    continue
                fill = pad_id if key == "input_ids" else 0
                padded = [r[prefix + key] + [fill] * (length - len(r[prefix + key])) for r in rows]
                out[prefix + key] = torch.tensor(padded)
        return out

    def forward(
        self, model: nn.Module, batch: dict[str, Tensor], taps: Iterable[Tap], *, teacher: bool = False
    ) -> Outputs:
        """Run ``model`` on ``batch`` and pool the requested taps."""
        taps = list(taps)
        prefix = "t_" if teacher and self.separate_teacher_inputs else ""
        inputs = _model_inputs(batch, prefix)
        out = model(**inputs, output_hidden_states=bool(taps))
        mask = inputs["attention_mask"].bool()
        feats = {(layer, p): pool(out.hidden_states[layer], mask, p) for layer, p in taps}
        return Outputs(
            logits=out.logits, targets=batch["labels"], features=feats, count=int(batch["labels"].numel())
        )

    @property
    def dev_metrics(self) -> tuple[str, ...]:
        """The names :meth:`evaluate` returns on dev (what ``train.select_metric`` may name)."""
        return (*self.data.metrics, "top_class_share")

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: str,
        *,
        batch_size: int,
        device: torch.device,
        metrics: Iterable[str] | None = None,
    ) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (the task's metrics by default)."""
        was_training = model.training
        model.eval()
        preds, labels = [], []
        # batches of similar length (less padding); the metrics do not depend on the order
        order = sorted(range(len(self.dataset(split))), key=self.lengths(split).__getitem__)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        loader = DataLoader(self.dataset(split), batch_sampler=batches, collate_fn=self.collate)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**_model_inputs(batch)).logits
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        predicted = torch.cat(preds)
        out = classification_metrics(
            predicted.numpy(),
            torch.cat(labels).numpy(),
            tuple(metrics or self.data.metrics),
            num_labels=len(self.data.label_names),
        )
        # a diagnostic, not a score: the share of examples given the most-predicted class; 1.0 means
        # the model answers one class whatever the input (a collapsed student), which reports flag
        out["top_class_share"] = float(torch.bincount(predicted).max()) / len(predicted)
        return out

    def cache_key(self) -> dict[str, Any]:
        """What determines the tokenised training inputs (for the teacher-output cache key)."""
        return {
            "data": self.data.name,
            "description": self.data.description,
            "n_train": len(self.data.splits["train"]),
            "train_rows": rows_hash(self.data.splits["train"]),
            "max_length": self.max_length,
            "tokenizer": type(self.tokenizer).__name__,
            "vocab": len(self.teacher_tokenizer or self.tokenizer),
        }


class TeacherCache:
    """Teacher logits and tapped features of every training example, computed once.

    Exact: the teacher is frozen, in eval mode and deterministic, so its outputs for an example do
    not depend on when they are computed (padding is masked; values agree with a live forward to
    float rounding). Per-example taps (``cls``/``mean``/``last``) are stored as (N, d) float32;
    ``tokens`` taps as one (total tokens, d) float32 block with offsets, so a batch's rows come out
    in the same row-major order as the student's ``hidden[mask]``. Stored on disk under the user
    cache, keyed by teacher, data and taps, so runs of a sweep share it.
    """

    def __init__(self, logits: Tensor, features: dict[Tap, Tensor], offsets: Tensor | None) -> None:
        self.logits = logits
        self.features = features
        self.offsets = offsets  # (N + 1,) token offsets for "tokens" taps

    @classmethod
    def build(
        cls,
        task: ClassificationTask,
        teacher: nn.Module,
        taps: list[Tap],
        *,
        batch_size: int,
        device: torch.device,
        path: Path | None = None,
        progress: bool = True,
    ) -> TeacherCache:
        if path is not None:
            from geodistill.assets import file_lock

            # runs of a sweep start together on a fresh cache: one computes, the others wait and read
            with file_lock(path.with_name(path.name + ".lock")):
                if path.exists():
                    return cls.load(path)
                cache = cls.build(
                    task, teacher, taps, batch_size=batch_size, device=device, progress=progress
                )
                cache.save(path)
                return cache
        ds = task.dataset("train")
        lens = torch.tensor(task.lengths("train", teacher=True), dtype=torch.long)
        # longest first, in batches of similar length: little padding; rows are put back in example order
        by_length = torch.argsort(-lens, stable=True).tolist()
        batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
        loader = DataLoader(ds, batch_sampler=batches, collate_fn=task.collate)
        n = len(ds)
        logits: Tensor | None = None
        pooled: dict[Tap, Tensor] = {}
        tokens: dict[Tap, list[Tensor | None]] = {t: [None] * n for t in taps if t[1] == "tokens"}
        teacher.eval()
        iterator = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc="teacher outputs (cached once)", leave=False)
        home = next(teacher.parameters()).device
        with torch.no_grad(), _placed(teacher, device, home):
            for batch in iterator:
                idx = batch["idx"]
                batch = {k: v.to(device) for k, v in batch.items()}
                out = task.forward(teacher, batch, taps, teacher=True)
                if logits is None:
                    logits = torch.zeros(n, out.logits.shape[-1])
                logits[idx] = out.logits.float().cpu()
                for t in taps:
                    value = out.features[t].float().cpu()
                    if t in tokens:  # (valid tokens of the batch, d), row-major: split per example
                        for i, rows in zip(idx.tolist(), value.split(lens[idx].tolist()), strict=True):
                            tokens[t][i] = rows
                    else:
                        if t not in pooled:
                            pooled[t] = torch.zeros(n, value.shape[-1])
                        pooled[t][idx] = value
        if logits is None:  # no training examples: the trainer stops with a message naming the data
            logits = torch.zeros(0, 0)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        feats = {**pooled, **{t: torch.cat(rows) for t, rows in tokens.items()}}  # type: ignore[arg-type]
        return cls(logits, feats, offsets)

    def save(self, path: Path) -> None:
        """Write the cache to ``path`` whole (a temporary file of this process, then renamed)."""
        from geodistill.assets import written_whole

        blob = {
            "logits": self.logits,
            "features": {f"{k[0]}:{k[1]}": v for k, v in self.features.items()},
            "offsets": self.offsets,
        }
        with written_whole(path) as tmp:
            torch.save(blob, tmp)

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        feats = {(int(k.split(":")[0]), k.split(":")[1]): v for k, v in blob["features"].items()}
        return cls(blob["logits"], feats, blob.get("offsets"))

    def lookup(self, batch: dict[str, Tensor], taps: Iterable[Tap], device: torch.device) -> Outputs:
        """The cached teacher :class:`Outputs` for the examples ``batch['idx']``."""
        idx = batch["idx"].cpu()
        feats = {}
        for t in taps:
            if t[1] == "tokens":
                assert self.offsets is not None
                rows = torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx.tolist()])
                feats[t] = self.features[t][rows].to(device)
            else:
                feats[t] = self.features[t][idx].to(device)
        return Outputs(
            logits=self.logits[idx].to(device), targets=batch["labels"], features=feats, count=len(idx)
        )


@contextlib.contextmanager
def _placed(model: nn.Module, device: torch.device, home: torch.device) -> Iterator[None]:
    """``model`` on ``device`` while the block runs, then back on ``home`` (a no-op when they agree)."""
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def cache_file(kind: str, parts: dict[str, Any]) -> Path:
    """A file in the user cache named by a hash of ``parts``."""
    from geodistill.assets import cache_dir

    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{digest}.pt"


def model_fingerprint(name: str) -> str:
    """What names a model in a cache key. Offline and hub names as they are (what they resolve to
    is pinned); a local directory by its path and the sha256 of each weight and config file, so a
    model saved again in place (the same size, in the same second) never reads the outputs or the
    fine-tune cached for the one it replaced."""
    p = Path(name)
    if not p.is_dir():
        return name
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    return f"{p.resolve()}:{[(f.name, _file_digest(f)) for f in files]}"


def teacher_fingerprint(name: str, passed_in: nn.Module | None = None) -> str:
    """A teacher's name in a cache key: a teacher passed in as a module by its weights (its name
    is the config's, whatever it holds), else :func:`model_fingerprint` of ``name``."""
    return module_fingerprint(passed_in) if passed_in is not None else model_fingerprint(name)


def module_fingerprint(model: nn.Module) -> str:
    """sha256 of a loaded model's state (every entry's name, dtype, shape and bytes): the cache key
    of a teacher passed in as a module, whose name says nothing about its weights."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(value.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_DIGESTS: dict[tuple[Any, ...], str] = {}


def _file_digest(f: Path) -> str:
    """sha256 of ``f``, hashed once per process for each stat stamp (inode, size, modification and
    change times: rewriting a file changes its change time even where its modification time is
    set back)."""
    from geodistill.assets import file_sha256

    st = f.stat()
    stamp = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = file_sha256(f)
    return _DIGESTS[stamp]
