#!/usr/bin/env python3
"""Generate tiny random-weight Hugging Face model fixtures + expected greedy outputs.

Writes into tests/fixtures/:
  <model>/            config.json, generation_config.json, tokenizer.json,
                      tokenizer_config.json, model.safetensors (or shards + index);
                      tokenizer.model as well for a SentencePiece vocabulary (llama2)
  expected/<model>.json  greedy continuations (24 new tokens, eos ignored),
                         chosen-token logprobs and top1-top2 logit margins.

Everything is deterministic (fixed seeds, CPU, float32) and re-runnable:
    .venv/bin/python scripts/make_fixtures.py

No network access is needed; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
EXPECTED = FIXTURES / "expected"

VOCAB_SIZE = 512
MAX_NEW_TOKENS = 24
MIN_MARGIN = 1e-3
MAX_DIR_BYTES = 1_500_000

# --------------------------------------------------------------------------------------
# Tokenizer training corpus (embedded so the script is self-contained).
# --------------------------------------------------------------------------------------
CORPUS = """
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he rowed his little boat out past the rocks, and every evening he came home
with a basket of silver fish. His wife mended the nets and sold the fish at the market.
They were not rich, but they were happy, and the people of the village loved them.
One day the fisherman caught a fish that could speak. "Let me go," said the fish, "and I
will grant you a wish." The fisherman was so surprised that he let the fish go at once.
When he told his wife the story, she was angry. "Why did you not ask for anything?" she said.
Machine learning is the study of computer algorithms that improve automatically through
experience and by the use of data. It is seen as a part of artificial intelligence.
A language model is a probability distribution over sequences of words. Given a sequence,
the model assigns a probability to the whole sequence and predicts the next token.
Large language models are trained on huge amounts of text and can generate fluent answers.
The transformer architecture uses attention to mix information between positions. Each layer
has a self-attention block and a feed-forward block, with residual connections and normalization.
Rotary position embeddings rotate the query and key vectors by an angle that depends on the
position, so that the attention score depends on the relative distance between tokens.
Grouped-query attention shares each key and value head between several query heads, which
makes the key-value cache smaller and decoding faster on memory-bound hardware.
To serve a model efficiently, an inference engine batches many requests together, keeps a
paged key-value cache, and schedules prefill and decode steps so that the hardware stays busy.
def add(a, b):
    return a + b

def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

fn main() {
    let xs: Vec<u32> = (1..=10).collect();
    let total: u32 = xs.iter().sum();
    println!("total = {}", total);
}
{"name": "Alice", "age": 30, "city": "Paris", "tags": ["admin", "user"], "active": true}
SELECT id, name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name LIMIT 20;
The numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 256 512 1024 2048.
On Monday we met at 9:30 am; on Tuesday at 14:45. The price was $19.99 (plus 20% tax).
Dear Sir or Madam, I am writing to ask about the status of my order, number 12345.
Thank you for your help. Best regards, Bob.
Q: What is the capital of France? A: The capital of France is Paris.
Q: How many legs does a spider have? A: A spider has eight legs.
Q: What color is the sky on a clear day? A: The sky is blue.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The sun rises in the east and sets in the west. The moon goes around the earth once a month.
Please write a short poem about the ocean, the wind, and the stars above the quiet harbor.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity.
In the beginning there was nothing but darkness, and then there was light, and the light
was good. The children played in the garden while the adults talked about the weather.
Café au lait, crème brûlée, naïve façade, jalapeño, über, smörgåsbord, déjà vu, résumé.
Le café est très bon ce matin. Die Straße ist lang. El niño come una manzana. Ça va bien.
日本語のテキストです。東京は日本の首都です。今日はいい天気ですね。
中文文本：你好，世界！我们今天学习语言模型。
Русский текст: привет, мир! Ελληνικά: γειά σου κόσμε. עברית: שלום. العربية: مرحبا.
Emoji: 🙂 😀 🚀 🎉 ❤️ 👍 🐍 🦀 — and symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥ ∞ → ← ✓.
"""

# Chat template for the qwen2 fixture (ChatML), not used by the expected outputs.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PROMPTS = [
    "The",
    "The sun rises in the east.",
    "def fibonacci(n):\n    if n < 2:",
    "Q: What is the capital of France? A:",
    "Le café est naïve — 日本語 and emoji 🙂!",
    (
        "Once upon a time, in a small village by the sea, there lived an old fisherman and "
        "his wife. Every morning he rowed his little boat out past the rocks, and every "
        "evening he came home with a basket of silver fish. One day the fisherman caught a "
        "fish that could speak, and it said to him:"
    ),
]

# Pre-tokenizer split patterns of the real model families (tokenizer.json of Llama 3.x and
# Qwen2 use Split(pattern) + ByteLevel(use_regex=False)); llama/mistral fixtures use the plain
# GPT-2 ByteLevel regex.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# --------------------------------------------------------------------------------------
# Model specs.
# --------------------------------------------------------------------------------------
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA3_SPECIALS = ["<unk>", "<s>", "</s>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=512,
    hidden_act="silu",
    attention_dropout=0.0,
)

SPECS = {
    "llama": dict(
        arch="LlamaForCausalLM",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        specials=LLAMA_SPECIALS,
        split=None,
        unk="<unk>",
        bos="<s>",
        eos=["</s>"],
        add_bos=True,
        seed=1001,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=None,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama3": dict(
        arch="LlamaForCausalLM",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        specials=LLAMA3_SPECIALS,
        split=LLAMA3_SPLIT,
        unk=None,
        bos="<s>",
        eos=["</s>", "<|eot_id|>"],
        add_bos=True,
        seed=2010,
        init_std=0.4,
        shard="100KB",
        config=dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            # head_dim = 8 -> 4 rotary frequencies with wavelengths ~6.3, ~167, ~4.4e3, ~1.2e5.
            # With original_max_position_embeddings=256 (high_freq_wavelen = 64,
            # low_freq_wavelen = 256) the first is kept, the second falls in the smoothed
            # band and the last two are divided by `factor`: all three llama3 branches are hit.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            rms_norm_eps=1e-5,
        ),
    ),
    "mistral": dict(
        arch="MistralForCausalLM",
        config_cls=MistralConfig,
        model_cls=MistralForCausalLM,
        specials=LLAMA_SPECIALS,
        split=None,
        unk="<unk>",
        bos="<s>",
        eos=["</s>"],
        add_bos=True,
        seed=2003,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            sliding_window=None,
            rms_norm_eps=1e-5,
        ),
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM",
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        specials=QWEN2_SPECIALS,
        split=QWEN2_SPLIT,
        unk=None,
        bos=None,  # Qwen2 adds no bos
        eos=["<|endoftext|>"],
        add_bos=False,
        seed=1007,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            rope_scaling=None,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
        ),
    ),
    # Qwen3: RMSNorm on each query and key head, head_dim (32) apart from hidden/heads (16).
    "qwen3": dict(
        arch="Qwen3ForCausalLM",
        config_cls=Qwen3Config,
        model_cls=Qwen3ForCausalLM,
        specials=QWEN2_SPECIALS,
        split=QWEN2_SPLIT,
        unk=None,
        bos=None,
        eos=["<|endoftext|>"],
        add_bos=False,
        seed=3001,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            rope_scaling=None,
            rms_norm_eps=1e-6,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
        ),
    ),
    # Llama 2 (and TinyLlama, Mistral v0.1): a SentencePiece BPE vocabulary (`tokenizer.model`,
    # byte fallback) beside its tokenizer.json, full multi-head attention, untied embeddings.
    "llama2": dict(
        arch="LlamaForCausalLM",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        specials=LLAMA_SPECIALS,
        split=None,
        sentencepiece=True,
        unk="<unk>",
        bos="<s>",
        eos=["</s>"],
        add_bos=True,
        seed=2002,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling=None,
            rms_norm_eps=1e-5,
        ),
    ),
    # Llama 3.2 (1B/3B): tied embeddings, llama3 rope with factor 32, one KV head per 4.
    "llama3.2": dict(
        arch="LlamaForCausalLM",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        specials=LLAMA3_SPECIALS,
        split=LLAMA3_SPLIT,
        unk=None,
        bos="<s>",
        eos=["</s>", "<|eot_id|>"],
        add_bos=True,
        seed=3202,
        init_std=0.4,
        shard=None,
        config=dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            rms_norm_eps=1e-5,
        ),
    ),
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
def train_tokenizer(specials: list[str], unk: str | None, split: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # No post-processor: the serving engine adds bos itself according to add_bos_token.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.split("\n")]
    # Repeat the corpus a little so frequencies are stable; deterministic.
    tok.train_from_iterator(lines * 3, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    # Round-trip sanity: every byte is encodable, decode(encode(x)) == x.
    for text in PROMPTS + [CORPUS, "".join(chr(c) for c in range(32, 127)), "\x00\x01\x7f\u00ff\U0001f642"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text, text
        assert None not in ids
    return tok


def train_sentencepiece(out: Path, specials: list[str]) -> Tokenizer:
    """A SentencePiece BPE model trained with Llama 2's options (byte fallback, digits split,
    identity normalization, a `▁` prefix, whitespace kept), written to `out/tokenizer.model`,
    and the fast tokenizer transformers converts it to, in the form of the tokenizer.json of
    Llama 2, TinyLlama and Mistral v0.1 (a normalizer that prepends `▁` and turns spaces into
    `▁`; no pre-tokenizer), which is what SentencePiece and llama.cpp do with the model. Its
    ids are checked against SentencePiece's own."""
    import io
    import tempfile

    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    lines = [line for line in CORPUS.split("\n") if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(out / "tokenizer.model", Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True})
        )
        converted = json.loads(AutoTokenizer.from_pretrained(tmp).backend_tokenizer.to_str())
    converted["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    converted["pre_tokenizer"] = None
    # No post-processor: the serving engine adds bos itself according to add_bos_token.
    converted["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(converted))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    edge = ["", " ", "  two leading", "trailing  ", "a\n\nb\tc\r\n", "x  y   z", "\x00\x7f\u00ff"]
    for text in PROMPTS + lines + edge + ["".join(chr(c) for c in range(32, 127))]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), (text, ids, sp.encode(text))
        assert tok.decode(ids) == sp.decode(ids) == text, text
    return tok


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
def build_config(spec: dict, tok: Tokenizer):
    cfg_kwargs = dict(COMMON)
    cfg_kwargs.update(copy.deepcopy(spec["config"]))  # configs mutate rope dicts in place
    bos_id = tok.token_to_id(spec["bos"]) if spec["bos"] else tok.token_to_id(spec["eos"][0])
    eos_ids = [tok.token_to_id(e) for e in spec["eos"]]
    cfg_kwargs.update(
        vocab_size=tok.get_vocab_size(),
        initializer_range=spec["init_std"],
        bos_token_id=bos_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        dtype="float32",
        use_cache=True,
    )
    return spec["config_cls"](**cfg_kwargs)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Explicit, version-independent random init (HF's default init zeroes biases and sets
    norm weights to 1, which would not exercise those code paths in the engine)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def patch_config_json(path: Path, spec: dict) -> None:
    """transformers 5 writes `rope_parameters` + `dtype`; real checkpoints in the wild (written
    by transformers 4.x) use `rope_theta` / `rope_scaling` / `torch_dtype`. Write both styles so
    a loader that only knows one of them still works."""
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [spec["arch"]]
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    cfg["rope_theta"] = spec["config"]["rope_theta"]
    cfg["rope_scaling"] = spec["config"].get("rope_scaling")
    if "sliding_window" in spec["config"]:
        cfg["sliding_window"] = spec["config"]["sliding_window"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_tokenizer_files(out: Path, tok: Tokenizer, spec: dict, config) -> None:
    tok.save(str(out / "tokenizer.json"), pretty=True)
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"][0],
        "unk_token": spec["unk"],
        "pad_token": None,
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    }
    if spec["arch"] == "Qwen2ForCausalLM":
        tcfg["chat_template"] = CHATML_TEMPLATE
    if spec.get("sentencepiece"):
        # Mistral-7B-Instruct-v0.3's template (a SentencePiece model's), as the chat tests hold it.
        mistral = json.loads((FIXTURES / "chat_templates/templates/mistral.json").read_text())
        tcfg["chat_template"] = mistral["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    gcfg = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gcfg, indent=2) + "\n")


def save_model(model, out: Path, shard: str | None) -> None:
    kwargs = {}
    if shard:
        kwargs["max_shard_size"] = shard
    try:
        model.save_pretrained(str(out), safe_serialization=True, **kwargs)
    except TypeError:  # newer transformers: safetensors only, no such kwarg
        model.save_pretrained(str(out), **kwargs)
    assert not list(out.glob("*.bin")), "expected safetensors only"


@torch.inference_mode()
def greedy(model, prompt_ids: list[int], n: int):
    ids = list(prompt_ids)
    out_ids, out_lp, margins = [], [], []
    for _ in range(n):
        x = torch.tensor([ids], dtype=torch.long)
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float()
        top = torch.topk(logits, 2)
        tok_id = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        out_lp.append(float(torch.log_softmax(logits, dim=-1)[tok_id]))
        out_ids.append(tok_id)
        ids.append(tok_id)  # eos is ignored on purpose
    return out_ids, out_lp, margins


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def make_one(name: str, spec: dict) -> dict:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    if spec.get("sentencepiece"):
        tok = train_sentencepiece(out, spec["specials"])
    else:
        tok = train_tokenizer(spec["specials"], spec["unk"], spec["split"])
    config = build_config(spec, tok)

    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](config).to(torch.float32).eval()
    init_weights(model, spec["seed"], spec["init_std"])
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    save_model(model, out, spec["shard"])
    patch_config_json(out / "config.json", spec)
    write_tokenizer_files(out, tok, spec, config)

    # Reload from disk (exactly what a consumer sees) and compute expected outputs with it.
    del model
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == spec["arch"], type(model).__name__
    loaded = model.state_dict()
    for k, v in ref_state.items():
        assert torch.equal(loaded[k], v), f"{name}: weight {k} changed after save/load"
    if spec["shard"]:
        assert (out / "model.safetensors.index.json").exists()
        assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    if spec["config"].get("rope_scaling"):
        rs = model.config.rope_parameters
        assert rs.get("rope_type") == "llama3", rs

    bos_id = tok.token_to_id(spec["bos"]) if spec["add_bos"] else None
    cases = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        prompt_ids = ([bos_id] if bos_id is not None else []) + ids
        out_ids, out_lp, margins = greedy(model, prompt_ids, MAX_NEW_TOKENS)
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "max_new_tokens": MAX_NEW_TOKENS,
                "output_ids": out_ids,
                "output_logprobs": [round(x, 6) for x in out_lp],
                "min_margin": round(min(margins), 6),
                # informative only:
                "output_text": tok.decode(out_ids, skip_special_tokens=False),
            }
        )
    # Prompt length coverage checks.
    lens = [len(tok.encode(p).ids) for p in PROMPTS]
    assert 1 <= lens[0] <= 2, lens
    assert sum(5 <= n <= 30 for n in lens) >= 3, lens
    assert max(lens) >= 70, lens
    assert any(any(ord(c) > 127 for c in p) for p in PROMPTS)

    worst = min(c["min_margin"] for c in cases)
    size = dir_size(out)
    log(
        f"{name:8s} vocab={tok.get_vocab_size()} prompt_lens={lens} min_margin={worst:.4f} "
        f"size={size} B specials={ {s: tok.token_to_id(s) for s in spec['specials']} }"
    )
    assert worst >= MIN_MARGIN, f"{name}: margin {worst} < {MIN_MARGIN}; change seed/init_std"
    assert size < MAX_DIR_BYTES, f"{name}: {size} bytes"
    return {
        "model": name,
        "architecture": spec["arch"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "cases": cases,
    }


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # deterministic reductions
    torch.use_deterministic_algorithms(True)
    EXPECTED.mkdir(parents=True, exist_ok=True)
    names = sys.argv[1:] or list(SPECS)
    for name in names:
        result = make_one(name, SPECS[name])
        (EXPECTED / f"{name}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    log("done:", ", ".join(names))


if __name__ == "__main__":
    main()
