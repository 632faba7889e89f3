"""Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K and IQ4_XS: dequantization against gguf.quants, the
repacking into the kernels' layouts (csrc/packed.h) shown lossless, and the int8-activation
kernels against a float64 numpy model of exactly that quantization, on every instruction set this
CPU and build can run, on 1 and 2 threads.

The test matrices are valid random blocks: random bytes for the quants and sub-block scales, and
small random fp16 block scales (rows of very different magnitude; the minimums of Q4_1 / Q5_1 of
either sign). gguf.quants is the reference throughout: the exact float64 weights are taken from its
dequantization (see `exact_weights`), not decoded again here."""

from __future__ import annotations

from functools import cache

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

import kernel_checks
from kernel_checks import (assert_linear_bits_agree, assert_moe_is_its_experts, assert_stack_is_its_matrices,
                           assert_within, dequantized_activations)
from lfm_edge import native

# type -> (byte offset of the main fp16 scale d, of the fp16 minimum or min-scale, or None)
SCALE_FIELDS = {
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0, None),
    Q.Q5_1: (0, 2),
    Q.IQ4_NL: (0, None),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108, None),
    Q.IQ4_XS: (0, None),
}
TYPES = tuple(SCALE_FIELDS)
# Packed bytes per row and block (csrc/qtypes.h): the file's, but for Q3_K and IQ4_XS, whose 6-bit
# scales are widened to a byte each.
PACKED_BLOCK_BYTES = {Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.IQ4_NL: 18, Q.Q2_K: 84, Q.Q3_K: 114, Q.IQ4_XS: 138}
TOKENS = (1, 2, 5)
ROWS = (1, 3, 17, 33, 1023)

# Against the float64 model of the same int8 activations and the exact weights: the integer dot
# products and sub-block scales are exact, so only the float32 accumulation rounds (at most two
# FMAs per 32 values): |y - y_model| <= MODEL_RTOL * sum of the magnitudes of the accumulated
# terms, sum |xq| (|s q| + |mn|). Rigorous bound ~(k/16) 2^-24; measured below 1e-6.
MODEL_RTOL = 1e-5
# Against the exact float32-activation path: each activation moves by at most amax_b / 254 (the
# int8 grid), so |y - y_f32| <= sum_b (amax_b / 254) sum_{i in b} |w_i|, times 1.001 for the
# float32 rounding of both paths (as test_kquants.py).
VS_F32_SLACK = 1.001


def block_of(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def ks_for(qtype: Q) -> tuple[int, ...]:
    return (32, 224, 2048) if block_of(qtype) == 32 else (256, 768, 2048)


@cache
def weights(qtype: Q, n: int, k: int) -> np.ndarray:
    """The GGUF bytes [n, row_bytes] of a random valid [n, k] matrix of qtype."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng([int(qtype), n, k, 5])
    nb = k // block
    raw = rng.integers(0, 256, size=(n, nb, nbytes), dtype=np.uint8)
    row_scale = np.exp(rng.uniform(-3, 3, size=(n, 1)))
    d_at, min_at = SCALE_FIELDS[qtype]

    def put(at: int, values: np.ndarray) -> None:  # fp16 values [n, nb] at byte `at` of each block
        raw[:, :, at : at + 2] = values.astype(np.float16).view(np.uint8).reshape(n, nb, 2)

    put(d_at, rng.uniform(0.25, 1, size=(n, nb)) * row_scale * 1e-2)
    if min_at is not None:
        sign = 1.0 if qtype == Q.Q2_K else rng.choice([-1.0, 1.0], size=(n, nb))  # Q2_K: dmin >= 0
        put(min_at, sign * rng.uniform(0.25, 1, size=(n, nb)) * row_scale * 1e-2)
    return np.ascontiguousarray(raw.reshape(n, -1))


def with_fp16_zeroed(raw: np.ndarray, qtype: Q, at: int) -> np.ndarray:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    out = raw.copy().reshape(raw.shape[0], -1, nbytes)
    out[:, :, at : at + 2] = 0
    return out.reshape(raw.shape)


def parts(qtype: Q, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scaled, minimum) as float64 [n, k], weight = scaled + minimum exactly, from gguf's
    dequantization: with the minimum's fp16 zeroed every gguf weight is an exact product, and with
    the main scale zeroed it is the minimum alone. Types without a minimum: (weights, 0)."""
    raw = weights(qtype, n, k)
    d_at, min_at = SCALE_FIELDS[qtype]
    if min_at is None:
        return gguf_quants.dequantize(raw, qtype).reshape(n, k).astype(np.float64), np.zeros((n, k))
    scaled = gguf_quants.dequantize(with_fp16_zeroed(raw, qtype, min_at), qtype).reshape(n, k)
    minimum = gguf_quants.dequantize(with_fp16_zeroed(raw, qtype, d_at), qtype).reshape(n, k)
    return scaled.astype(np.float64), minimum.astype(np.float64)


@cache
def exact_weights(qtype: Q, n: int, k: int) -> np.ndarray:
    scaled, minimum = parts(qtype, n, k)
    return scaled + minimum


@cache
def packed(qtype: Q, n: int, k: int) -> native.PackedMatrix:
    return native.PackedMatrix(weights(qtype, n, k), qtype, n, k)


def activations(t: int, k: int) -> np.ndarray:
    return kernel_checks.activations(t, k, seed=17)


# ---------------------------------------------------------------- dequantize, get_rows, repack


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_is_gguf_exactly(isa, qtype, n):
    for k in ks_for(qtype):
        raw = weights(qtype, n, k)
        want = gguf_quants.dequantize(raw, qtype).astype(np.float32).reshape(n, k)
        got = native.dequantize(raw, qtype, n, k)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"k={k}")
        ids = np.array([n - 1, 0, n // 2, n - 1], np.int64)
        np.testing.assert_array_equal(native.get_rows(raw, qtype, n, k, ids).view(np.uint32), want[ids].view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_exact_model_is_gguf_rounded_once(qtype):
    # The float64 weights, rounded to float32 once, are gguf's: for the types with a minimum gguf
    # rounds scaled + minimum once; for the others every weight is exact in float32.
    n, k = 33, 512
    want = gguf_quants.dequantize(weights(qtype, n, k), qtype).reshape(n, k)
    np.testing.assert_array_equal(exact_weights(qtype, n, k).astype(np.float32), want)


PACKED_TYPES = [Q[name] for name in native.qtypes() if name not in ("F32", "F16", "BF16")]


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
def test_packed_matrix_gives_back_the_files_bytes(qtype):
    # Every quantized type, old and new: the packed copy holds exactly the file's integers, so
    # unpacking it (csrc/unpack.cpp) gives the file's bytes back, every bit of random blocks
    # included, and those dequantize to gguf's weights bit for bit (where gguf's are finite: the
    # random fp16 scales include infinities and NaNs, whose NaN bits numpy and C may choose
    # differently).
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n, k, e = 37, 3 * 256, 3
    raw = np.random.default_rng([int(qtype), 11]).integers(0, 256, (e * n, k // block * nbytes), dtype=np.uint8)
    stack = native.PackedMatrix(raw, qtype, n, k, e)
    back = stack.gguf_bytes()
    assert back.shape == raw.shape
    np.testing.assert_array_equal(back, raw)
    with np.errstate(over="ignore", invalid="ignore"):  # random fp16 scales include inf and NaN
        want = gguf_quants.dequantize(raw, qtype).reshape(e * n, k)
    got = native.dequantize(back, qtype, e * n, k)
    finite = np.isfinite(want)
    assert finite.mean() > 0.9 and np.array_equal(np.isfinite(got), finite)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_repacking_is_lossless(isa, qtype):
    # Read every weight back out of the packed matrix through the int8 kernel: token i is 127 at
    # column i and 0 elsewhere, so its int8 block has scale exactly 1 and q = 127 there, every
    # other block scale 0. Each output is then 127 * (s q) + 127 * mn, with the integer brackets
    # exact and the float32 steps rounding once (the first product, 127 d u, is exact for the
    # types with a minimum): y must be that float64 value rounded to float32, from gguf's own
    # dequantization. A quant, scale or minimum the repacking lost or moved changes y by at least
    # 127 d, far beyond one rounding.
    n, k = 33, 512
    y = native.linear(np.eye(k, dtype=np.float32) * np.float32(127), packed(qtype, n, k)).T  # [n, k]
    scaled, minimum = parts(qtype, n, k)
    np.testing.assert_array_equal(y, (127 * scaled + 127 * minimum).astype(np.float32))


# ---------------------------------------------------------------- int8-activation matmul

LINEAR_CASES = [
    pytest.param(qtype, t, n, k, id=f"{qtype.name}-T{t}-N{n}-K{k}")
    for qtype in TYPES
    for k in ks_for(qtype)
    for n in ROWS
    for t in TOKENS
]


@pytest.mark.parametrize("qtype, t, n, k", LINEAR_CASES)
def test_int8_linear_matches_numpy_model(isa, qtype, t, n, k):
    x = activations(t, k)
    w = exact_weights(qtype, n, k)
    xq = dequantized_activations(x)

    y = native.linear(x, packed(qtype, n, k))

    assert y.dtype == np.float32 and y.shape == (t, n)
    scaled, minimum = parts(qtype, n, k)
    terms = np.abs(xq) @ (np.abs(scaled) + np.abs(minimum)).T  # what the float32 sums accumulate
    assert_within(y, xq @ w.T, MODEL_RTOL * terms + 1e-30, "vs the int8 model")
    amax = np.abs(x.reshape(t, k // 32, 32)).max(axis=-1).astype(np.float64)  # [T, k/32]
    w_block_sums = np.abs(w).reshape(n, k // 32, 32).sum(axis=-1)  # [n, k/32]
    bound = VS_F32_SLACK * (amax / 254.0) @ w_block_sums.T + 1e-30
    y_f32 = native.matmul(x, weights(qtype, n, k), qtype, n, k)
    assert_within(y, y_f32.astype(np.float64), bound + 1e-5 * (np.abs(x) @ np.abs(w).T), "vs the float32 path")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_int8_linear_is_the_same_on_every_isa_and_thread_count(qtype):
    n, k, t = 1023, 2048, 5
    assert_linear_bits_agree(activations(t, k), packed(qtype, n, k), weights(qtype, n, k), qtype, n, k)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_packed_size_and_stacks(isa, qtype):
    n, k, e = 17, 512, 3
    stack = native.PackedMatrix(np.concatenate([weights(qtype, n, k)] * e), qtype, n, k, e)
    assert stack.nbytes == e * 32 * (k // block_of(qtype)) * PACKED_BLOCK_BYTES[qtype]  # 2 row groups of 16
    assert_stack_is_its_matrices(stack, packed(qtype, n, k), activations(2, k))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_moe_runs_the_type_as_experts(isa, qtype):
    # gate/up [E, F, H], down [E, H, F] with H = F = 256: each expert against ops on its own
    e, h = 3, 256
    mats = [native.PackedMatrix(weights(qtype, e * h, h), qtype, h, h, e) for _ in range(3)]
    assert_moe_is_its_experts(*mats, activations(2, h) * np.float32(1e-4))  # 1e-4: silu's exp in range


# ---------------------------------------------------------------- validation and files


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_rows_must_be_whole_blocks(qtype):
    block = block_of(qtype)
    kind = "super-blocks" if block == 256 else "blocks"
    with pytest.raises(ValueError, match=f"k = 48 is not a multiple of {block}, which {qtype.name} rows \\({kind}"):
        native.dequantize(np.zeros(1000, np.uint8), qtype, 1, 48)
    with pytest.raises(ValueError, match=f"k = 48 is not a multiple of {block}"):
        native.PackedMatrix(np.zeros(1000, np.uint8), qtype, 1, 48)
    assert native.row_bytes(qtype, 2048) == 2048 // block * GGML_QUANT_SIZES[qtype][1]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_gguf_tensors_load_and_pack(tmp_path, qtype):
    import gguf

    from lfm_edge import ops
    from lfm_edge.gguf_file import GGUFFile
    from lfm_edge.packed import Linear

    n, k = 33, 512
    raw = weights(qtype, n, k)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "lfm2")
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = GGUFFile(tmp_path / "m.gguf").tensors["blk.0.attn_q.weight"]
    assert tensor.qtype == qtype and tensor.shape == (n, k) and tensor.nbytes == raw.nbytes
    x = activations(3, k)
    np.testing.assert_array_equal(ops.linear(x, Linear(tensor)), native.linear(x, packed(qtype, n, k)))
    emb = ops.embedding(tensor, np.array([5, 0, 32]))  # token_embd may be of any of these types
    np.testing.assert_array_equal(emb, gguf_quants.dequantize(raw, qtype).reshape(n, k)[[5, 0, 32]])


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ3_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0], ids=lambda q: q.name)
def test_unsupported_types_are_refused_in_one_sentence(tmp_path, qtype):
    import gguf

    from lfm_edge.errors import LfmEdgeError
    from lfm_edge.gguf_file import GGUFFile

    block, nbytes = GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "lfm2")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, nbytes), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LfmEdgeError) as e:
        GGUFFile(tmp_path / "m.gguf")
    msg = str(e.value)
    assert f"blk.0.ffn_up.weight is stored as {qtype.name}, which lfm-edge does not support" in msg
    assert "IQ4_XS" in msg and "Q2_K" in msg and msg.count(". ") == 0  # one sentence naming what is


def test_the_file_reader_and_the_kernels_know_the_same_types():
    from lfm_edge.gguf_file import SUPPORTED_TYPES

    assert {q.name: int(q) for q in SUPPORTED_TYPES} == native.qtypes()
    for name, qtype_id in native.qtypes().items():  # the kernels' row sizes are gguf's
        assert native.row_bytes(qtype_id, 2048) == 2048 // block_of(Q(qtype_id)) * GGML_QUANT_SIZES[Q(qtype_id)][1], name
