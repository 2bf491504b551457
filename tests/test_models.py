"""geodistill.models: loading by name or path, layer-subset and narrow students, saving.

Tiny random models (hidden 32, 4 layers, vocabulary 64) are built from configs, saved to temporary
directories and loaded by path: the same code path as a hub name, with no download. The real
offline MiniLM is used where it is already cached or can be fetched; SmolLM2's GGUF conversion is
marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from geodistill import models
from geodistill.assets import AssetError
from geodistill.models import (
    OFFLINE_MODELS,
    SUPPORTED_ARCHITECTURES,
    hidden_size,
    layer_subset_student,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    narrow_student,
    num_layers,
    resolve_model,
    save_student,
    transformer_layers,
    vocab_size,
)

VOCAB = 64
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox")


def tiny_config(arch: str) -> PretrainedConfig:
    """Hidden 32, 4 layers, 4 heads, vocabulary 64; special ids inside the vocabulary."""
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    llama_like = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **ids,
    }
    bert_like = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 72,
        **ids,
    }
    configs = {
        "bert": lambda: transformers.BertConfig(**bert_like),
        "roberta": lambda: transformers.RobertaConfig(**bert_like),
        "distilbert": lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=4, n_heads=4, max_position_embeddings=64, **ids
        ),
        "llama": lambda: transformers.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**llama_like, sliding_window=None),
        # layer_types: full, full, sliding, sliding: checks that a layer subset slices per-layer fields
        "qwen2": lambda: transformers.Qwen2Config(
            **llama_like, use_sliding_window=True, sliding_window=4, max_window_layers=2
        ),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            **ids,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**{**llama_like, "num_key_value_heads": None}),
    }
    return configs[arch]()


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """Encoders with a classification head, decoders with an LM head, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if arch in ENCODERS else AutoModelForCausalLM
    return auto.from_config(tiny_config(arch)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, with pad/bos/eos/unk at ids 0..3."""
    specials = ["[PAD]", "<s>", "</s>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens, the second right-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 5:] = 0
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def layer_prefix(model: PreTrainedModel) -> str:
    layers = transformer_layers(model)
    return next(name for name, module in model.named_modules() if module is layers) + "."


# ----------------------------------------------------------------------------------------------
# names and loading


def test_registry_and_resolve_passthrough(tmp_path: Path) -> None:
    from geodistill.assets import ASSETS

    assert set(OFFLINE_MODELS) == {"minilm-l6", "smollm2-135m-instruct"}
    for spec in OFFLINE_MODELS.values():
        assert spec.asset in ASSETS
    # hub names and local directories pass through untouched, without touching the network
    for name in ("bert-base-uncased", "facebook/opt-1.3b", str(tmp_path)):
        assert resolve_model(name) == name
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_model("")


def test_supported_architectures_cover_the_tests() -> None:
    assert set(ENCODERS + DECODERS) <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_load_by_path_and_size_helpers(arch: str, tmp_path: Path) -> None:
    """The hub code path: a checkpoint directory loads as a classifier (new head) and, for decoders, as an LM."""
    tiny_model(arch).save_pretrained(tmp_path)
    # encoders were saved with a 2-label head (loaded as is), decoders with none (new head)
    clf = load_classifier(str(tmp_path), 2, ["neg", "pos"])
    assert clf.config.id2label == {0: "neg", 1: "pos"}
    assert clf.config.label2id == {"neg": 0, "pos": 1}
    assert clf.config.pad_token_id is not None  # decoder heads need it to find the last real token
    with torch.no_grad():
        logits = clf.eval()(**batch()).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    if arch in ENCODERS:  # the saved head is the one loaded
        assert torch.equal(
            clf.state_dict()[k := next(k for k in clf.state_dict() if "classifier" in k)],
            tiny_model(arch).state_dict()[k],
        )
    for m in (clf, clf.config):
        assert (hidden_size(m), num_layers(m), vocab_size(m)) == (32, 4, VOCAB)
    assert len(transformer_layers(clf)) == 4
    if arch in DECODERS:
        lm = load_causal_lm(str(tmp_path))
        assert lm.dtype == torch.float32
        with torch.no_grad():
            assert lm(**batch()).logits.shape == (2, 7, VOCAB)
        assert len(transformer_layers(lm)) == 4


def test_load_classifier_replaces_the_report_with_a_summary(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).save_pretrained(tmp_path)  # no classification head
    with caplog.at_level("INFO", logger="geodistill.models"):
        load_classifier(str(tmp_path), 2)
    assert not any("LOAD REPORT" in r.getMessage() for r in caplog.records)
    assert any(
        "new classification head" in r.getMessage() and "classifier.weight" in r.getMessage()
        for r in caplog.records
    )
    assert not any(r.levelname == "WARNING" for r in caplog.records if r.name == "geodistill.models")

    # a backbone weight missing from the checkpoint is not "expected": it is still a warning
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    load_classifier(str(tmp_path), 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "bert.encoder.layer.1.output.dense.weight" in warnings[0]


def test_load_classifier_head_size_mismatch(tmp_path: Path, caplog) -> None:
    tiny_model("bert").save_pretrained(tmp_path)  # a 2-label head
    with pytest.raises(RuntimeError, match=r"differs from num_labels=3.*ignore_mismatched_sizes=True"):
        load_classifier(str(tmp_path), 3)
    # the report explaining it is not swallowed
    assert any("LOAD REPORT" in r.getMessage() and "MISMATCH" in r.getMessage() for r in caplog.records)
    model = load_classifier(str(tmp_path), 3, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 3


def test_load_tokenizer_pads_with_eos(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 2


def test_loader_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        load_classifier(str(tmp_path), 0)
    with pytest.raises(ValueError, match="has 2 names"):
        load_classifier(str(tmp_path), 3, ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        load_classifier(str(tmp_path), 2, ["a", "a"])
    with pytest.raises(ValueError, match=r"'minilm-l6'.*cannot be loaded for 'causal-lm'"):
        load_causal_lm("minilm-l6")


def test_unknown_name_error_lists_offline_models(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="minilm-l6, smollm2-135m-instruct"):
        load_tokenizer("no-such-org/no-such-model-geodistill")


# ----------------------------------------------------------------------------------------------
# layer-subset students


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_layer_subset_keeps_exactly_the_chosen_layers(arch: str, tmp_path: Path) -> None:
    teacher = tiny_model(arch)
    teacher.requires_grad_(False)  # a frozen teacher, as in distillation
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    keep = [0, 2, 3]
    student = layer_subset_student(teacher, keep)

    # weights: block k of the student is block keep[k] of the teacher, everything else identical
    prefix = layer_prefix(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    expected_keys = set()
    for key in t_sd:
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in keep:
                expected_keys.add(f"{prefix}{keep.index(int(index))}.{rest}")
        else:
            expected_keys.add(key)
    assert set(s_sd) == expected_keys
    for key, value in s_sd.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            source = f"{prefix}{keep[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_sd[source]), key
        assert value.data_ptr() != t_sd[source].data_ptr(), f"{key} shares memory with the teacher"

    # the teacher is untouched; the student is trainable and consistent
    assert len(transformer_layers(teacher)) == 4 and teacher.config.num_hidden_layers == 4
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert num_layers(student) == num_layers(student.config) == 3
    # every module that holds a config holds the student's (attention modules keep one)
    held = [
        m.config for m in student.modules() if isinstance(getattr(m, "config", None), type(student.config))
    ]
    assert held and all(c is student.config for c in held)
    idx = [m.layer_idx for m in transformer_layers(student).modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == ([0, 1, 2] if idx else [])
    if arch == "qwen2":
        assert teacher.config.layer_types == [
            "full_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
        ]
        assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]

    # round trip with plain transformers: no missing keys, identical outputs
    save_student(student, tiny_tokenizer(), tmp_path)
    auto = AutoModelForSequenceClassification if arch in ENCODERS else AutoModelForCausalLM
    reloaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        a = student.eval()(**batch()).logits
        b = reloaded.eval()(**batch()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if arch in DECODERS:  # the KV cache is indexed by layer_idx: generation fails if it was not renumbered
        prompt = batch()["input_ids"][:1, :4]
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        out_a = student.generate(prompt, **kwargs)
        out_b = reloaded.generate(prompt, **kwargs)
        assert torch.equal(out_a, out_b) and out_a.shape == (1, 9)


@pytest.mark.parametrize("arch", ["bert", "llama", "opt", "gpt2"])
def test_layer_subset_of_all_layers_is_the_teacher(arch: str) -> None:
    teacher = tiny_model(arch)
    student = layer_subset_student(teacher, [0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            student.eval()(**batch()).logits, teacher(**batch()).logits, rtol=0, atol=0
        )


def test_layer_subset_keeps_tied_embeddings() -> None:
    student = layer_subset_student(tiny_model("llama"), [1])
    assert student.lm_head.weight is student.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([0, 4], r"layer index 4 is out of range.*valid indices are 0\.\.3"),
        ([-1], r"layer index -1 is out of range.*0\.\.3"),
        ([], r"at least one layer.*0\.\.3"),
        ([2, 1], "strictly increasing"),
        ([1, 1], "strictly increasing"),
        ([0, 1.0], r"layer index 1\.0 is not an int"),
        ([True], "not an int"),
        ("01", "list of layer indices"),
    ],
)
def test_layer_subset_rejects_bad_indices(layers: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer_subset_student(tiny_model("gpt2"), layers)  # type: ignore[arg-type]


def test_unsupported_architecture_is_named() -> None:
    torch.manual_seed(0)
    config = transformers.ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    electra = transformers.ElectraForSequenceClassification(config)
    for fn in (transformer_layers, hidden_size, num_layers, vocab_size):
        with pytest.raises(
            ValueError, match=r"unsupported architecture 'electra'.*supported model_type values: bert"
        ):
            fn(electra)
    with pytest.raises(ValueError, match="'electra'"):
        layer_subset_student(electra, [0])
    with pytest.raises(TypeError, match="PreTrainedModel or PretrainedConfig"):
        hidden_size("bert")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# narrow students


def attention_widths(model: PreTrainedModel) -> set[int]:
    """Output widths of every Linear in the first block (q/k/v/o and MLP)."""
    block = transformer_layers(model)[0]
    widths = set()
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            widths |= {module.in_features, module.out_features}
        elif isinstance(module, transformers.pytorch_utils.Conv1D):  # GPT-2's transposed Linear
            widths |= set(module.weight.shape)
    return widths


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_narrow_student_shapes(arch: str) -> None:
    teacher_config = tiny_config(arch)
    task = "classification" if arch in ENCODERS else "causal-lm"
    torch.manual_seed(0)
    student = narrow_student(teacher_config, num_layers=2, hidden_size=16, num_heads=2, task=task)
    assert type(student.config) is type(teacher_config)
    assert (hidden_size(student), num_layers(student), vocab_size(student)) == (16, 2, VOCAB)
    assert student.get_input_embeddings().weight.shape == (VOCAB, 16)
    assert student.dtype == torch.float32
    # the teacher's MLP/hidden ratio (2 here, 4 for GPT-2's implicit n_inner) is kept
    mlp = 64 if arch == "gpt2" else 32
    assert getattr(student.config, models._ARCHS[arch].intermediate) == mlp
    # every Linear of a block maps between the new widths: 16, heads (KV 8), MLP, fused QKV (NeoX 48, GPT-2 3 x 16)
    assert mlp in attention_widths(student) and attention_widths(student) <= {8, 16, 32, 48, mlp}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(student.config, key) == getattr(teacher_config, key) or (
            key == "pad_token_id" and arch == "gpt2"
        )
    if arch in ("llama", "mistral", "qwen2"):
        # head_dim follows the new width; teacher 4 heads / 2 KV -> 2 heads / 1 KV keeps the ratio
        # (Qwen2 has no head_dim field: it derives hidden // heads itself)
        assert getattr(student.config, "head_dim", 8) == 8 and student.config.num_key_value_heads == 1
        attn = transformer_layers(student)[0].self_attn
        assert attn.q_proj.weight.shape == (16, 16) and attn.k_proj.weight.shape == (8, 16)
    if arch == "qwen2":
        assert student.config.layer_types == ["full_attention", "full_attention"]
    ids = batch()
    with torch.no_grad():
        logits = student.eval()(**ids).logits
    assert logits.shape == ((2, 2) if task == "classification" else (2, 7, VOCAB))
    assert torch.isfinite(logits).all()


def test_narrow_student_is_seeded_and_overrides_apply() -> None:
    config = tiny_config("llama")
    kwargs = {"num_layers": 2, "hidden_size": 24, "num_heads": 6, "task": "causal-lm"}
    torch.manual_seed(3)
    a = narrow_student(config, **kwargs)
    torch.manual_seed(3)
    a2 = narrow_student(config, **kwargs)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), a2.state_dict().values(), strict=True)
    )
    b = narrow_student(config, **kwargs, intermediate_size=40, num_key_value_heads=2, rms_norm_eps=1e-3)
    assert a.config.num_key_value_heads == 3  # 6 * 2 / 4
    assert a.config.intermediate_size == 48
    assert (b.config.num_key_value_heads, b.config.intermediate_size, b.config.rms_norm_eps) == (2, 40, 1e-3)
    assert config.hidden_size == 32 and config.num_hidden_layers == 4  # the teacher's config is not mutated


def test_narrow_student_of_another_architecture_shares_the_vocabulary() -> None:
    teacher = tiny_config("llama")
    teacher.pad_token_id = None
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    opt = narrow_student(
        teacher,
        num_layers=2,
        hidden_size=16,
        num_heads=4,
        task="causal-lm",
        architecture="opt",
        tokenizer=tok,
    )
    assert opt.config.model_type == "opt"
    assert (opt.config.vocab_size, opt.config.max_position_embeddings) == (VOCAB, 64)
    # OPT's own defaults (pad 1, bos 2) index another vocabulary: the teacher's (and tokenizer's) are used
    assert (opt.config.pad_token_id, opt.config.bos_token_id, opt.config.eos_token_id) == (0, 1, 2)
    assert opt.config.word_embed_proj_dim == 16 and opt.config.ffn_dim == 32
    with torch.no_grad():
        assert opt(**batch()).logits.shape == (2, 7, VOCAB)
    # and a classifier whose label names follow the teacher's when the counts agree
    bert = tiny_config("bert")
    bert.id2label, bert.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    gpt2 = narrow_student(
        bert, num_layers=1, hidden_size=16, num_heads=2, task="classification", architecture="gpt2"
    )
    assert gpt2.config.id2label == {0: "neg", 1: "pos"} and gpt2.config.vocab_size == VOCAB
    assert (gpt2.config.pad_token_id, gpt2.config.bos_token_id, gpt2.config.eos_token_id) == (0, 1, 2)
    bert.pad_token_id, bert.eos_token_id = None, 2  # a decoder classifier needs a pad id: eos stands in
    gpt2 = narrow_student(
        bert, num_layers=1, hidden_size=16, num_heads=2, task="classification", architecture="gpt2"
    )
    assert gpt2.config.pad_token_id == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 30, "num_heads": 4}, r"hidden_size=30 is not divisible by num_heads=4"),
        ({"num_heads": 0}, r"num_heads must be a positive int, got 0"),
        ({"num_layers": 2.5}, r"num_layers must be a positive int, got 2\.5"),
        ({"task": "seq2seq"}, r"task must be one of .*'seq2seq'"),
        ({"num_labels": 3}, r"num_labels=3 is only meaningful for task='classification'"),
        ({"architecture": "t5"}, r"unsupported student architecture 't5'"),
        ({"architecture": "bert"}, r"'bert' is an encoder; task='causal-lm' needs a decoder"),
        ({"hiden_size": 8}, r"unknown config field 'hiden_size' for a LlamaConfig student"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3 must be a positive divisor of num_heads=4"),
    ],
)
def test_narrow_student_errors(kwargs: dict, match: str) -> None:
    args = {"num_layers": 2, "hidden_size": 16, "num_heads": 4, "task": "causal-lm", **kwargs}
    with pytest.raises(ValueError, match=match):
        narrow_student(tiny_config("llama"), **args)


# ----------------------------------------------------------------------------------------------
# saving: loads with plain transformers, in a process that never imports geodistill


def test_saved_students_load_without_geodistill(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = narrow_student(tiny_config("llama"), num_layers=2, hidden_size=16, num_heads=4, task="causal-lm")
    clf = layer_subset_student(tiny_model("bert"), [1, 3])
    save_student(lm, tok, tmp_path / "lm")
    save_student(clf, tok, tmp_path / "clf")
    assert (tmp_path / "lm" / "model.safetensors").is_file() and (
        tmp_path / "clf" / "model.safetensors"
    ).is_file()
    ids = batch()
    with torch.no_grad():
        expected = {"lm": lm.eval()(**ids).logits, "clf": clf.eval()(**ids).logits}
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / "lm")!r}).eval()
        clf = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "clf")!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "lm")!r})
        assert tok("w1 w2").input_ids == [5, 6], tok("w1 w2").input_ids
        with torch.no_grad():
            assert torch.equal(lm(**ref["ids"]).logits, ref["expected"]["lm"])
            assert torch.equal(clf(**ref["ids"]).logits, ref["expected"]["clf"])
        assert not any(m.startswith("geodistill") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_save_student_type_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_student(torch.nn.Linear(2, 2), tiny_tokenizer(), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokenizer"):
        save_student(tiny_model("gpt2"), "gpt2", tmp_path)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# materialising a GGUF model: once, atomically, under concurrency (conversion faked; the real one is slow)


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path: Path) -> list[Path]:
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "asset_path", lambda key, member: tmp_path / "model.gguf")
    calls: list[Path] = []

    def convert(gguf_file: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other threads to reach the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_materialise_converts_once_under_concurrency(fake_conversion: list[Path], tmp_path: Path) -> None:
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("smollm2-135m-instruct")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert results == [str(target)] * 4
    assert len(fake_conversion) == 1
    marker = json.loads((target / "geodistill_source.json").read_text())
    assert marker["sha256"] == models.ASSETS["smollm2"].sha256
    assert marker["conversion"] == models._CONVERSION_VERSION
    assert target.stat().st_mode & 0o777 == 0o755  # readable by other users of a shared cache
    # no temporary directories left behind; a second call does not convert again
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == ["smollm2-135m-instruct"]
    resolve_model("smollm2-135m-instruct")
    assert len(fake_conversion) == 1


def test_materialise_replaces_broken_copies_and_cleans_up_failures(
    fake_conversion: list[Path], tmp_path: Path, monkeypatch
) -> None:
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: an interrupted or hand-made copy
    assert resolve_model("smollm2-135m-instruct") == str(target)
    assert len(fake_conversion) == 1 and (target / "geodistill_source.json").is_file()

    # a marker from another pin of the package is stale too
    (target / "geodistill_source.json").write_text(json.dumps({"sha256": "0" * 64}))
    resolve_model("smollm2-135m-instruct")
    assert len(fake_conversion) == 2

    def broken(gguf_file: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    (target / "geodistill_source.json").unlink()
    with pytest.raises(RuntimeError, match="conversion failed"):
        resolve_model("smollm2-135m-instruct")
    assert not (target / "geodistill_source.json").exists()
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["smollm2-135m-instruct"]


# ----------------------------------------------------------------------------------------------
# the real offline models


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    try:
        return resolve_model("minilm-l6")
    except AssetError as e:  # no index access and no seeded archive: nothing to test against
        pytest.skip(f"MiniLM asset unavailable: {e}")


def test_minilm_teacher_and_students(minilm_dir: str) -> None:
    assert Path(minilm_dir, "model.safetensors").is_file()
    tok = load_tokenizer("minilm-l6")
    teacher = load_classifier("minilm-l6", 2, ["negative", "positive"]).eval()
    assert (hidden_size(teacher), num_layers(teacher), vocab_size(teacher)) == (384, 6, 30522)
    enc = tok(
        ["A gripping, beautifully acted film.", "Dull and far too long."], padding=True, return_tensors="pt"
    )
    assert tok.convert_ids_to_tokens(enc.input_ids[0, :3].tolist()) == ["[CLS]", "a", "gripping"]  # uncased
    with torch.no_grad():
        logits = teacher(**enc).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert teacher.config.id2label == {0: "negative", 1: "positive"}

    subset = layer_subset_student(teacher, [0, 2, 4])
    assert num_layers(subset) == 3 and hidden_size(subset) == 384
    torch.testing.assert_close(
        transformer_layers(subset)[2].attention.self.query.weight,
        transformer_layers(teacher)[4].attention.self.query.weight,
        rtol=0,
        atol=0,
    )
    torch.manual_seed(0)
    narrow = narrow_student(teacher.config, num_layers=4, hidden_size=192, num_heads=4, task="classification")
    assert (hidden_size(narrow), num_layers(narrow), vocab_size(narrow)) == (192, 4, 30522)
    assert narrow.config.intermediate_size == 768 and narrow.config.id2label == teacher.config.id2label
    with torch.no_grad():
        for student in (subset, narrow):
            out = student.eval()(**enc).logits
            assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.slow
def test_smollm2_gguf_materialises_and_answers() -> None:
    try:
        path = resolve_model("smollm2-135m-instruct")
    except AssetError as e:
        pytest.skip(f"SmolLM2 asset unavailable: {e}")
    assert Path(path, "model.safetensors").is_file()
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.model_max_length == 8192 and tok.eos_token == "<|im_end|>"
    model = load_causal_lm("smollm2-135m-instruct").eval()
    assert (hidden_size(model), num_layers(model), vocab_size(model)) == (576, 30, 49152)
    assert (
        model.config.num_key_value_heads == 3 and getattr(model.config, "quantization_config", None) is None
    )
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer
    # a layer-subset student of the real teacher generates (KV-cache slots renumbered)
    student = layer_subset_student(model, list(range(0, 30, 5)))
    with torch.no_grad():
        assert (
            student.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1]
            == prompt["input_ids"].shape[1] + 3
        )
