"""The whole model on the native kernels against the numpy reference path (`lfm_edge.reference`
swapped into `lfm_edge.ops`), on the tiny checkpoints.

Float files must agree to float32 rounding. Q8_0 / Q4_0 files run int8 activations natively
but float32 activations in the reference, so they agree only approximately; the tiny random
MoE models route near-ties (router scores within 1e-3 of each other), so a rounding-sized
difference can pick another expert: those tests replay the reference's routing in the native
run, which leaves only the continuous error to measure.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import lfm_edge
from lfm_edge import native, ops, reference

conv_layer = ops.conv_layer  # before any test patches it

# Float files: float32 sums in another order, and a polynomial exp in attention.
FLOAT_RTOL = 2e-5
# Quantized files: cosine similarity of each position's logits, native vs reference. The
# int8 activations alone cost the tiny random models about as much as Q8_0 weights do (their
# logits are very sensitive: even f16 weights move the MoE ones by 1e-1); measured worst
# 0.9974 (moe, q8_0), so 0.995 keeps ~2x headroom. Against a reference that quantizes
# activations exactly as the kernels do, only rounding ties decided differently remain
# (float32 differences of ~1e-6 flip an int8 step now and then): measured worst 0.99967.
MIN_COSINE = 0.995
MIN_COSINE_INT8_MODEL = 0.999


@contextlib.contextmanager
def reference_ops(monkeypatch):
    with monkeypatch.context() as m:
        for name in reference.OPS:
            m.setattr(ops, name, getattr(reference, name))
        yield


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each position's logits."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def native_and_reference(llm, ids, monkeypatch, patch_reference=lambda m: None):
    """Logits of `ids` natively and on the reference ops (after `patch_reference(m)`), the native
    run replaying the reference run's expert choices so that only the continuous error remains."""
    routes = []

    def op_by_op(m):  # the layers that route, so that every choice passes through ops.route
        for layer in llm.model.layers:
            if layer.conv_layer is not None and layer.conv_layer.router is not None:
                m.setattr(layer, "conv_layer", None)

    with monkeypatch.context() as m:
        patch_reference(m)
        op_by_op(m)
        for op in reference.OPS:
            m.setattr(ops, op, getattr(reference, op))
        m.setattr(ops, "route", lambda *a: routes.append(reference.route(*a)) or routes[-1])
        reference_logits = llm.logits(ids)
    replay = iter(routes)
    with monkeypatch.context() as m:
        op_by_op(m)
        m.setattr(ops, "route", lambda *a: next(replay))
        native_logits = llm.logits(ids)
    assert next(replay, None) is None  # every choice was replayed
    return native_logits, reference_logits


def prompt(llm, n=64) -> list[int]:
    return np.random.default_rng(0).integers(0, llm.args.n_vocab, n).tolist()


@pytest.mark.parametrize("name", ["moe", "moe_alt", "dense"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16"])
def test_float_files_match_the_reference_path(name, out_type, gguf_path, monkeypatch):
    # float32 keys and values: in a float16 cache, a last-bit difference can round to another half
    llm = lfm_edge.load(gguf_path(name, out_type), kv_cache_type="f32")
    ids = prompt(llm)
    native_logits = llm.logits(ids)
    with reference_ops(monkeypatch):
        reference_logits = llm.logits(ids)
    assert relative_error(native_logits, reference_logits) < FLOAT_RTOL


@pytest.mark.parametrize("name", ["moe", "moe_alt", "dense"])
@pytest.mark.parametrize("out_type", ["q8_0", "q4_0"])
def test_quantized_files_stay_close_to_the_reference_path(name, out_type, gguf_path, monkeypatch):
    llm = lfm_edge.load(gguf_path(name, out_type))
    native_logits, reference_logits = native_and_reference(llm, prompt(llm), monkeypatch)
    cosine = row_cosines(native_logits, reference_logits)
    err = relative_error(native_logits, reference_logits)
    assert cosine.min() >= MIN_COSINE, f"{name} {out_type}: min cosine {cosine.min():.6f}, max error {err:.2e}"
    assert err > 0  # the int8 activations really are in use


def int8_activations(x: np.ndarray) -> np.ndarray:
    """x rounded to the kernels' int8 grid (blocks of 32, one float32 scale each)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    q, d, _ = native.quantize_activations(x)
    t, k = x.shape
    return (q.reshape(t, k // 32, 32) * d[..., None]).reshape(t, k).astype(np.float32)


@pytest.mark.parametrize("name", ["moe", "dense"])
@pytest.mark.parametrize("out_type", ["q8_0", "q4_0"])
def test_quantized_files_match_a_reference_with_int8_activations(name, out_type, gguf_path, monkeypatch):
    llm = lfm_edge.load(gguf_path(name, out_type))
    linear, expert_linear = reference.linear, reference.expert_linear

    def quantized(x, w):
        return int8_activations(x) if reference.stored(w).qtype in (2, 8) else x  # Q4_0, Q8_0

    def int8_reference(m):
        m.setattr(reference, "linear", lambda x, w: linear(quantized(x, w), w))
        m.setattr(reference, "expert_linear", lambda x, w, e: expert_linear(quantized(x, w), w, e))

    native_logits, reference_logits = native_and_reference(llm, prompt(llm), monkeypatch, int8_reference)
    cosine = row_cosines(native_logits, reference_logits)
    assert cosine.min() >= MIN_COSINE_INT8_MODEL, f"min cosine {cosine.min():.7f}"


def test_logits_do_not_depend_on_the_thread_count(gguf_path):
    llm = lfm_edge.load(gguf_path("moe", "q4_0"))
    ids = prompt(llm, 40)
    before = native.threads()
    try:
        results = []
        for n in (1, 2):
            native.set_threads(n)
            results.append(llm.logits(ids))
    finally:
        native.set_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


def test_weights_are_packed_once_at_load(gguf_path):
    llm = lfm_edge.load(gguf_path("moe", "q4_0"))
    layer = llm.model.layers[-1]
    moe = layer.feed_forward
    assert moe.gate.native.int8_activations and moe.gate.native.n_mats == llm.args.n_expert
    # 16-row groups of 18-byte blocks: as large as the file's bytes, plus padding rows
    assert moe.gate.nbytes >= moe.gate.tensor.nbytes


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("out_type", ["f32", "q8_0", "q4_0"])
def test_a_conv_layer_in_one_native_call_has_the_bits_of_its_ops(name, out_type, gguf_path, isa, threads, monkeypatch):
    """ops.conv_layer (a conv layer and its FFN, dense or a sparse MoE, in one native call)
    against the same layer op by op (DecoderLayer's own path): the same logits to the bit, over a
    prefill and decode steps that carry the conv state between calls."""
    llm = lfm_edge.load(gguf_path(name, out_type))
    ids = prompt(llm, 40)

    def run():
        cache = llm.model.make_cache(64)
        steps = [llm.model(np.array(ids[:33]), cache)]
        steps += [llm.model(np.array([t]), cache) for t in ids[33:]]
        return np.concatenate(steps)

    calls = []
    with monkeypatch.context() as m:
        m.setattr(ops, "conv_layer", lambda *a: calls.append(1) or conv_layer(*a))
        fused = run()
    fused_layers = [layer for layer in llm.model.layers if layer.conv_layer is not None]
    assert len(fused_layers) == sum(not llm.args.is_attention(i) for i in range(llm.args.n_layer))
    assert all(layer.conv_layer.native is not None for layer in fused_layers)
    if name == "moe":
        assert any(layer.conv_layer.router is not None for layer in fused_layers)
    assert len(calls) == 8 * len(fused_layers)  # 1 prefill + 7 steps, each layer
    with monkeypatch.context() as m:
        for layer in fused_layers:
            m.setattr(layer, "conv_layer", None)
        op_by_op = run()
    assert np.isfinite(fused).all()
    np.testing.assert_array_equal(fused, op_by_op)


def test_conv_layer_refuses_weights_of_the_wrong_shape(gguf_path):
    layer = next(l for l in lfm_edge.load(gguf_path("dense", "q8_0")).model.layers if l.conv_layer is not None)
    w = layer.conv_layer
    with pytest.raises(ValueError, match="out_proj"):
        native.ConvLayer(w.operator_norm, w.ffn_norm, w.eps, w.in_proj.native, w.kernel, w.in_proj.native,
                         w.gate.native, w.up.native, w.down.native)
    with pytest.raises(ValueError, match="state"):
        w.native(np.zeros((1, w.operator_norm.size), np.float32), np.zeros((5, 3), np.float32))


def test_a_moe_conv_layer_refuses_a_wrong_router_bias_or_top_k(gguf_path):
    layer = next(l for l in lfm_edge.load(gguf_path("moe", "q8_0")).model.layers
                 if l.conv_layer is not None and l.conv_layer.router is not None)
    w = layer.conv_layer
    n_expert = w.gate.n_mats

    def make(**change):
        args = dict(gate=w.gate.native, up=w.up.native, down=w.down.native, router=w.router.native,
                    expert_bias=w.expert_bias, top_k=w.top_k, normalize=w.normalize, scale=w.scale) | change
        return native.ConvLayer(w.operator_norm, w.ffn_norm, w.eps, w.in_proj.native, w.kernel, w.out_proj.native,
                                **args)

    make()  # as loaded
    with pytest.raises(ValueError, match="router"):
        make(router=w.out_proj.native)
    with pytest.raises(ValueError, match="expert_bias"):
        make(expert_bias=np.zeros(n_expert + 1, np.float32))
    for top_k in (0, n_expert + 1):
        with pytest.raises(ValueError, match="top_k"):
            make(top_k=top_k)
    with pytest.raises(ValueError, match=r"\[E, F, H\]"):
        make(down=w.gate.native)
