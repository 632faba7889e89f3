"""Kernel micro-benchmarks with pytest-benchmark, at LFM2-8B-A1B's shapes, for every kernel x weight
type x instruction set this CPU runs. Run on demand, never by the test suite (`pytest -q tests`
does not collect bench/):

    pytest bench/ --benchmark-only --benchmark-autosave            # saves .benchmarks/.../NNNN_*.json
    pytest bench/ --benchmark-only --benchmark-compare             # against the last saved run
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=mean:10%
    pytest bench/ --benchmark-only -k "gemv and avx2" --kernel-threads 1

Each benchmark puts its rate in `extra_info` (in the saved JSON, and in --benchmark-json): `gbps`
(bytes the kernel must read from memory per second) for the bandwidth-bound ones, `gmacs` for the
compute-bound ones, and `roofline_share`: that rate over the probe's (lfm_edge.probes: read
bandwidth, or the int8 peak of the same instruction set) on the same threads.

- gemv: decode's matrix-vector product (native.linear, one token) over a stack of [7168, 2048]
  matrices (the dense FFN's) of DRAM_BYTES (4x the largest cache the CPU reports, at least
  160 MB), a different one each call, so weights come from DRAM as in a decode step.
- linear_few_tokens: 2 to 12 tokens (several sequences decoding together, a short prompt's
  experts) through one expert's [1792, 2048] Q4_0 matrix, a different one each call from a stack of
  DRAM_BYTES, in GB/s of weights read: the AVX-512 kernels read two row groups side by side up to 4
  tokens, and the AMX table takes a tile from 8.
- linear_prompt: a prompt's dense matmul (native.linear, 512 tokens) through one [7168, 2048]
  matrix (the dense FFN's), in GMAC/s: on AMX, whole tiles of 16 tokens laid out once a matmul.
- moe_gemm: prefill's expert-grouped GEMM (native.moe): 512 tokens, 32 experts [1792, 2048], top 4
  (about 64 tokens an expert), gate + up + down.
- attention: decode (1 token over 32,768 positions of float16 KV: 8 KV heads x 64, 67 MB, a
  different copy each call out of DRAM_BYTES of them, so from DRAM) in GB/s of KV read, and
  prefill (512 and 4096 tokens, causal, one call as a prompt's first chunk) in GMAC/s of QK^T
  and PV.
- quantize_activations: a prompt's activations (512 tokens x the hidden 2048 or the experts' 1792,
  whose 56 blocks of 32 leave 8 over the AVX-512 kernel's 16 at a time) quantized to int8 blocks,
  in GB/s of floats read: from L2/L3, so no probe applies.
- short_conv: the gated short conv of a conv layer (2048 wide, width 3), for 1 and 512 tokens, in
  GB/s of activations read and written; it has one implementation for every instruction set.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import make_synthetic
from lfm_edge import native

ISAS = native.available_isas()
QTYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.IQ4_XS]
HIDDEN, FFN, EXPERT_FFN, N_EXPERT, TOP_K = 2048, 7168, 1792, 32, 4
N_HEAD, N_KV, HEAD_DIM = 32, 8, 64


def largest_cache_bytes() -> int:
    """The largest CPU cache Linux reports for cpu0 (sysfs), 0 where it reports none. A VM may
    report its host's whole L3, shared with other tenants: 480 MB on the project's AMX VM."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


# Weights or KV caches read once per pass of at least this many bytes come from DRAM, as in a
# decode step: 4x the largest cache, at least 160 MB. On the AMX VM (480 MB reported) a 160 MB
# GEMV stack read at 39-44 GB/s on 2 threads against a read probe of 34: partly from the cache.
# Stacks of 0.5, 1 and 2 GB read 31.0, 29.7 and 30.2.
DRAM_BYTES = max(160 << 20, 4 * largest_cache_bytes())


def weight_stack(qtype: Q, n_mats: int, n: int, k: int):
    """n_mats random [n, k] matrices of qtype (make_synthetic's blocks: real-looking scales), packed."""
    spec = make_synthetic.Spec("bench", (n_mats, n, k), qtype, "matrix")
    raw = make_synthetic.random_blocks(np.random.default_rng([int(qtype), n, k]), spec)
    return native.PackedMatrix(raw, int(qtype), n, k, n_mats)


@lru_cache(maxsize=1)
def dram_stack(qtype: Q, n: int, k: int):
    """DRAM_BYTES of random [n, k] matrices of qtype, packed: each read from DRAM when cycled through."""
    one = native.row_bytes(int(qtype), k) * n
    return weight_stack(qtype, -(-DRAM_BYTES // one), n, k)


@lru_cache(maxsize=1)
def expert_stacks(qtype: Q):
    return (weight_stack(qtype, N_EXPERT, EXPERT_FFN, HIDDEN), weight_stack(qtype, N_EXPERT, EXPERT_FFN, HIDDEN),
            weight_stack(qtype, N_EXPERT, HIDDEN, EXPERT_FFN))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("isa", ISAS)
def test_gemv(benchmark, rooflines, record, isa, qtype):
    w = dram_stack(qtype, FFN, HIDDEN)
    x = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    index = itertools.cycle(range(w.n_mats))
    with native.use_isa(isa):
        benchmark(lambda: native.linear(x, w, next(index)))
    gbps = w.nbytes / w.n_mats / benchmark.stats.stats.mean * 1e-9
    record(benchmark, isa, gbps, "gbps", rooflines.read_gbps(), n=FFN, k=HIDDEN, n_mats=w.n_mats)


@pytest.mark.parametrize("tokens", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("isa", ISAS)
def test_linear_few_tokens(benchmark, rooflines, record, isa, tokens):
    w = dram_stack(Q.Q4_0, EXPERT_FFN, HIDDEN)
    x = np.random.default_rng(6).standard_normal((tokens, HIDDEN)).astype(np.float32)
    index = itertools.cycle(range(w.n_mats))
    with native.use_isa(isa):
        benchmark(lambda: native.linear(x, w, next(index)))
    gbps = w.nbytes / w.n_mats / benchmark.stats.stats.mean * 1e-9
    record(benchmark, isa, gbps, "gbps", rooflines.read_gbps(), tokens=tokens, n=EXPERT_FFN, k=HIDDEN, n_mats=w.n_mats)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_prompt(benchmark, rooflines, record, isa, qtype):
    w = weight_stack(qtype, 1, FFN, HIDDEN)
    tokens = 512
    x = np.random.default_rng(7).standard_normal((tokens, HIDDEN)).astype(np.float32)
    with native.use_isa(isa):
        # scalar takes seconds a call: fewer rounds
        benchmark.pedantic(native.linear, args=(x, w), rounds=1 if isa == "scalar" else 5,
                           warmup_rounds=0 if isa == "scalar" else 1)
    gmacs = tokens * FFN * HIDDEN / benchmark.stats.stats.mean * 1e-9
    record(benchmark, isa, gmacs, "gmacs", rooflines.int8_gmacs(isa), tokens=tokens, n=FFN, k=HIDDEN)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("isa", ISAS)
def test_moe_gemm(benchmark, rooflines, record, isa, qtype):
    gate, up, down = expert_stacks(qtype)
    rng = np.random.default_rng(1)
    tokens = 512
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    experts = np.stack([rng.choice(N_EXPERT, TOP_K, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, TOP_K)).astype(np.float32)
    with native.use_isa(isa):
        # scalar takes seconds a call: fewer rounds
        benchmark.pedantic(native.moe, args=(x, experts, weights, gate, up, down),
                           rounds=1 if isa == "scalar" else 5, warmup_rounds=0 if isa == "scalar" else 1)
    gmacs = tokens * TOP_K * 3 * EXPERT_FFN * HIDDEN / benchmark.stats.stats.mean * 1e-9
    record(benchmark, isa, gmacs, "gmacs", rooflines.int8_gmacs(isa), tokens=tokens, experts=N_EXPERT, top_k=TOP_K)


@pytest.mark.parametrize("isa", ISAS)
def test_attention_decode(benchmark, rooflines, record, isa):
    ctx = 32768
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, N_HEAD, HEAD_DIM)).astype(np.float32)
    kv = rng.standard_normal((2, N_KV, ctx, HEAD_DIM)).astype(np.float16)  # one cache's keys and values
    # copies of it, a different one each call, so that they come from DRAM (DRAM_BYTES)
    stack = np.empty((-(-DRAM_BYTES // kv.nbytes),) + kv.shape, np.float16)
    stack[:] = kv
    index = itertools.cycle(range(len(stack)))

    def attend():
        i = next(index)
        return native.attention(q, stack[i, 0], stack[i, 1], ctx - 1)

    with native.use_isa(isa):
        benchmark(attend)
    gbps = kv.nbytes / benchmark.stats.stats.mean * 1e-9
    record(benchmark, isa, gbps, "gbps", rooflines.read_gbps(), ctx=ctx, kv="f16", caches=len(stack))


@pytest.mark.parametrize("tokens", [512, 4096])
@pytest.mark.parametrize("isa", ISAS)
def test_attention_prefill(benchmark, record, isa, tokens):
    if isa == "scalar" and tokens > 512:
        pytest.skip("the scalar twin takes minutes at 4096 tokens")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((tokens, N_HEAD, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((N_KV, tokens, HEAD_DIM)).astype(np.float16)
    v = rng.standard_normal((N_KV, tokens, HEAD_DIM)).astype(np.float16)
    with native.use_isa(isa):
        benchmark.pedantic(native.attention, args=(q, k, v, 0), rounds=1 if isa == "scalar" else 5, warmup_rounds=1)
    # QK^T and PV over the causal triangle, float32 multiply-adds (no int8 probe applies)
    macs = 2 * N_HEAD * HEAD_DIM * tokens * (tokens + 1) // 2
    record(benchmark, isa, macs / benchmark.stats.stats.mean * 1e-9, "gmacs", None, tokens=tokens, kv="f16")


@pytest.mark.parametrize("tokens", [1, 512])
def test_short_conv(benchmark, rooflines, record, tokens):
    rng = np.random.default_rng(4)
    bcx = rng.standard_normal((tokens, 3 * HIDDEN)).astype(np.float32)
    kernel = rng.standard_normal((HIDDEN, 3)).astype(np.float32)
    state = np.zeros((2, HIDDEN), np.float32)
    benchmark(native.gated_short_conv, bcx, state, kernel)
    gbps = (bcx.nbytes + tokens * HIDDEN * 4) / benchmark.stats.stats.mean * 1e-9
    record(benchmark, native.isa(), gbps, "gbps", rooflines.read_gbps(), tokens=tokens, hidden=HIDDEN)


@pytest.mark.parametrize("k", [HIDDEN, EXPERT_FFN])
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_activations(benchmark, record, isa, k):
    tokens = 512
    x = np.random.default_rng(5).standard_normal((tokens, k)).astype(np.float32)
    with native.use_isa(isa):
        benchmark(native.quantize_activations, x)
    record(benchmark, isa, x.nbytes / benchmark.stats.stats.mean * 1e-9, "gbps", None, tokens=tokens, k=k)
