"""The K-quants (Q4_K, Q5_K, Q6_K): dequantization against gguf.quants, and the int8-activation
kernels on their repacked layouts (csrc/packed.h) against a float64 numpy model of exactly that
quantization, on every instruction set this CPU and build can run, and on 1 and 2 threads.

gguf-py cannot quantize to the K-quants, so the test matrices are valid random blocks: random
bytes for the quants and the 6-bit / int8 sub-block scales and mins, and small random fp16
super-block scales (rows of very different magnitude)."""

from __future__ import annotations

from functools import cache

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import kernel_checks
from kernel_checks import (assert_linear_bits_agree, assert_moe_is_its_experts, assert_stack_is_its_matrices,
                           assert_within, dequantized_activations)
from lfm_edge import native

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
BLOCK_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
PACKED_ROW_BYTES = {Q.Q4_K: 148, Q.Q5_K: 180, Q.Q6_K: 210}  # per row and super-block
TOKENS = (1, 2, 5, 33)
ROWS = (1, 3, 17, 33, 1023)
KS = (256, 512, 2048)

# Against the float64 model of the same int8 activations and the exact K-quant weights: the
# integer dot products are exact and the sub-block scales are exact in float32, so only the
# float32 accumulation rounds (two FMAs per 32 values for Q4_K / Q5_K, one for Q6_K):
# |y - y_model| <= MODEL_RTOL * sum of the magnitudes of the accumulated terms, i.e.
# sum |xq| (|s q| + mn) for Q4_K / Q5_K and sum |xq| |w| for Q6_K. Rigorous bound ~(k/16) 2^-24.
MODEL_RTOL = {Q.Q4_K: 1e-5, Q.Q5_K: 1e-5, Q.Q6_K: 1e-5}
# Against the exact float32-activation path: each activation moves by at most amax_b / 254
# (the int8 grid), so |y - y_f32| <= sum_b (amax_b / 254) sum_{i in b} |w_i| (times 1.001 for
# the float32 rounding of both paths), as for Q4_0 / Q8_0 in test_kernels_int8.py.
VS_F32_SLACK = 1.001


@cache
def weights(qtype: Q, n: int, k: int) -> np.ndarray:
    """The GGUF bytes [n, row_bytes] of a random valid [n, k] matrix of qtype."""
    rng = np.random.default_rng([int(qtype), n, k, 3])
    nb = k // 256
    raw = rng.integers(0, 256, size=(n, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    row_scale = np.exp(rng.uniform(-3, 3, size=(n, 1)))

    def fp16(scale: float) -> np.ndarray:  # [n, nb, 2] bytes of positive fp16 scales
        return (rng.uniform(0.25, 1, size=(n, nb)) * row_scale * scale).astype(np.float16).view(np.uint8).reshape(n, nb, 2)

    if qtype == Q.Q6_K:
        raw[:, :, 208:210] = fp16(1e-3)  # d; the int8 scales stay random bytes
    else:
        raw[:, :, 0:2] = fp16(1e-2)  # d
        raw[:, :, 2:4] = fp16(1e-2)  # dmin
    return np.ascontiguousarray(raw.reshape(n, -1))


def k_parts(qtype: Q, raw: np.ndarray, k: int):
    """(s, q, mn) as float64, each [n, k]: weight = s * q - mn exactly (Q6_K: mn = 0, q signed).

    Decoded here from the block bytes, independently of the kernels; the 6-bit scale unpacking
    is gguf.quants'."""
    n = raw.shape[0]
    blocks = raw.reshape(n * (k // 256), BLOCK_BYTES[qtype])
    if qtype == Q.Q6_K:
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float64)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float64)
        q = np.empty((len(blocks), 256), np.int64)
        for h in range(2):
            for w in range(128):
                low = (ql[:, 64 * h + w % 64] >> (4 * (w // 64))) & 15
                high = (qh[:, 32 * h + w % 32] >> (2 * (w // 32))) & 3
                q[:, 128 * h + w] = (low | (high << 4)).astype(np.int64) - 32
        s = np.repeat(d * sc, 16, axis=1)
        return s.reshape(n, k), q.reshape(n, k).astype(np.float64), np.zeros((n, k))
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, m = gguf_quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    qs = blocks[:, 16:144] if qtype == Q.Q4_K else blocks[:, 48:176]
    q = np.empty((len(blocks), 256), np.int64)
    for j in range(8):
        q[:, 32 * j : 32 * j + 32] = (qs[:, 32 * (j // 2) : 32 * (j // 2) + 32] >> (4 * (j % 2))) & 15
        if qtype == Q.Q5_K:
            q[:, 32 * j : 32 * j + 32] |= ((blocks[:, 16:48] >> j) & 1).astype(np.int64) << 4
    s = np.repeat(d * sc.astype(np.float64), 32, axis=1)
    mn = np.repeat(dmin * m.astype(np.float64), 32, axis=1)
    return s.reshape(n, k), q.reshape(n, k).astype(np.float64), mn.reshape(n, k)


@cache
def exact_weights(qtype: Q, n: int, k: int) -> np.ndarray:
    s, q, mn = k_parts(qtype, weights(qtype, n, k), k)
    return s * q - mn  # float64, exact


@cache
def packed(qtype: Q, n: int, k: int) -> native.PackedMatrix:
    return native.PackedMatrix(weights(qtype, n, k), qtype, n, k)


def activations(t: int, k: int) -> np.ndarray:
    return kernel_checks.activations(t, k, seed=13)


# ---------------------------------------------------------------- dequantize and get_rows


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_dequantize_is_gguf_exactly(isa, qtype, n, k):
    raw = weights(qtype, n, k)
    want = gguf_quants.dequantize(raw, qtype).astype(np.float32).reshape(n, k)
    got = native.dequantize(raw, qtype, n, k)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    ids = np.array([n - 1, 0, n // 2, n - 1], np.int64)
    np.testing.assert_array_equal(native.get_rows(raw, qtype, n, k, ids).view(np.uint32), want[ids].view(np.uint32))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_numpy_model_is_gguf_rounded_once(qtype):
    # The model's exact weights, rounded to float32 once, are gguf's float32 weights: the model
    # decodes the blocks right, and gguf's dequantization rounds s * q - mn exactly once.
    n, k = 33, 512
    want = gguf_quants.dequantize(weights(qtype, n, k), qtype).reshape(n, k)
    np.testing.assert_array_equal(exact_weights(qtype, n, k).astype(np.float32), want)


# ---------------------------------------------------------------- int8-activation matmul

LINEAR_CASES = [
    pytest.param(qtype, t, n, k, id=f"{qtype.name}-T{t}-N{n}-K{k}")
    for qtype in K_TYPES
    for k in KS
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
    s, q, mn = k_parts(qtype, weights(qtype, n, k), k)
    terms = np.abs(xq) @ (np.abs(s * q) + mn).T  # what the float32 sums accumulate
    assert_within(y, xq @ w.T, MODEL_RTOL[qtype] * terms + 1e-30, "vs the int8 model")
    amax = np.abs(x.reshape(t, k // 32, 32)).max(axis=-1).astype(np.float64)  # [T, k/32]
    w_block_sums = np.abs(w).reshape(n, k // 32, 32).sum(axis=-1)  # [n, k/32]
    bound = VS_F32_SLACK * (amax / 254.0) @ w_block_sums.T + 1e-30
    y_f32 = native.matmul(x, weights(qtype, n, k), qtype, n, k)
    assert_within(y, y_f32.astype(np.float64), bound + 1e-5 * (np.abs(x) @ np.abs(w).T), "vs the float32 path")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_int8_linear_is_the_same_on_every_isa_and_thread_count(qtype):
    n, k, t = 1023, 2048, 5
    assert_linear_bits_agree(activations(t, k), packed(qtype, n, k), weights(qtype, n, k), qtype, n, k)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_packed_size_and_stacks(isa, qtype):
    n, k, e = 17, 512, 3
    raws = [weights(qtype, n, k) for _ in range(1)] * e
    stack = native.PackedMatrix(np.concatenate(raws), qtype, n, k, e)
    assert stack.nbytes == e * 32 * (k // 256) * PACKED_ROW_BYTES[qtype]  # 2 row groups of 16
    assert_stack_is_its_matrices(stack, packed(qtype, n, k), activations(2, k))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_moe_runs_k_quant_experts(isa, qtype):
    # gate/up [E, F, H], down [E, H, F] with H = F = 256: each expert against ops on its own
    e, h = 3, 256
    mats = [native.PackedMatrix(weights(qtype, e * h, h), qtype, h, h, e) for _ in range(3)]
    assert_moe_is_its_experts(*mats, activations(2, h) * np.float32(1e-3))  # 1e-3: silu's exp in range


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_not_multiple_of_256_raises(qtype):
    with pytest.raises(ValueError, match=f"k = 128 is not a multiple of 256, which {qtype.name}"):
        native.dequantize(np.zeros(1000, np.uint8), qtype, 1, 128)
    with pytest.raises(ValueError, match="k = 96 is not a multiple of 256"):
        native.PackedMatrix(np.zeros(1000, np.uint8), qtype, 1, 96)
    assert native.row_bytes(qtype, 512) == 2 * BLOCK_BYTES[qtype]


# ---------------------------------------------------------------- loading from a GGUF file


def write_gguf(path, tensors):
    """A GGUF with raw K-quant tensors {name: (qtype, bytes, shape)}. uint8 bytes [n, row_bytes]
    take their value shape from the bytes; other dtypes are written with `shape` as declared."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "lfm2")
    for name, (qtype, raw, shape) in tensors.items():
        writer.add_tensor(name, raw, raw_shape=None if raw.dtype == np.uint8 else shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_gguf_k_quant_tensors_load_and_pack(tmp_path, qtype):
    from lfm_edge import ops
    from lfm_edge.gguf_file import GGUFFile
    from lfm_edge.packed import Linear

    n, k = 33, 512
    raw = weights(qtype, n, k)
    write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (qtype, raw, (n, k))})
    tensor = GGUFFile(tmp_path / "m.gguf").tensors["blk.0.attn_q.weight"]
    assert tensor.qtype == qtype and tensor.shape == (n, k) and tensor.nbytes == raw.nbytes
    x = activations(3, k)
    y = ops.linear(x, Linear(tensor))
    np.testing.assert_array_equal(y, native.linear(x, packed(qtype, n, k)))
    # the embedding lookup of a K-quant table (token_embd may be Q4_K / Q6_K)
    emb = ops.embedding(tensor, np.array([5, 0, 32]))
    want = gguf_quants.dequantize(raw, qtype).reshape(n, k)[[5, 0, 32]]
    np.testing.assert_array_equal(emb, want)


def test_gguf_k_quant_rows_must_be_whole_super_blocks(tmp_path):
    from lfm_edge.errors import LfmEdgeError
    from lfm_edge.gguf_file import GGUFFile

    raw = weights(Q.Q4_K, 1, 256).view(np.int8)  # one block's bytes, declared as 2 rows of 128
    write_gguf(tmp_path / "bad.gguf", {"blk.3.ffn_down.weight": (Q.Q4_K, raw, (2, 128))})
    # gguf-py's reader refuses such a file before lfm-edge's own check (gguf_file.py) sees it
    with pytest.raises(LfmEdgeError, match="bad.gguf: is truncated or corrupt .*128.* not a multiple of Q4_K"):
        GGUFFile(tmp_path / "bad.gguf")
