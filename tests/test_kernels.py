"""The C++ kernels against numpy references built on gguf.quants, for every instruction set this
CPU and build can run, plus every validation error the module promises."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import time
import sys
from functools import cache

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from lfm_edge import native
from lfm_edge.errors import LfmEdgeError

ISAS = native.available_isas()
QUANT_TYPES = (Q.Q8_0, Q.Q4_0)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QTYPES = FLOAT_TYPES + QUANT_TYPES

TOKENS = (1, 3, 17, 33)
ROWS = (1, 3, 17, 33, 1023)
# Q4_0 / Q8_0 rows are whole 32-weight blocks; float rows can be any length, and 47 and 300
# reach the SIMD tail paths (300 also spans two 256-value chunks).
QUANT_KS = (32, 96, 2048)
FLOAT_KS = QUANT_KS + (47, 300)

# Dequantization is exact on every path: the same float32 bits as gguf.quants.dequantize.
# matmul: every path multiplies those exact weights and accumulates in float32, only in a
# different order, so |y - y_ref| <= MATMUL_RTOL * sum_i |x_i| |w_i| with y_ref in float64.
# The rigorous bound is about k * 2^-24 (1.2e-4 at k = 2048); rounding errors partly cancel,
# and the measured worst case is below 1e-7, so 1e-5 leaves a 100x margin yet still catches a
# single dropped or doubled term (about 1/k of the scale, 5e-4 at k = 2048).
MATMUL_RTOL = {
    Q.F32: 1e-5,
    Q.F16: 1e-5,
    Q.BF16: 1e-5,
    Q.Q8_0: 1e-5,
    Q.Q4_0: 1e-5,
}


def ks_for(qtype: Q) -> tuple[int, ...]:
    return FLOAT_KS if qtype in FLOAT_TYPES else QUANT_KS


@cache
def weights(qtype: Q, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the GGUF bytes of a random [n, k] matrix, its exact float32 values per gguf.quants)."""
    rng = np.random.default_rng([int(qtype), n, k])
    row_scale = np.exp(rng.uniform(-3, 3, size=(n, 1)))  # rows of very different magnitude
    values = (rng.standard_normal((n, k)) * row_scale).astype(np.float32)  # [n, k]
    raw = gguf_quants.quantize(values, qtype)  # F32/F16 keep their dtype, the others are uint8
    reference = gguf_quants.dequantize(raw, qtype).astype(np.float32).reshape(n, k)
    return np.ascontiguousarray(raw), reference


@cache
def activations(t: int, k: int) -> np.ndarray:
    return np.random.default_rng([t, k, 7]).standard_normal((t, k)).astype(np.float32)  # [T, k]


@cache
def matmul_reference(qtype: Q, t: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W.T in float64, sum_i |x_i| |w_i|), both [T, n]."""
    x = activations(t, k).astype(np.float64)
    w = weights(qtype, n, k)[1].astype(np.float64)
    return x @ w.T, np.abs(x) @ np.abs(w).T


MATMUL_CASES = [
    pytest.param(qtype, t, n, k, id=f"{qtype.name}-T{t}-N{n}-K{k}")
    for qtype in QTYPES
    for k in ks_for(qtype)
    for n in ROWS
    for t in TOKENS
]
DEQUANTIZE_CASES = [
    pytest.param(qtype, n, k, id=f"{qtype.name}-N{n}-K{k}")
    for qtype in QTYPES
    for k in ks_for(qtype)
    for n in ROWS
]


# ---------------------------------------------------------------- kernels against numpy


@pytest.mark.parametrize("qtype, t, n, k", MATMUL_CASES)
def test_matmul_matches_reference(isa, qtype, t, n, k):
    raw, _ = weights(qtype, n, k)
    x = activations(t, k)
    expected, scale = matmul_reference(qtype, t, n, k)

    y = native.matmul(x, raw, qtype, n, k)

    assert y.dtype == np.float32 and y.shape == (t, n)
    error = np.abs(y.astype(np.float64) - expected)
    limit = MATMUL_RTOL[qtype] * scale
    bad = np.argwhere(~(error <= limit))  # also catches NaN
    assert bad.size == 0, (
        f"{len(bad)} of {y.size} outputs off; first at {tuple(bad[0])}: "
        f"got {y[tuple(bad[0])]}, want {expected[tuple(bad[0])]}, "
        f"relative error {error[tuple(bad[0])] / scale[tuple(bad[0])]:.2e}"
    )


@pytest.mark.parametrize("qtype, n, k", DEQUANTIZE_CASES)
def test_dequantize_is_exact(isa, qtype, n, k):
    raw, expected = weights(qtype, n, k)

    got = native.dequantize(raw, qtype, n, k)

    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
def test_dequantize_every_16_bit_pattern(isa, qtype):
    """Subnormals, signed zeros, infinities and NaNs convert exactly (NaN payloads may differ)."""
    bits = np.arange(1 << 16, dtype=np.uint16)  # one row of k = 65536 values
    if qtype == Q.F16:
        expected = bits.view(np.float16).astype(np.float32)
    else:
        expected = (bits.astype(np.uint32) << 16).view(np.float32)

    got = native.dequantize(bits, qtype, 1, bits.size)[0]

    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_get_rows_is_exact(isa, qtype, id_dtype):
    n, k = 33, 96
    raw, table = weights(qtype, n, k)
    ids = np.array([0, 32, 5, 5, 17, 1], dtype=id_dtype)

    got = native.get_rows(raw, qtype, n, k, ids)
    strided = native.get_rows(raw, qtype, n, k, ids[::2])
    empty = native.get_rows(raw, qtype, n, k, ids[:0])

    np.testing.assert_array_equal(got.view(np.uint32), table[ids].view(np.uint32))
    np.testing.assert_array_equal(strided.view(np.uint32), table[ids[::2]].view(np.uint32))
    assert empty.shape == (0, k)


def test_weights_may_be_any_buffer():
    """w is read as bytes whatever its dtype or type: bytes, a uint8 array, or a 2-D array."""
    n, k = 3, 64
    raw, table = weights(Q.Q4_0, n, k)
    as_bytes = bytes(raw.tobytes())
    as_int16 = raw.reshape(-1).view(np.int16)

    np.testing.assert_array_equal(native.dequantize(as_bytes, Q.Q4_0, n, k), table)
    np.testing.assert_array_equal(native.dequantize(as_int16, Q.Q4_0, n, k), table)


def test_row_bytes():
    assert native.row_bytes(Q.F32, 96) == 384
    assert native.row_bytes(Q.F16, 96) == 192
    assert native.row_bytes(Q.BF16, 96) == 192
    assert native.row_bytes(Q.Q8_0, 96) == 3 * 34
    assert native.row_bytes(Q.Q4_0, 96) == 3 * 18


# ---------------------------------------------------------------- instruction sets


def test_available_isas_match_this_cpu():
    assert ISAS[0] == "scalar"
    assert ISAS == [name for name in native.KNOWN_ISAS if name in ISAS]  # lowest first
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("the expected set is only known for x86-64 Linux")
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    expected = ["scalar"]
    if {"avx2", "fma", "f16c"} <= set(flags):
        expected.append("avx2")
        if "avx_vnni" in flags:
            expected.append("avxvnni")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= set(flags):
            expected.append("avx512")
            # and where Linux lets the process use the tile data (dispatch asks it the same way)
            if {"amx_tile", "amx_int8"} <= set(flags) and amx_permitted():
                expected.append("amx")
    assert ISAS == expected


def amx_permitted() -> bool:
    """arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 (x86-64 Linux's syscall 158)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0


def test_use_isa_switches_and_restores():
    before = native.isa()
    for name in ISAS:
        with native.use_isa(name):
            assert native.isa() == name
        assert native.isa() == before
    with pytest.raises(RuntimeError), native.use_isa("scalar"):
        raise RuntimeError("inside")
    assert native.isa() == before


def test_use_isa_rejects_unknown_names():
    before = native.isa()
    with pytest.raises(LfmEdgeError, match="not an instruction set"):
        with native.use_isa("sse9"):
            pass
    assert native.isa() == before


def test_set_isa_rejects_unknown_names():
    from lfm_edge import _C

    with pytest.raises(ValueError, match="'sse9' is not available"):
        _C.set_isa("sse9")


def run_python(code: str, isa_env: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != native.ISA_ENV_VAR}
    if isa_env is not None:
        env[native.ISA_ENV_VAR] = isa_env
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_best_isa_is_active_by_default():
    result = run_python("from lfm_edge import native; print(native.isa())", None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ISAS[-1]


@pytest.mark.parametrize("name", ISAS)
def test_isa_env_var_selects_isa(name):
    result = run_python("from lfm_edge import native; print(native.isa())", name.upper())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name


def test_isa_env_var_rejects_unknown_value():
    result = run_python("import lfm_edge.native", "sse9")
    assert result.returncode != 0
    assert "LfmEdgeError: LFM_EDGE_ISA='sse9' is not an instruction set" in result.stderr


def test_missing_extension_raises_lfm_edge_error():
    code = "import sys; sys.modules['lfm_edge._C'] = None; import lfm_edge.native"
    result = run_python(code, None)
    assert result.returncode != 0
    assert "LfmEdgeError" in result.stderr and "pip install ." in result.stderr


# ---------------------------------------------------------------- validation errors


def q4_0_weights(n: int = 3, k: int = 64) -> np.ndarray:
    return weights(Q.Q4_0, n, k)[0]


def test_wrong_byte_count_raises():
    raw = q4_0_weights().reshape(-1)  # 3 rows of 36 bytes
    x = activations(1, 64)
    message = "w holds 107 bytes, but 3 rows of Q4_0 with k = 64 take 108 bytes"
    with pytest.raises(ValueError, match=message):
        native.matmul(x, raw[:-1], Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="w holds 108 bytes, but 4 rows"):
        native.dequantize(raw, Q.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="w holds 108 bytes, but 3 rows of Q8_0"):
        native.get_rows(raw, Q.Q8_0, 3, 64, np.array([0]))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_k_not_multiple_of_32_raises(qtype):
    with pytest.raises(ValueError, match=f"k = 48 is not a multiple of 32, which {qtype.name}"):
        native.dequantize(np.zeros(1000, np.uint8), qtype, 1, 48)
    with pytest.raises(ValueError, match="k = 48 is not a multiple of 32"):
        native.matmul(activations(1, 48), np.zeros(1000, np.uint8), qtype, 1, 48)


def test_non_positive_sizes_raise():
    raw = q4_0_weights()
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        native.dequantize(raw, Q.Q4_0, 0, 64)
    with pytest.raises(ValueError, match="k must be positive, got -32"):
        native.dequantize(raw, Q.Q4_0, 3, -32)
    with pytest.raises(ValueError, match="n \\* row_bytes is too large"):
        native.dequantize(raw, Q.Q4_0, 2**62, 64)


@pytest.mark.parametrize("qtype_id", [9, 16, 19, 22, 99, -1])  # Q8_1, IQ2_XXS, IQ1_S, IQ2_S: not weight types here
def test_bad_qtype_raises(qtype_id):
    with pytest.raises(ValueError, match=f"qtype {qtype_id} is not supported"):
        native.matmul(activations(1, 64), q4_0_weights(), qtype_id, 3, 64)
    with pytest.raises(ValueError, match=f"qtype {qtype_id} is not supported"):
        native.row_bytes(qtype_id, 64)


def test_bad_activations_raise():
    raw = q4_0_weights()
    x = activations(4, 128)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        native.matmul(x[:, ::2], raw, Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        native.matmul(np.asfortranarray(x[:, :64]), raw, Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="x must be float32, got float64"):
        native.matmul(x[:, :64].astype(np.float64), raw, Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="x must be float32, got >f4"):
        native.matmul(x[:, :64].astype(">f4"), raw, Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="x must be 2-D \\[T, k\\], got 1-D"):
        native.matmul(x[0, :64].copy(), raw, Q.Q4_0, 3, 64)
    with pytest.raises(ValueError, match="x has 128 columns but k = 64"):
        native.matmul(x, raw, Q.Q4_0, 3, 64)


def test_non_contiguous_weights_raise():
    raw = np.repeat(q4_0_weights().reshape(-1), 2)[::2]  # right size, stride 2
    with pytest.raises(ValueError, match="w must be a C-contiguous buffer"):
        native.dequantize(raw, Q.Q4_0, 3, 64)


@pytest.mark.parametrize("bad_id, position", [(33, 1), (-1, 2), (2**40, 1)])
def test_out_of_range_id_raises(bad_id, position):
    raw = weights(Q.F32, 33, 32)[0]
    ids = np.array([0, 1, 2], dtype=np.int64)
    ids[position] = bad_id
    with pytest.raises(ValueError, match=rf"ids\[{position}\] = {bad_id} is out of range"):
        native.get_rows(raw, Q.F32, 33, 32, ids)


def test_bad_ids_raise():
    raw = weights(Q.F32, 33, 32)[0]
    with pytest.raises(ValueError, match="ids must be int32 or int64, got float64"):
        native.get_rows(raw, Q.F32, 33, 32, np.array([1.0]))
    with pytest.raises(ValueError, match="ids must be int32 or int64, got uint32"):
        native.get_rows(raw, Q.F32, 33, 32, np.array([1], dtype=np.uint32))
    with pytest.raises(ValueError, match="ids must be 1-D, got 2-D"):
        native.get_rows(raw, Q.F32, 33, 32, np.array([[1, 2]], dtype=np.int64))


def test_kernel_time_counts_the_time_inside_kernels():
    """bench's Python-overhead figure is wall time minus this: it must grow by about the time a
    kernel call takes, and not while Python alone runs."""
    x = np.ones((64, 4096), np.float32)
    w = np.ones(4096, np.float32)
    before = native.kernel_time_ns()
    sum(range(200_000))  # Python only
    assert native.kernel_time_ns() == before
    t0 = time.perf_counter_ns()
    for _ in range(20):
        native.rms_norm(x, w, 1e-5)
    wall = time.perf_counter_ns() - t0
    inside = native.kernel_time_ns() - before
    assert 0 < inside <= wall


@pytest.mark.parametrize("n", [1, 7, 16, 17, 100, 1792])
def test_silu_mul(isa, n):
    rng = np.random.default_rng(n)
    h = (rng.standard_normal(n) * 8).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    got = native.silu_mul(h, u)
    exact = h.astype(np.float64) / (1.0 + np.exp(-h.astype(np.float64))) * u
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-37)
    # an element's bits do not depend on where it falls: alone, in a vector or in the tail
    for i in {0, n // 2, n - 1}:
        assert native.silu_mul(h[i : i + 1], u[i : i + 1]).view(np.uint32)[0] == got.view(np.uint32)[i]


def test_silu_mul_limits(isa):
    h = np.array([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 86.0, -86.0, 88.0, -88.0, 1e30, -1e30,
                  np.inf, -np.inf, np.nan], np.float32)
    got = native.silu_mul(h, np.ones_like(h))
    finite = np.isfinite(h)
    hd = h[finite].astype(np.float64)
    with np.errstate(over="ignore"):
        exact = hd / (1.0 + np.exp(-hd))
    # below -87 silu is flushed to -0 (it is smaller than 88 e^-87 = 1.6e-36 there)
    np.testing.assert_allclose(got[finite], exact, rtol=2e-6, atol=2e-36)
    assert got[h == np.inf][0] == np.inf
    assert np.isnan(got[np.isnan(h) | (h == -np.inf)]).all()
    assert np.signbit(got[h == -1e30])[0]  # -0, as v / (1 + e^-v) gives


def test_silu_mul_checks_its_arguments():
    with pytest.raises(ValueError, match="u"):
        native.silu_mul(np.zeros(4, np.float32), np.zeros(5, np.float32))
