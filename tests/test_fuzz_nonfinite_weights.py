"""Weights that overflow float16 end in one sentence, with no numpy warning on stderr (issue 12).

A value past float16's range (65504) written into the float16 KV cache becomes inf; numpy
warns "overflow encountered in cast" on each such write, which reached stderr once per step
before the one sentence about non-finite logits. The test runs with warnings as errors.
"""

from __future__ import annotations

import struct
import warnings

import pytest

import fuzz_gguf as fz
import lfm_edge
from lfm_edge.errors import LfmEdgeError

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def huge_values_model(gguf_path, tmp_path_factory):
    """The tiny f32 MoE with one attention layer's value weights all 1e30: V overflows float16."""
    g = fz.parse(gguf_path("moe", "f32").read_bytes())
    t = next(t for t in g.tensors if t.name.endswith("attn_v.weight"))
    n = t.dims[0] * t.dims[1]
    data = bytearray(g.data)
    data[t.offset : t.offset + 4 * n] = struct.pack("<f", 1e30) * n
    g.data = bytes(data)
    path = tmp_path_factory.mktemp("huge") / "huge-v.gguf"
    path.write_bytes(fz.serialize(g)[0])
    return path


@pytest.mark.filterwarnings("error")
def test_values_past_float16_are_one_sentence_without_a_warning(huge_values_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = lfm_edge.load(str(huge_values_model), n_ctx=256, kv_cache_type="f16")
        with pytest.raises(LfmEdgeError, match="NaN or infinite logits") as e:
            llm.chat(HI, max_tokens=3, stream=False, seed=0)
        with pytest.raises(LfmEdgeError, match="NaN or infinite logits"):
            "".join(llm.generate("Once upon", max_tokens=3, seed=1))
    assert "\n" not in str(e.value)
    assert [str(w.message) for w in caught] == []


def test_the_same_weights_with_a_float32_cache_are_not_refused(huge_values_model):
    """The float16 cache is what overflows: with a float32 cache the logits stay finite."""
    llm = lfm_edge.load(str(huge_values_model), n_ctx=256, kv_cache_type="f32")
    assert llm.logits(llm.tokenize("hi")).shape[0] >= 1
    assert isinstance(llm.chat(HI, max_tokens=3, stream=False, seed=0), str)
