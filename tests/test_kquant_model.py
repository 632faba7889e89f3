"""Whole-model K-quant files made by llama.cpp's own quantizer, as the published
Q4_K_M / Q5_K_M / Q6_K files are: lfm-edge must load them and compute the right logits.

tests/test_kquants.py checks the Q4_K / Q5_K / Q6_K kernels on random blocks; here the
tiny "moe_k" checkpoint (all matrix rows a multiple of 256 wide) is converted to f32 by
our tool and quantized by llama_model_quantize (llama-cpp-python). Each file must really
hold K-quants, and its logits must stay close to lfm-edge's on the f32 file and agree
with llama.cpp's on the same file. The tiny random routers sit near ties, so a rounding
can flip an expert at a few positions: limits are on medians over the positions.

No greedy-token check: with tied embeddings this random model's top token is the input
token at 98% of the positions, so argmax agreement (measured 0.98-1.0 against both
f32 and llama.cpp) says little.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import lfm_edge
from lfm_edge import tiny_models

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp ftype (lower case) -> type of most matrices. The mixes raise some tensors to Q6_K:
# token_embd (also the output here), attn_v and ffn_down of some layers.
FTYPES = {
    "q4_k_m": Q.Q4_K,
    "q5_k_m": Q.Q5_K,
    "q6_k": Q.Q6_K,
}
# llama.cpp keeps these float32: norms, the 3-tap conv kernel, the router, the expert bias
F32_TENSORS = ("norm.weight", "shortconv.conv.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")

# Against lfm-edge on the f32 file: (median over positions of max|dlogit| / max|logit|,
# median cosine of the logit rows). Measured 0.159 / 0.926, 0.100 / 0.967, 0.056 / 0.990
# (llama.cpp on the same files: 0.158 / 0.925, 0.095 / 0.970, 0.062 / 0.988); this random
# model amplifies weight noise (Q8_0 of it: 0.018 / 0.9991). ~2x headroom on error and 1-cos.
VS_F32_LIMITS = {
    "q4_k_m": (0.3, 0.85),
    "q5_k_m": (0.2, 0.935),
    "q6_k": (0.11, 0.98),
}
# Against llama.cpp on the same file, the same measures: 0.023 / 0.9984, 0.024 / 0.9986,
# 0.022 / 0.9988 (both quantize activations, not identically, and keep an f16 KV cache).
# A swapped pair of sub-block scales gives cosines below 0.5.
VS_LLAMA_CPP_LIMITS = (5e-2, 0.997)

# BOS, then 127 random ordinary tokens (ids 0..19 are specials / reserved, the last two
# are <think> / </think>)
PROMPT = [1] + np.random.default_rng(0).integers(20, tiny_models.VOCAB_SIZE - 2, 127).tolist()


@pytest.fixture(autouse=True)
def _plain_buffers(llama_cpp_plain_buffers):
    """Every test here runs llama.cpp without its AMX buffers (see conftest)."""


@pytest.fixture(scope="module")
def kquant_path(llama_quantized):
    """kquant_path(name) -> the f32 GGUF of moe_k quantized by llama.cpp to ftype `name`."""
    return lambda name: llama_quantized(name.upper())


@pytest.fixture(scope="module")
def reference(gguf_path):
    llm = lfm_edge.load(gguf_path("moe_k", "f32"))
    assert llm.kv_cache_type == "f32"
    return llm.logits(PROMPT)


def compare(got, want):
    """(per-position max|got - want| / max|want|, per-position cosine)."""
    per_position = np.max(np.abs(got - want), axis=-1) / np.max(np.abs(want))
    cosine = np.sum(got * want, axis=-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return per_position, cosine


@pytest.mark.parametrize("name", FTYPES)
def test_llama_cpp_wrote_k_quants(name, kquant_path):
    types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(kquant_path(name)).tensors}
    matrices = {n: t for n, t in types.items() if not n.endswith(F32_TENSORS)}
    base = FTYPES[name]
    assert {t for n, t in types.items() if n not in matrices} == {Q.F32}
    assert set(matrices.values()) == {base, Q.Q6_K}, matrices
    assert types["token_embd.weight"] == Q.Q6_K
    assert [n for n, t in matrices.items() if t == base and "ffn_up_exps" in n], "no base-type experts"


@pytest.mark.parametrize("name", FTYPES)
def test_logits_stay_close_to_f32(name, kquant_path, reference):
    per_position, cosine = compare(lfm_edge.load(kquant_path(name)).logits(PROMPT), reference)
    max_err, min_cos = VS_F32_LIMITS[name]
    assert np.median(per_position) < max_err, f"{name}: median error {np.median(per_position):.3e}"
    assert np.median(cosine) > min_cos, f"{name}: median cosine {np.median(cosine):.5f}"
    assert per_position.min() > 0  # the file really holds other numbers


@pytest.mark.parametrize("name", FTYPES)
def test_logits_agree_with_llama_cpp(name, kquant_path):
    path = kquant_path(name)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    theirs = np.array(llm.scores[: len(PROMPT)], dtype=np.float32)
    per_position, cosine = compare(lfm_edge.load(path).logits(PROMPT), theirs)
    max_err, min_cos = VS_LLAMA_CPP_LIMITS
    assert np.median(per_position) < max_err, f"{name}: median error {np.median(per_position):.3e}"
    assert np.median(cosine) > min_cos, f"{name}: median cosine {np.median(cosine):.5f}"
