"""Fixtures of the kernel micro-benchmarks (bench/test_kernels_bench.py): the rooflines they are
measured against, and the thread count.

    pytest bench/ --benchmark-only [--kernel-threads 1] [--benchmark-autosave]

The probes (lfm_edge.probes) run once per session: read bandwidth with the best instruction set,
the int8 peak with each one a benchmark uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_synthetic, for random weight blocks

from lfm_edge import native, probes  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--kernel-threads", type=int, default=None,
                     help="threads of lfm-edge's kernels and of the probes (default: every core)")


@pytest.fixture(scope="session")
def threads(request) -> int:
    n = request.config.getoption("--kernel-threads")
    if n is not None:
        if n < 1:
            raise pytest.UsageError("--kernel-threads must be at least 1")
        native.set_threads(n)
    return native.threads()


class Rooflines:
    """The probes' results on `threads` threads, measured on first use."""

    def __init__(self, threads: int):
        self.threads = threads
        self._gbps: float | None = None
        self._gmacs: dict[str, float] = {}

    def read_gbps(self) -> float:
        if self._gbps is None:
            self._gbps = probes.read_bandwidth(self.threads, repeats=3)["gbps"]
        return self._gbps

    def int8_gmacs(self, isa: str) -> float:
        if isa not in self._gmacs:
            with native.use_isa(isa):
                self._gmacs[isa] = probes.int8_peak(self.threads)["gmacs"]
        return self._gmacs[isa]


@pytest.fixture(scope="session")
def rooflines(threads) -> Rooflines:
    return Rooflines(threads)


RATES = pytest.StashKey[list]()


@pytest.fixture
def record(request, threads):
    """record(benchmark, isa, rate, unit, roofline, **shape): the rate ("gbps" or "gmacs") and its
    share of the roofline into benchmark.extra_info, and into the summary printed at the end."""

    def put(benchmark, isa: str, rate: float, unit: str, roofline: float | None, **shape) -> None:
        benchmark.extra_info.update(isa=isa, threads=threads, **shape)
        benchmark.extra_info[unit] = round(rate, 3)
        share = None if roofline is None else rate / roofline
        if share is not None:
            benchmark.extra_info["roofline_share"] = round(share, 4)
        request.config.stash.setdefault(RATES, []).append((request.node.name, rate, unit, roofline, share))

    return put


def pytest_terminal_summary(terminalreporter, config):
    rates = config.stash.get(RATES, [])
    if not rates:
        return
    terminalreporter.section("rates against the probes (extra_info)")
    for name, rate, unit, roofline, share in rates:
        label = "GB/s" if unit == "gbps" else "GMAC/s"
        against = "" if share is None else f"  = {100 * share:5.1f}% of {roofline:.1f}"
        terminalreporter.write_line(f"{name:32s} {rate:9.2f} {label}{against}")
