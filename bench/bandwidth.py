"""Memory read bandwidth, and the decode roofline it sets for a model file.

    python bench/bandwidth.py                          # GB/s with 1 and 2 threads
    python bench/bandwidth.py --model m.gguf -t 1 2    # ... and the roofline in tokens/s

Decode reads every weight a token uses once, so tokens/s <= bandwidth / active bytes per token.
Active bytes are computed from the file (lfm_edge.probes.per_token): every non-expert tensor,
top_k/n_expert of each stacked expert tensor, and the output head (the embedding matrix when the
head is tied; an untied input embedding costs one row per token).

The probe is lfm-edge's own (csrc/probe*.cpp, through lfm_edge.probes.read_bandwidth): each
thread sums its contiguous slice of a buffer far larger than the caches, written by that thread
beforehand and backed by transparent huge pages, with the active kernel table's widest loads in
1, 2, 4 and 8 independent streams; the best pass is reported, the limit decode can reach. The
C/OpenMP probe it replaces read one stream per thread on 4 KiB pages and reported the median:
10.7 / 16.4 GB/s at 1 / 2 threads on the project's AMD EPYC VM, below the 20.8 GB/s decode itself
streamed at 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lfm_edge import probes


def measure(threads: int, size_mb: int = 1024, repeats: int = 5) -> dict:
    """Read bandwidth with `threads` threads: best GB/s ("gbps"), the best stream count's passes
    ("runs", "gbps_min", "gbps_max"), each stream count's best, and how it was measured."""
    return probes.read_bandwidth(threads, size_mb, repeats)


def active_bytes(path: str | os.PathLike[str]) -> dict:
    """Bytes (and MACs) of weights one token uses, by group, from the file's tensors and metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")

    def meta(key: str, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = meta("general.architecture")
    tensors = [(t.name, int(t.n_elements), int(t.n_bytes), int(t.n_elements) // int(t.shape[0]))
               for t in reader.tensors]  # shape in ggml order: the row length first
    counts = probes.per_token(tensors, int(meta(f"{arch}.expert_count", 0) or 0),
                              int(meta(f"{arch}.expert_used_count", 0) or 0))
    return {"file_bytes": os.path.getsize(path), **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file: also print its active bytes per token and the roofline")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size-mb", type=int, default=1024, help="buffer size (default 1024 MiB)")
    p.add_argument("-r", "--repeats", type=int, default=5, help="passes per stream count (default 5)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.size_mb < 1 or args.repeats < 1 or min(args.threads) < 1:
        p.error("--size-mb, --repeats and --threads must be positive")
    bw = [measure(t, args.size_mb, args.repeats) for t in args.threads]
    act = active_bytes(args.model) if args.model else None
    if args.json:
        print(json.dumps({"bandwidth": bw, "model": act}))
        return 0
    for b in bw:
        streams = ", ".join(f"{s}: {g:.1f}" for s, g in b["by_streams"].items())
        print(f"read bandwidth, {b['threads']} thread(s): {b['gbps']:.1f} GB/s with {b['streams']} streams a thread "
              f"(best of each stream count: {streams}; {b['method']}, {b['buffer_mb']} MiB)")
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
