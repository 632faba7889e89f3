"""Write a full-size synthetic LFM2 GGUF file: random weights, real shapes.

    python bench/make_synthetic.py /tmp/lfm2-8b-a1b-q4_0.gguf                # ~4.7 GB, about a minute
    python bench/make_synthetic.py /tmp/small.gguf --layers 3 --type q8_0     # a quick test file
    python bench/make_synthetic.py /tmp/lfm2-350m-q4_0.gguf --model lfm2-350m # a dense model

Models (MODELS): the MoE LFM2-8B-A1B and LFM2.5-8B-A1B (`lfm2moe`) and the dense LFM2-1.2B,
LFM2.5-1.2B and LFM2-350M (`lfm2`), each with its published config's shapes.

The published weights cannot be downloaded here, and speed does not depend on their values, so
this file stands in for them: the real tensor names, shapes, types and metadata, and a real-sized
byte-level BPE vocabulary (65,536 synthetic tokens with merges consistent with them, the LFM2
special tokens at ids 0-13, the ChatML chat template). It loads in lfm-edge and in llama.cpp.

Quantized blocks are written directly as random bytes with small random-sign fp16 scales (no
quantization pass; `--type` picks one of TYPES for every matrix), one tensor at a time, so it is fast and needs about one tensor of memory.
The scales give every weight matrix a standard deviation of GAIN/sqrt(K) (K = its row length), so
activations stay O(1) through all the layers and the logits stay finite. `--layers N` keeps the
first N layers of the real layer pattern (N = 3 has a dense, a conv, an attention and a MoE layer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf.quants as gguf_quants
import numpy as np
from gguf import (
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)
from gguf.constants import GGML_QUANT_SIZES


@dataclass(frozen=True)
class Config:
    name: str
    n_layer: int = 24
    hidden: int = 2048
    n_head: int = 32
    n_kv_head: int = 8
    attention_layers: tuple[int, ...] = (2, 6, 10, 14, 18, 21)
    n_dense_layers: int = 2
    ffn_dim: int = 7168  # the dense SwiGLU of the first n_dense_layers layers
    n_expert: int = 32
    n_expert_used: int = 4
    expert_ffn_dim: int = 1792
    conv_kernel: int = 3
    n_vocab: int = 65536
    n_ctx_train: int = 32768
    rope_base: float = 1e6
    norm_eps: float = 1e-5
    # LFM2.5's vocabulary puts its special tokens at its end (<|startoftext|> = 124894), with
    # <think> and </think> among them; LFM2's has them at ids 0-13 and no think tokens.
    specials_at_end: bool = False
    chat_template: str = "lfm2"  # a key of CHAT_TEMPLATES
    moe: bool = True  # arch lfm2moe; False: a dense LFM2 (arch lfm2), every layer a SwiGLU


def dense(name: str, n_layer: int, hidden: int, n_head: int, block_ff_dim: int, attention_layers) -> Config:
    """A dense LFM2 (arch lfm2) from its published config.json. Its SwiGLU width is derived from
    block_ff_dim as transformers' Lfm2MLP does (block_auto_adjust_ff_dim: 2/3 of it, rounded up
    to a multiple of block_multiple_of = 256), which is the width of the published ffn tensors."""
    ffn = -(-int(2 * block_ff_dim / 3) // 256) * 256
    return Config(name, n_layer=n_layer, hidden=hidden, n_head=n_head, n_kv_head=8,
                  attention_layers=tuple(attention_layers), n_dense_layers=n_layer, ffn_dim=ffn,
                  n_expert=0, n_expert_used=0, expert_ffn_dim=0, n_ctx_train=128000, moe=False)


MODELS = {
    "lfm2-8b-a1b": Config("LFM2-8B-A1B (synthetic)"),
    # vocabulary, context, RoPE base and norm eps of the published LFM2.5-8B-A1B (its config facts:
    # 124,928 tokens, 128k context, rope_theta 5e6, norm_eps 1e-6), with its chat template
    "lfm2.5-8b-a1b": Config(
        "LFM2.5-8B-A1B (synthetic)", n_vocab=124928, n_ctx_train=128000, rope_base=5e6, norm_eps=1e-6,
        specials_at_end=True, chat_template="lfm2.5-8b-a1b",
    ),
    # The dense models' config.json (tests/real_configs, /work/shared/real/config): 16 layers,
    # attention at 2, 5, 8, 10, 12, 14, 8 KV heads, vocabulary 65,536 with LFM2's special tokens
    # at ids 0-13, ChatML, tied embeddings, rope_theta 1e6, norm_eps 1e-5, 128k context.
    # LFM2-1.2B: hidden 2048, 32 heads, block_ff_dim 12288 -> ffn 8192 (its config.json is not
    # stored here; LFM2.5-1.2B kept its architecture, and LFM2.5-1.2B-Base's config has these values).
    "lfm2-1.2b": dense("LFM2-1.2B (synthetic)", 16, 2048, 32, 12288, (2, 5, 8, 10, 12, 14)),
    # LFM2.5-1.2B (its Base config): the same shapes and vocabulary as LFM2-1.2B
    "lfm2.5-1.2b": dense("LFM2.5-1.2B (synthetic)", 16, 2048, 32, 12288, (2, 5, 8, 10, 12, 14)),
    # LFM2-350M: hidden 1024, 16 heads, block_ff_dim 6656 -> ffn 4608
    "lfm2-350m": dense("LFM2-350M (synthetic)", 16, 1024, 16, 6656, (2, 5, 8, 10, 12, 14)),
}
# --type -> (the type of every weight matrix, the file type it declares). Files of one type, not
# llama-quantize's mixes: e.g. q4_k stands in for a Q4_K_S file (Q4_K_M's speed is close to it).
TYPES = {
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "iq4_nl": (GGMLQuantizationType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "q2_k": (GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "q3_k": (GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q4_k": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": (GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "iq4_xs": (GGMLQuantizationType.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}
# Byte offsets of each block's fp16 scale d (given a random sign) and of its fp16 minimum or
# min-scale, if any (set to 0: the weights are then d times the block's integers).
SCALE_AT = {
    GGMLQuantizationType.Q4_0: (0, None),
    GGMLQuantizationType.Q8_0: (0, None),
    GGMLQuantizationType.Q4_1: (0, 2),
    GGMLQuantizationType.Q5_0: (0, None),
    GGMLQuantizationType.Q5_1: (0, 2),
    GGMLQuantizationType.IQ4_NL: (0, None),
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108, None),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208, None),
    GGMLQuantizationType.IQ4_XS: (0, None),
}
# standard deviation of one stored value q of a block (value = d * q): Q4_0 q-8 is uniform on
# -8..7, Q8_0 q is uniform on -128..127; the other types' RMS with d = 1 is measured once on
# random blocks (value_std).
VALUE_STD = {
    GGMLQuantizationType.Q4_0: float(np.sqrt(np.mean(np.arange(-8, 8) ** 2.0))),  # 4.64
    GGMLQuantizationType.Q8_0: float(np.sqrt(np.mean(np.arange(-128, 128) ** 2.0))),  # 73.9
}


def value_std(qtype: GGMLQuantizationType) -> float:
    """RMS of the weights of random blocks of qtype with d = 1 and no minimum."""
    if qtype not in VALUE_STD:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(0).integers(0, 256, (1024, size), dtype=np.uint8)
        d_at, min_at = SCALE_AT[qtype]
        raw[:, d_at : d_at + 2] = np.full(1024, 1.0, np.float16).view(np.uint8).reshape(1024, 2)
        if min_at is not None:
            raw[:, min_at : min_at + 2] = 0
        VALUE_STD[qtype] = float(np.sqrt(np.mean(gguf_quants.dequantize(raw, qtype).astype(np.float64) ** 2)))
    return VALUE_STD[qtype]


GAIN = 0.5  # std of a matrix's output for unit-RMS inputs
F32 = GGMLQuantizationType.F32

# The named LFM2 special tokens at their real ids (lfm_edge/tiny_models.py lists the same).
SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]
# ids 14.. are ordinary vocabulary entries named <|reserved_N|> in the real vocabulary
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(4, 10)]
BOS_ID, EOS_ID, PAD_ID = 1, 7, 0
# LFM2.5's special tokens, the last 35 ids of its 124,928: <|pad|> = 124893,
# <|startoftext|> = 124894, <|im_start|> = 124899, <|im_end|> = 124900, <think> = 124901,
# </think> = 124902, <|tool_call_start|> = 124905 (the published ids), then reserved tokens.
LFM25_SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|tool_list_start|>", "<|tool_list_end|>",
    "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]
LFM25_FIRST_SPECIAL = 124893

# LFM2's chat template (ChatML, tools listed in the system turn), as in the published files.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
{%- set ns.system_prompt = messages[0]["content"] -%}
{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
{%- set ns.system_prompt = ns.system_prompt + ("\\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
{%- for tool in tools -%}
{%- if tool is not string -%}{%- set tool = tool | tojson -%}{%- endif -%}
{%- set ns.system_prompt = ns.system_prompt + tool -%}
{%- if not loop.last -%}{%- set ns.system_prompt = ns.system_prompt + ", " -%}{%- endif -%}
{%- endfor -%}
{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}{{- "<|im_start|>system\\n" + ns.system_prompt + "<|im_end|>\\n" -}}{%- endif -%}
{%- for message in messages -%}
{{- "<|im_start|>" + message["role"] + "\\n" -}}
{%- set content = message["content"] -%}
{%- if content is not string -%}{%- set content = content | tojson -%}{%- endif -%}
{%- if message["role"] == "tool" -%}{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}{%- endif -%}
{{- content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}
"""


# The published LFM2.5-8B-A1B template (reasoning, {% generation %}, Pythonic tool calls), kept
# with its source and licence among the test goldens.
LFM25_TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "tests" / "golden" / "templates" / "hf-LFM2.5-8B-A1B.jinja"


def chat_template(cfg: Config) -> str:
    if cfg.chat_template == "lfm2":
        return CHAT_TEMPLATE
    return LFM25_TEMPLATE_FILE.read_text(encoding="utf-8")


# -- tensors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]  # numpy order, row length last
    qtype: GGMLQuantizationType
    kind: str  # "matrix", "norm", "conv", "router", "bias"

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def layer_is_attention(cfg: Config, i: int) -> bool:
    return i in cfg.attention_layers


def plan(cfg: Config, qtype: GGMLQuantizationType) -> list[Spec]:
    """Every tensor of the file, in llama.cpp's names and the order convert.py writes them."""
    h, d = cfg.hidden, cfg.hidden // cfg.n_head
    specs = [Spec("token_embd.weight", (cfg.n_vocab, h), qtype, "matrix"),
             Spec("token_embd_norm.weight", (h,), F32, "norm")]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layer = [Spec(p + "attn_norm.weight", (h,), F32, "norm"), Spec(p + "ffn_norm.weight", (h,), F32, "norm")]
        if layer_is_attention(cfg, i):
            layer += [
                Spec(p + "attn_q.weight", (cfg.n_head * d, h), qtype, "matrix"),
                Spec(p + "attn_k.weight", (cfg.n_kv_head * d, h), qtype, "matrix"),
                Spec(p + "attn_v.weight", (cfg.n_kv_head * d, h), qtype, "matrix"),
                Spec(p + "attn_output.weight", (h, cfg.n_head * d), qtype, "matrix"),
                Spec(p + "attn_q_norm.weight", (d,), F32, "norm"),
                Spec(p + "attn_k_norm.weight", (d,), F32, "norm"),
            ]
        else:
            layer += [
                Spec(p + "shortconv.conv.weight", (h, cfg.conv_kernel), F32, "conv"),  # [H, L]
                Spec(p + "shortconv.in_proj.weight", (3 * h, h), qtype, "matrix"),
                Spec(p + "shortconv.out_proj.weight", (h, h), qtype, "matrix"),
            ]
        if i < cfg.n_dense_layers:
            layer += [
                Spec(p + "ffn_gate.weight", (cfg.ffn_dim, h), qtype, "matrix"),
                Spec(p + "ffn_up.weight", (cfg.ffn_dim, h), qtype, "matrix"),
                Spec(p + "ffn_down.weight", (h, cfg.ffn_dim), qtype, "matrix"),
            ]
        else:
            e, f = cfg.n_expert, cfg.expert_ffn_dim
            layer += [
                Spec(p + "ffn_gate_inp.weight", (e, h), F32, "router"),
                Spec(p + "exp_probs_b.bias", (e,), F32, "bias"),
                Spec(p + "ffn_gate_exps.weight", (e, f, h), qtype, "matrix"),  # [E, F, H]
                Spec(p + "ffn_up_exps.weight", (e, f, h), qtype, "matrix"),
                Spec(p + "ffn_down_exps.weight", (e, h, f), qtype, "matrix"),  # [E, H, F]
            ]
        specs += sorted(layer, key=lambda s: s.name)
    return specs


def random_blocks(rng: np.random.Generator, spec: Spec, chunk_rows: int = 4096) -> np.ndarray:
    """The bytes of `spec`: random values, fp16 scales of random sign and size ~GAIN/sqrt(K)/std(q)."""
    block, size = GGML_QUANT_SIZES[spec.qtype]
    n_rows, k = int(np.prod(spec.shape[:-1])), spec.shape[-1]
    n_blocks = n_rows * (k // block)
    out = np.empty((n_blocks, size), dtype=np.uint8)
    raw = rng.bit_generator.random_raw((out.nbytes + 7) // 8).view(np.uint8)[: out.nbytes]
    out[...] = raw.reshape(n_blocks, size)
    del raw
    d = GAIN / np.sqrt(k) / value_std(spec.qtype)
    scales = (d * rng.uniform(0.5, 1.5, n_blocks) * rng.choice([-1.0, 1.0], n_blocks)).astype(np.float16)
    d_at, min_at = SCALE_AT[spec.qtype]
    out[:, d_at : d_at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if min_at is not None:
        out[:, min_at : min_at + 2] = 0
    return out.reshape(-1)


def random_f32(rng: np.random.Generator, spec: Spec) -> np.ndarray:
    shape = spec.shape
    if spec.kind == "norm":  # RMSNorm weights ~1
        return (1.0 + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    if spec.kind == "conv":
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if spec.kind == "router":  # router logits ~N(0, 1)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if spec.kind == "bias":  # enough to change which experts are picked
        return (0.15 * rng.standard_normal(shape)).astype(np.float32)
    raise ValueError(spec)


# -- tokenizer -------------------------------------------------------------------------


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def vocabulary(cfg: Config, seed: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges: specials, reserved, the 256 bytes, then merged words.

    Each merged token is the concatenation of two earlier tokens, and its merge is listed when
    it is made, so every merge joins two tokens of the vocabulary and ranks after both parts.
    Words look like byte-level BPE words: letters, most with a leading 'Ġ' (a space).
    """
    rng = np.random.default_rng(seed)
    if cfg.specials_at_end:
        specials: list[str] = []
        n_reserved = cfg.n_vocab - LFM25_FIRST_SPECIAL - len(LFM25_SPECIAL_TOKENS)
        tail = LFM25_SPECIAL_TOKENS + [f"<|reserved_{i}|>" for i in range(n_reserved)]
        tokens = byte_chars()
    else:
        specials, tail = list(SPECIAL_TOKENS), []
        tokens = specials + RESERVED_TOKENS + byte_chars()
    types = [TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (len(tokens) - len(specials))
    known = set(tokens)
    merges: list[str] = []
    letters = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    space = byte_chars()[ord(" ")]  # 'Ġ'
    pieces = list(letters)  # short continuation pieces (no leading space)
    words = list(letters)  # anything a piece can be appended to

    def add(a: str, b: str) -> None:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(TokenType.NORMAL)
        known.add(a + b)

    for c in letters:
        add(space, c)
        words.append(space + c)
    target = cfg.n_vocab - len(tail)
    while len(tokens) < target:
        # short words are more common than long ones, as in a trained vocabulary
        a = words[int(len(words) * rng.random() ** 2)]
        b = pieces[int(len(pieces) * rng.random() ** 3)]
        if len(a) + len(b) > 14 or a + b in known:
            continue
        add(a, b)
        words.append(a + b)
        if not (a + b).startswith(space) and len(a + b) <= 4:
            pieces.append(a + b)
    tokens += tail
    types += [TokenType.CONTROL] * len(tail)
    return tokens, [int(t) for t in types], merges


# -- the file --------------------------------------------------------------------------


def write(out: Path, model: str = "lfm2-8b-a1b", out_type: str = "q4_0", n_layer: int | None = None,
          seed: int = 0, log=print) -> Path:
    cfg = MODELS[model]
    if n_layer is not None:
        if not 1 <= n_layer <= cfg.n_layer:
            raise SystemExit(f"make_synthetic.py: --layers must be within 1..{cfg.n_layer}, got {n_layer}")
        cfg = Config(**{**cfg.__dict__, "n_layer": n_layer,
                        "attention_layers": tuple(i for i in cfg.attention_layers if i < n_layer),
                        "n_dense_layers": min(cfg.n_dense_layers, n_layer),
                        "name": f"{cfg.name}, first {n_layer} layers"})
    qtype, file_type = TYPES[out_type]
    specs = plan(cfg, qtype)
    arch = "lfm2moe" if cfg.moe else "lfm2"
    w = GGUFWriter(path=None, arch=arch)
    w.add_name(cfg.name)
    w.add_file_type(int(file_type))
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv([cfg.n_kv_head if layer_is_attention(cfg, i) else 0 for i in range(cfg.n_layer)])
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.n_vocab)
    w.add_shortconv_l_cache(cfg.conv_kernel)
    if cfg.moe:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
        w.add_expert_feed_forward_length(cfg.expert_ffn_dim)
        w.add_leading_dense_block_count(cfg.n_dense_layers)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_norm(True)
        w.add_expert_weights_scale(1.0)

    tokens, types, merges = vocabulary(cfg, seed)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("lfm2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos, eos, pad = (tokens.index(t) for t in ("<|startoftext|>", "<|im_end|>", "<|pad|>"))
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template(cfg))

    for s in specs:
        if s.qtype == F32:
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes)
        else:
            block, size = GGML_QUANT_SIZES[s.qtype]
            byte_shape = (*s.shape[:-1], s.shape[-1] // block * size)
            w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), s.nbytes, raw_dtype=s.qtype)
    total = sum(s.nbytes for s in specs)
    log(f"writing {out}: {cfg.name}, {out_type}, {len(specs)} tensors, {total / 1e9:.2f} GB of weights")
    rng = np.random.default_rng(seed + 1)
    tmp = out.with_name(out.name + ".partial")
    start = time.perf_counter()
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for s in specs:
            data = random_f32(rng, s) if s.qtype == F32 else random_blocks(rng, s)
            w.write_tensor_data(data)
            done += s.nbytes
            if s.nbytes > 50e6:
                log(f"  {done / total:6.1%}  {s.name}")
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the GGUF file to write (put it under /tmp, not in the repo)")
    p.add_argument("--type", default="q4_0", choices=list(TYPES))
    p.add_argument("--model", default="lfm2-8b-a1b", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (a smaller test file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.out.parent.is_dir():
        p.error(f"{args.out.parent} is not a directory")
    write(args.out, args.model, args.type, args.layers, args.seed, log=(lambda *_: None) if args.quiet else print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
