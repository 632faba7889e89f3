"""The forward pass against transformers' outputs on tiny random checkpoints.

Goldens in tests/golden/ were computed by transformers (tests/make_goldens.py;
tests/test_goldens_live.py recomputes them); these tests need no torch.
"""

from __future__ import annotations

import numpy as np
import pytest

import lfm_edge
from lfm_edge.sampling import Sampler, SamplingParams

MODELS = ["moe", "moe_alt", "dense"]

# Quantized files against the f32 file over the 200-token golden prompt:
# (median over positions of max|dlogit| / max|logit|, median cosine of the
# logit rows). Medians, because on these tiny random MoE models a rounding
# can flip a near-tied top-k expert choice at a few positions. Q8_0 and Q4_0
# also quantize activations to int8. Measured values are in the README; the
# limits leave ~1.5-2x headroom.
QUANT_LIMITS = {
    "f16": (2e-3, 0.9999),
    "bf16": (1.5e-2, 0.9995),
    "q8_0": (7e-2, 0.996),
    "q4_0": (0.6, 0.75),
}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", MODELS)
def test_f32_logits_match_transformers(name, gguf_path, golden):
    g = golden(name)
    llm = lfm_edge.load(gguf_path(name, "f32"))
    logits = llm.logits(g["prompt_ids"].tolist())
    assert logits.shape == g["logits"].shape
    assert logits.dtype == np.float32
    err_per_position = np.max(np.abs(logits - g["logits"]), axis=-1) / np.max(np.abs(g["logits"]))
    assert err_per_position.max() < 1e-4, f"worst position {int(err_per_position.argmax())}: {err_per_position.max():.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_transformers(name, gguf_path, golden):
    g = golden(name)
    llm = lfm_edge.load(gguf_path(name, "f32"))
    sampler = Sampler(SamplingParams(temperature=0.0))
    # no end-of-generation stop: the golden was made with eos disabled
    llm.tokenizer.eog_ids = set()
    ids = list(llm.decode_tokens(g["greedy_prompt_ids"].tolist(), len(g["greedy_ids"]), sampler))
    assert ids == g["greedy_ids"].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_prefill_then_decode_equals_full_forward(name, gguf_path, golden):
    llm = lfm_edge.load(gguf_path(name, "f32"))
    ids = golden(name)["prompt_ids"][:40].tolist()
    full = llm.logits(ids)
    cache = llm.new_cache()
    # an uneven split exercises a prefill that starts mid-sequence, then single steps
    chunks = [ids[:17], ids[17:30]] + [[t] for t in ids[30:]]
    rows = []
    for chunk in chunks:
        rows.append(llm.model(np.array(chunk, dtype=np.int32), cache))
    stepped = np.concatenate(rows)
    assert cache.pos == len(ids)
    assert relative_error(stepped, full) < 1e-5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("out_type", list(QUANT_LIMITS))
def test_quantized_files_stay_close_to_f32(name, out_type, gguf_path, golden):
    ids = golden(name)["prompt_ids"].tolist()
    reference = lfm_edge.load(gguf_path(name, "f32")).logits(ids)
    quantized = lfm_edge.load(gguf_path(name, out_type)).logits(ids)
    per_position = np.max(np.abs(quantized - reference), axis=-1) / np.max(np.abs(reference))
    cosine = np.sum(quantized * reference, axis=-1) / (
        np.linalg.norm(quantized, axis=-1) * np.linalg.norm(reference, axis=-1)
    )
    max_err, min_cos = QUANT_LIMITS[out_type]
    assert np.median(per_position) < max_err, f"{out_type}: median error {np.median(per_position):.3e}"
    assert np.median(cosine) > min_cos, f"{out_type}: median cosine {np.median(cosine):.5f}"
    # and the quantization is not a no-op: the file really holds other numbers
    assert per_position.min() > 0


@pytest.mark.parametrize("name", MODELS)
def test_float16_kv_cache_stays_close_to_float32(name, gguf_path, golden):
    """llama.cpp's default cache type, ours for every file but a float32 one."""
    ids = golden(name)["prompt_ids"].tolist()
    exact = lfm_edge.load(gguf_path(name, "f32"))
    assert exact.kv_cache_type == "f32"
    assert lfm_edge.load(gguf_path(name, "q8_0")).kv_cache_type == "f16"
    want = exact.logits(ids)
    got = lfm_edge.load(gguf_path(name, "f32"), kv_cache_type="f16").logits(ids)
    per_position = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)
    # measured: max 2.6e-4 / 9.8e-4 / 3.1e-4 (moe / moe_alt / dense), same argmax everywhere
    assert 0 < per_position.max() < 3e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


def test_unknown_kv_cache_type_is_refused(gguf_path):
    with pytest.raises(lfm_edge.LfmEdgeError, match="kv_cache_type must be one of f16, f32"):
        lfm_edge.load(gguf_path("moe", "f32"), kv_cache_type="q8_0")


def test_quantized_files_are_smaller(gguf_path):
    sizes = {t: gguf_path("moe", t).stat().st_size for t in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_every_isa_gives_the_same_logits(gguf_path, golden):
    from lfm_edge import native

    ids = golden("moe")["prompt_ids"][:64].tolist()
    # float32 keys and values: with float16 ones, an ISA's last-bit difference in a key can round
    # to another half and flip an int8 activation downstream (measured 8e-3 at one position)
    llm = lfm_edge.load(gguf_path("moe", "q4_0"), kv_cache_type="f32")
    results = {}
    for isa in native.available_isas():
        with native.use_isa(isa):
            results[isa] = llm.logits(ids)
    reference = results["scalar"]
    for isa, logits in results.items():
        assert relative_error(logits, reference) < 1e-5, isa
