"""Tiny random LFM2 / LFM2-MoE checkpoints in the exact Hugging Face layout.

Importable (``write_checkpoint(name, out_dir)``) and runnable
(``python -m lfm_edge.tiny_models OUT_DIR [NAME ...]``).  Needs only numpy,
tokenizers (its own safetensors writer) -- never torch -- and is deterministic: the same
bytes on every machine (weights from ``numpy.random.default_rng(seed)``, a BPE
tokenizer trained on the fixed corpus below).

Each checkpoint directory holds what a published LiquidAI repo holds:
``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards +
``model.safetensors.index.json``), ``tokenizer.json``,
``tokenizer_config.json`` (with the real LFM2 chat template) and
``special_tokens_map.json``.  Tensor names are the published ones; experts are
stored one by one (``feed_forward.experts.E.w1.weight``), which transformers 5
fuses on load into ``experts.gate_up_proj`` / ``experts.down_proj``.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import numpy as np
from lfm_edge.quantize.safetensors_io import save_file

__all__ = ["MODELS", "CONFIGS", "SEEDS", "write_checkpoint", "build_tokenizer_json",
           "tokenizer_json_str", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "VOCAB_SIZE"]

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

# The named special tokens of LFM2 / LFM2.5 at their real ids (0..13).
SPECIAL_TOKENS = [
    "<|pad|>",                 # 0
    "<|startoftext|>",         # 1  bos
    "<|endoftext|>",           # 2
    "<|fim_pre|>",             # 3
    "<|fim_mid|>",             # 4
    "<|fim_suf|>",             # 5
    "<|im_start|>",            # 6
    "<|im_end|>",              # 7  eos
    "<|tool_list_start|>",     # 8
    "<|tool_list_end|>",       # 9
    "<|tool_call_start|>",     # 10
    "<|tool_call_end|>",       # 11
    "<|tool_response_start|>",  # 12
    "<|tool_response_end|>",   # 13
]
# In the real vocab ids 14.. are "<|reserved_4|>", "<|reserved_5|>", ... stored as ordinary
# vocab entries (GGUF token_type NORMAL, not in added_tokens); we keep a few of them.
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(4, 10)]  # ids 14..19
# LFM2.5 reasoning markers: special added tokens at high ids (the real ones sit near the
# top of the 65,536 vocab); here they are the last two ids.
THINK_TOKENS = ["<think>", "</think>"]

VOCAB_SIZE = 1280  # total, including specials, reserved, bytes, merges and think tokens

# Llama-3 split regex, exactly as in LFM2's tokenizer.json.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The LFM2 (v1) chat template (LiquidAI/LFM2-350M, LFM2-1.2B, LFM2-8B-A1B): tools go into
# the system turn between <|tool_list_start|> and <|tool_list_end|>; tool results are
# wrapped in <|tool_response_start|> ... <|tool_response_end|>.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set system_prompt = "" -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
\t{%- set ns.system_prompt = messages[0]["content"] -%}
\t{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
\t{%- set ns.system_prompt = ns.system_prompt + ("\\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
\t{%- for tool in tools -%}
\t\t{%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
\t\t{%- endif -%}
\t\t{%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
\t{%- endfor -%}
\t{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
\t{{- "<|im_start|>system\\n" + ns.system_prompt + "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
\t{{- "<|im_start|>" + message["role"] + "\\n" -}}
\t{%- set content = message["content"] -%}
\t{%- if content is not string -%}
\t\t{%- set content = content | tojson -%}
\t{%- endif -%}
\t{%- if message["role"] == "tool" -%}
\t\t{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
\t{%- endif -%}
\t{{- content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
\t{{- "<|im_start|>assistant\\n" -}}
{%- endif -%}
"""

# Fixed training corpus.  Every script the runtime must handle appears, plus code, JSON,
# digits, runs of spaces / tabs / newlines and chat markup.
_CORPUS_PARTS = [
    # English
    "The quick brown fox jumps over the lazy dog. Liquid foundation models run on phones, "
    "laptops and cars. They combine short gated convolutions with grouped-query attention, "
    "and the mixture-of-experts variant activates only a few experts for every token. "
    "Don't panic: it's fine, we'll see, they're here, I'm sure, you've done it, he'd go.",
    "Once upon a time, in a small town by the sea, there lived an old fisherman who told "
    "stories about the weather, the tides and the stars. Every evening the children came "
    "to listen, and every evening he began with the same words: the sea remembers.",
    "Machine learning inference on a CPU is limited by memory bandwidth. Quantization to "
    "four bits shrinks the weights, and a good kernel keeps the vector units busy while "
    "the next block of weights streams in from memory.",
    # French
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque ? "
    "C'est à côté de l'église, près du café. Les élèves français étudient l'histoire, "
    "la géographie et les mathématiques. « Bonjour ! » dit-elle, très gênée.",
    "Il était une fois une petite fille qui s'appelait Chloé. Elle aimait les crêpes, "
    "les pêches et les forêts profondes où chantaient les oiseaux de l'été.",
    # German
    "Der schnelle braune Fuchs springt über den faulen Hund. Die Straße ist naß, und die "
    "Mädchen hören Musik. Größere Modelle benötigen mehr Speicher; Übersetzung ist schwierig. "
    "Äpfel, Öl und Überraschungen: Grüß Gott und schönen Tag noch!",
    "Donaudampfschifffahrtsgesellschaftskapitän und Kraftfahrzeughaftpflichtversicherung "
    "sind lange deutsche Wörter. Wir fahren morgen früh nach München.",
    # Spanish / Portuguese / Italian (accents)
    "El niño comió una manzana en la mañana. ¿Dónde está el baño? ¡Qué sorpresa! "
    "A informação está disponível em português. Perché la città è così bella?",
    # Chinese
    "快速的棕色狐狸跳过了懒惰的狗。今天天气很好，我们去公园散步吧。"
    "人工智能模型可以在手机上运行，液态基础模型结合了卷积和注意力机制。"
    "我喜欢学习中文，也喜欢吃饺子和面条。北京是中国的首都。",
    "机器学习需要大量的数据和计算资源。在中央处理器上推理时，内存带宽是主要的瓶颈。",
    # Japanese
    "素早い茶色の狐が怠け者の犬を飛び越えた。今日はいい天気ですね。"
    "東京は日本の首都です。私はラーメンとお寿司が大好きです。"
    "カタカナとひらがなと漢字を使って文章を書きます。ありがとうございました。",
    # Korean
    "빠른 갈색 여우가 게으른 개를 뛰어넘었다. 오늘 날씨가 정말 좋네요. "
    "서울은 대한민국의 수도입니다. 저는 김치찌개와 비빔밥을 좋아해요. 감사합니다!",
    # Arabic
    "الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بكم في عالم الذكاء الاصطناعي. "
    "اللغة العربية جميلة جدا، وهي لغة القرآن والشعر. شكرا جزيلا لكم.",
    # Emoji and symbols
    "I love pizza 🍕 and coffee ☕! Great job 👍👍 🎉🎉🎉 Let's go 🚀 to the moon 🌕. "
    "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷 🇩🇪 🇯🇵 🇰🇷, skin tones: 👋🏽 👋🏿, hearts: ❤️ 💙 💚. "
    "Math: ∑ x² ≤ ∞, π ≈ 3.14159, €100 → £85, © ® ™ ± × ÷ — “quotes” ‘single’ …",
    # Python code
    "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "class Tokenizer:\n    def __init__(self, vocab):\n        self.vocab = dict(vocab)\n"
    "        self.inverse = {v: k for k, v in self.vocab.items()}\n\n"
    "    def encode(self, text):\n        return [self.vocab[c] for c in text if c in self.vocab]\n",
    "import numpy as np\n\nx = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
    "if x.sum() > 10 and not x.any() == False:\n\tprint(f\"sum = {x.sum():.3f}\")\n"
    "else:\n\tpass  # nothing to do\n\nresult = [i * i for i in range(100) if i % 3 == 0]\n"
    "assert len(result) == 34, result\n",
    # JSON / tool calls
    '{"name": "get_weather", "description": "Get the current weather", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
    '[get_weather(city="Paris"), get_time(zone="Europe/Berlin", fmt=24)]\n'
    '{"temperature": 21.5, "unit": "celsius", "ok": true, "items": [1, 2, 3, null]}',
    # Numbers
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1234 56789 3.14159 2026-11-22 12:34:56 "
    "+1 (555) 123-4567 1,000,000 0x1F 1e-5 99.9% 007",
    # Whitespace runs
    "a  b   c    d     e\n\nf\n\n\ng\n\n\n\nh\t\ti\t\t\tj \n \n  end    \n\n    indented\n"
    "        deeper\n            deepest\r\nwindows line\r\n\r\n",
    # Chat markup as plain text (specials are added tokens, so this also trains the text
    # between them)
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "<think>The user asks about France.</think>The capital of France is Paris.<|im_end|>\n",
]


def _corpus() -> list[str]:
    # Repeat the parts with deterministic variations so common words reach min_frequency.
    out = []
    for rep in range(4):
        for i, part in enumerate(_CORPUS_PARTS):
            if rep % 2 == 1:
                part = part.upper() if i % 5 == 0 else part.replace(". ", ".\n")
            if rep == 3:
                part = part.replace(" ", "  ") if i % 4 == 0 else part
            out.append(part)
    return out


def build_tokenizer_json() -> dict:
    """Train the tiny byte-level BPE and return its tokenizer.json as a dict."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + RESERVED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(THINK_TOKENS)
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 1)])
    data = json.loads(tok.to_str())
    # Reserved tokens are plain vocab entries in the real tokenizer, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in RESERVED_TOKENS]
    # Normalise to the exact field set of the published file.
    data["model"]["dropout"] = None
    data["model"]["unk_token"] = None
    data["model"]["continuing_subword_prefix"] = None
    data["model"]["end_of_word_suffix"] = None
    data["model"]["fuse_unk"] = False
    data["model"]["byte_fallback"] = False
    data["model"]["ignore_merges"] = True
    vocab = data["model"]["vocab"]
    assert len(vocab) + len(THINK_TOKENS) == VOCAB_SIZE, (len(vocab), VOCAB_SIZE)
    for i, s in enumerate(SPECIAL_TOKENS + RESERVED_TOKENS):
        assert vocab[s] == i, (s, vocab[s], i)
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    for j, t in enumerate(THINK_TOKENS):
        assert [a["id"] for a in data["added_tokens"] if a["content"] == t] == [len(vocab) + j]
    return data


# LFM2.5's 124,928-token vocabulary keeps its named special tokens at the end, in LFM2's
# order with <think>/</think> after <|im_end|> (LFM2.5-8B-A1B: <|startoftext|> = 124894,
# <|im_start|> = 124899, <|im_end|> = 124900, <think> = 124901, <|tool_call_start|> = 124905),
# then reserved tokens up to the last id: 35 ids in all.
LFM25_SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|tool_list_start|>", "<|tool_list_end|>",
    "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
] + [f"<|reserved_{i}|>" for i in range(19)]
# added but not special in LFM2.5's tokenizer_config (matched whole, kept when decoding)
LFM25_NOT_SPECIAL = {"<|tool_call_start|>", "<|tool_call_end|>"}


def build_lfm25_tokenizer_json(n_vocab: int = 1024) -> dict:
    """A tiny tokenizer.json laid out like LFM2.5's: byte-level BPE written with LFM2.5's split
    regex, then the LFM25_SPECIAL_TOKENS as added tokens ending at id n_vocab - 1."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from lfm_edge.tokenizer import LFM25_SPLIT

    n_normal = n_vocab - len(LFM25_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM25_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_normal, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == n_normal, (tok.get_vocab_size(), n_normal)
    for t in LFM25_SPECIAL_TOKENS:
        special = t not in LFM25_NOT_SPECIAL
        tok.add_tokens([AddedToken(t, special=special, normalized=False)])
    bos = LFM25_SPECIAL_TOKENS[1]
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    data = json.loads(tok.to_str())
    assert [a["id"] for a in data["added_tokens"]] == list(range(n_normal, n_vocab))
    return data


_TOKENIZER_CACHE: dict[str, str] = {}


def tokenizer_json_str() -> str:
    """tokenizer.json text (trained once per process; training is deterministic)."""
    if "s" not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE["s"] = json.dumps(build_tokenizer_json(), ensure_ascii=False, indent=2) + "\n"
    return _TOKENIZER_CACHE["s"]


def _tokenizer_config() -> dict:
    data = json.loads(tokenizer_json_str())
    added = {}
    for t in data["added_tokens"]:
        added[str(t["id"])] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                  "single_word", "special")}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|pad|>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False,
        "use_fast": True,
    }


def _special_tokens_map() -> dict:
    def tok(s):
        return {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}
    return {"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|im_end|>"),
            "pad_token": tok("<|pad|>")}


# --------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------

_COMMON = {
    "bos_token_id": 1,
    "eos_token_id": 7,
    "pad_token_id": 0,
    "conv_L_cache": 3,
    "conv_bias": False,
    "norm_eps": 1e-05,
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
    "dtype": "float32",
    "transformers_version": "5.23.0",
}

CONFIGS: dict[str, dict] = {
    # LFM2-8B-A1B shaped, written the way transformers 5 saves it (rope_parameters dict,
    # tie_word_embeddings) like LFM2.5-8B-A1B.
    "moe": {
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        **_COMMON,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 6,
        "layer_types": ["conv", "conv", "full_attention", "conv", "full_attention", "conv"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_dense_layers": 2,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "use_expert_bias": True,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
    },
    # Different layout, sharded, written like the original LFM2-8B-A1B config.json
    # (top-level rope_theta, tie_embedding).
    "moe_alt": {
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        **_COMMON,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 7,
        "layer_types": ["full_attention", "conv", "conv", "full_attention", "conv", "conv",
                        "full_attention"],
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_dense_layers": 1,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "use_expert_bias": True,
        "rope_theta": 1000000.0,
        "tie_embedding": True,
    },
    # Dense LFM2 shaped like LFM2-1.2B's config.json: block_* keys, block_auto_adjust_ff_dim
    # true, so the real FFN width is derived: int(2*256/3)=170 -> *1.0 -> round up to a
    # multiple of 32 -> 192 (w1/w3 [192, 64], w2 [64, 192]).
    "dense": {
        "architectures": ["Lfm2ForCausalLM"],
        "model_type": "lfm2",
        **_COMMON,
        "hidden_size": 64,
        "block_dim": 64,
        "conv_dim": 64,
        "conv_dim_out": 64,
        "intermediate_size": 256,
        "block_ff_dim": 256,
        "block_auto_adjust_ff_dim": True,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 32,
        "block_mlp_init_scale": 1.0,
        "block_norm_eps": 1e-05,
        "block_out_init_scale": 1.0,
        "block_use_swiglu": True,
        "block_use_xavier_init": True,
        "conv_use_xavier_init": True,
        "num_hidden_layers": 5,
        "layer_types": ["conv", "full_attention", "conv", "conv", "full_attention"],
        "full_attn_idxs": [1, 4],
        "num_attention_heads": 4,
        "num_heads": 4,
        "num_key_value_heads": 1,
        "rope_theta": 1000000.0,
        "theta": 1000000.0,
        "use_pos_enc": True,
        "tie_embedding": True,
    },
    # Not a golden model: every matrix input width is a multiple of 256 (the K-quant
    # super-block), so llama.cpp's quantizer can write real Q4_K / Q5_K / Q6_K files of it
    # (tests/test_kquant_model.py). head_dim = 256 / 4 = 64; written like "moe". 16 experts,
    # not 8: llama.cpp gives 8-expert (Mixtral) models Q8_0 attn_k / attn_v, while the
    # published LFM2-8B-A1B files (32 experts) have K-quants there too.
    "moe_k": {
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        **_COMMON,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 5,
        "layer_types": ["conv", "full_attention", "conv", "conv", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_dense_layers": 1,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "use_expert_bias": True,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
    },
}

# The golden set: tests/make_goldens.py, tests/test_goldens_live.py and
# `lfm-edge demo-model --arch` use these. "moe_k" stays out of it (no golden; it is checked
# against lfm-edge's own f32 file and against llama.cpp instead).
MODELS = ["moe", "moe_alt", "dense"]
SEEDS = {"moe": 20261177, "moe_alt": 20261157, "dense": 20261146, "moe_k": 20261256}
SHARDS = {"moe": 1, "moe_alt": 3, "dense": 1, "moe_k": 1}


def dense_ffn_dim(cfg: dict) -> int:
    """The FFN width transformers' Lfm2MLP derives from the config."""
    ff = cfg["intermediate_size"]
    if cfg.get("block_auto_adjust_ff_dim", True):
        ff = int(2 * ff / 3)
        mult = cfg.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            ff = int(mult * ff)
            m = cfg.get("block_multiple_of", 256)
            ff = m * ((ff + m - 1) // m)
    return ff


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

def _weights(name: str) -> dict[str, np.ndarray]:
    cfg = CONFIGS[name]
    rng = np.random.default_rng(SEEDS[name])
    H = cfg["hidden_size"]
    V = cfg["vocab_size"]
    L = cfg["conv_L_cache"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    moe = cfg["model_type"] == "lfm2_moe"
    f32 = np.float32

    def lin(out_f, in_f, gain=1.0):
        return (rng.standard_normal((out_f, in_f)) * (gain / np.sqrt(in_f))).astype(f32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(f32)

    t: dict[str, np.ndarray] = {}
    t["model.embed_tokens.weight"] = (rng.standard_normal((V, H)) * 0.5).astype(f32)
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        t[p + "operator_norm.weight"] = norm(H)
        if kind == "conv":
            t[p + "conv.in_proj.weight"] = lin(3 * H, H)
            t[p + "conv.conv.weight"] = (rng.standard_normal((H, 1, L)) * 0.5).astype(f32)
            t[p + "conv.out_proj.weight"] = lin(H, H, 0.7)
        else:
            t[p + "self_attn.q_proj.weight"] = lin(nh * hd, H)
            t[p + "self_attn.k_proj.weight"] = lin(nkv * hd, H)
            t[p + "self_attn.v_proj.weight"] = lin(nkv * hd, H)
            t[p + "self_attn.out_proj.weight"] = lin(H, nh * hd, 0.7)
            t[p + "self_attn.q_layernorm.weight"] = norm(hd)
            t[p + "self_attn.k_layernorm.weight"] = norm(hd)
        t[p + "ffn_norm.weight"] = norm(H)
        if not moe or i < cfg["num_dense_layers"]:
            ff = cfg["intermediate_size"] if moe else dense_ffn_dim(cfg)
            t[p + "feed_forward.w1.weight"] = lin(ff, H)
            t[p + "feed_forward.w3.weight"] = lin(ff, H)
            t[p + "feed_forward.w2.weight"] = lin(H, ff, 0.7)
        else:
            E, F = cfg["num_experts"], cfg["moe_intermediate_size"]
            t[p + "feed_forward.gate.weight"] = lin(E, H, 1.5)
            for e in range(E):
                q = f"{p}feed_forward.experts.{e}."
                t[q + "w1.weight"] = lin(F, H)
                t[q + "w3.weight"] = lin(F, H)
                t[q + "w2.weight"] = lin(H, F, 0.7)
            # Same order of magnitude as the spread of the sigmoid scores, so the bias
            # really changes which experts are picked (but not the weights).
            t[p + "feed_forward.expert_bias"] = (0.15 * rng.standard_normal(E)).astype(f32)
    t["model.embedding_norm.weight"] = norm(H)
    return t


def _save_weights(tensors: dict[str, np.ndarray], out: pathlib.Path, shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    names = list(tensors)
    total = sum(a.nbytes for a in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n in names:  # split by running byte count: a layer's experts may straddle shards
        k = min(shards - 1, acc * shards // total)
        groups[k].append(n)
        acc += tensors[n].nbytes
    weight_map = {}
    for k, g in enumerate(groups):
        assert g, "empty shard"
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in g}, out / fname, metadata=meta)
        for n in g:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _dump(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(name: str, out_dir) -> pathlib.Path:
    """Write checkpoint `name` (a key of CONFIGS) into out_dir/name; return that directory."""
    if name not in CONFIGS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {list(CONFIGS)}")
    out = pathlib.Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    cfg = copy.deepcopy(CONFIGS[name])
    _dump(out / "config.json", dict(sorted(cfg.items())))
    _dump(out / "generation_config.json",
          {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
           "transformers_version": _COMMON["transformers_version"]})
    (out / "tokenizer.json").write_text(tokenizer_json_str(), encoding="utf-8")
    _dump(out / "tokenizer_config.json", _tokenizer_config())
    _dump(out / "special_tokens_map.json", _special_tokens_map())
    _save_weights(_weights(name), out, SHARDS[name])
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python {sys.argv[0]} OUT_DIR [NAME ...]   (names: {', '.join(CONFIGS)})")
        return 0 if argv else 2
    names = argv[1:] or MODELS
    for n in names:
        print(write_checkpoint(n, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
