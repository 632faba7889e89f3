"""Every published config.json form converts, by transformers' rules.

The published config.json files (tests/real_configs/, sources in its README) and the
LFM2.5-8B-A1B / LFM2-24B-A2B facts are read without torch: layer types, FFN widths, tying and
RoPE as transformers derives them. With torch + transformers installed, each is shrunk (every
key kept, only sizes changed), made into a random model by transformers, saved the way the
published checkpoints are (bf16, per-expert names, sharded; fused expert names once), converted
with `lfm-edge quantize --type f32`, and its logits compared with transformers' on the same
bf16-rounded weights in float32. Where a llama.cpp source tree is found, its own converter
writes a second GGUF that our loader must run to the same logits.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lfm_edge import tiny_models
from lfm_edge.errors import LfmEdgeError
from lfm_edge.quantize.convert import convert
from lfm_edge.quantize.hf_config import read_config

REAL = Path(__file__).parent / "real_configs"
LOGIT_TOL = 1e-4  # of the largest |logit|


def real_config(name: str) -> dict:
    return json.loads((REAL / name / "config.json").read_text(encoding="utf-8"))


def attention_layers(mc) -> list[int]:
    return [i for i in range(mc.n_layer) if mc.is_attention(i)]


def lfm25_8b_a1b_config() -> dict:
    """LFM2.5-8B-A1B per CONFIG_FACTS.md: LFM2-8B-A1B's transformers-5 config with LFM2.5's
    vocabulary (124,928, specials at the end), norm_eps 1e-6 and RoPE theta 5e6."""
    cfg = real_config("LFM2-8B-A1B")
    cfg.pop("model_name")
    cfg.pop("unsloth_version")
    cfg.update(vocab_size=124928, norm_eps=1e-6, rope_theta=5000000.0, bos_token_id=124894, eos_token_id=124900,
               pad_token_id=124893, rope_parameters={"rope_theta": 5000000.0, "rope_type": "default"})
    return cfg


def lfm2_24b_a2b_config() -> dict:
    """LFM2-24B-A2B's published facts: 40 layers, 64 experts, top-4 (the rest as LFM2-8B-A1B)."""
    cfg = real_config("LFM2-8B-A1B")
    cfg.pop("model_name")
    cfg.pop("unsloth_version")
    types = ["full_attention" if i % 4 == 2 else "conv" for i in range(40)]
    cfg.update(num_hidden_layers=40, layer_types=types, num_experts=64, num_experts_per_tok=4)
    return cfg


# -- reading config.json, no torch ------------------------------------------------------------

def test_lfm2_350m_old_form():
    """full_attn_idxs, block_ff_dim 6656 auto-adjusted: 4608, llama.cpp's LFM2-350M width."""
    mc = read_config(real_config("LFM2-350M"))
    assert mc.arch == "lfm2" and mc.n_layer == 16 and mc.hidden == 1024
    assert attention_layers(mc) == [2, 5, 8, 10, 12, 14]
    assert mc.layer_types[:3] == ("conv", "conv", "full_attention")
    assert mc.ff_dense == 4608
    assert (mc.n_head, mc.n_head_kv, mc.tied, mc.rope_theta) == (16, 8, True, 1e6)
    assert (mc.bos_id, mc.eos_id, mc.pad_id, mc.n_vocab, mc.conv_L_cache) == (1, 7, 0, 65536, 3)


def test_lfm25_1_2b_both_forms():
    mc = read_config(real_config("LFM2.5-1.2B-Base"))
    assert mc.ff_dense == 8192  # 12288 auto-adjusted (llama.cpp's 1.2B)
    assert attention_layers(mc) == [2, 5, 8, 10, 12, 14]
    assert mc.tied and mc.n_head == 32 and mc.n_head_kv == 8


def test_lfm2_8b_a1b_transformers5_form():
    mc = read_config(real_config("LFM2-8B-A1B"))
    assert mc.arch == "lfm2moe"
    assert attention_layers(mc) == [2, 6, 10, 14, 18, 21]
    assert (mc.ff_dense, mc.ff_expert, mc.n_expert, mc.n_expert_used, mc.n_dense_layers) == (7168, 1792, 32, 4, 2)
    assert mc.rope_theta == 1e6 and mc.tied and mc.norm_topk_prob and mc.use_expert_bias
    assert [mc.is_dense(i) for i in range(4)] == [True, True, False, False]


def test_lfm25_8b_a1b_and_24b_facts():
    mc = read_config(lfm25_8b_a1b_config())
    assert (mc.n_vocab, mc.bos_id, mc.eos_id, mc.rope_theta, mc.norm_eps) == (124928, 124894, 124900, 5e6, 1e-6)
    big = read_config(lfm2_24b_a2b_config())
    assert (big.n_expert, big.n_expert_used, big.n_layer) == (64, 4, 40)


def dense(**kw) -> dict:
    return {"model_type": "lfm2", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, **kw}


@pytest.mark.parametrize("cfg, attn", [
    (dense(), [0, 1, 2, 3]),  # neither key: every layer is attention (Lfm2Config)
    (dense(full_attn_idxs=[3, 1]), [1, 3]),
    (dense(layer_types=["conv", "full_attention", "conv", "conv"]), [1]),
    (dense(layer_types=["conv", "full_attention", "conv", "conv"], full_attn_idxs=[1]), [1]),
])
def test_layer_types(cfg, attn):
    assert attention_layers(read_config(cfg)) == attn


@pytest.mark.parametrize("cfg, ff", [
    (dense(), 8192),  # intermediate_size 12288 by default, auto-adjusted
    (dense(intermediate_size=300), 256),  # int(200) rounded up to 256
    (dense(block_ff_dim=300, block_multiple_of=64), 256),
    (dense(block_ff_dim=300, block_multiple_of=48), 240),
    (dense(block_ff_dim=300, block_ffn_dim_multiplier=1.5, block_multiple_of=32), 320),  # int(300) -> 320
    (dense(block_ff_dim=300, block_ffn_dim_multiplier=None), 200),  # no multiplier: no rounding
    (dense(block_ff_dim=300, block_auto_adjust_ff_dim=False), 300),
    (dense(intermediate_size=300, block_ff_dim=300, block_multiple_of=32), 224),
    ({"model_type": "lfm2_moe", "layer_types": ["conv"] * 32, "intermediate_size": 300}, 300),  # no adjust
])
def test_dense_ffn_width(cfg, ff):
    assert read_config(cfg).ff_dense == ff


@pytest.mark.parametrize("cfg, theta", [
    (dense(), 1e6),
    (dense(rope_theta=5e6), 5e6),
    (dense(rope_parameters={"rope_theta": 5e6, "rope_type": "default"}), 5e6),
    (dense(rope_theta=1e4, rope_parameters={"rope_type": "default"}), 1e4),
    (dense(rope_theta=1e4, rope_parameters={"rope_theta": 5e6}), 5e6),  # rope_parameters wins
])
def test_rope_theta(cfg, theta):
    assert read_config(cfg).rope_theta == theta


@pytest.mark.parametrize("cfg, tied", [
    (dense(), True),
    (dense(tie_word_embeddings=False), False),
    (dense(tie_embedding=False), False),
    (dense(tie_embedding=True, tie_word_embeddings=False), True),  # tie_embedding overrides
])
def test_tied_embeddings(cfg, tied):
    assert read_config(cfg).tied is tied


@pytest.mark.parametrize("cfg, words", [
    (dense(model_type="llama"), "model_type 'llama' is not supported"),
    (dense(layer_types=["conv"] * 3), "each of the 4 layers"),
    (dense(layer_types=["conv", "sliding_attention", "conv", "conv"]), "'sliding_attention' is not supported"),
    (dense(layer_types=["conv", "full_attention", "conv", "conv"], full_attn_idxs=[2]), "name different attention"),
    (dense(full_attn_idxs=[1, 4]), "full_attn_idxs must list layer numbers 0..3"),
    (dense(block_ff_dim=300, intermediate_size=200), "block_ff_dim 300 and intermediate_size 200 disagree"),
    (dense(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn' is not supported"),
    (dense(conv_bias=True), "conv_bias = true is not supported"),
    (dense(num_attention_heads=5), "do not divide"),
    ({"model_type": "lfm2_moe", "full_attn_idxs": [1]}, "needs layer_types"),
    ({"model_type": "lfm2_moe", "layer_types": ["conv"] * 32, "num_experts": 4, "num_experts_per_tok": 6},
     "num_experts_per_tok 6 must be between 1 and num_experts 4"),
])
def test_unknown_or_contradictory_config_is_one_sentence(cfg, words):
    with pytest.raises(LfmEdgeError) as e:
        read_config(cfg, "x/config.json")
    msg = str(e.value)
    assert words in msg and msg.startswith("x/config.json: ") and "\n" not in msg


VALID = [real_config(n) for n in ("LFM2-350M", "LFM2.5-1.2B-Base", "LFM2-8B-A1B")]
VALID += [lfm25_8b_a1b_config(), lfm2_24b_a2b_config()]
VALID += [cfg for group in ("test_layer_types", "test_dense_ffn_width", "test_rope_theta", "test_tied_embeddings")
          for cfg, _ in next(m.args[1] for m in globals()[group].pytestmark if m.name == "parametrize")]
# transformers 5's strict config refuses block_ffn_dim_multiplier = null (4.x took it; its Lfm2MLP
# code still reads null as "no multiplier, no rounding", which is what read_config does)
VALID = [cfg for cfg in VALID if cfg.get("block_ffn_dim_multiplier", 1.0) is not None]


@pytest.mark.parametrize("cfg", VALID)
def test_read_config_agrees_with_transformers(cfg):
    """Live: transformers' own config classes and MLP give the same layer types, widths, tying, RoPE."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Lfm2Config, Lfm2MoeConfig
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeMLP

    mc = read_config(cfg)
    if mc.moe:
        theirs = Lfm2MoeConfig.from_dict(copy.deepcopy(cfg))
        with torch.device("meta"):
            width = Lfm2MoeMLP(theirs, intermediate_size=theirs.intermediate_size).w1.out_features
        assert (mc.n_expert, mc.n_expert_used, mc.ff_expert, mc.n_dense_layers) == (
            theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size, theirs.num_dense_layers)
    else:
        theirs = Lfm2Config.from_dict(copy.deepcopy(cfg))
        with torch.device("meta"):
            width = Lfm2MLP(theirs).w1.out_features
    assert list(mc.layer_types) == list(theirs.layer_types)
    assert [mc.is_attention(i) for i in range(mc.n_layer)] == [t != "conv" for t in theirs.layer_types]
    assert mc.ff_dense == width
    assert mc.tied == theirs.tie_word_embeddings
    assert mc.rope_theta == theirs.rope_parameters["rope_theta"]
    assert (mc.hidden, mc.n_head, mc.n_head_kv, mc.n_vocab, mc.norm_eps, mc.conv_L_cache, mc.n_ctx) == (
        theirs.hidden_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.vocab_size,
        theirs.norm_eps, theirs.conv_L_cache, theirs.max_position_embeddings)
    eos = theirs.eos_token_id[0] if isinstance(theirs.eos_token_id, list) else theirs.eos_token_id
    assert (mc.bos_id, mc.eos_id, mc.pad_id) == (theirs.bos_token_id, eos, theirs.pad_token_id)


def test_config_that_contradicts_the_weights(tmp_path):
    """The tiny dense checkpoint with an attention layer called conv, and with a wrong FFN width."""
    ckpt = tiny_models.write_checkpoint("dense", tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    bad = dict(cfg, layer_types=["conv"] * 5, full_attn_idxs=[])
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(LfmEdgeError, match="does not match the weights: it makes layer 1 conv, but the weights have"):
        convert(ckpt, tmp_path / "x.gguf", "f32", log=lambda *_: None)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, block_multiple_of=128)))
    with pytest.raises(LfmEdgeError, match=r"blk.0.ffn_gate.weight is \[192, 64\], the config gives \[256, 64\]"):
        convert(ckpt, tmp_path / "x.gguf", "f32", log=lambda *_: None)
    assert not (tmp_path / "x.gguf").exists()


# -- shrunk real configs through transformers --------------------------------------------------

@dataclass
class Case:
    name: str
    config: dict
    tokenizer: str  # "lfm2" (specials first) | "lfm25" (specials at the end)
    seed: int
    layout: str = "per_expert"  # or "fused": transformers 5's in-memory expert names
    shards: str = "100KB"


def shrink(cfg: dict, **sizes) -> dict:
    """`cfg` with only sizes changed: every key it had, no key it lacked."""
    out = copy.deepcopy(cfg)
    for k, v in sizes.items():
        assert k in out, f"shrink would add {k}"
        out[k] = v
    assert out.keys() == cfg.keys()
    return out


LFM2_VOCAB = tiny_models.VOCAB_SIZE  # the tiny LFM2 tokenizer: specials at ids 0..13
LFM25_VOCAB = 1024  # the tiny LFM2.5 tokenizer: 35 specials at ids 989..1023
LFM25_IDS = {t: LFM25_VOCAB - len(tiny_models.LFM25_SPECIAL_TOKENS) + i
             for i, t in enumerate(tiny_models.LFM25_SPECIAL_TOKENS)}
MOE6 = ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]


def cases() -> list[Case]:
    lfm2_350m = shrink(
        real_config("LFM2-350M"), hidden_size=64, block_dim=64, conv_dim=64, conv_dim_out=64, block_ff_dim=416,
        block_multiple_of=32, num_hidden_layers=6, full_attn_idxs=[2, 5], num_attention_heads=4, num_heads=4,
        num_key_value_heads=2, vocab_size=LFM2_VOCAB)
    lfm25_12b = shrink(
        real_config("LFM2.5-1.2B-Base"), hidden_size=64, block_dim=64, conv_dim=64, block_ff_dim=300,
        intermediate_size=300, block_multiple_of=64, num_hidden_layers=7,
        layer_types=["conv", "conv", "full_attention", "conv", "full_attention", "conv", "full_attention"],
        num_attention_heads=4, num_heads=4, num_key_value_heads=2, vocab_size=LFM2_VOCAB)
    moe = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=6, layer_types=MOE6,
               num_attention_heads=4, num_key_value_heads=2, num_experts=8)
    lfm2_8b = shrink(real_config("LFM2-8B-A1B"), **moe, vocab_size=LFM2_VOCAB)
    lfm25_8b = shrink(lfm25_8b_a1b_config(), **moe, vocab_size=LFM25_VOCAB, bos_token_id=LFM25_IDS["<|startoftext|>"],
                      eos_token_id=LFM25_IDS["<|im_end|>"], pad_token_id=LFM25_IDS["<|pad|>"])
    lfm2_24b = shrink(lfm2_24b_a2b_config(), hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                      num_hidden_layers=8, layer_types=lfm2_24b_a2b_config()["layer_types"][:8],
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=LFM2_VOCAB)
    return [
        Case("LFM2-350M", lfm2_350m, "lfm2", 3501),
        Case("LFM2.5-1.2B-Base", lfm25_12b, "lfm2", 1201),
        Case("LFM2-8B-A1B", lfm2_8b, "lfm2", 8101),
        Case("LFM2-8B-A1B-fused", lfm2_8b, "lfm2", 8102, layout="fused"),
        Case("LFM2.5-8B-A1B", lfm25_8b, "lfm25", 8251),
        Case("LFM2-24B-A2B", lfm2_24b, "lfm2", 2401, shards="150KB"),
        # values, not sizes, changed: an output head of its own, routing without an expert bias
        Case("LFM2.5-1.2B-Base-untied", dict(lfm25_12b, tie_embedding=False), "lfm2", 1202),
        Case("LFM2-8B-A1B-no-expert-bias", dict(lfm2_8b, use_expert_bias=False), "lfm2", 8103),
    ]


CASES = {c.name: c for c in cases()}
TEXT = ("<|im_start|>user\nBonjour ! Don't panic: 12345 + 67 = 12412.\n\n  indented\tand tabbed "
        "中文 and émojis 🚀<|im_end|>\n<|im_start|>assistant\n<think>Let me think.</think>The answer is "
        "<|tool_call_start|>[f(x=1)]<|tool_call_end|> done.<|im_end|>")


def write_tokenizer(case: Case, out: Path) -> None:
    if case.tokenizer == "lfm2":
        (out / "tokenizer.json").write_text(tiny_models.tokenizer_json_str(), encoding="utf-8")
        bos, eos, pad = "<|startoftext|>", "<|im_end|>", "<|pad|>"
    else:
        data = tiny_models.build_lfm25_tokenizer_json(LFM25_VOCAB)
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        bos, eos, pad = "<|startoftext|>", "<|im_end|>", "<|pad|>"
    tcfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos, "pad_token": pad,
            "clean_up_tokenization_spaces": False, "legacy": False, "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": tiny_models.CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")


def randomize(model, seed: int) -> None:
    """Weights with some spread (transformers' init leaves norms at 1 and the expert bias at 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * r)  # norms
            elif "conv.conv" in name or "embed_tokens" in name:
                p.copy_(0.5 * r)
            else:
                gain = 1.5 if name.endswith("feed_forward.gate.weight") else 1.0
                p.copy_(r * (gain / p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.15 * torch.randn(b.shape, generator=g))


def build_checkpoint(case: Case, out: Path) -> Path:
    """A random transformers model of `case`, saved like a published checkpoint (bf16, sharded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True)
    config_text = json.dumps(case.config, indent=2) + "\n"
    (out / "config.json").write_text(config_text)
    write_tokenizer(case, out)
    torch.manual_seed(case.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    randomize(model, case.seed)
    model = model.to(torch.bfloat16)
    if case.layout == "per_expert":
        model.save_pretrained(out, max_shard_size=case.shards)  # per-expert names (transformers 5 un-fuses)
    else:
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(config_text)  # the shrunk published file, not transformers' rewrite
    return out


def reference_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers did not load every weight: {bad}"
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def our_logits(gguf: Path, ids: list[int], text: str) -> tuple[np.ndarray, list[int]]:
    import lfm_edge

    llm = lfm_edge.load(gguf, n_threads=2, n_ctx=256)
    return llm.logits(ids), llm.tokenize(text)


def max_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max()), float(np.abs(want).max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> (checkpoint, GGUF of ours, ids, transformers logits), made once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("shrunk")
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            case = CASES[name]
            ckpt = build_checkpoint(case, root / name)
            ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(TEXT).ids
            gguf = convert(ckpt, root / f"{name}.gguf", "f32", log=lambda *_: None)
            made[name] = (ckpt, gguf, ids, reference_logits(ckpt, ids))
        return made[name]

    return get


def check_checkpoint_form(case: Case, ckpt: Path) -> None:
    """Saved the way the published checkpoints are."""
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    for f in files:
        raw = (ckpt / f).read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        assert {v["dtype"] for v in header.values()} == {"BF16"}, f
    if case.layout == "fused":
        return
    if not read_config(case.config).tied:
        assert "lm_head.weight" in json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(files) > 1 and (ckpt / "model.safetensors.index.json").exists()
    names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    if case.config["model_type"] == "lfm2_moe":
        assert "model.layers.2.feed_forward.experts.0.w1.weight" in names
        assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("name", list(CASES))
def test_shrunk_checkpoint_matches_transformers(built, name):
    case = CASES[name]
    ckpt, gguf, ids, want = built(name)
    check_checkpoint_form(case, ckpt)
    assert len(ids) > 40
    got, our_ids = our_logits(gguf, ids, TEXT)
    assert our_ids == ids, "the GGUF tokenizer encodes differently from tokenizer.json"
    err, scale = max_error(got, want)
    print(f"{name}: max |logit error| {err:.3g} = {err / scale:.3g} of the largest logit {scale:.3g}")
    assert err <= LOGIT_TOL * scale, f"{name}: max |diff| {err} > {LOGIT_TOL} * {scale}"


# -- llama.cpp's converter on the same checkpoints --------------------------------------------

def llama_cpp_source() -> Path | None:
    """A llama.cpp source tree with convert_hf_to_gguf.py: $LLAMA_CPP_SRC, or an unpacked sdist."""
    candidates = [os.environ.get("LLAMA_CPP_SRC", "")]
    for root in (Path.home() / ".cache/lfm-edge/llama.cpp", Path("/work/llama-sdist")):
        candidates += [str(p / "vendor/llama.cpp") for p in sorted(root.glob("llama_cpp_python-*"))]
    for c in candidates:
        if c and (Path(c) / "convert_hf_to_gguf.py").exists() and (Path(c) / "gguf-py").is_dir():
            return Path(c)
    return None


# The tiny tokenizers are not a published tokenizer.json, so the converter cannot recognise them
# by hash; tell it what it would say for LFM2 / LFM2.5 ("lfm2"). Everything else is its own code.
RUN_LLAMA_CPP_CONVERTER = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "lfm2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name", [n for n in CASES if not n.endswith(("-fused", "-untied", "-no-expert-bias"))])
def test_llama_cpp_converter_output_runs_the_same(built, name, tmp_path):
    src = llama_cpp_source()
    if src is None:
        pytest.skip("no llama.cpp source tree (set LLAMA_CPP_SRC to one with convert_hf_to_gguf.py)")
    ckpt, ours, ids, want = built(name)
    out = tmp_path / "llama-cpp.gguf"
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}"}
    r = subprocess.run([sys.executable, "-c", RUN_LLAMA_CPP_CONVERTER, str(src), str(ckpt), "--outfile", str(out),
                        "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got, their_ids = our_logits(out, ids, TEXT)
    assert their_ids == ids, "llama.cpp's vocabulary tokenizes differently in our loader"
    mine, _ = our_logits(ours, ids, TEXT)
    err, scale = max_error(got, want)
    print(f"{name} via llama.cpp's converter: max |logit error| {err / scale:.3g} of the largest logit; "
          f"vs our GGUF {max_error(got, mine)[0]:.3g}")
    assert err <= LOGIT_TOL * scale
    np.testing.assert_allclose(got, mine, rtol=0, atol=1e-6 * scale)
