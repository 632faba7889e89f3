"""The thread pool: its default size, and what it does when its helpers are not getting a core."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lfm_edge.llm import usable_cores


def test_default_threads_count_physical_cores():
    logical = len(os.sched_getaffinity(0))
    cores = usable_cores()
    assert 1 <= cores <= logical
    siblings = {
        open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read().strip()
        for c in os.sched_getaffinity(0)
    }
    assert cores == len(siblings)


# The pool pinned to one CPU next to a busy process: its helper is off the core most of the
# time, the case the stall tracking in threadpool.cpp is for. Whichever way the jobs run
# (helper, solo), every result equals the one-thread result bit for bit.
CONTENDED = textwrap.dedent(
    """
    import os, time
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    busy = os.fork()
    if busy == 0:
        while True:
            pass
    try:
        import numpy as np
        from gguf import GGMLQuantizationType as Q
        from lfm_edge import native

        rng = np.random.default_rng(0)
        n, k = 512, 2048
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        native.set_threads(1)
        want = native.matmul(x, w.view(np.uint8), Q.F32, n, k)
        native.set_threads(2)
        for i in range(300):
            got = native.matmul(x, w.view(np.uint8), Q.F32, n, k)
            assert np.array_equal(got, want), i
            time.sleep(0.0002)  # Python work between two kernels of a step
        s = native.pool_stats()
        print(s["stalls"], s["solo_jobs"])
    finally:
        os.kill(busy, 9)
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_pool_is_exact_when_its_helper_gets_no_core():
    out = subprocess.run([sys.executable, "-c", CONTENDED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stalls, solo_jobs = map(int, out.stdout.split())
    assert 0 <= stalls and 0 <= solo_jobs <= 300
