"""What this CPU can do at most, and what a model asks of it per token: the two rooflines.

Decode reads every weight a token uses once, so tokens/s <= read bandwidth / bytes read per token.
Prefill multiplies each weight a token uses once (int8 activations times the weights' integers),
so tokens/s <= int8 multiply-accumulate rate / MACs per token. The probes run the instructions of
the active kernel table (csrc/probe*.cpp; ``LFM_EDGE_ISA`` or ``native.use_isa`` picks a lower
one) and report the best pass, as a roofline is what the machine can give, not what it gave on
average while other processes ran:

- ``read_bandwidth(threads)``: each thread sums its contiguous slice of a 1 GiB buffer (written
  by that thread first, transparent huge pages asked for), with the widest loads, in 1, 2, 4 and
  8 independent streams at once; one stream per core leaves cache-line misses unused.
- ``int8_peak(threads)``: independent chains of the kernels' int8 dot product on registers
  (AVX2: vpmaddubsw + vpmaddwd + vpaddd; AVX-VNNI: vpdpbusd on ymm; AVX-512 VNNI: vpdpbusd),
  no memory traffic.

``per_token`` counts a model's active weights from its tensor list: bytes for decode, MACs for
prefill and decode (attention over the context is left out: a few MMAC per token at 4k).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from lfm_edge import native

READ_STREAMS = (1, 2, 4, 8)


def read_bandwidth(threads: int, size_mb: int = 1024, repeats: int = 5, streams: Iterable[int] = READ_STREAMS,
                   huge_pages: bool = True) -> dict:
    """Read bandwidth with `threads` threads: the best GB/s over every pass of every stream count,
    and each stream count's passes (GB/s = 1e9 bytes/s)."""
    by_streams = {s: native._C.measure_read_bandwidth(size_mb << 20, threads, s, repeats, huge_pages) for s in streams}
    best = max(by_streams, key=lambda s: max(by_streams[s]))
    runs = by_streams[best]
    return {"threads": threads, "gbps": max(runs), "gbps_min": min(runs), "gbps_max": max(runs), "runs": runs,
            "streams": best, "by_streams": {s: max(r) for s, r in by_streams.items()}, "buffer_mb": size_mb,
            "huge_pages": huge_pages, "isa": native.isa(),
            "method": f"lfm-edge probe ({native.isa()} loads, best of {len(by_streams) * repeats} passes)"}


def int8_peak(threads: int, repeats: int = 5, seconds: float = 0.1) -> dict:
    """The int8 multiply-accumulate rate with `threads` threads: the best GMAC/s of `repeats` runs
    of about `seconds` each (GMAC = 1e9 multiply-accumulates)."""
    info = native._C.probe_int8_info()
    start = time.perf_counter()
    native._C.probe_int8_mac(0x0F0E0D0C, 0x7F80017F, 100_000)
    rate = 100_000 / max(time.perf_counter() - start, 1e-6)  # iterations per second, roughly
    iterations = max(1000, int(rate * seconds))
    runs = native._C.measure_int8_peak(threads, iterations, repeats)
    return {"threads": threads, "gmacs": max(runs), "gmacs_min": min(runs), "runs": runs, "isa": info["isa"],
            "instructions": info["instructions"]}


# -- what a token asks for ----------------------------------------------------------------------


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


def per_token(tensors: Iterable[tuple[str, int, int, int]], n_expert: int, n_expert_used: int) -> dict:
    """What one token reads and multiplies, from (name, elements, bytes, rows) of every tensor
    (rows: the product of every dimension but the row length; 1 for a vector).

    Bytes (a decode step): every non-expert tensor, n_expert_used / n_expert of each stacked expert
    tensor, the output head (the embedding matrix when the head is tied); an untied embedding is
    one row. MACs: one per active weight of every matrix (rows > 1) but the embedding lookup;
    `prefill_macs` leaves the output head out, since a prompt's logits are taken at its last
    token only.
    """
    tensors = list(tensors)
    names = {t[0] for t in tensors}
    tied = "output.weight" not in names
    by_group: dict[str, float] = {}
    macs = head_macs = 0.0
    for name, elements, nbytes, rows in tensors:
        group = tensor_group(name)
        share = n_expert_used / n_expert if group == "experts" and n_expert else 1.0
        if name == "token_embd.weight" and not tied:
            nbytes, share_macs = nbytes / rows, 0.0  # a lookup of one row
        else:
            share_macs = share if rows > 1 else 0.0
        by_group[group] = by_group.get(group, 0.0) + nbytes * share
        macs += elements * share_macs
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            head_macs = elements
    return {"active_bytes": sum(by_group.values()), "by_group": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
            "decode_macs": macs, "prefill_macs": macs - head_macs, "weight_bytes": sum(t[2] for t in tensors),
            "n_expert": n_expert, "n_expert_used": n_expert_used, "tied_head": tied}


def model_per_token(llm) -> dict:
    """per_token for a loaded model (lfm_edge.load), from its file's tensor table."""
    tensors = [(t.name, math.prod(t.shape), t.nbytes, t.n_rows) for t in llm.file.tensors.values()]
    return per_token(tensors, getattr(llm.args, "n_expert", 0), getattr(llm.args, "n_expert_used", 0))
