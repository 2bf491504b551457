"""Instruction-following distillation (geodistill.instruct) on tiny local models.

Teacher and students share one word-level tokenizer built here; models are tiny Llama/OPT/GPT-2
configs saved to temporary directories, data a local jsonl file: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from geodistill.config import ConfigError, DistillConfig, from_dict, load_config
from geodistill.data import load_instructions
from geodistill.data.instructions import format_prompt
from geodistill.instruct import (
    GREEDY,
    GenerationOptions,
    InstructionTask,
    check_answer_logits,
    encode_prompts,
    evaluate_saved_lm,
    generate_answers,
    generate_eval,
    score_answers,
    setup_instruction,
    teacher_answers,
)
from geodistill.losses import kd_loss, resolve_losses
from geodistill.train import setup, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "geodistill" / "configs" / "instruct"
SPECIALS = ["[PAD]", "<s>", "</s>", "[UNK]"]
WORDS = [f"w{i}" for i in range(24)]
INSTRUCTIONS = ["copy the words", "say the first word", "say the last word", "count"]
VOCAB = SPECIALS + sorted(
    {*WORDS, *" ".join(INSTRUCTIONS).split(), "one", "two", "three", "four", "user", "assistant"}
)


def tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`VOCAB`, pad/bos/eos/unk = 0..3; optionally a chat template."""
    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    if chat:
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}"
        )
    return tok


def tiny_lm(arch: str, *, layers: int = 4, hidden: int = 32, vocab: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    v = vocab or len(VOCAB)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=v,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **ids,
        )
    elif arch == "opt":
        config = transformers.OPTConfig(
            vocab_size=v,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            **ids,
        )
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=v,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:  # gemma2: logits soft-capped
        config = transformers.Gemma2Config(
            vocab_size=v,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            final_logit_softcapping=3.0,
            **ids,
        )
    return AutoModelForCausalLM.from_config(config).eval()


def write_data(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Four word tasks with exact answers (copy, first, last, count), ``n`` rows."""
    g = torch.Generator().manual_seed(seed)
    names = ["one", "two", "three", "four"]
    with open(path, "w") as f:
        for i in range(n):
            k = 1 + int(torch.randint(0, 4, (1,), generator=g))
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]
            task = i % 4
            output = [" ".join(words), words[0], words[-1], names[k - 1]][task]
            row = {"instruction": INSTRUCTIONS[task], "input": " ".join(words), "output": output}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine idle threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """Saved tiny teacher (Llama, 4 layers), OPT teacher and pretrained OPT student, data file."""
    root = tmp_path_factory.mktemp("instruct")
    tok = tiny_tokenizer()
    out = {"data": str(write_data(root / "words.jsonl"))}
    for name, model in {
        "llama": tiny_lm("llama"),
        "opt": tiny_lm("opt"),
        "opt_small": tiny_lm("opt", layers=2, hidden=16, seed=1),
        "opt_other_vocab": tiny_lm("opt", layers=2, hidden=16, vocab=len(VOCAB) + 8, seed=2),
    }.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def make_cfg(assets: dict[str, str], tmp_path: Path, **over: Any) -> DistillConfig:
    """A small instruction config on the tiny assets; ``over`` replaces whole sections."""
    base = {
        "task": "instruction",
        "data": {"name": assets["data"], "max_length": 40, "max_prompt_length": 24, "max_new_tokens": 6},
        "teacher": {"name": assets["llama"], "finetune": False},
        "student": {"init": "layer_subset", "layers": [0, 2]},
        "losses": [{"name": "kd"}],
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "eval_batch_size": 8,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "device": "cpu",
            "threads": 1,
            "log_every": 1,
            "eval_every": 1000,
        },
        "output_dir": str(tmp_path / "run"),
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return from_dict(DistillConfig, base)


def make_task(assets: dict[str, str], tok=None, data=None, **kw: Any) -> InstructionTask:
    data = data or load_instructions(assets["data"])
    opts = {"max_length": 40, "max_prompt_length": 24, "max_new_tokens": 6, "progress": False, **kw}
    return InstructionTask(data, tok or tiny_tokenizer(), **opts)


# ------------------------------------------------------------------------------------------
# batches: prompts, answers, masks


def test_labels_mask_the_prompt_and_padding(assets) -> None:
    task = make_task(assets)
    tok = task.tokenizer
    rows = task.data.splits["train"]
    ds = task.dataset("train")
    for j in range(8):
        r, row = ds[j], rows[j]
        prompt = encode_prompts(tok, [row["instruction"]], [row["input"]], 24)[0]
        answer = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r["input_ids"] == prompt + answer
        assert r["labels"] == [-100] * len(prompt) + answer  # only answer tokens (and EOS) count
    batch = task.collate([ds[j] for j in range(8)])
    lengths = [len(ds[j]["input_ids"]) for j in range(8)]
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding never counts
    answers = sum(sum(1 for x in ds[j]["labels"] if x != -100) for j in range(8))
    assert task.count(batch) == answers


def test_truncation_prompt_from_the_left_total_to_max_length(assets) -> None:
    tok = tiny_tokenizer()
    task = make_task(assets, tok, max_length=9, max_prompt_length=5)
    row = task.data.splits["train"][0]
    full = encode_prompts(tok, [row["instruction"]], [row["input"]], 1000)[0]
    r = task.dataset("train")[0]
    assert r["input_ids"][:5] == full[-5:] and len(r["input_ids"]) <= 9
    assert all(
        len(x["input_ids"]) <= 9 and any(v != -100 for v in x["labels"]) for x in task.dataset("train")
    )
    with pytest.raises(ConfigError, match=r"data\.max_prompt_length \(9\)"):
        make_task(assets, tok, max_length=9, max_prompt_length=9)


def test_chat_template_prompt(assets) -> None:
    tok = tiny_tokenizer(chat=True)
    ids = encode_prompts(tok, ["copy the words"], ["w1 w2"], 100)[0]
    # the template writes BOS itself: no second BOS from the tokenizer
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        *["user", "copy", "the", "words", "w1", "w2", "assistant"],
    ]
    plain = encode_prompts(tiny_tokenizer(), ["copy the words"], ["w1 w2"], 100)[0]
    assert "assistant" not in tiny_tokenizer().convert_ids_to_tokens(plain)  # format_prompt otherwise


def template_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """:func:`tiny_tokenizer` that also knows the words of :func:`format_prompt`'s template and,
    like OPT's, writes BOS before every text (the chat template writes its own)."""
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = {w for text in (format_prompt("i", "x"), format_prompt("i")) for w, _ in split(text)}
    vocab = VOCAB + sorted(words - set(VOCAB))
    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    tok.chat_template = tiny_tokenizer(chat=True).chat_template if chat else None
    return tok


@pytest.mark.parametrize("chat", [False, True])
def test_long_prompts_lose_the_middle_of_the_user_text(chat: bool) -> None:
    """A prompt over the limit keeps BOS, the template's header and its response marker, and the
    first and last tokens of the instruction-to-input text; shorter prompts are left alone."""
    tok = template_tokenizer(chat)
    instruction, text = "copy the words", " ".join(WORDS * 2)

    def encode(limit: int) -> list[int]:
        return encode_prompts(tok, [instruction], [text], limit)[0]

    full = encode(10_000)
    names = tok.convert_ids_to_tokens(full)
    start = names.index("copy")  # the user text: "copy" .. the input's last word
    end = len(names) - names[::-1].index(WORDS[-1])
    head, tail = full[:start], full[end:]
    if chat:
        assert names[:start] == ["<s>", "user"] and names[end:] == ["assistant"]
    else:
        assert names[:4] == ["<s>", "Below", "is", "an"] and names[start - 3 : start] == [
            "###",
            "Instruction",
            ":",
        ]
        assert names[end:] == ["###", "Response", ":"]
    for limit in (len(head) + len(tail) + 1, len(head) + len(tail) + 9, len(full) - 1):
        cut = encode(limit)
        budget = limit - len(head) - len(tail)
        front = budget // 2
        assert cut == head + full[start : start + front] + full[end - (budget - front) : end] + tail
    assert encode(len(full)) == full  # fits: unchanged
    # head and tail alone do not fit: BOS, then the end of the prompt
    assert encode(len(head) + len(tail) - 1) == full[:1] + full[len(full) - (len(head) + len(tail) - 2) :]


# ------------------------------------------------------------------------------------------
# the answer-only LM head


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma2"])
def test_answer_logits_equal_the_full_forward(arch: str, assets) -> None:
    model = tiny_lm(arch, layers=2)
    task = make_task(assets)
    batch = task.collate([task.dataset("train")[j] for j in range(6)])
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = task.forward(model, batch, [(1, "tokens"), (2, "mean"), (2, "last")])
    hook.remove()
    mask = batch["labels"][:, 1:] != -100
    n = int(mask.sum())
    assert seen == [(n, 32)]  # the head ran on the answer positions only, never on (B, T, d)
    full = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    torch.testing.assert_close(out.logits, full.logits[:, :-1][mask], atol=1e-5, rtol=1e-5)
    assert out.targets.tolist() == batch["labels"][:, 1:][mask].tolist() and out.count == n
    assert (out.targets >= 0).all()
    hs = full.hidden_states
    torch.testing.assert_close(out.features[(1, "tokens")], hs[1][:, :-1][mask])
    w = mask.unsqueeze(-1).float()
    torch.testing.assert_close(out.features[(2, "mean")], (hs[2][:, :-1] * w).sum(1) / w.sum(1))
    last = torch.tensor([int(torch.nonzero(m).max()) for m in mask])
    torch.testing.assert_close(out.features[(2, "last")], hs[2][torch.arange(6), last])
    assert check_answer_logits(model, "student") < 1e-4
    # KD on these rows equals KD on the full logits with the answer mask
    other = tiny_lm(arch, layers=2, seed=5)
    t_full = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t_rows = task.forward(other, batch, []).logits
    torch.testing.assert_close(
        kd_loss(out.logits, t_rows, temperature=2.0),
        kd_loss(full.logits[:, :-1], t_full, temperature=2.0, mask=mask),
    )


def test_check_answer_logits_catches_a_head_it_does_not_reproduce() -> None:
    model = tiny_lm("llama", layers=1)
    original = model.forward

    def scaled(*a: Any, **kw: Any):
        out = original(*a, **kw)
        out.logits = out.logits * 2  # e.g. a logit scale the answer-only path would miss
        return out

    model.forward = scaled
    with pytest.raises(ConfigError, match=r"teacher\.name: LlamaForCausalLM computes its logits differently"):
        check_answer_logits(model, "teacher.name")


# ------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_left_padded_batches_generate_what_single_prompts_do(arch: str, assets) -> None:
    model = tiny_lm(arch, layers=2, seed=3)
    task = make_task(assets, tiny_tokenizer(chat=True))  # short prompts of several lengths
    prompts, _ = task.prompts("train")
    prompts = prompts[:7]
    assert len({len(p) for p in prompts}) > 2  # real padding
    opts = dataclasses.replace(GREEDY, max_new_tokens=8)
    tok = task.tokenizer
    batched = generate_answers(model, tok, prompts, options=opts, batch_size=4)
    single = generate_answers(model, tok, prompts, options=opts, batch_size=1)
    assert batched == single and all(batched)
    # and equal to a plain greedy loop over full forwards
    ids = torch.tensor([prompts[0]])
    for _ in range(8):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if int(nxt) == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert single[0] == tok.decode(ids[0, len(prompts[0]) :], skip_special_tokens=True).strip()


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(assets) -> None:
    model = tiny_lm("llama", layers=2, seed=4)
    task = make_task(assets)
    prompts = task.prompts("dev")[0]
    opts = GenerationOptions(do_sample=True, temperature=1.5, seeds=(1, 2), max_new_tokens=6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_answers(model, task.tokenizer, prompts, options=opts, seed=1, batch_size=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_answers(model, task.tokenizer, prompts, options=opts, seed=1, batch_size=3)
    c = generate_answers(model, task.tokenizer, prompts, options=opts, seed=2, batch_size=3)
    assert a == b and a != c
    out = generate_eval(
        model,
        task.tokenizer,
        task.rows("dev"),
        options=opts,
        batch_size=3,
        max_prompt_length=24,
        progress=False,
    )
    assert set(out) == {"rougeL", "exact_match", "rougeL_std", "rougeL@seed1", "rougeL@seed2"}
    assert out["rougeL"] == pytest.approx((out["rougeL@seed1"] + out["rougeL@seed2"]) / 2)


def stop_after(model: torch.nn.Module, token: int) -> None:
    """Make EOS the model's next token after ``token``: answers that end for some prompts only."""

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        after = ids[:, -1] == token  # (B,)
        logits = output.logits[:, -1]  # (B, V)
        logits[after, 2] = logits[after].max(dim=-1).values + 10.0  # EOS = 2
        return output

    model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    "settings",
    [{"repetition_penalty": 5.0}, {"no_repeat_ngram_size": 1}, {"min_new_tokens": 8}],
    ids=["repetition_penalty", "no_repeat_ngram_size", "min_new_tokens"],
)
def test_decoding_ignores_the_checkpoints_generation_config(settings: dict, assets) -> None:
    """A checkpoint's generation_config.json (its own penalties, minimum length) changes neither
    greedy nor sampled answers: the decoding is GenerationOptions only."""
    model = tiny_lm("llama", layers=2, seed=3)
    tok = tiny_tokenizer(chat=True)
    task = make_task(assets, tok)
    prompts = task.prompts("train")[0][:8]
    decodings = [
        dataclasses.replace(GREEDY, max_new_tokens=8),
        GenerationOptions(do_sample=True, seeds=(10,), max_new_tokens=8),
    ]

    def answers() -> list[list[str]]:
        return [generate_answers(model, tok, prompts, options=o, seed=10, batch_size=4) for o in decodings]

    plain = answers()
    assert any(len(a.split()) < 8 for a in plain[1])  # some end early: min_new_tokens would matter
    config = model.generation_config
    for key, value in settings.items():
        setattr(config, key, value)
    assert answers() == plain
    assert model.generation_config is config  # put back
    assert all(getattr(config, k) == v for k, v in settings.items())


def test_teacher_answers_record_whether_they_ended(assets, tmp_path: Path) -> None:
    """Sequence-level KD: an answer cut at max_new_tokens trains without EOS, a finished one with
    it; the cache stores the flags, and an old cache (a bare list) reads as finished answers."""
    tok = tiny_tokenizer(chat=True)
    teacher = tiny_lm("llama", seed=3)  # greedy answers of 16 prompts: 13 say w6
    stop_after(teacher, tok.convert_tokens_to_ids("w6"))
    task = make_task(assets, tok, data=load_instructions(assets["data"], max_train=16))
    cpu = torch.device("cpu")
    answers, ended = teacher_answers(teacher, task, batch_size=4, device=cpu, progress=False)
    # the reference: a plain greedy loop per prompt, ended when it met EOS within max_new_tokens
    expected = []
    for prompt in task.prompts("train")[0]:
        ids = torch.tensor([prompt])
        stop = False
        for _ in range(task.select.max_new_tokens):
            with torch.no_grad():
                nxt = teacher(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tok.eos_token_id:
                stop = True
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        expected.append(stop)
    assert ended == expected and 0 < sum(ended) < len(ended)
    assert answers == generate_answers(teacher, tok, task.prompts("train")[0], options=task.select)

    task.replace_answers("train", answers, ended)
    eos = tok.eos_token_id
    for row, answer, done in zip(task.dataset("train"), answers, ended, strict=True):
        target = [x for x in row["labels"] if x != -100]
        assert target == tok(answer, add_special_tokens=False)["input_ids"] + [eos] * done
    task.replace_answers("train", answers)  # no flags: every answer finished
    assert all(row["input_ids"][-1] == eos for row in task.dataset("train"))

    path = tmp_path / "answers.json"
    assert teacher_answers(teacher, task, batch_size=4, device=cpu, path=path, progress=False) == (
        answers,
        ended,
    )
    assert json.loads(path.read_text()) == {"answers": answers, "ended": ended}
    assert teacher_answers(teacher, task, batch_size=4, device=cpu, path=path, progress=False) == (
        answers,
        ended,
    )
    path.write_text(json.dumps(answers))  # the format before the flags
    assert teacher_answers(None, task, batch_size=4, device=cpu, path=path) == (
        answers,
        [True] * len(answers),
    )


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_answer_likelihood_is_the_full_forward_on_each_example(arch: str, assets) -> None:
    """Right-padded, length-sorted batches score each reference answer as the model's own full
    forward on that example alone does: log-probability of every answer token (and EOS) given
    everything before it, and top-1 hits, over all answer tokens of the split."""
    model = tiny_lm(arch, layers=2, seed=5)
    task = make_task(assets, tiny_tokenizer(chat=True))
    ds = task.dataset("dev")
    logprob, hits, count = 0.0, 0, 0
    for row in ds:
        ids = torch.tensor([row["input_ids"]])
        answer = torch.tensor(row["labels"]) != -100
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        at = answer[1:]  # position t predicts token t + 1
        target = ids[0, 1:][at]
        logprob += float(torch.log_softmax(logits[at], -1).gather(1, target[:, None]).sum())
        hits += int((logits[at].argmax(-1) == target).sum())
        count += int(at.sum())
    assert count > len(ds)  # answers of several tokens, plus EOS
    out = task.answer_likelihood(model, "dev", batch_size=3, device=torch.device("cpu"))
    assert out["answer_logprob"] == pytest.approx(logprob / count, rel=1e-5)
    assert out["answer_token_accuracy"] == hits / count
    assert model.training is False
    model.train()
    task.answer_likelihood(model, "dev", batch_size=8, device=torch.device("cpu"))
    assert model.training  # restored


def test_score_answers() -> None:
    out = score_answers(["w1 w2", "The w3.", "x"], [["w1 w2"], ["w3", "w4"], ["w5"]])
    assert out["exact_match"] == pytest.approx(2 / 3)  # articles and punctuation normalised away
    # ROUGE keeps "the": "the w3" vs "w3" has P = 1/2, R = 1, F = 2/3
    assert out["rougeL"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        score_answers([], [])


# ------------------------------------------------------------------------------------------
# runs


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("losses", "student"),
    [
        ([{"name": "ce"}], {"init": "layer_subset", "layers": [0, 2]}),
        ([{"name": "kd", "temperature": 2.0}], {"init": "layer_subset", "layers": [0, 3]}),
        (
            [{"name": "kd", "direction": "reverse"}, {"name": "ce", "weight": 0.5}],
            {"init": "config", "architecture": "opt", "num_layers": 2, "hidden_size": 16, "num_heads": 2},
        ),
        (
            [{"name": "kd"}, {"name": "procrustes", "layers": [[2, 4], [1, 2]], "pooling": "tokens"}],
            {"init": "config", "num_layers": 2, "hidden_size": 16, "num_heads": 4},
        ),
        ([{"name": "gram", "pooling": "mean"}, {"name": "ce"}], {"init": "pretrained"}),
    ],
    ids=["sft", "kd-forward", "kd-reverse-opt-student", "kd-procrustes-tokens", "gram-mean-pretrained"],
)
def test_tiny_distillation_runs(losses, student, assets, tmp_path: Path) -> None:
    if student["init"] == "pretrained":
        student = {**student, "name": assets["opt_small"]}
        teacher = {"name": assets["opt"]}
    else:
        teacher = {}
    cfg = make_cfg(assets, tmp_path, losses=losses, student=student, teacher=teacher)
    run = setup(cfg, progress=False)
    assert run.teacher_cache is None  # LM teachers run live
    assert (run.teacher is None) == (losses == [{"name": "ce"}])
    before_s = params(run.student.model)
    before_t = params(run.teacher) if run.teacher is not None else None
    results = train(run, progress=False)
    after_s = params(run.student.model)
    assert any(not torch.equal(before_s[k], after_s[k]) for k in before_s)  # the student learned
    if before_t is not None:
        assert all(torch.equal(before_t[k], v) for k, v in params(run.teacher).items())
        assert not run.teacher.training
    assert results["steps"] == 2 and results["metric"] == "rougeL"
    for split in ("dev", "test"):
        assert set(results[split]) == {"rougeL", "exact_match", "answer_logprob", "answer_token_accuracy"}
        assert 0 <= results[split]["rougeL"] <= 1
        assert results[split]["answer_logprob"] < 0 <= results[split]["answer_token_accuracy"] <= 1
    assert set(run.task.dev_metrics) == set(results["dev"])  # what select_metric is checked against
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    keys = {k for row in log for k in row if k.startswith("loss/")}
    assert keys == {f"loss/{k}" for k in run.objective.pairs} | {f"loss/{t.key}" for t in run.objective.terms}
    reloaded = AutoModelForCausalLM.from_pretrained(results["student_dir"])  # plain transformers
    assert type(reloaded).__name__.endswith("ForCausalLM")
    again = evaluate_saved_lm(results["student_dir"], cfg, ["dev"], progress=False)
    assert again["dev"] == pytest.approx(results["dev"])


def test_loss_falls_when_overfitting_one_batch(assets, tmp_path: Path) -> None:
    cfg = make_cfg(
        assets,
        tmp_path,
        data={"max_train": 4},
        losses=[{"name": "kd"}, {"name": "procrustes", "pooling": "tokens"}],
        student={"init": "config", "num_layers": 2, "hidden_size": 32, "num_heads": 4},
        train={"max_steps": 25, "lr": 3e-3, "max_grad_norm": None},
    )
    train(setup(cfg, progress=False), progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kd = [r["loss/kd"] for r in log if "loss/kd" in r]
    pr = [r["loss/procrustes"] for r in log if "loss/procrustes" in r]
    assert len(kd) == 25 and kd[-1] < 0.5 * kd[0] and pr[-1] < 0.5 * pr[0]


def test_micro_batches_weigh_answer_tokens_exactly(assets, tmp_path: Path) -> None:
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 take the same step (per-token means)."""
    finals = []
    for bs, acc in ((4, 1), (2, 2)):
        cfg = make_cfg(
            assets,
            tmp_path / f"{bs}x{acc}",
            data={"max_train": 4},
            losses=[{"name": "kd"}, {"name": "ce"}, {"name": "gram"}],
            train={"max_steps": 1, "batch_size": bs, "grad_accum": acc, "max_grad_norm": None},
        )
        run = setup(cfg, progress=False)
        assert run.objective.terms[2].options["pooling"] == "tokens"  # the instruction default
        train(run, progress=False)
        finals.append(params(run.student.model))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=2e-6, rtol=1e-4)


def test_setup_errors_name_the_field(assets, tmp_path: Path) -> None:
    def err(match: str, **over: Any) -> None:
        with pytest.raises(ConfigError, match=match):
            setup(make_cfg(assets, tmp_path, **over), progress=False)

    err(r"losses\[1\]\.layers\[0\]: teacher layer 9 is out of range", losses=[
        {"name": "kd"}, {"name": "procrustes", "layers": [[1, 9]]}])  # fmt: skip
    err(r"losses\[0\]\.pooling: 'cls' is the first prompt token", losses=[{"name": "cka", "pooling": "cls"}])
    err(r"student\.layers: layer index 7 is out of range", student={"layers": [0, 7]})
    err(r"student\.layers: required", student={"layers": None})
    err(r"data\.max_prompt_length \(40\)", data={"max_prompt_length": 40})
    err(
        rf"losses\[0\] \(kd\): the teacher's logits cover {len(VOCAB)} tokens, the student's {len(VOCAB) + 8}",
        teacher={"name": assets["opt"]},
        student={"init": "pretrained", "name": assets["opt_other_vocab"]},
    )
    err(r"student\.name: required", student={"init": "pretrained"})
    err(r"student: hidden_size=30 is not divisible", student={"init": "config", "hidden_size": 30})
    other = tmp_path / "chat_tok_student"
    tiny_lm("opt", layers=1, hidden=16).save_pretrained(other)
    t = tiny_tokenizer()
    t.add_tokens(["extra"])
    t.save_pretrained(other)
    err(r"student\.name: .* has another tokenizer", student={"init": "pretrained", "name": str(other)})


def test_setup_errors_stop_before_the_teachers_sft(assets, tmp_path: Path, monkeypatch) -> None:
    """teacher.finetune=true: every check runs on the teacher's config before its SFT (minutes)."""
    import geodistill.finetune as finetune

    calls: list = []

    def refuse(cfg, **kw):
        calls.append(cfg)
        raise AssertionError("the teacher was fine-tuned before the config was checked")

    monkeypatch.setattr(finetune, "finetuned_teacher", refuse)

    def err(match: str, teacher: dict | None = None, **over: Any) -> None:
        with pytest.raises(ConfigError, match=match):
            setup(
                make_cfg(assets, tmp_path, teacher={"finetune": True, **(teacher or {})}, **over),
                progress=False,
            )

    err(r"^losses\[1\]\.layers\[0\]: teacher layer 9 is out of range", losses=[
        {"name": "kd"}, {"name": "procrustes", "layers": [[1, 9]]}])  # fmt: skip
    err(r"^student\.layers: layer index 7 is out of range", student={"layers": [0, 7]})
    err(r"^student: hidden_size=30 is not divisible", student={"init": "config", "hidden_size": 30})
    err(
        rf"^losses\[0\] \(kd\): the teacher's logits cover {len(VOCAB)} tokens, the student's {len(VOCAB) + 8}",
        teacher={"name": assets["opt"]},
        student={"init": "pretrained", "name": assets["opt_other_vocab"]},
    )
    err(r"^data\.max_prompt_length \(40\)", data={"max_prompt_length": 40})
    err(r"^teacher\.name: could not load", teacher={"name": str(tmp_path / "no-such-teacher")})
    assert not calls

    # the control: a valid config reaches the SFT and trains with the teacher it returns
    monkeypatch.setattr(
        finetune, "finetuned_teacher", lambda cfg, **kw: calls.append(cfg) or Path(assets["llama"])
    )
    run = setup(make_cfg(assets, tmp_path / "ok", teacher={"finetune": True}), progress=False)
    assert len(calls) == 1 and run.teacher is not None and not run.teacher.training


def test_a_loaded_teacher_can_be_passed_in(assets, tmp_path: Path) -> None:
    cfg = make_cfg(assets, tmp_path, losses=[{"name": "kd"}], teacher={"finetune": True})
    teacher = tiny_lm("llama", seed=9)
    run = setup_instruction(cfg, resolve_losses(cfg.losses), teacher_override=teacher, progress=False)
    assert run.teacher is teacher and not teacher.training  # used as given: no fine-tuning, no loading
    assert not any(p.requires_grad for p in teacher.parameters())


def test_sequence_level_kd_trains_on_cached_teacher_answers(assets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(assets, tmp_path, losses=[{"name": "ce"}], data={"max_train": 8, "answers": "teacher"})
    run = setup(cfg, progress=False)
    assert run.teacher is None  # only needed for the answers
    files = list((tmp_path / "cache" / "teacher_answers").glob("*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    assert list(run.task.rows("train")["output"]) == cached["answers"]  # the student trains on them
    assert [[a] for a in cached["answers"]] == list(run.task.rows("train")["references"])
    # they are the teacher's greedy answers to the training prompts
    fresh = make_task(assets, data=load_instructions(assets["data"], max_train=8), max_new_tokens=6)
    teacher = AutoModelForCausalLM.from_pretrained(assets["llama"])
    expected = teacher_answers(teacher, fresh, batch_size=4, device=torch.device("cpu"), progress=False)
    assert (cached["answers"], cached["ended"]) == expected
    # a second setup reads the cache instead of generating again; a cache of the older format (a
    # bare list) reads as finished answers, each trained with EOS as before
    n = len(cached["answers"])
    files[0].write_text(json.dumps(["w1"] * n))
    run = setup(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")), progress=False)
    assert list(run.task.rows("train")["output"]) == ["w1"] * n
    w1, eos = run.task.tokenizer.convert_tokens_to_ids(["w1", "</s>"])
    assert all(row["input_ids"][-2:] == [w1, eos] for row in run.task.dataset("train"))


# ------------------------------------------------------------------------------------------
# shipped configs


def shipped() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def test_every_instruction_config_loads() -> None:
    names = {p.stem for p in shipped()}
    assert {"quick", "offline", "opt-13b-to-1.3b-dolly", "opt-1.3b-to-125m-dolly"} <= names
    for p in shipped():
        cfg = load_config(DistillConfig, p)
        assert cfg.task == "instruction"
        assert cfg.data.max_prompt_length < cfg.data.max_length


@pytest.mark.parametrize("name", ["opt-13b-to-1.3b-dolly", "opt-1.3b-to-125m-dolly"])
def test_paper_configs_run_end_to_end_on_tiny_models(name: str, assets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GEODISTILL_CACHE", str(tmp_path / "cache"))  # the teacher's SFT is cached here
    overrides = [
        f"teacher.name={assets['opt']}",
        f"student.name={assets['opt_small']}",
        f"data.name={assets['data']}",
        "data.max_length=40",
        "data.max_prompt_length=24",
        "data.max_new_tokens=4",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.eval_batch_size=8",
        "train.device=cpu",
        "teacher_train.max_steps=1",
        "teacher_train.batch_size=2",
        "teacher_train.eval_batch_size=8",
        "teacher_train.device=cpu",
        f"output_dir={tmp_path / 'run'}",
        # the MiniLLM evaluation sets are hub names: a local file stands in for one of them
        f"data.eval_sets={{vicuna: {write_data(tmp_path / 'vicuna.jsonl', n=6, seed=7)}}}",
        "data.eval_seeds=[1, 2]",
    ]
    cfg = load_config(DistillConfig, CONFIG_DIR / f"{name}.yaml", overrides)
    assert cfg.data.eval_decoding == "sample"  # the MiniLLM protocol
    # the paper's layer maps name OPT-13B/1.3B layers; map them onto the tiny models' last layers
    losses = [
        dataclasses.replace(loss, layers="last") if loss.layers is not None else loss for loss in cfg.losses
    ]
    cfg = dataclasses.replace(cfg, losses=tuple(losses))
    run = setup(cfg, progress=False)
    assert next(run.teacher.parameters()).dtype == getattr(torch, cfg.teacher.dtype)
    sft = list((tmp_path / "cache" / "teachers").glob("*/results.json"))
    assert len(sft) == cfg.teacher.finetune  # the teacher's SFT ran (once) when the config asks for it
    results = train(run, progress=False)
    assert results["steps"] == 2 and 0 <= results["test"]["rougeL"] <= 1
    assert 0 <= results["test"]["vicuna/rougeL"] <= 1


@pytest.mark.slow
def test_offline_quick_config_with_smollm2(tmp_path: Path) -> None:
    """The real quick config: SmolLM2-135M-Instruct teacher, 6-layer student, a few steps."""
    cfg = load_config(
        DistillConfig,
        CONFIG_DIR / "quick.yaml",
        [f"output_dir={tmp_path / 'quick'}", "train.max_steps=4", "data.max_eval=8"],
    )
    start = time.perf_counter()
    results = train(setup(cfg, progress=False), progress=False)
    print(
        f"quick: {time.perf_counter() - start:.0f} s, {results['seconds_per_step']:.2f} s/step, {results['test']}"
    )
    assert results["steps"] == 4 and 0 <= results["test"]["rougeL"] <= 1
