"""A check the int8-activation kernel tests share (test_kernels_int8, test_kquants,
test_quant_types)."""

from __future__ import annotations

import numpy as np

from lfm_edge import native


def assert_linear_bits_agree(x: np.ndarray, matrix: native.PackedMatrix, raw: np.ndarray, qtype, n: int, k: int):
    """`native.linear(x, matrix)` gives the same bits on every instruction set this CPU and build
    can run, on 1 and 2 threads; one token at a time, and two (decode: two sequences together),
    give prefill's bits; and it is the int8-activation path, not the float32 one of `raw`."""
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
    for row in range(len(x)):
        np.testing.assert_array_equal(native.linear(x[row : row + 1], matrix)[0], first[row])
    for row in range(len(x) - 1):
        np.testing.assert_array_equal(native.linear(x[row : row + 2], matrix), first[row : row + 2])
