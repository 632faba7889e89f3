"""Memory read bandwidth, and the decode roofline it sets for a model file.

    python bench/bandwidth.py                          # GB/s with 1 and 2 threads
    python bench/bandwidth.py --model m.gguf -t 1 2    # ... and the roofline in tokens/s

Decode reads every weight a token uses once, so tokens/s <= bandwidth / active bytes per token.
Active bytes are computed from the file: every non-expert tensor, top_k/n_expert of each stacked
expert tensor, and the output head (the embedding matrix when the head is tied; an untied input
embedding costs one row per token).

The probe is a small C program compiled at run time (gcc -O3 -march=native -fopenmp, cached in
~/.cache/lfm-edge/bandwidth) that sums a buffer several times larger than the caches; the median
of the repeats is reported. Without gcc it falls back to numpy summing slices in threads, which
is slower than the memory and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("LFM_EDGE_CACHE_ROOT", Path.home() / ".cache" / "lfm-edge")) / "bandwidth"

PROBE_C = r"""
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* usage: probe BYTES REPEATS THREADS; prints one GB/s figure per repeat */
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    size_t n = (size_t)atoll(argv[1]) / sizeof(uint64_t);
    int repeats = atoi(argv[2]);
    omp_set_num_threads(atoi(argv[3]));
    uint64_t *a = aligned_alloc(64, n * sizeof(uint64_t));
    if (!a) return 1;
    /* first touch by the threads that will read, so pages sit near them */
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;
    uint64_t sink = 0;
    for (int r = 0; r < repeats; r++) {
        uint64_t s = 0;
        double t0 = omp_get_wtime();
        #pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double t1 = omp_get_wtime();
        sink += s;
        printf("%.3f\n", (double)(n * sizeof(uint64_t)) / (t1 - t0) / 1e9);
    }
    fprintf(stderr, "checksum %llu\n", (unsigned long long)sink);
    free(a);
    return 0;
}
"""


def probe_binary() -> Path | None:
    """The compiled probe, built once per source text; None without a C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    tag = hashlib.sha256(PROBE_C.encode()).hexdigest()[:12]
    binary = CACHE / f"probe-{tag}"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(PROBE_C)
        out = Path(tmp) / "probe"
        build = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", str(src), "-o", str(out)],
                               check=False, capture_output=True, text=True)
        if build.returncode != 0:
            print(f"bandwidth.py: could not compile the C probe ({build.stderr.strip()[:200]}); using numpy",
                  file=sys.stderr)
            return None
        shutil.move(str(out), binary)
    return binary


def numpy_bandwidth(size_bytes: int, repeats: int, threads: int) -> list[float]:
    """Sum float64 slices in `threads` Python threads (numpy releases the GIL in reductions)."""
    a = np.ones(size_bytes // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    out = []
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out.append(a.nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def measure(threads: int, size_mb: int = 2048, repeats: int = 7) -> dict:
    """Read bandwidth with `threads` threads: median GB/s, the runs, and how it was measured."""
    size = size_mb * 2**20
    binary = probe_binary()
    if binary is not None:
        env = {**os.environ, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
        run = subprocess.run([str(binary), str(size), str(repeats + 1), str(threads)],
                             capture_output=True, text=True, env=env, check=True)
        runs = [float(x) for x in run.stdout.split()][1:]  # the first pass warms the TLB and caches
        method = "C probe (gcc -O3 -march=native -fopenmp)"
    else:
        runs = numpy_bandwidth(size, repeats + 1, threads)[1:]
        method = "numpy threads (a lower bound)"
    return {"threads": threads, "gbps": statistics.median(runs), "gbps_min": min(runs),
            "gbps_max": max(runs), "runs": runs, "buffer_mb": size_mb, "method": method}


# -- what a decode step reads -------------------------------------------------------------


def tensor_group(name: str) -> str:
    if "_exps." in name:
        return "experts"
    if ".shortconv." in name:
        return "conv"
    if ".attn_" in name and not name.endswith("attn_norm.weight"):
        return "attention"
    if ".ffn_gate_inp." in name or ".exp_probs_b." in name:
        return "router"
    if any(f".ffn_{w}." in name for w in ("gate", "up", "down")):
        return "dense ffn"
    if name in ("output.weight", "token_embd.weight"):
        return "head/embedding"
    return "norms"


def active_bytes(path: str | os.PathLike[str]) -> dict:
    """Bytes of weights one decoded token reads, by group, from the file's tensors and metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")

    def meta(key: str, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = meta("general.architecture")
    n_expert = int(meta(f"{arch}.expert_count", 0) or 0)
    n_used = int(meta(f"{arch}.expert_used_count", 0) or 0)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    rows = {t.name: int(t.shape[-1]) if len(t.shape) > 1 else 1 for t in reader.tensors}  # ggml order
    tied = "output.weight" not in sizes
    groups: dict[str, float] = {}
    for name, nbytes in sizes.items():
        group = tensor_group(name)
        if group == "experts":
            nbytes = nbytes * n_used / n_expert
        elif name == "token_embd.weight" and not tied:
            nbytes = nbytes / rows[name]  # a lookup of one row
        groups[group] = groups.get(group, 0) + nbytes
    return {
        "file_bytes": os.path.getsize(path),
        "weight_bytes": sum(sizes.values()),
        "active_bytes": sum(groups.values()),
        "by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "n_expert": n_expert,
        "n_expert_used": n_used,
        "tied_head": tied,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file: also print its active bytes per token and the roofline")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size-mb", type=int, default=2048, help="buffer size (default 2048 MiB)")
    p.add_argument("-r", "--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    bw = [measure(t, args.size_mb, args.repeats) for t in args.threads]
    act = active_bytes(args.model) if args.model else None
    if args.json:
        print(json.dumps({"bandwidth": bw, "model": act}))
        return 0
    for b in bw:
        print(f"read bandwidth, {b['threads']} thread(s): {b['gbps']:.1f} GB/s "
              f"(min {b['gbps_min']:.1f}, max {b['gbps_max']:.1f}; {b['method']}, {b['buffer_mb']} MiB)")
    if act:
        print(f"{args.model}: {act['file_bytes'] / 1e9:.2f} GB file; a decoded token reads "
              f"{act['active_bytes'] / 1e9:.3f} GB (top {act['n_expert_used']} of {act['n_expert']} experts)")
        for group, nbytes in act["by_group"].items():
            print(f"  {group:15s} {nbytes / 1e9:7.3f} GB")
        for b in bw:
            print(f"decode roofline, {b['threads']} thread(s): {b['gbps'] * 1e9 / act['active_bytes']:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
