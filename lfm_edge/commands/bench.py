"""`lfm-edge bench -m FILE`: prompt-processing and generation speed, like llama.cpp's llama-bench.

    lfm-edge bench -m model.gguf -t 2 -p 512 -n 128 -r 3 [--ctx-depth 4096] [--json]

pp: one prefill of p random prompt tokens from an empty state, in tokens/s.
tg: n single-token decode steps (after --ctx-depth tokens of context), in tokens/s.
Each is run r times after a short warm-up; the median is reported with the min and max.
Also: load time, time to first token of a p-token prompt (prefill + picking the token), peak RSS,
the kernels' instruction set, and the share of a decode step spent outside the kernels (Python
and the bindings: wall time minus the time the kernels report, over the wall time). Prompt
tokens are random non-special ids from a seeded generator, so runs are repeatable; decode feeds
random ids too (no sampling is timed, as in llama-bench).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LfmEdgeError


def configure_parser(p: argparse.ArgumentParser) -> None:
    # numbers are read as text and checked in main(), so a bad value is one LfmEdgeError line
    p.add_argument("-m", "--model", help="a .gguf file")
    p.add_argument("-t", "--threads", default=None, help="threads (default: all cores)")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt tokens for pp and TTFT; 0 skips (default 512)")
    p.add_argument("-n", "--n-gen", default="128", help="generated tokens for tg; 0 skips (default 128)")
    p.add_argument("-r", "--repetitions", default="3", help="runs of each test (default 3)")
    p.add_argument("-d", "--ctx-depth", default="0", help="tokens of context before the tg steps (default 0)")
    p.add_argument("-ctk", "--kv-cache-type", default=None,
                   help="f16 or f32 keys and values (default: f32 for a float32 model, else f16)")
    p.add_argument("--seed", default="0", help="seed of the random token ids (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def count(value: str | None, name: str, minimum: int) -> int:
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LfmEdgeError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise LfmEdgeError(f"{name} must be at least {minimum}, got {n}")
    return n


@dataclass
class Result:
    model: str
    model_bytes: int
    arch: str
    isa: str
    threads: int
    n_prompt: int
    n_gen: int
    ctx_depth: int
    repetitions: int
    load_s: float
    pp_tps: float | None = None  # median over the runs
    pp_tps_min: float | None = None
    pp_tps_max: float | None = None
    pp_runs: list[float] = field(default_factory=list)
    ttft_s: float | None = None  # median: prefill of n_prompt tokens + argmax of the logits
    tg_tps: float | None = None
    tg_tps_min: float | None = None
    tg_tps_max: float | None = None
    tg_runs: list[float] = field(default_factory=list)
    tg_overhead: float | None = None  # share of the tg time spent outside the kernels (Python, bindings)
    rss_mb: float = 0.0  # peak resident set of this process, file pages touched included
    kernel_threads: int | None = None  # what the native thread pool reports
    kv_cache_type: str = ""
    version: str = ""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_ids(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in rng.choice(allowed, size=n)]


def run(path: str, threads: int | None, n_prompt: int, n_gen: int, repetitions: int, ctx_depth: int,
        seed: int, kv_cache_type: str | None = None) -> Result:
    import lfm_edge

    from .. import native

    if not Path(path).is_file():
        raise LfmEdgeError(f"{path}: no such file")
    n_ctx = max(n_prompt, ctx_depth + n_gen, 1)
    start = time.perf_counter()
    llm = lfm_edge.load(path, n_threads=threads, n_ctx=n_ctx, kv_cache_type=kv_cache_type)
    load_s = time.perf_counter() - start
    kernel_threads = native.threads()  # load() sized the process-wide pool to llm.n_threads
    special = llm.tokenizer.special_ids
    allowed = np.array([i for i in range(llm.args.n_vocab) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(seed)
    result = Result(
        model=str(path), model_bytes=Path(path).stat().st_size, arch=llm.args.arch, isa=native.isa(),
        threads=llm.n_threads, n_prompt=n_prompt, n_gen=n_gen, ctx_depth=ctx_depth,
        repetitions=repetitions, load_s=load_s, version=lfm_edge.__version__, kernel_threads=kernel_threads,
        kv_cache_type=llm.kv_cache_type,
    )
    cache = llm.new_cache()
    # warm-up: touch the code paths and page in the weights a short prompt and a step use
    llm.prefill(random_ids(rng, allowed, min(8, n_ctx)), cache)
    if cache.pos < n_ctx:
        llm.decode_one_token(random_ids(rng, allowed, 1)[0], cache)

    if n_prompt:
        prompt = random_ids(rng, allowed, n_prompt)
        pp, ttft = [], []
        for _ in range(repetitions):
            cache.reset()
            t0 = time.perf_counter()
            logits = llm.prefill(prompt, cache)
            t1 = time.perf_counter()
            int(np.argmax(logits))  # the first token is known here
            t2 = time.perf_counter()
            pp.append(n_prompt / (t1 - t0))
            ttft.append(t2 - t0)
        result.pp_runs, result.ttft_s = pp, statistics.median(ttft)
        result.pp_tps, result.pp_tps_min, result.pp_tps_max = statistics.median(pp), min(pp), max(pp)

    if n_gen:
        cache.reset()
        if ctx_depth:
            llm.prefill(random_ids(rng, allowed, ctx_depth), cache)
        at_depth = cache.checkpoint()
        steps = random_ids(rng, allowed, n_gen)
        tg, overhead = [], []
        for _ in range(repetitions):
            cache.restore(at_depth)
            k0, t0 = native.kernel_time_ns(), time.perf_counter()
            for tok in steps:
                llm.decode_one_token(tok, cache)
            wall = time.perf_counter() - t0
            tg.append(n_gen / wall)
            overhead.append(1.0 - (native.kernel_time_ns() - k0) * 1e-9 / wall)
        result.tg_runs, result.tg_overhead = tg, statistics.median(overhead)
        result.tg_tps, result.tg_tps_min, result.tg_tps_max = statistics.median(tg), min(tg), max(tg)

    result.rss_mb = peak_rss_mb()
    return result


def table(r: Result) -> str:
    """llama-bench-like markdown: one row per test."""
    size = f"{r.model_bytes / 2**30:.2f} GiB"
    rows = [
        "| model | size | isa | threads | test | t/s (median) | min | max |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    name = Path(r.model).name
    if r.pp_tps is not None:
        rows.append(f"| {name} | {size} | {r.isa} | {r.threads} | pp{r.n_prompt} | "
                    f"{r.pp_tps:.2f} | {r.pp_tps_min:.2f} | {r.pp_tps_max:.2f} |")
    if r.tg_tps is not None:
        test = f"tg{r.n_gen}" + (f" @ d{r.ctx_depth}" if r.ctx_depth else "")
        rows.append(f"| {name} | {size} | {r.isa} | {r.threads} | {test} | "
                    f"{r.tg_tps:.2f} | {r.tg_tps_min:.2f} | {r.tg_tps_max:.2f} |")
    extra = [f"load {r.load_s:.2f} s"]
    if r.tg_overhead is not None:
        extra.append(f"outside the kernels {100 * r.tg_overhead:.1f}% of a decode step")
    if r.ttft_s is not None:
        extra.append(f"time to first token ({r.n_prompt}-token prompt) {r.ttft_s:.3f} s")
    extra.append(f"peak RSS {r.rss_mb:.0f} MB")
    extra.append(f"{r.kv_cache_type} KV cache")
    extra.append(f"{r.repetitions} runs each")
    return "\n".join(rows) + "\n\n" + ", ".join(extra)


def main(args: argparse.Namespace) -> int:
    if not args.model:
        raise LfmEdgeError("bench needs a model file: -m FILE")
    threads = None if args.threads is None else count(args.threads, "-t/--threads", 1)
    n_prompt = count(args.n_prompt, "-p/--n-prompt", 0)
    n_gen = count(args.n_gen, "-n/--n-gen", 0)
    repetitions = count(args.repetitions, "-r/--repetitions", 1)
    ctx_depth = count(args.ctx_depth, "-d/--ctx-depth", 0)
    seed = count(args.seed, "--seed", 0)
    if n_prompt == 0 and n_gen == 0:
        raise LfmEdgeError("nothing to measure: -p and -n are both 0")
    r = run(args.model, threads, n_prompt, n_gen, repetitions, ctx_depth, seed, args.kv_cache_type)
    print(json.dumps(asdict(r)) if args.json else table(r))
    return 0
