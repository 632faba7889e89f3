"""Checks the int8-activation kernel tests share (test_kernels_int8, test_kquants,
test_quant_types)."""

from __future__ import annotations

from functools import cache

import numpy as np

from lfm_edge import native


@cache
def activations(t: int, k: int, seed: int) -> np.ndarray:
    """Random float32 activations [t, k] with blocks of 32 of very different scales and, when
    k > 32, an all-zero block (its int8 scale is 0)."""
    rng = np.random.default_rng([t, k, seed])
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, :32] *= 100.0
    if k > 32:
        x[0, 32:64] = 0.0
    return x


def dequantized_activations(x: np.ndarray) -> np.ndarray:
    """The int8 activations the kernels use (checked bit-exact in test_kernels_int8.py), float64."""
    q, d, _ = native.quantize_activations(x)
    t, k = x.shape
    return (q.reshape(t, k // 32, 32).astype(np.float64) * d[..., None].astype(np.float64)).reshape(t, k)


def assert_within(got: np.ndarray, want: np.ndarray, limit: np.ndarray, what: str) -> None:
    """Every |got - want| <= limit (a NaN is out of bounds); all that are not counted in one message."""
    error = np.abs(got.astype(np.float64) - want)
    bad = np.argwhere(~(error <= limit))
    assert bad.size == 0, (
        f"{what}: {len(bad)} of {got.size} off; first at {tuple(bad[0])}: got {got[tuple(bad[0])]}, "
        f"want {want[tuple(bad[0])]}, limit {limit[tuple(bad[0])]:.3e}"
    )


def assert_linear_bits_agree(x: np.ndarray, matrix: native.PackedMatrix, raw: np.ndarray, qtype, n: int, k: int):
    """`native.linear(x, matrix)` gives the same bits on every instruction set this CPU and build
    can run, on 1 and 2 threads; one token at a time, and two (decode: two sequences together),
    give prefill's bits, whichever way decode streams the weights (native.DECODE_STREAMINGS: the
    AVX-512 kernels read row groups side by side or one at a time); and it is the int8-activation
    path, not the float32 one of `raw`."""
    results = {}
    before = native.threads()
    try:
        for isa in native.available_isas():
            for n_threads in (1, 2):
                native.set_threads(n_threads)
                with native.use_isa(isa):
                    results[isa, n_threads] = native.linear(x, matrix)
    finally:
        native.set_threads(before)
    first = results["scalar", 1]
    assert not np.array_equal(first, native.matmul(x, raw, qtype, n, k))  # really int8
    for key, y in results.items():
        np.testing.assert_array_equal(y.view(np.uint32), first.view(np.uint32), err_msg=str(key))
    for streaming in native.DECODE_STREAMINGS:
        with native.use_decode_streaming(streaming):
            for row in range(len(x)):
                np.testing.assert_array_equal(native.linear(x[row : row + 1], matrix)[0], first[row], err_msg=streaming)
            for row in range(len(x) - 1):
                np.testing.assert_array_equal(native.linear(x[row : row + 2], matrix), first[row : row + 2],
                                              err_msg=streaming)


def assert_stack_is_its_matrices(stack: native.PackedMatrix, single: native.PackedMatrix, x: np.ndarray):
    """Each matrix of `stack` (n_mats copies of one matrix) computes what `single`, that matrix
    packed alone, does."""
    assert stack.int8_activations
    for i in range(stack.n_mats):
        np.testing.assert_array_equal(native.linear(x, stack, i), native.linear(x, single))


def assert_moe_is_its_experts(gate: native.PackedMatrix, up: native.PackedMatrix, down: native.PackedMatrix,
                              x: np.ndarray):
    """`native.moe` of two tokens, two experts each, against each expert's SwiGLU from
    `native.linear` (gate/up [E, F, H], down [E, H, F]); x must keep silu's exp in range."""
    experts = np.array([[0, 2], [1, 0]])
    wts = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    out = native.moe(x, experts, wts, gate, up, down)
    want = np.zeros((2, down.n))
    for t in range(2):
        for j in range(2):
            ex = experts[t, j]
            g = native.linear(x[t : t + 1], gate, ex)
            u = native.linear(x[t : t + 1], up, ex)
            hid = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
            want[t] += wts[t, j] * native.linear(hid, down, ex)[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
