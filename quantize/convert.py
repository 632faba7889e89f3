"""Hugging Face LFM2 / LFM2-MoE checkpoint -> GGUF, in llama.cpp's conventions.

The output loads in lfm-edge and in llama.cpp. Tensors are converted one at
a time and streamed to a temporary file that replaces OUT only when complete,
so memory stays near one tensor and a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize as gguf_quantize

from lfm_edge.errors import LfmEdgeError
from lfm_edge.files import atomic_output, resolve_output
from lfm_edge.gguf_file import row_bytes
from lfm_edge.tokenizer import LFM2_SPLITS

from .hf_config import ModelConfig, read_config
from .safetensors_io import Checkpoint

OUT_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}


# per-layer HF suffix -> GGUF suffix
LAYER_NAMES = {
    "operator_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "conv.conv.weight": "shortconv.conv.weight",
    "conv.in_proj.weight": "shortconv.in_proj.weight",
    "conv.out_proj.weight": "shortconv.out_proj.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.out_proj.weight": "attn_output.weight",
    "self_attn.q_layernorm.weight": "attn_q_norm.weight",
    "self_attn.k_layernorm.weight": "attn_k_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",
    "feed_forward.expert_bias": "exp_probs_b.bias",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embedding_norm.weight": "token_embd_norm.weight",
    "lm_head.weight": "output.weight",
}
# stacked expert tensors: HF per-expert name -> GGUF name
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
# tensors llama.cpp keeps in float32 whatever the output type: tiny, and
# read by ops that want full precision
KEEP_F32 = ("shortconv.conv.weight", "ffn_gate_inp.weight")

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EXPERT_RE = re.compile(r"^feed_forward\.experts\.(\d+)\.(w[123])\.weight$")


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 data of `shape`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.qtype, self.shape[-1])


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LfmEdgeError(f"{path}: not found (a Hugging Face checkpoint directory needs it)") from None
    except json.JSONDecodeError as e:
        raise LfmEdgeError(f"{path}: is not valid JSON ({e})") from None


def convert(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    out_type: str = "f16",
    log=print,
    name: str | None = None,
    flags: dict[str, bool] | None = None,
) -> Path:
    """Write the checkpoint in `hf_dir` as a GGUF file `out`; `name` overrides general.name,
    `flags` adds boolean metadata keys (e.g. {"lfm_edge.demo": True})."""
    src, dst = Path(hf_dir), Path(out)
    if out_type not in OUT_TYPES:
        raise LfmEdgeError(f"unknown output type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    if not src.is_dir():
        raise LfmEdgeError(f"{src}: is not a directory (expected a Hugging Face checkpoint)")
    if not dst.parent.resolve().is_dir():
        raise LfmEdgeError(f"{dst}: cannot write there, {dst.parent} is not a directory")
    config = read_json(src / "config.json")
    mc = read_config(config, f"{src / 'config.json'}")
    qtype, file_type = OUT_TYPES[out_type]
    ckpt = Checkpoint(src)
    tensors = plan_tensors(ckpt, mc, qtype, src)
    writer = GGUFWriter(path=None, arch=mc.arch)
    write_metadata(writer, mc, file_type, src, name or config.get("_name_or_path"))
    for key, value in (flags or {}).items():
        writer.add_bool(key, value)
    write_vocab(writer, src, mc)
    for t in tensors:
        if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if t.qtype == GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
        else:
            byte_shape = (*t.shape[:-1], row_bytes(t.qtype, t.shape[-1]))
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    resolve_output(dst)  # a directory, FIFO or device given as OUT is refused before the work
    with atomic_output(dst) as tmp:  # OUT is replaced only when complete (see lfm_edge.files)
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, t in enumerate(tensors):
                data = gguf_quantize(np.ascontiguousarray(t.load(), dtype=np.float32), t.qtype)
                if data.nbytes != t.nbytes:
                    raise LfmEdgeError(f"internal error: {t.name} encoded to {data.nbytes} bytes, expected {t.nbytes}")
                writer.write_tensor_data(data)
                log(f"[{i + 1:4d}/{len(tensors)}] {t.name:36s} {t.qtype.name:5s} {list(t.shape)}")
        finally:
            writer.close()
    return dst


def plan_tensors(ckpt: Checkpoint, mc: ModelConfig, qtype: GGMLQuantizationType, src: Path) -> list[OutTensor]:
    """Every output tensor: its GGUF name, shape and encoding, and how to read it."""
    out: list[OutTensor] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name in ckpt.names():
        shape = ckpt.shape(name)
        if name in GLOBAL_NAMES:
            if name == "lm_head.weight" and mc.tied:
                continue  # the same matrix as the embedding
            out.append(OutTensor(GLOBAL_NAMES[name], shape, qtype, lambda n=name: ckpt.load(n)))
            continue
        m = LAYER_RE.match(name)
        if not m:
            raise LfmEdgeError(f"{src}: unexpected tensor {name}")
        layer, rest = int(m.group(1)), m.group(2)
        if e := EXPERT_RE.match(rest):
            experts.setdefault((layer, e.group(2)), {})[int(e.group(1))] = name
            continue
        if rest in ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"):
            out.extend(fused_experts(ckpt, name, layer, rest, qtype))
            continue
        if rest == "feed_forward.expert_bias" and not mc.use_expert_bias:
            continue  # transformers ignores it too (use_expert_bias = false); zeros are written below
        if rest not in LAYER_NAMES:
            raise LfmEdgeError(f"{src}: unexpected tensor {name}")
        gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        load = lambda n=name: ckpt.load(n)  # noqa: E731
        if rest == "conv.conv.weight":  # [H, 1, L] -> [H, L]: a 2-D tensor for the conv op
            shape = (shape[0], shape[-1])
            load = lambda n=name: ckpt.load(n).reshape(ckpt.shape(n)[0], -1)  # noqa: E731
        out.append(OutTensor(gguf_name, shape, qtype, load))
    n_expert = mc.n_expert
    for (layer, w), by_expert in sorted(experts.items()):
        if sorted(by_expert) != list(range(n_expert)):
            raise LfmEdgeError(f"{src}: layer {layer} has experts {sorted(by_expert)} of {w}, expected 0..{n_expert - 1}")
        names = [by_expert[e] for e in range(n_expert)]
        shape = (n_expert, *ckpt.shape(names[0]))
        load = lambda ns=names: np.stack([ckpt.load(n) for n in ns])  # noqa: E731
        out.append(OutTensor(f"blk.{layer}.{EXPERT_NAMES[w]}", shape, qtype, load))
    if mc.moe and not mc.use_expert_bias:
        # routing on the scores alone is routing with a zero expert bias
        for layer in range(mc.n_dense_layers, mc.n_layer):
            zeros = lambda: np.zeros(mc.n_expert, np.float32)  # noqa: E731
            out.append(OutTensor(f"blk.{layer}.exp_probs_b.bias", (mc.n_expert,), qtype, zeros))
    check_against_config(out, mc, src)
    for t in out:
        t.qtype = output_type(t, qtype)
    return sorted(out, key=tensor_order)


def check_against_config(tensors: list[OutTensor], mc: ModelConfig, src: Path) -> None:
    """The weights must be the model config.json describes; say where they differ."""
    shapes = {t.name: t.shape for t in tensors}
    where = f"{src / 'config.json'}"
    need = {"token_embd.weight": (mc.n_vocab, mc.hidden), "token_embd_norm.weight": (mc.hidden,)}
    if not mc.tied:
        need["output.weight"] = (mc.n_vocab, mc.hidden)
    head_dim = mc.hidden // mc.n_head
    for i in range(mc.n_layer):
        p = f"blk.{i}."
        if mc.is_attention(i):
            need[p + "attn_q.weight"] = (mc.n_head * head_dim, mc.hidden)
            need[p + "attn_k.weight"] = (mc.n_head_kv * head_dim, mc.hidden)
        else:
            need[p + "shortconv.in_proj.weight"] = (3 * mc.hidden, mc.hidden)
            need[p + "shortconv.conv.weight"] = (mc.hidden, mc.conv_L_cache)
        if mc.is_dense(i):
            need[p + "ffn_gate.weight"] = (mc.ff_dense, mc.hidden)
        else:
            need[p + "ffn_gate_inp.weight"] = (mc.n_expert, mc.hidden)
            need[p + "ffn_gate_exps.weight"] = (mc.n_expert, mc.ff_expert, mc.hidden)
    blocks = {int(m.group(1)) for n in shapes if (m := re.match(r"blk\.(\d+)\.", n))}
    if blocks - set(range(mc.n_layer)):
        raise LfmEdgeError(f"{where} does not match the weights: they have layer {max(blocks)}, "
                           f"num_hidden_layers is {mc.n_layer}")
    for name in shapes:
        m = re.match(r"blk\.(\d+)\.(\w+)\.", name)
        if not m:
            continue
        layer, part = int(m.group(1)), m.group(2)
        misplaced = (
            (part.startswith("attn_") and part != "attn_norm" and not mc.is_attention(layer))
            or (part == "shortconv" and mc.is_attention(layer))
            or (part in ("ffn_gate", "ffn_up", "ffn_down") and not mc.is_dense(layer))
            or (part.startswith(("ffn_gate_inp", "ffn_gate_exps", "exp_probs")) and mc.is_dense(layer))
        )
        if misplaced:
            kind = mc.layer_types[layer] + ("" if mc.is_dense(layer) else " with experts")
            raise LfmEdgeError(f"{where} does not match the weights: it makes layer {layer} {kind}, "
                               f"but the weights have {name}")
    for name, shape in need.items():
        if name not in shapes:
            m = re.match(r"blk\.(\d+)\.", name)
            what = f"layer {m.group(1)} ({mc.layer_types[int(m.group(1))]})" if m else "the model"
            raise LfmEdgeError(f"{where} does not match the weights: {what} has no {name} tensor")
        if tuple(shapes[name]) != shape:
            raise LfmEdgeError(f"{where} does not match the weights: {name} is {list(shapes[name])}, "
                               f"the config gives {list(shape)}")


def fused_experts(ckpt: Checkpoint, name: str, layer: int, rest: str, qtype) -> list[OutTensor]:
    """transformers 5's in-memory expert layout, if a checkpoint was saved that way.

    gate_up_proj is [E, 2F, H] with gate rows first; down_proj is [E, H, F].
    """
    shape = ckpt.shape(name)
    if rest.endswith("down_proj"):
        return [OutTensor(f"blk.{layer}.ffn_down_exps.weight", shape, qtype, lambda: ckpt.load(name))]
    e, two_f, h = shape
    f = two_f // 2
    return [
        OutTensor(f"blk.{layer}.ffn_gate_exps.weight", (e, f, h), qtype, lambda: ckpt.load(name)[:, :f]),
        OutTensor(f"blk.{layer}.ffn_up_exps.weight", (e, f, h), qtype, lambda: ckpt.load(name)[:, f:]),
    ]


def output_type(t: OutTensor, wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """Vectors and the small float-only tensors stay F32; matrices take the requested type."""
    if len(t.shape) == 1 or t.name.endswith(KEEP_F32):
        return GGMLQuantizationType.F32
    block = 32 if wanted in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0) else 1
    if t.shape[-1] % block:
        # a row that is not whole blocks cannot be quantized; keep it exact
        return GGMLQuantizationType.F16 if wanted != GGMLQuantizationType.F32 else GGMLQuantizationType.F32
    return wanted


def tensor_order(t: OutTensor) -> tuple:
    m = re.match(r"blk\.(\d+)\.", t.name)
    return (1, int(m.group(1)), t.name) if m else (0, 0, t.name)


def write_metadata(writer: GGUFWriter, mc: ModelConfig, file_type, src: Path, name: str | None = None) -> None:
    writer.add_name(name or src.resolve().name)
    writer.add_file_type(int(file_type))
    writer.add_block_count(mc.n_layer)
    writer.add_context_length(mc.n_ctx)
    writer.add_embedding_length(mc.hidden)
    writer.add_head_count(mc.n_head)
    # 0 marks a conv layer: how llama.cpp stores the layer types
    writer.add_head_count_kv([mc.n_head_kv if mc.is_attention(i) else 0 for i in range(mc.n_layer)])
    writer.add_rope_freq_base(mc.rope_theta)
    writer.add_layer_norm_rms_eps(mc.norm_eps)
    writer.add_vocab_size(mc.n_vocab)
    writer.add_shortconv_l_cache(mc.conv_L_cache)
    writer.add_feed_forward_length(mc.ff_dense)  # LFM2's after the auto-adjust, as llama.cpp writes it
    if mc.moe:
        writer.add_expert_count(mc.n_expert)
        writer.add_expert_used_count(mc.n_expert_used)
        writer.add_expert_feed_forward_length(mc.ff_expert)
        writer.add_leading_dense_block_count(mc.n_dense_layers)
        writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_norm(mc.norm_topk_prob)
        writer.add_expert_weights_scale(mc.routed_scaling_factor)


def load_added_tokens(tok: dict) -> dict[int, dict]:
    return {t["id"]: t for t in tok.get("added_tokens", [])}


def check_pre_tokenizer(tok: dict, where: str) -> None:
    """The GGUF says `lfm2` (llama-3's split regex, then bytes): the tokenizer.json must split that way.

    LFM2.5's file writes the regex differently; tests/test_tokenizer_lfm25.py pins that it splits the same.
    """
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [p for p in steps if p.get("type") == "Split"]
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    regexes = [(p.get("pattern") or {}).get("Regex") for p in splits]
    isolated = all((p.get("behavior"), p.get("invert")) in (("Isolated", False), ("Removed", True)) for p in splits)
    if not (len(splits) == 1 and regexes[0] in LFM2_SPLITS and isolated and len(byte_level) == 1
            and len(steps) == 2 and not byte_level[0].get("use_regex", True)):
        raise LfmEdgeError(f"{where}: the pre-tokenizer is not LFM2's (llama-3's split regex then byte-level), "
                           "so the GGUF's 'lfm2' pre-tokenizer would split text differently")


def write_vocab(writer: GGUFWriter, src: Path, mc: ModelConfig) -> None:
    """tokenizer.json -> llama.cpp's gpt2-style BPE vocabulary, plus the chat template."""
    tok = read_json(src / "tokenizer.json")
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise LfmEdgeError(f"{src}/tokenizer.json: the tokenizer is {model.get('type')}, expected byte-level BPE")
    check_pre_tokenizer(tok, f"{src / 'tokenizer.json'}")
    vocab: dict[str, int] = model["vocab"]
    added = load_added_tokens(tok)
    n_vocab = mc.n_vocab
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    extra = [i for i in list(by_id) + list(added) if i >= n_vocab]
    if extra:
        raise LfmEdgeError(f"{src}: the tokenizer has token id {max(extra)} but vocab_size is {n_vocab}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("lfm2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() else {}
    for value, add in ((mc.bos_id, writer.add_bos_token_id), (mc.eos_id, writer.add_eos_token_id),
                       (mc.pad_id, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", post_processor_adds_bos(tok))))
    writer.add_add_eos_token(bool(tcfg.get("add_eos_token", False)))
    template = chat_template(src, tcfg)
    if template:
        writer.add_chat_template(template)


def post_processor_adds_bos(tok: dict) -> bool:
    post = tok.get("post_processor") or {}
    procs = post.get("processors", [post])
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            return bool(single) and "SpecialToken" in single[0]
    return False


def chat_template(src: Path, tcfg: dict) -> str | None:
    jinja = src / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    t = tcfg.get("chat_template")
    if isinstance(t, list):  # named templates: take the default one
        t = next((x["template"] for x in t if x.get("name") == "default"), t[0]["template"] if t else None)
    return t
