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
from lfm_edge.cache import Batch

conv_layer, attention_layer, decoder_layers = ops.conv_layer, ops.attention_layer, ops.decoder_layers  # unpatched

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
        m.setattr(llm.model, "layer_stack", None)
        for layer in llm.model.layers:
            for fused in ("conv_layer", "attention_layer"):
                weights = getattr(layer, fused)
                if weights is not None and weights.router is not None:
                    m.setattr(layer, fused, None)

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


def prefill_and_steps(llm, ids, kv_dtype=np.float16):
    """A prefill of all but the last 7 of ids, then a decode step for each of those: the logits of
    every call, and what the cache then holds (each attention layer's keys and values, and the
    conv windows)."""
    cache = llm.model.make_cache(64, kv_dtype)
    steps = [llm.model(np.array(ids[:-7]), cache)]
    steps += [llm.model(np.array([t]), cache) for t in ids[-7:]]
    kv = [(c.keys.copy(), c.values.copy()) for c in cache.kv if c is not None]
    return np.concatenate(steps), kv, cache.state.conv.copy()


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("out_type", ["f32", "q8_0", "q4_0"])
def test_a_conv_layer_in_one_native_call_has_the_bits_of_its_ops(name, out_type, gguf_path, isa, threads, monkeypatch):
    """ops.conv_layer (a conv layer and its FFN, dense or a sparse MoE, in one native call)
    against the same layer op by op (DecoderLayer's own path): the same logits to the bit, over a
    prefill and decode steps that carry the conv state between calls."""
    llm = lfm_edge.load(gguf_path(name, out_type))
    ids = prompt(llm, 40)

    def run():
        return prefill_and_steps(llm, ids)[0]

    monkeypatch.setattr(llm.model, "layer_stack", None)  # layer by layer
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


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("out_type", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("kv_cache_type", ["f16", "f32"])
def test_an_attention_layer_in_one_native_call_has_the_bits_of_its_ops(name, out_type, kv_cache_type, gguf_path, isa,
                                                                      threads, monkeypatch):
    """ops.attention_layer (an attention layer and its FFN in one native call, writing its keys and
    values into the cache itself) against the same layer op by op: the same logits and the same
    cache to the bit, over a prefill and decode steps."""
    llm = lfm_edge.load(gguf_path(name, out_type))
    ids = prompt(llm, 40)
    dtype = {"f16": np.float16, "f32": np.float32}[kv_cache_type]

    def run():
        return prefill_and_steps(llm, ids, dtype)[:2]

    monkeypatch.setattr(llm.model, "layer_stack", None)  # layer by layer
    calls = []
    with monkeypatch.context() as m:
        m.setattr(ops, "attention_layer", lambda *a: calls.append(1) or attention_layer(*a))
        fused, fused_kv = run()
    fused_layers = [layer for layer in llm.model.layers if layer.attention_layer is not None]
    assert len(fused_layers) == sum(llm.args.is_attention(i) for i in range(llm.args.n_layer)) > 0
    assert all(layer.attention_layer.native is not None for layer in fused_layers)
    if name == "moe":
        assert any(layer.attention_layer.router is not None for layer in fused_layers)
    assert len(calls) == 8 * len(fused_layers)  # 1 prefill + 7 steps, each layer
    with monkeypatch.context() as m:
        for layer in fused_layers:
            m.setattr(layer, "attention_layer", None)
        op_by_op, op_by_op_kv = run()
    assert np.isfinite(fused).all()
    np.testing.assert_array_equal(fused, op_by_op)
    for (keys, values), (want_keys, want_values) in zip(fused_kv, op_by_op_kv, strict=True):
        assert keys.dtype == dtype and np.any(keys[:, :40] != 0) and not np.any(keys[:, 40:])
        np.testing.assert_array_equal(keys, want_keys)
        np.testing.assert_array_equal(values, want_values)


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("out_type", ["f32", "q4_0"])
@pytest.mark.parametrize("kv_cache_type", ["f16", "f32"])
def test_all_layers_in_one_native_call_have_the_bits_of_the_layers_one_by_one(name, out_type, kv_cache_type, gguf_path,
                                                                             isa, threads, monkeypatch):
    """ops.decoder_layers (every layer of a forward call in one native call) against the layers one
    native call each: the same logits, keys, values and conv windows to the bit, over a prefill and
    decode steps; and a batch of two sequences still runs layer by layer."""
    llm = lfm_edge.load(gguf_path(name, out_type))
    ids = prompt(llm, 40)
    dtype = {"f16": np.float16, "f32": np.float32}[kv_cache_type]

    def run():
        return prefill_and_steps(llm, ids, dtype)

    stack = llm.model.layer_stack
    assert stack is not None and stack.native is not None and len(stack.layers) == llm.args.n_layer
    calls = []
    with monkeypatch.context() as m:
        m.setattr(ops, "decoder_layers", lambda *a: calls.append(1) or decoder_layers(*a))
        m.setattr(ops, "conv_layer", lambda *a: pytest.fail("a layer ran on its own"))
        stacked = run()
    assert len(calls) == 8  # 1 prefill + 7 steps
    with monkeypatch.context() as m:
        m.setattr(llm.model, "layer_stack", None)
        m.setattr(ops, "decoder_layers", lambda *a: pytest.fail("the stack ran"))
        layer_by_layer = run()
    assert np.isfinite(stacked[0]).all() and np.any(stacked[2])
    np.testing.assert_array_equal(stacked[0], layer_by_layer[0])
    for (k, v), (want_k, want_v) in zip(stacked[1], layer_by_layer[1], strict=True):
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
    np.testing.assert_array_equal(stacked[2], layer_by_layer[2])

    # two sequences in one forward call: each its own windows and cache, so layer by layer
    caches = [llm.model.make_cache(64, dtype) for _ in range(2)]
    with monkeypatch.context() as m:
        m.setattr(ops, "decoder_layers", lambda *a: pytest.fail("the stack ran for a batch"))
        batch = Batch(caches, [3, 2])
        llm.model.forward(np.array(ids[:3] + ids[:2]), batch)
        batch.commit()
    assert [c.pos for c in caches] == [3, 2]


def every_half_boundary() -> np.ndarray:
    """float32 values at and around each point where rounding to float16 changes: every half, the
    midpoints between neighbours and one float32 step either side of them, both signs, and the
    specials."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # +0 .. 65504
    above = np.append(halves[1:], np.float32(65536.0))  # the next half (65504's: where inf begins)
    midpoints = (halves.astype(np.float64) + above) / 2  # exact in float32: halves have 11 bits
    points = np.concatenate([halves, midpoints.astype(np.float32)])
    around = np.concatenate([points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(0))])
    specials = np.array([np.inf, np.nan, 1e-45, 2.0**-25, 2.0**-24, 3.4e38, 65519.996, 65520.0], dtype=np.float32)
    x = np.concatenate([around, specials])
    return np.concatenate([x, -x])


def test_the_native_kv_cache_rounds_to_float16_as_numpy_does():
    x = every_half_boundary()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = native._C.float_to_half_bits(x)
    differ = np.nonzero(got != want)[0]
    assert differ.size == 0, f"{differ.size} differ, e.g. {x[differ[:4]]}: {got[differ[:4]]} != {want[differ[:4]]}"
    # and a spread of ordinary values, every exponent float32 has
    rng = np.random.default_rng(0)
    x = np.ldexp(rng.random(1 << 16, dtype=np.float32) * 2 - 1, rng.integers(-150, 128, 1 << 16, dtype=np.int32))
    assert x.dtype == np.float32
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(native._C.float_to_half_bits(x), x.astype(np.float16).view(np.uint16))


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


def test_attention_layer_refuses_weights_a_cache_or_a_start_that_do_not_fit(gguf_path):
    llm = lfm_edge.load(gguf_path("dense", "q8_0"))
    layer = next(l for l in llm.model.layers if l.attention_layer is not None)
    w = layer.attention_layer
    hidden, d = w.operator_norm.size, w.q_norm.size
    n_kv = w.wk.native.n // d

    def make(**change):
        args = dict(operator_norm=w.operator_norm, ffn_norm=w.ffn_norm, eps=w.eps, wq=w.wq.native, wk=w.wk.native,
                    wv=w.wv.native, wo=w.wo.native, q_norm=w.q_norm, k_norm=w.k_norm, n_heads=w.n_head,
                    rope_base=w.rope_base, gate=w.gate.native, up=w.up.native, down=w.down.native) | change
        return native.AttentionLayer(**args)

    made = make()  # as loaded
    with pytest.raises(ValueError, match="wo"):
        make(wo=w.wq.native if w.wq.native.n != hidden else w.gate.native)
    with pytest.raises(ValueError, match="n_heads"):
        make(n_heads=hidden + 1)
    with pytest.raises(ValueError, match="k_norm"):
        make(k_norm=np.ones(d + 2, np.float32))
    with pytest.raises(ValueError, match="q_norm"):
        make(q_norm=np.ones(3, np.float32))
    x = np.zeros((2, hidden), np.float32)
    cache = np.zeros((n_kv, 8, d), np.float16)
    assert made(x, cache, cache.copy(), 6).shape == (2, hidden)
    with pytest.raises(ValueError, match="holds 8 positions"):
        made(x, cache, cache.copy(), 7)
    with pytest.raises(ValueError, match="holds 8 positions"):
        made(x, cache, cache.copy(), -1)
    with pytest.raises(ValueError, match="KV cache has shape"):
        made(x, np.zeros((n_kv + 1, 8, d), np.float16), np.zeros((n_kv + 1, 8, d), np.float16), 0)
    with pytest.raises(ValueError, match="same dtype"):
        made(x, cache, cache.astype(np.float32), 0)
    with pytest.raises(ValueError, match="float32 or float16"):
        made(x, cache.astype(np.float64), cache.astype(np.float64), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        made(x, np.zeros((n_kv, d, 8), np.float16).transpose(0, 2, 1), cache.copy(), 0)
    cache.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        made(x, cache, cache, 0)
    with pytest.raises(ValueError, match="columns"):
        made(np.zeros((2, hidden + 1), np.float32), cache.copy(), cache.copy(), 0)


def test_a_layer_stack_refuses_what_does_not_fit_its_layers(gguf_path):
    llm = lfm_edge.load(gguf_path("moe", "q8_0"))
    stack = llm.model.layer_stack.native
    layers = llm.model.layer_stack.layers
    hidden = layers[0].operator_norm.size
    caches = [c for c in llm.model.make_cache(16).kv if c is not None]
    kv = [(c.keys, c.values) for c in caches]
    n_conv = sum(hasattr(layer, "kernel") for layer in layers)
    width = next(layer.kernel.shape[1] for layer in layers if hasattr(layer, "kernel"))
    conv = np.zeros((n_conv, width - 1, hidden), np.float32)
    x = np.zeros((2, hidden), np.float32)
    assert stack(x, conv, kv, 0).shape == (2, hidden)
    with pytest.raises(ValueError, match="conv_states"):
        stack(x, conv[1:], kv, 0)
    with pytest.raises(ValueError, match="pairs for"):
        stack(x, conv, kv[1:], 0)
    with pytest.raises(ValueError, match=r"\(k, v\) pairs of arrays"):
        stack(x, conv, [(k,) for k, _ in kv], 0)
    with pytest.raises(ValueError, match=r"\(k, v\) pairs of arrays"):
        stack(x, conv, [(k.tolist(), v) for k, v in kv], 0)
    with pytest.raises(ValueError, match="holds 16 positions"):
        stack(x, conv, kv, 15)
    with pytest.raises(ValueError, match="columns"):
        stack(np.zeros((2, hidden + 1), np.float32), conv, kv, 0)
    with pytest.raises(ValueError, match="at least one"):
        native.LayerStack([])
    # attention layers only: no conv state to carry, whatever width a cache gives its empty array
    attention_only = native.LayerStack([layer.native for layer in layers if not hasattr(layer, "kernel")])
    for carried in (0, width - 1):
        assert attention_only(x, np.zeros((0, carried, hidden), np.float32), kv, 0).shape == (2, hidden)
    with pytest.raises(ValueError, match="conv_states"):
        attention_only(x, conv, kv, 0)
    with pytest.raises(ValueError, match="ConvLayer and AttentionLayer"):
        native.LayerStack([layers[0].native, "a layer"])
    wider = lfm_edge.load(gguf_path("moe_alt", "q8_0")).model.layer_stack.layers
    assert wider[0].operator_norm.size != hidden
    with pytest.raises(ValueError, match="hidden sizes"):
        native.LayerStack([layers[0].native, wider[0].native])
