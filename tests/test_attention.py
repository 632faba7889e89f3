"""The attention kernel (csrc/attention_impl.h) against the numpy reference, on every
instruction set this CPU and build can run, for decode (one query over S keys) and prefill
(a causal block of queries), with context lengths that end mid-vector and mid-tile, over
float32 and float16 KV caches with room to spare past the attended positions. Prompts of odd
lengths, alone and after a cached prefix, go through both of the kernel's paths: a call with
fewer than 8 query vectors (rows x the heads of one KV head) takes the row path, more take the
tiles of up to 64 query vectors x 64 keys, up to four such tiles a call going through the keys
together (ops.cpp gives a call 4 x (64 // group) rows: whole rows a tile)."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge import native, reference

ISAS = native.available_isas()
CONTEXTS = (1, 3, 17, 33, 1023, 4100)  # S: 64-key tiles, 16/8-lane vectors, ends off both
# (n_heads, n_kv, head_dim): LFM2's 32/8/64, one KV head for many queries, odd groups, head
# sizes that are not a multiple of any vector width, the largest group and head the bindings take,
# and a group of 6 (AVX-512 decode: four heads x four keys at a time, then two heads alone)
HEADS = ((32, 8, 64), (4, 1, 16), (6, 2, 40), (3, 3, 17), (16, 1, 256), (10, 2, 24), (12, 2, 32))
# Against a float64 reference: the kernel's exp is good to ~2 ulp and its float32 sums run in
# another order (fused multiply-adds on AVX2/AVX-512), so |got - want| <= ATOL_REL * max|want|.
# Measured worst 1.7e-6 (scalar, S = 4100); the existing model tests use the same 2e-5.
ATOL_REL = 2e-5


@pytest.fixture(params=[np.float32, np.float16], ids=["kv_f32", "kv_f16"])
def kv_dtype(request):
    return request.param


def inputs(t: int, s: int, n_heads: int, n_kv: int, d: int, q_scale: float = 2.0, kv_dtype=np.float32):
    """Queries [T, n_heads, d] and a KV cache [n_kv, S + 5, d] whose last 5 rows are poison."""
    rng = np.random.default_rng([t, s, n_heads, n_kv, d])
    q = (rng.standard_normal((t, n_heads, d)) * q_scale).astype(np.float32)
    k = (rng.standard_normal((n_kv, s + 5, d)) * 2).astype(kv_dtype)
    v = rng.standard_normal((n_kv, s + 5, d)).astype(kv_dtype)
    k[:, s:] = np.nan  # past the attended positions: must never be read
    v[:, s:] = np.nan
    return q, k, v


def check(q, k, v, q_start, atol_rel=ATOL_REL):
    got = native.attention(q, k, v, q_start)
    # the reference sees exactly the cache's values (float16 -> float64 is exact)
    want = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), q_start)
    assert got.shape == want.shape == (q.shape[0], q.shape[1] * q.shape[2])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol_rel * np.abs(want).max())


@pytest.mark.parametrize("s", CONTEXTS)
@pytest.mark.parametrize("n_heads, n_kv, d", HEADS, ids=lambda x: str(x))
def test_decode_matches_reference(isa, threads, kv_dtype, s, n_heads, n_kv, d):
    q, k, v = inputs(1, s, n_heads, n_kv, d, kv_dtype=kv_dtype)
    check(q, k, v, s - 1)


@pytest.mark.parametrize("t, q_start", [(2, 0), (17, 0), (33, 0), (5, 1018), (3, 4097), (70, 30)])
@pytest.mark.parametrize("n_heads, n_kv, d", HEADS[:3], ids=lambda x: str(x))
def test_prefill_matches_reference(isa, threads, kv_dtype, t, q_start, n_heads, n_kv, d):
    q, k, v = inputs(t, q_start + t, n_heads, n_kv, d, kv_dtype=kv_dtype)
    check(q, k, v, q_start)


# (T, q_start): odd prompt lengths alone, and after a cached prefix that ends mid-tile or on a
# tile's edge; 1023 rows are 64 passes of 16 rows (group 4) over 16 key tiles
PROMPTS = ((1, 0), (3, 0), (17, 0), (33, 0), (3, 61), (17, 64), (33, 100), (65, 190), (200, 1))


@pytest.mark.parametrize("t, q_start", PROMPTS, ids=lambda x: str(x))
@pytest.mark.parametrize("n_heads, n_kv, d", ((32, 8, 64), (3, 3, 17), (16, 1, 256), (10, 2, 24)), ids=lambda x: str(x))
def test_prompt_matches_reference(isa, kv_dtype, t, q_start, n_heads, n_kv, d):
    q, k, v = inputs(t, q_start + t, n_heads, n_kv, d, kv_dtype=kv_dtype)
    check(q, k, v, q_start)


@pytest.mark.parametrize("t, q_start", [(1023, 0), (1023, 77)])
@pytest.mark.parametrize("n_heads, n_kv, d", ((4, 1, 16), (6, 2, 40)), ids=lambda x: str(x))
def test_long_prompt_matches_reference(isa, kv_dtype, t, q_start, n_heads, n_kv, d):
    q, k, v = inputs(t, q_start + t, n_heads, n_kv, d, kv_dtype=kv_dtype)
    check(q, k, v, q_start)


@pytest.mark.parametrize("t", [1, 70])
def test_peaked_prompt_scores_rescale(isa, kv_dtype, t):
    """Scores in the hundreds over several key tiles: the tiles' online softmax rescales the
    sums as each new tile raises a query's maximum (t = 70: the tiled path, t = 1: the rows)."""
    q, k, v = inputs(t, 300, 32, 8, 64, q_scale=40.0, kv_dtype=kv_dtype)
    k[:, 150] *= 3
    k[:, 250] *= 4
    check(q, k, v, 300 - t, atol_rel=10 * ATOL_REL)


def test_peaked_scores_do_not_overflow(isa, kv_dtype):
    """Scores in the hundreds, one tile far above the others: the online softmax rescales."""
    q, k, v = inputs(1, 1023, 32, 8, 64, q_scale=40.0, kv_dtype=kv_dtype)
    k[:, 700] *= 3
    # scores of several hundred lose ~3e-5 to float32 rounding in each exponent: a looser limit
    check(q, k, v, 1022, atol_rel=10 * ATOL_REL)


@pytest.mark.parametrize("t, s", [(1, 4100), (1, 33), (9, 1023), (70, 1100)])
def test_thread_count_does_not_change_a_bit(isa, t, s):
    q, k, v = inputs(t, s, 32, 8, 64)
    before = native.threads()
    try:
        outs = []
        for n in (1, 2, 3):
            native.set_threads(n)
            outs.append(native.attention(q, k, v, s - t))
    finally:
        native.set_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_a_querys_bits_do_not_depend_on_the_rows_beside_it(isa, kv_dtype):
    """A prompt's rows in one call (its tiles of 64 query vectors going through the keys
    together) or in two calls of other sizes and starts: the same bits for every row, as long as
    each call is long enough for the tiles (8 query vectors or more)."""
    q, k, v = inputs(150, 1100, 32, 8, 64, kv_dtype=kv_dtype)
    start = 1100 - 150
    whole = native.attention(q, k, v, start)
    split = np.concatenate([native.attention(q[:37], k, v, start), native.attention(q[37:], k, v, start + 37)])
    np.testing.assert_array_equal(whole, split)


@pytest.mark.parametrize("t", [1, 40])
def test_instruction_sets_agree(t):
    q, k, v = inputs(t, 1023, 32, 8, 64)
    outs = {}
    for name in ISAS:
        with native.use_isa(name):
            outs[name] = native.attention(q, k, v, 1023 - t)
    scalar = outs["scalar"]
    for name, out in outs.items():
        np.testing.assert_allclose(out, scalar, rtol=0, atol=ATOL_REL * np.abs(scalar).max(), err_msg=name)


def test_long_context_needs_no_score_matrix(kv_dtype):
    """32k keys for 2 queries: a [T, S] float32 score matrix per head would be 128 MB."""
    q, k, v = inputs(2, 32768, 4, 1, 64, kv_dtype=kv_dtype)
    check(q, k, v, 32768 - 2)


def test_bad_caches_are_refused_with_a_sentence():
    q, k, v = inputs(2, 10, 4, 1, 16)
    with pytest.raises(ValueError, match="fewer than q_start"):
        native.attention(q, k, v, 14)  # 16 positions asked of a 15-row cache
    with pytest.raises(ValueError, match="same dtype"):
        native.attention(q, k, v.astype(np.float16), 8)
    with pytest.raises(ValueError, match="float32 or float16"):
        native.attention(q, k.astype(np.float64), v.astype(np.float64), 8)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.attention(q, k[:, ::2], v[:, ::2], 3)
