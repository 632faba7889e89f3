"""NaN and inf activations through every kernel, on every instruction set: defined outputs, never
a crash or undefined behaviour (tests/sanitize.sh runs this file under ASan + UBSan).

The rules checked (csrc/kernels.h QuantizedRows for the int8 types): a 32-value activation block
that holds a NaN or an infinity quantizes to q = 0, sum = 0, d = NaN, so every output of that
token is NaN; a block too small to scale (max|x| / 127 below FLT_MIN) quantizes to zeros; the
other tokens, heads, positions and channels give the bits they give without the bad values."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from lfm_edge import native

ISAS = native.available_isas()
# type -> byte offsets of its fp16 scale fields in one block (the rest of a block: any bytes)
SCALE_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.IQ4_NL: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,),
}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
N, K = 19, 512  # rows: one full 16-row group and a partial one; K: two 256-value super-blocks
NAN, INF = np.float32(np.nan), np.float32(np.inf)


@pytest.fixture(params=ISAS)
def isa(request):
    with native.use_isa(request.param):
        yield request.param


def weights(qtype: Q, n: int = N, k: int = K, n_mats: int = 1) -> np.ndarray:
    """GGUF bytes of a random valid [n_mats * n, k] matrix: random quants, small fp16 scales."""
    rng = np.random.default_rng([int(qtype), n, k])
    if qtype in FLOAT_TYPES:
        values = rng.standard_normal((n_mats * n, k)).astype(np.float32)
        if qtype == Q.F32:
            return values.view(np.uint8)
        if qtype == Q.F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_mats * n, k // block, nbytes), dtype=np.uint8)
    for at in SCALE_FIELDS[qtype]:
        scale = rng.uniform(0.25, 1, size=raw.shape[:2]) * 1e-2
        raw[:, :, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return np.ascontiguousarray(raw.reshape(n_mats * n, -1))


def bad_activations(k: int = K) -> np.ndarray:
    """[6, k]: token 0 finite, 1 one NaN, 2 one +inf, 3 one -inf, 4 a block of 1e-38s, 5 finite."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((6, k)).astype(np.float32)
    x[1, 3] = NAN
    x[2, k // 2 + 7] = INF
    x[3, k - 1] = -INF
    x[4, 32:64] *= np.float32(1e-38)
    return x


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS) + list(FLOAT_TYPES), ids=lambda q: q.name)
def test_linear_nonfinite_rows_are_nan_and_others_untouched(isa, qtype):
    w = native.PackedMatrix(weights(qtype), qtype, N, K)
    x = bad_activations()
    y = native.linear(x, w)
    assert y.shape == (6, N)
    if qtype in FLOAT_TYPES:  # exact float32 sums: NaN, or +-inf where inf meets a weight
        assert np.isnan(y[1]).all()
        assert not np.isfinite(y[2:4]).any()
    else:  # int8 activations: the non-finite block's scale is NaN
        assert np.isnan(y[1:4]).all()
    assert np.isfinite(y[[0, 4, 5]]).all()
    for t in (0, 4, 5):  # each token alone gives the bits it gives beside the bad ones
        assert_same_bits(native.linear(x[t : t + 1], w)[0], y[t])
    if qtype not in FLOAT_TYPES:  # the tiny block counts as zeros
        zeroed = x[4:5].copy()
        zeroed[0, 32:64] = 0.0
        assert_same_bits(native.linear(zeroed, w)[0], y[4])


def test_quantized_activations_of_nonfinite_blocks(isa):
    q, d, s = (np.asarray(a) for a in native.quantize_activations(bad_activations()))
    blocks = {1: 0, 2: (K // 2 + 7) // 32, 3: K // 32 - 1, 4: 1}  # token -> its bad block
    for t, b in blocks.items():
        assert not q[t, 32 * b : 32 * b + 32].any() and s[t, b] == 0
        assert np.isnan(d[t, b]) == (t != 4)
    others = np.ones(d.shape, bool)
    for t, b in blocks.items():
        others[t, b] = False
    assert np.isfinite(d[others]).all() and (d[others] > 0).all()
    assert (np.abs(q.astype(np.int32)) <= 127).all()


def test_nonfinite_linear_agrees_across_isas():
    """The scalar twin and each instruction set: NaN at the same outputs, the same bits elsewhere."""
    x = bad_activations()
    for qtype in SCALE_FIELDS:
        w = native.PackedMatrix(weights(qtype), qtype, N, K)
        outs = []
        for name in ISAS:
            with native.use_isa(name):
                outs.append(native.linear(x, w))
        for y in outs[1:]:
            np.testing.assert_array_equal(np.isnan(y), np.isnan(outs[0]))
            ok = ~np.isnan(y)
            assert_same_bits(y[ok], outs[0][ok])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F32], ids=lambda q: q.name)
def test_moe_nonfinite_token(isa, qtype):
    n_expert, ffn, hidden = 4, 256, 256
    mats = [native.PackedMatrix(weights(qtype, n, k, n_expert), qtype, n, k, n_expert)
            for n, k in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]
    x = bad_activations(hidden)
    experts = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]], np.int32)
    gates = np.full((6, 2), 0.5, np.float32)
    out = native.moe(x, experts, gates, *mats)
    if qtype in FLOAT_TYPES:  # inf through silu and the float32 sums: inf or NaN
        assert not np.isfinite(out[1:4]).any()
    else:
        assert np.isnan(out[1:4]).all()
    assert np.isfinite(out[[0, 4, 5]]).all()
    for t in (0, 4, 5):
        assert_same_bits(native.moe(x[t : t + 1], experts[t : t + 1], gates[t : t + 1], *mats)[0], out[t])


def test_route_nonfinite_logits():
    logits = np.zeros((3, 8), np.float32)
    logits[0, 2] = NAN  # a NaN expert is never preferred to a finite one
    logits[1, 5] = INF  # sigmoid(inf) = 1: first
    logits[2, :] = NAN  # all NaN: the lowest ids, their weights NaN
    experts, weights_ = native.route(logits, None, 2, False, 1.0)
    assert experts.tolist() == [[0, 1], [5, 0], [0, 1]]
    assert weights_[1, 0] == 1.0 and np.isnan(weights_[2]).all() and np.isfinite(weights_[:2]).all()
    bias = np.zeros(8, np.float32)
    bias[4] = NAN
    experts, _ = native.route(np.zeros((1, 8), np.float32), bias, 8, True, 1.0)
    assert experts.tolist() == [[0, 1, 2, 3, 5, 6, 7, 4]]


def test_rms_norm_nonfinite_rows(isa):
    x = bad_activations()
    w = np.random.default_rng(1).standard_normal(K).astype(np.float32)
    y = native.rms_norm(x, w, 1e-5)
    assert np.isnan(y[1]).all()
    for t, i in ((2, K // 2 + 7), (3, K - 1)):  # x / sqrt(inf): 0, and inf / inf = NaN
        assert np.isnan(y[t, i]) and (np.delete(y[t], i) == 0).all()
    for t in (0, 4, 5):
        assert_same_bits(native.rms_norm(x[t : t + 1], w, 1e-5)[0], y[t])


def test_rope_nonfinite_pairs(isa):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    positions = np.array([0, 5, 1000])
    clean = native.rope(x, positions, 1e6)
    x[1, 0, 3] = NAN
    x[2, 1, 40] = INF
    y = native.rope(x, positions, 1e6)
    bad = np.zeros(y.shape, bool)
    bad[1, 0, [3, 35]] = True  # the rotated pair (i, i + d/2)
    bad[2, 1, [8, 40]] = True
    assert not np.isfinite(y[bad]).any()
    assert_same_bits(y[~bad], clean[~bad])


@pytest.mark.parametrize("gated", [False, True])
def test_short_conv_nonfinite_channel(isa, gated):
    rng = np.random.default_rng(4)
    h, width, t = 48, 3, 6
    kernel = rng.standard_normal((h, width)).astype(np.float32)
    x = rng.standard_normal((t, 3 * h if gated else h)).astype(np.float32)
    state0 = rng.standard_normal((width - 1, h)).astype(np.float32)
    conv = native.gated_short_conv if gated else native.short_conv
    clean = conv(x, state0.copy(), kernel)
    channel = 2 * h + 5 if gated else 5  # the convolved input x of channel 5
    x[1, channel] = NAN
    state = state0.copy()
    y = conv(x, state, kernel)
    bad = np.zeros(y.shape, bool)
    bad[1 : 1 + width, 5] = True  # the NaN reaches the next width - 1 tokens of its channel only
    assert np.isnan(y[bad]).all()
    assert_same_bits(y[~bad], clean[~bad])
    assert np.isfinite(state).all()  # the NaN token left the window


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16], ids=["kv_f32", "kv_f16"])
# the kernel's two paths (csrc/attention_impl.h): 6 queries of one KV head take the row path,
# 12 or more the tiles; 70 tokens cross a key tile and span two passes of queries
@pytest.mark.parametrize("t, n_heads, n_kv", [(6, 2, 2), (6, 4, 2), (70, 4, 2)], ids=["rows", "tile", "tiles"])
def test_attention_nonfinite_queries_keys_values(isa, kv_dtype, t, n_heads, n_kv):
    rng = np.random.default_rng(5)
    d, group = 64, n_heads // n_kv
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    q[..., 7] = np.abs(q[..., 7])  # an inf in key dim 7 makes a score of +inf
    k = rng.standard_normal((n_kv, t, d)).astype(kv_dtype)
    v = rng.standard_normal((n_kv, t, d)).astype(kv_dtype)
    clean = native.attention(q, k, v, 0).reshape(t, n_heads, d)

    q_bad = q.copy()
    q_bad[2, 1, 0] = NAN  # one query head of one token
    y = native.attention(q_bad, k, v, 0).reshape(t, n_heads, d)
    assert np.isnan(y[2, 1]).all()
    keep = np.ones((t, n_heads), bool)
    keep[2, 1] = False
    assert_same_bits(y[keep], clean[keep])

    for cache, value in ((k, INF), (k, NAN), (v, NAN), (v, INF)):
        original = cache[0, 3, 7]
        cache[0, 3, 7] = value  # position 3 of KV head 0 (query heads 0 .. group - 1)
        y = native.attention(q, k, v, 0).reshape(t, n_heads, d)
        cache[0, 3, 7] = original
        assert not np.isfinite(y[3:, :group]).all(axis=-1).any()  # every later query of the group
        keep = np.ones((t, n_heads), bool)
        keep[3:, :group] = False  # earlier positions and the other KV heads: as without it
        assert_same_bits(y[keep], clean[keep])
