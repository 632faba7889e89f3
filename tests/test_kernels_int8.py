"""The int8-activation kernels (Q4_0 / Q8_0 weights repacked at load) and the fused ops
(MoE, norms, conv, RoPE, routing; attention is in test_attention.py) against numpy, on every instruction set this CPU
and build can run, and on 1 and 2 threads."""

from __future__ import annotations

import mmap
import platform
import re
import shutil
import subprocess
import sys
from functools import cache

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import kernel_checks
from kernel_checks import assert_linear_bits_agree, assert_within
from lfm_edge import native, reference

INT8_TYPES = (Q.Q8_0, Q.Q4_0)
TOKENS = (1, 2, 5, 33)
ROWS = (1, 3, 17, 33, 1023)
KS = (32, 96, 2048)

# Against a float64 numpy model of exactly the int8 activations the kernel uses (same q, same
# scales): the integer dot products are exact, only the float32 sum over the k/32 blocks
# (one fused multiply-add each) rounds, so |y - y_model| <= INT8_MODEL_RTOL * sum |xq| |w|.
# The rigorous bound is (k/32) * 2^-24 (4e-6 at k = 2048); measured worst cases are ~1e-7.
INT8_MODEL_RTOL = {Q.Q8_0: 1e-5, Q.Q4_0: 1e-5}
# Against the exact float32-activation path: rounding x to the int8 grid moves each x_i by at
# most d_b / 2 = max|x in block b| / 254, so |y - y_f32| <= sum_b (amax_b / 254) sum_{i in b}
# |w_i| (the documented bound, times 1.001 for float32 rounding of the two paths). The typical
# error is far below it (errors cancel).
INT8_VS_F32_SLACK = 1.001


@cache
def weights(qtype: Q, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the GGUF bytes of a random [n, k] matrix, its exact float32 values per gguf.quants)."""
    rng = np.random.default_rng([int(qtype), n, k, 1])
    row_scale = np.exp(rng.uniform(-3, 3, size=(n, 1)))
    values = (rng.standard_normal((n, k)) * row_scale).astype(np.float32)
    raw = gguf_quants.quantize(values, qtype)
    return np.ascontiguousarray(raw), gguf_quants.dequantize(raw, qtype).astype(np.float32).reshape(n, k)


@cache
def packed(qtype: Q, n: int, k: int) -> native.PackedMatrix:
    return native.PackedMatrix(weights(qtype, n, k)[0], qtype, n, k)


def activations(t: int, k: int) -> np.ndarray:
    return kernel_checks.activations(t, k, seed=11)


def quantize_model(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's version of the activation quantization (kernels.h QuantizedRows), in float32."""
    t, k = x.shape
    blocks = x.reshape(t, k // 32, 32)
    scale = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)  # [T, k/32]
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.rint(blocks * inverse[..., None]).astype(np.int8)  # ties to even, like the kernels
    return q.reshape(t, k), scale, q.astype(np.int32).sum(axis=-1)


def dequantized_activations(x: np.ndarray) -> np.ndarray:
    q, d, _ = quantize_model(x)
    t, k = x.shape
    return (q.reshape(t, k // 32, 32).astype(np.float64) * d[..., None].astype(np.float64)).reshape(t, k)


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("k", KS)
def test_activation_quantization_is_exact(isa, t, k):
    x = activations(t, k)
    q, d, s = native.quantize_activations(x)
    q_want, d_want, s_want = quantize_model(x)
    np.testing.assert_array_equal(q, q_want)
    np.testing.assert_array_equal(d.view(np.uint32), d_want.view(np.uint32))
    np.testing.assert_array_equal(s, s_want)


@pytest.mark.parametrize("k", [512, 1792, 4608])
def test_activation_quantization_matches_the_scalar_twin(isa, k):
    """The AVX-512 kernel quantizes 16 blocks at a time and the blocks left over one by one (k =
    1792: 8 left over); an inf or NaN sends its 16 to the one-by-one path. Every path gives the
    scalar twin's bits: blocks of zeros, of subnormals (scale below the normal floats: q = 0),
    exact ties, huge values, and an inf or NaN in the first, a middle and the last block."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((8, k)) * rng.choice([1e-3, 1.0, 1e3], size=(8, 1))).astype(np.float32)
    nb = k // 32
    x[1, 32 * 3 : 32 * 4] = 0.0
    x[2, 32 * 5 : 32 * 6] *= np.float32(1e-39)
    x[3, :32] = np.arange(32, dtype=np.float32) - 15.5  # halves: ties to even
    x[3, 32 : 64] = np.float32(3e38) * np.sign(x[3, 32:64])
    x[4, 7] = np.nan
    x[5, 32 * (nb // 2) + 5] = np.inf
    x[6, k - 1] = -np.inf
    x[7, 32 * (nb - 1) :] = np.float32(1e-45)  # the smallest subnormal, in the last block
    got = [np.asarray(a) for a in native.quantize_activations(x)]
    with native.use_isa("scalar"):
        want = [np.asarray(a) for a in native.quantize_activations(x)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
    assert np.isnan(got[1][4, 0]) and np.isnan(got[1][5, nb // 2]) and np.isnan(got[1][6, nb - 1])
    assert not got[0][7, 32 * (nb - 1) :].any() and got[2][7, nb - 1] == 0


def test_activation_quantization_rounds_ties_to_even(isa):
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127.0, 0.5, 1.5, -2.5]  # scale exactly 1: the halves are ties
    q, d, s = native.quantize_activations(x)
    assert d[0, 0] == 1.0 and q[0, :4].tolist() == [127, 0, 2, -2] and s[0, 0] == 127


# ---------------------------------------------------------------- int8-activation matmul

LINEAR_CASES = [
    pytest.param(qtype, t, n, k, id=f"{qtype.name}-T{t}-N{n}-K{k}")
    for qtype in INT8_TYPES
    for k in KS
    for n in ROWS
    for t in TOKENS
]


@pytest.mark.parametrize("qtype, t, n, k", LINEAR_CASES)
def test_int8_linear_matches_numpy_model(isa, qtype, t, n, k):
    x = activations(t, k)
    w = weights(qtype, n, k)[1].astype(np.float64)
    xq = dequantized_activations(x)

    y = native.linear(x, packed(qtype, n, k))

    assert y.dtype == np.float32 and y.shape == (t, n)
    assert_within(y, xq @ w.T, INT8_MODEL_RTOL[qtype] * (np.abs(xq) @ np.abs(w).T), "vs the int8 model")
    # and against the float32-activation path, within the documented bound
    amax = np.abs(x.reshape(t, k // 32, 32)).max(axis=-1).astype(np.float64)  # [T, k/32]
    w_block_sums = np.abs(w).reshape(n, k // 32, 32).sum(axis=-1)  # [n, k/32]
    bound = INT8_VS_F32_SLACK * (amax / 254.0) @ w_block_sums.T + 1e-30
    assert_within(y, x.astype(np.float64) @ w.T, bound, "vs the float32 path")


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda q: q.name)
# AVX-512: 1 to 4 tokens read row groups side by side, 5 and 7 a tile of 4 and the rest. AMX: up
# to 7 tokens go to the AVX-512 kernels, 8 and 15 to a partial tile alone, and 37 to two 16-token
# tiles and a partial tile of 5
@pytest.mark.parametrize("t", [3, 4, 5, 7, 8, 15, 37])
def test_int8_linear_is_the_same_on_every_isa_and_thread_count(qtype, t):
    n, k = 1023, 2048
    assert_linear_bits_agree(activations(t, k), packed(qtype, n, k), weights(qtype, n, k)[0], qtype, n, k)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("k", [32, 96, 1056, 1792])
def test_int8_linear_whole_tiles_are_the_same_for_any_block_count(qtype, k):
    # AMX runs a whole tile's blocks two at a time, each product scaled two blocks later: one
    # block, odd counts and an even one that is not a power of two, through two whole tiles and
    # a partial one (37 tokens)
    n, t = 45, 37
    assert_linear_bits_agree(activations(t, k), packed(qtype, n, k), weights(qtype, n, k)[0], qtype, n, k)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_float_linear_is_the_exact_float32_path(isa, threads, qtype):
    n, k, t = 33, 96, 5
    raw = gguf_quants.quantize(np.random.default_rng(3).standard_normal((n, k)).astype(np.float32), qtype)
    x = activations(t, k)
    y = native.linear(x, native.PackedMatrix(raw, qtype, n, k))
    np.testing.assert_array_equal(y, native.matmul(x, raw, qtype, n, k))


def test_stacked_matrices_are_addressed_by_index(isa):
    n, k, e = 17, 64, 3
    raws = [gguf_quants.quantize(np.full((n, k), i + 1.0, np.float32), Q.Q4_0) for i in range(e)]
    pm = native.PackedMatrix(np.concatenate(raws), Q.Q4_0, n, k, e)
    x = np.ones((1, k), np.float32)
    for i in range(e):
        np.testing.assert_allclose(native.linear(x, pm, i), np.full((1, n), (i + 1.0) * k), rtol=1e-6)
    assert pm.n_mats == e and pm.nbytes == e * 2 * (k // 32) * 288  # 2 row groups of 16
    with pytest.raises(ValueError, match="index 3 is out of range for 3 stacked matrices"):
        native.linear(x, pm, 3)


def test_packed_matrix_checks_its_buffer():
    raw = weights(Q.Q4_0, 3, 64)[0]
    with pytest.raises(ValueError, match="w holds 108 bytes, but 6 rows of Q4_0"):
        native.PackedMatrix(raw, Q.Q4_0, 3, 64, 2)
    with pytest.raises(ValueError, match="n_mats must be positive"):
        native.PackedMatrix(raw, Q.Q4_0, 3, 64, 0)
    with pytest.raises(ValueError, match="x has 32 columns but k = 64"):
        native.linear(activations(1, 32), native.PackedMatrix(raw, Q.Q4_0, 3, 64))


def rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page dropping is Linux's madvise")
def test_packing_from_a_file_mapping_lets_its_pages_go(tmp_path, threads):
    n, k = 2048, 2048  # 2.4 MB of Q4_0
    raw = weights(Q.Q4_0, n, k)[0]
    path = tmp_path / "w.bin"
    path.write_bytes(raw.tobytes())
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    w = np.frombuffer(mapping, np.uint8).reshape(raw.shape)
    assert int(w[:, ::64].sum(dtype=np.int64)) >= 0  # every page of the mapping present
    before = rss_file_kb()
    pm = native.PackedMatrix(w, Q.Q4_0, n, k, 1, mapping)
    dropped = before - rss_file_kb()
    assert dropped >= 0.95 * raw.nbytes / 1024, f"only {dropped} of {raw.nbytes // 1024} KB let go"
    np.testing.assert_array_equal(pm.gguf_bytes(), raw)
    np.testing.assert_array_equal(w, raw)  # the mapping reads from the file again
    del w


def test_packing_drops_pages_only_of_a_read_only_mapping_holding_the_weights(tmp_path):
    raw = weights(Q.Q4_0, 3, 64)[0]
    path = tmp_path / "w.bin"
    path.write_bytes(raw.tobytes())
    with open(path, "rb") as f:
        read_only = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    writable = mmap.mmap(-1, raw.nbytes)
    writable[:] = raw.tobytes()
    with pytest.raises(TypeError, match="mapping must be an mmap.mmap or None"):
        native.PackedMatrix(raw, Q.Q4_0, 3, 64, 1, raw.tobytes())
    with pytest.raises(ValueError, match="mapping must be read-only"):
        native.PackedMatrix(np.frombuffer(writable, np.uint8), Q.Q4_0, 3, 64, 1, writable)
    with pytest.raises(ValueError, match="the weights do not lie inside the given mapping"):
        native.PackedMatrix(raw, Q.Q4_0, 3, 64, 1, read_only)
    np.testing.assert_array_equal(np.frombuffer(writable, np.uint8), raw.reshape(-1))  # untouched


# ---------------------------------------------------------------- MoE


def moe_case(qtype: Q, n_expert=5, ffn=64, hidden=96):
    rng = np.random.default_rng([int(qtype), 5])
    mats, values = [], []
    for shape in ((n_expert, ffn, hidden), (n_expert, ffn, hidden), (n_expert, hidden, ffn)):
        raw = gguf_quants.quantize(rng.standard_normal(shape).reshape(-1, shape[-1]).astype(np.float32), qtype)
        mats.append(native.PackedMatrix(raw, qtype, shape[1], shape[2], n_expert))
        values.append(gguf_quants.dequantize(raw, qtype).reshape(shape).astype(np.float64))
    return mats, values


def moe_model(x, experts, weights_, values, int8):
    """float64 numpy model of the fused MoE, with the kernels' int8 activations if int8."""
    gate, up, down = values
    quant = dequantized_activations if int8 else (lambda a: a.astype(np.float64))
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[t, j]
            xt = quant(x[t : t + 1])
            g, u = xt @ gate[e].T, xt @ up[e].T
            h = (g / (1.0 + np.exp(-g))) * u
            out[t] += weights_[t, j] * (quant(h.astype(np.float32)) @ down[e].T)[0]
    return out


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.F32, Q.F16], ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 2, 33])
def test_moe_matches_numpy_model(isa, threads, qtype, t):
    mats, values = moe_case(qtype)
    rng = np.random.default_rng([t, 9])
    x = rng.standard_normal((t, 96)).astype(np.float32)
    experts = np.stack([rng.choice(5, 2, replace=False) for _ in range(t)])
    weights_ = rng.random((t, 2)).astype(np.float32)

    out = native.moe(x, experts, weights_, *mats)

    want = moe_model(x, experts, weights_, values, int8=qtype in INT8_TYPES)
    # the int8 model is near-exact; silu's exp and the float32 sums leave ~1e-6 relative
    assert np.max(np.abs(out - want)) <= 2e-5 * np.max(np.abs(want))
    # each token alone (decode) gives the bits of the batch (prefill)
    single = native.moe(x[-1:], experts[-1:], weights_[-1:], *mats)
    np.testing.assert_array_equal(single[0], out[-1])


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_long_prompts_give_the_bits_of_short_ones(isa, n_threads):
    # At k = 2048 linear and moe cut more than 128 rows of activations into chunks of 128 (so
    # that a chunk stays in L2), and moe cuts an expert with more rows than that into several
    # work items: each output must keep the bits it has when its token comes alone.
    t, k = 300, 2048
    x = activations(t, k)
    w = packed(Q.Q4_0, 33, k)
    mats, _ = moe_case(Q.Q4_0, n_expert=3, ffn=32, hidden=k)
    rng = np.random.default_rng(12)
    experts = np.stack([rng.choice(3, 2, replace=False) for _ in range(t)])  # ~200 rows an expert
    experts[::7] = experts[::7, ::-1]  # the best expert is not always the lower id
    weights_ = rng.random((t, 2)).astype(np.float32)
    before = native.threads()
    try:
        native.set_threads(n_threads)
        y = native.linear(x, w)
        out = native.moe(x, experts, weights_, *mats)
        alone = np.concatenate([native.linear(x[r : r + 1], w) for r in range(t)])
        np.testing.assert_array_equal(y.view(np.uint32), alone.view(np.uint32))
        alone = np.concatenate([native.moe(x[r : r + 1], experts[r : r + 1], weights_[r : r + 1], *mats) for r in range(t)])
        np.testing.assert_array_equal(out.view(np.uint32), alone.view(np.uint32))
    finally:
        native.set_threads(before)


def test_moe_rejects_bad_experts():
    mats, _ = moe_case(Q.Q4_0)
    x = np.zeros((1, 96), np.float32)
    with pytest.raises(ValueError, match="expert id 5 is out of range for 5 experts"):
        native.moe(x, np.array([[5, 0]]), np.ones((1, 2), np.float32), *mats)
    with pytest.raises(ValueError, match="gate/up must be"):
        native.moe(x, np.array([[1, 0]]), np.ones((1, 2), np.float32), mats[0], mats[2], mats[2])


# ---------------------------------------------------------------- small ops


@pytest.mark.parametrize("shape", [(1, 2048), (5, 64), (3, 4, 16)])
def test_rms_norm_matches_reference(shape):
    rng = np.random.default_rng(list(shape))
    x = rng.standard_normal(shape).astype(np.float32) * 3
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    np.testing.assert_allclose(native.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 5, 33])
def test_short_conv_matches_reference_and_carries_state(t):
    rng = np.random.default_rng(t)
    h, width = 48, 3
    kernel = rng.standard_normal((h, width)).astype(np.float32)
    bcx = rng.standard_normal((t, 3 * h)).astype(np.float32)
    state = rng.standard_normal((width - 1, h)).astype(np.float32)
    state_ref = state.copy()
    got = native.gated_short_conv(bcx, state, kernel)
    want = reference.gated_short_conv(bcx, state_ref, kernel)
    np.testing.assert_array_equal(got, want)  # the same float32 operations in the same order
    np.testing.assert_array_equal(state, state_ref)
    bx = rng.standard_normal((t, h)).astype(np.float32)
    np.testing.assert_array_equal(native.short_conv(bx, state, kernel), reference.short_conv(bx, state_ref, kernel))
    np.testing.assert_array_equal(state, state_ref)


def test_rope_matches_reference():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 4, 64)).astype(np.float32)
    positions = np.array([0, 1, 7, 1000, 32767])
    np.testing.assert_allclose(native.rope(x, positions, 1e6), reference.rope(x, positions, 1e6), rtol=0, atol=2e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_reference(normalize):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((33, 32)).astype(np.float32)
    logits[0, :] = 0.5  # all tied: the lowest ids win
    bias = (rng.standard_normal(32) * 0.1).astype(np.float32)
    for b in (bias, None):
        experts, weights_ = native.route(logits, b, 4, normalize, 2.5)
        want_experts, want_weights = reference.route(logits, b, 4, normalize, 2.5)
        np.testing.assert_array_equal(experts, want_experts)
        np.testing.assert_allclose(weights_, want_weights, rtol=1e-6)
    assert native.route(logits, None, 4, True, 1.0)[0][0].tolist() == [0, 1, 2, 3]


def test_threads_can_be_set_and_read():
    before = native.threads()
    try:
        native.set_threads(1)
        assert native.threads() == 1
        native.set_threads(2)
        assert native.threads() == 2
    finally:
        native.set_threads(before)
    from lfm_edge.errors import LfmEdgeError

    with pytest.raises(LfmEdgeError, match="n_threads must be a positive integer"):
        native.set_threads(0)


def test_decode_streaming_follows_the_cpu_vendor_and_can_be_changed():
    from pathlib import Path

    from lfm_edge.errors import LfmEdgeError

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "vendor_id" in cpuinfo:
        amd = "AuthenticAMD" in cpuinfo
        assert native.decode_streaming() == ("nontemporal" if amd else "prefetch-l2")
    before = native.decode_streaming()
    for streaming in native.DECODE_STREAMINGS:
        with native.use_decode_streaming(streaming):
            assert native.decode_streaming() == streaming
        assert native.decode_streaming() == before
    with pytest.raises(LfmEdgeError, match="decode streaming 'fast' is not one of prefetch-l2, nontemporal"):
        with native.use_decode_streaming("fast"):
            pass


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="the x86-64 kernels' machine code, read with objdump")
def test_the_built_kernels_keep_their_weight_prefetches():
    # A prefetch has no effect a test can see but speed, and gcc 12 once dropped every one of the
    # AVX-512 kernels' (a branch between the two kinds in the block loop): count them in the module.
    from lfm_edge import _C

    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    counts = {kind: len(re.findall(rf"\b{kind}\b", code)) for kind in ("prefetcht1", "prefetchnta")}
    if "avx512" in native.available_isas() or "avx2" in native.available_isas():
        assert counts["prefetcht1"] >= 100, counts  # every AVX table's decode and prompt tiles
    if "avx512" in native.available_isas():
        assert counts["prefetchnta"] >= 100, counts  # the AVX-512 decode tiles on AMD
