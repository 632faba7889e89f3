"""The roofline probes (csrc/probe*.cpp, lfm_edge/probes.py) for every instruction set this CPU
and build can run: their loops compute what they claim (so a probe cannot report work it skipped),
bad arguments are refused, and the per-token counts follow the model's tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lfm_edge import native, probes

ISAS = native.available_isas()
C = native._C


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("streams", [1, 2, 4, 8])
@pytest.mark.parametrize("lines_per_stream", [1, 3, 17])
def test_read_sum_is_the_sum_of_every_word(isa, streams, lines_per_stream):
    rng = np.random.default_rng(streams * 100 + lines_per_stream)
    n = 64 * streams * lines_per_stream
    raw = rng.integers(0, 256, n + 1, dtype=np.uint8)
    data = raw[1:]  # unaligned
    expected = int(np.frombuffer(data.tobytes(), dtype="<u8").sum(dtype=np.uint64))
    with native.use_isa(isa):
        assert C.probe_read_sum(data, streams) == expected


def dot4(a4: int, b4: int) -> int:
    a = [(a4 >> (8 * j)) & 0xFF for j in range(4)]
    b = [((b4 >> (8 * j)) & 0xFF) - 256 * (((b4 >> (8 * j)) & 0xFF) >= 128) for j in range(4)]
    return sum(x * y for x, y in zip(a, b))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("iterations", [0, 1, 7, 100])
def test_int8_mac_does_the_macs_it_counts(isa, iterations):
    rng = np.random.default_rng(iterations)
    with native.use_isa(isa):
        info = C.probe_int8_info()
        # the amx table's prefill yardstick stays AVX-512's vpdpbusd peak (csrc/probe.cpp)
        assert info["isa"] == ("avx512" if isa == "amx" else isa)
        for _ in range(5):
            # weights within vpmaddubsw's int16 pair range, as the kernels' 4-bit weights are
            a4 = int.from_bytes(rng.integers(0, 64, 4, dtype=np.uint8).tobytes(), "little")
            b4 = int.from_bytes(rng.integers(-128, 128, 4, dtype=np.int8).tobytes(), "little")
            expected = iterations * info["macs_per_iteration"] // 4 * dot4(a4, b4)
            assert C.probe_int8_mac(a4, b4, iterations) == expected


@pytest.mark.parametrize("isa", ISAS)
def test_measurements_are_rates(isa):
    with native.use_isa(isa):
        bw = C.measure_read_bandwidth(4 << 20, 2, 4, 3, True)
        peak = C.measure_int8_peak(2, 1000, 3)
    assert len(bw) == 3 and all(math.isfinite(x) and x > 0 for x in bw)
    assert len(peak) == 3 and all(math.isfinite(x) and x > 0 for x in peak)


@pytest.mark.parametrize("call, message", [
    (lambda: C.probe_read_sum(np.zeros(192, np.uint8), 3), "streams must be 1, 2, 4 or 8"),
    (lambda: C.probe_read_sum(np.zeros(100, np.uint8), 1), "multiple of 64"),
    (lambda: C.probe_read_sum(np.zeros((2, 64), np.uint8), 1), "1-D"),
    (lambda: C.measure_read_bandwidth(1 << 20, 0, 1, 1), "threads must be"),
    (lambda: C.measure_read_bandwidth(0, 1, 1, 1), "bytes must be positive"),
    (lambda: C.measure_int8_peak(1, 0, 1), "iterations must be positive"),
    (lambda: C.measure_int8_peak(1, 10, 0), "repeats must be"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_per_token_counts_active_weights():
    # (name, elements, bytes, rows): a 2-layer MoE with 8 experts, top 2, tied head
    tensors = [
        ("token_embd.weight", 1000 * 64, 36_000, 1000),
        ("blk.0.attn_q.weight", 64 * 64, 2304, 64),
        ("blk.0.attn_norm.weight", 64, 256, 1),
        ("blk.1.ffn_gate_exps.weight", 8 * 32 * 64, 9216, 8 * 32),
        ("blk.1.ffn_gate_inp.weight", 8 * 64, 2048, 8),
        ("blk.1.shortconv.conv.weight", 64 * 3, 768, 64),
    ]
    got = probes.per_token(tensors, n_expert=8, n_expert_used=2)
    assert got["active_bytes"] == 36_000 + 2304 + 256 + 9216 / 4 + 2048 + 768
    assert got["decode_macs"] == 1000 * 64 + 64 * 64 + 8 * 32 * 64 / 4 + 8 * 64 + 64 * 3
    assert got["prefill_macs"] == got["decode_macs"] - 1000 * 64
    assert got["tied_head"]
    # an untied embedding is a lookup of one row; the head is the separate output matrix
    untied = probes.per_token(tensors + [("output.weight", 1000 * 64, 36_000, 1000)], n_expert=8, n_expert_used=2)
    assert untied["active_bytes"] == got["active_bytes"] + 36
    assert untied["decode_macs"] == got["decode_macs"]
    assert untied["prefill_macs"] == got["prefill_macs"]
