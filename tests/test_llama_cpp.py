"""Files written by `lfm-edge quantize` load and run in llama.cpp (through llama-cpp-python).

Same file, same prompt: llama.cpp's tokens must equal ours and its logits must
agree with ours. llama.cpp does not read `routed_scaling_factor` for lfm2moe
(it assumes 1.0, true of the published models), so logits are compared only
on checkpoints whose factor is 1.0; the others must still load and tokenize.
"""

from __future__ import annotations

import numpy as np
import pytest

import lfm_edge

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "The quick brown fox, 東京 😀, def f(x):\n    return x  <|im_end|>"
SCALED = {"moe"}  # tiny models with routed_scaling_factor != 1


@pytest.fixture(autouse=True)
def _plain_buffers(llama_cpp_plain_buffers):
    """Every test here runs llama.cpp without its AMX buffers (see conftest)."""


def run_llama_cpp(path, text):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    return ids, logits


@pytest.mark.parametrize("name", ["dense", "moe_alt", "moe"])
@pytest.mark.parametrize("out_type", ["f32", "q8_0", "q4_0"])
def test_llama_cpp_loads_and_agrees(name, out_type, gguf_path):
    path = gguf_path(name, out_type)
    ids, theirs = run_llama_cpp(path, TEXT)
    ours_llm = lfm_edge.load(path)
    assert ours_llm.tokenize(TEXT) == ids
    if name in SCALED:
        return
    ours = ours_llm.logits(ids)
    per_position = np.max(np.abs(ours - theirs), axis=-1) / np.max(np.abs(ours))
    cosine = np.sum(ours * theirs, axis=-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    if out_type == "f32":
        # both compute in float32 (llama.cpp keeps an f16 KV cache)
        assert per_position.max() < 1e-2, f"{name}: {per_position.max():.3e}"
    else:
        # Both quantize activations to int8 per 32 values, but not bit-identically,
        # and on these random routers a tiny difference can flip a near-tied
        # expert at some positions: compare the typical position.
        assert np.median(per_position) < 5e-2, f"{name} {out_type}: median {np.median(per_position):.3e}"
        assert np.median(cosine) > 0.998, f"{name} {out_type}: median cosine {np.median(cosine):.5f}"
