"""`lfm-edge bench -m MODEL`: prompt-processing and generation speed, like llama.cpp's llama-bench.

    lfm-edge bench -m model.gguf -t 1,2 -p 512,4096 -n 128 -r 3 [-d 4096] [-o md|csv|json|jsonl]

pp: one prefill of p random prompt tokens from an empty state, in tokens/s.
tg: n single-token decode steps (after d tokens of context), in tokens/s. With -np, tg runs that
many sequences at once on the generation engine (each after d tokens of its own context, as
llama-batched-bench's TG): the aggregate tokens/s of all of them, and each sequence's own rate.
Each number of -t, -p, -n and -d may be a comma list; every combination is a test, run r times
after a short warm-up and reported as llama-bench does: mean ± sample standard deviation of the
runs' tokens/s. `-o` picks llama-bench's output formats and field names (md, csv, json, jsonl);
`--json` prints lfm-edge's own record per configuration instead (median, min and max; what
bench/compare.py reads). Also: load time, time to first token of a p-token prompt (prefill +
picking the token), peak RSS, the kernels' instruction set, and the share of a decode step
spent outside the kernels (Python and the bindings: wall time minus the time the kernels report,
over the wall time). Prompt tokens are random non-special ids from a seeded generator, so runs
are repeatable; decode feeds random ids too (no sampling is timed, as in llama-bench).
--ttft-during-decode: a p-token prompt arriving while another sequence decodes, on the engine
(each on its own thread, as two clients of a server): its time to first token, and the decoding
stream's longest wait between two tokens meanwhile (what the engine's prompt chunks cost it).
--roofline: this CPU's int8 multiply-accumulate peak and read bandwidth (lfm_edge.probes, with the
active kernels' instructions) and each test as a share of the roofline it sets: pp tokens/s x MACs
per prompt token / peak, tg tokens/s x weight bytes read per token / bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LfmEdgeError
from ..hub import resolve_model
from .common import add_gpu_flags, add_weight_cache_flag, thread_count

OUTPUTS = ("md", "csv", "json", "jsonl")


def configure_parser(p: argparse.ArgumentParser) -> None:
    # numbers are read as text and checked in main(), so a bad value is one LfmEdgeError line
    p.add_argument("-m", "--model", help="a .gguf file or a hub reference (see lfm-edge run --help)")
    p.add_argument("-t", "--threads", default=None, help="threads, a comma list (default: all cores)")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt tokens for pp and TTFT, a comma list; 0 skips (default 512)")
    p.add_argument("-n", "--n-gen", default="128", help="generated tokens for tg, a comma list; 0 skips (default 128)")
    p.add_argument("-r", "--repetitions", default="3", help="runs of each test (default 3)")
    p.add_argument("-d", "--ctx-depth", "--n-depth", default="0",
                   help="tokens of context before the tg steps, a comma list (default 0)")
    p.add_argument("-np", "--parallel", default=None,
                   help="sequences decoded at once for tg, a comma list: aggregate and per-sequence tokens/s "
                        "on the generation engine (default: one sequence, the plain decode loop)")
    p.add_argument("-ctk", "--cache-type-k", "--kv-cache-type", dest="kv_cache_type", default=None,
                   help="f16 or f32 keys and values (default: f32 for a float32 model, else f16)")
    p.add_argument("--roofline", action="store_true",
                   help="also probe this CPU's int8 peak and read bandwidth (lfm_edge.probes: a few seconds and "
                        "1 GiB per thread count) and give pp and tg as a share of the rooflines they set")
    p.add_argument("--ttft-during-decode", action="store_true",
                   help="also: time to first token of a p-token prompt that arrives while another sequence decodes")
    p.add_argument("--seed", default="0", help="seed of the random token ids (default 0)")
    p.add_argument("-o", "--output", default="md", help=f"llama-bench's output format: {', '.join(OUTPUTS)} (default md)")
    p.add_argument("--json", action="store_true",
                   help="one lfm-edge record per configuration (median, min, max, TTFT, load, RSS) instead")
    add_weight_cache_flag(p)
    add_gpu_flags(p)


def count(value: str | None, name: str, minimum: int) -> int:
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LfmEdgeError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise LfmEdgeError(f"{name} must be at least {minimum}, got {n}")
    return n


def counts(value: str, name: str, minimum: int) -> list[int]:
    """A comma list of integers, as llama-bench takes them: `-t 1,2`."""
    values = [count(v.strip(), name, minimum) for v in str(value).split(",")]
    return list(dict.fromkeys(values))  # each once, in the order given


@dataclass
class Test:
    """One llama-bench row: a pp or a tg test at one thread count; field names as llama-bench's."""

    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    backends: str
    isa: str
    n_threads: int
    type_k: str
    type_v: str
    n_prompt: int
    n_gen: int
    n_depth: int
    test_time: str
    avg_ns: int
    stddev_ns: int
    avg_ts: float
    stddev_ts: float
    samples_ns: list[int]
    samples_ts: list[float]
    ttft_s: float | None = None  # pp: median prefill of n_prompt tokens + argmax of the logits
    tg_overhead: float | None = None  # tg: share of the time spent outside the kernels
    n_parallel: int | None = None  # tg -np: sequences decoded at once (avg_ts: all of them together)
    seq_ts: float | None = None  # tg -np: mean tokens/s of one sequence
    ttft_busy_s: float | None = None  # pp --ttft-during-decode: median TTFT beside a decoding sequence
    busy_gap_s: float | None = None  # ... and that sequence's longest wait between tokens meanwhile
    busy_chunk: int | None = None  # ... the prompt chunk the engine read in such a step at the end
    roofline_share: float | None = None  # --roofline: pp of the int8 peak's roofline, tg of the bandwidth's

    @property
    def name(self) -> str:
        test = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        test += f" np{self.n_parallel}" if self.n_parallel else ""
        return test + (f" @ d{self.n_depth}" if self.n_depth else "")


@dataclass
class Result:
    """lfm-edge's own record of one configuration (--json)."""

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
    weights: str = ""  # where load_s's weights came from: "packed", "cache" (the packing saved before)
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
    n_parallel: int | None = None  # -np: tg is that many sequences at once, tg_tps their aggregate
    tg_seq_tps: float | None = None  # -np: median tokens/s of one sequence
    ttft_busy_s: float | None = None  # --ttft-during-decode: median TTFT of the prompt beside a decoding sequence
    busy_gap_s: float | None = None  # the decoding sequence's longest wait between two tokens meanwhile
    pp_roofline_share: float | None = None  # --roofline: pp_tps x MACs per prompt token / int8 peak
    tg_roofline_share: float | None = None  # --roofline: tg_tps x weight bytes per token / read bandwidth
    int8_peak_gmacs: float | None = None  # --roofline: the probes (lfm_edge.probes), this thread count
    read_gbps: float | None = None
    rss_mb: float = 0.0  # peak resident set of this process, file pages touched included
    kernel_threads: int | None = None  # what the native thread pool reports
    kv_cache_type: str = ""
    version: str = ""


def peak_rss_of(pid: int | str = "self") -> float | None:
    """A process's peak resident set in MB (this one's by default): Linux's VmHWM, which starts
    afresh at exec; None where there is no /proc (or the process is gone). ru_maxrss does not
    start afresh: a process started by vfork + exec (Python's subprocess) carries its parent's
    peak. bench/compare.py reads its tools' with this too."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set in MB."""
    peak = peak_rss_of()
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB, macOS bytes


def random_ids(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in rng.choice(allowed, size=n)]


def describe(llm) -> tuple[str, int, int]:
    """llama-bench's model_type ("lfm2moe Q4_0": the weight type holding most bytes), size, params."""
    tensors = list(llm.file.tensors.values())
    by_type: Counter[str] = Counter()
    for t in tensors:
        by_type[t.qtype.name] += t.nbytes
    params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
    return f"{llm.args.arch} {by_type.most_common(1)[0][0]}", sum(by_type.values()), params


class Bench:
    """A loaded model and the tests run on it; each test is handed to `report` as it finishes."""

    def __init__(self, path: Path, n_ctx: int, seed: int, kv_cache_type: str | None, weight_cache: bool | None = None):
        import lfm_edge

        start = time.perf_counter()
        self.llm = lfm_edge.load(path, n_ctx=n_ctx, kv_cache_type=kv_cache_type, weight_cache=weight_cache)
        self.load_s = time.perf_counter() - start
        cache = self.llm.weight_cache
        self.weights = "cache" if cache is not None and cache.status == "read" else "packed"
        self.saved = ""  # how the packing's save went, said in the footer
        if cache is not None and cache.status in ("saving", "written"):  # this load packed and saves
            cache.wait()  # the tests measure a quiet machine
            self.saved = (f"saved to the weight cache in {cache.save_s:.2f} s" if cache.status == "written"
                          else f"not saved ({cache.reason})")
        self.path, self.n_ctx = path, n_ctx
        self.model_type, self.model_size, self.n_params = describe(self.llm)
        special = self.llm.tokenizer.special_ids
        self.allowed = np.array([i for i in range(self.llm.args.n_vocab) if i not in special], dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.cache = self.llm.new_cache()
        self.rooflines: dict[int, dict] = {}  # --roofline: threads -> the probes' results

    def measure_roofline(self, threads: int, tests: list[Test]) -> None:
        """Probe the int8 peak and read bandwidth on `threads` threads and set each single-sequence
        test's share of its roofline (the weights only: attention over the context is left out)."""
        from .. import native, probes

        per_token = probes.model_per_token(self.llm)
        # in a child process, so the probe's 1 GiB buffer stays out of this one's peak RSS
        code = ("import json; from lfm_edge import probes; "
                f"print(json.dumps([probes.int8_peak({threads}), probes.read_bandwidth({threads})]))")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                               env={**os.environ, native.ISA_ENV_VAR: native.isa()})
        if child.returncode != 0:
            raise LfmEdgeError(f"the roofline probes failed: {(child.stderr.strip().splitlines() or ['no message'])[-1]}")
        peak, bw = json.loads(child.stdout)
        roof = self.rooflines[threads] = {"gmacs": peak["gmacs"], "instructions": peak["instructions"],
                                          "gbps": bw["gbps"], "prefill_macs": per_token["prefill_macs"],
                                          "active_bytes": per_token["active_bytes"]}
        for t in tests:
            if t.n_prompt or not t.n_parallel:
                t.roofline_share = roofline_share(roof, t.avg_ts, prefill=bool(t.n_prompt))

    def use_threads(self, threads: int | None) -> int:
        from .. import native

        if threads is not None:
            native.set_threads(threads)
            self.llm.n_threads = threads
        # warm-up: touch the code paths and page in the weights a short prompt and a step use
        self.cache.reset()
        self.llm.prefill(random_ids(self.rng, self.allowed, min(8, self.n_ctx)), self.cache)
        if self.cache.pos < self.n_ctx:
            self.llm.decode_one_token(random_ids(self.rng, self.allowed, 1)[0], self.cache)
        return self.llm.n_threads

    def test(self, n_prompt: int, n_gen: int, n_depth: int, samples_ns: list[int], **extra) -> Test:
        tokens = (n_prompt or n_gen) * (extra.get("n_parallel") or 1)
        ts = [tokens * 1e9 / ns for ns in samples_ns]
        return Test(
            model_filename=str(self.path), model_type=self.model_type, model_size=self.model_size,
            model_n_params=self.n_params, backends="CPU", isa=isa(), n_threads=self.llm.n_threads,
            type_k=self.llm.kv_cache_type, type_v=self.llm.kv_cache_type,
            n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth,
            test_time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            avg_ns=int(statistics.mean(samples_ns)), stddev_ns=int(stdev(samples_ns)),
            avg_ts=statistics.mean(ts), stddev_ts=stdev(ts), samples_ns=samples_ns, samples_ts=ts, **extra,
        )

    def pp(self, n_prompt: int, repetitions: int) -> Test:
        prompt = random_ids(self.rng, self.allowed, n_prompt)
        self.cache.reset()
        self.llm.prefill(prompt, self.cache)  # warm-up at this size, as llama-bench does
        samples, ttft = [], []
        for _ in range(repetitions):
            self.cache.reset()
            t0 = time.perf_counter_ns()
            logits = self.llm.prefill(prompt, self.cache)
            t1 = time.perf_counter_ns()
            int(np.argmax(logits))  # the first token is known here
            t2 = time.perf_counter_ns()
            samples.append(t1 - t0)
            ttft.append((t2 - t0) * 1e-9)
        return self.test(n_prompt, 0, 0, samples, ttft_s=statistics.median(ttft))

    def tg(self, n_gen: int, n_depth: int, repetitions: int) -> Test:
        from .. import native

        self.cache.reset()
        if n_depth:
            self.llm.prefill(random_ids(self.rng, self.allowed, n_depth), self.cache)
        at_depth = self.cache.checkpoint()
        steps = random_ids(self.rng, self.allowed, n_gen)
        samples, overhead = [], []
        for _ in range(repetitions):
            self.cache.restore(at_depth)
            k0, t0 = native.kernel_time_ns(), time.perf_counter_ns()
            for tok in steps:
                self.llm.decode_one_token(tok, self.cache)
            wall = time.perf_counter_ns() - t0
            samples.append(wall)
            overhead.append(1.0 - (native.kernel_time_ns() - k0) / wall)
        return self.test(0, n_gen, n_depth, samples, tg_overhead=statistics.median(overhead))

    def tg_parallel(self, n_gen: int, n_depth: int, n_seq: int, repetitions: int) -> Test:
        """n_seq sequences decoding n_gen tokens together on the engine, each after n_depth tokens
        of its own random context (read untimed); timed from the step after every prompt's first
        token to the last token."""
        from .. import native
        from ..engine import Engine

        engine = Engine(self.llm, n_parallel=n_seq)
        samples, overhead = [], []
        for _ in range(repetitions):
            handles = [engine.submit(random_ids(self.rng, self.allowed, max(n_depth, 1)), n_gen + 1,
                                     RandomTokens(random_ids(self.rng, self.allowed, n_gen + 1))) for _ in range(n_seq)]
            while any(h.stats.completion_tokens == 0 for h in handles):
                engine.step()
            k0, t0 = native.kernel_time_ns(), time.perf_counter_ns()
            while engine.step():  # each step: one token of every sequence
                pass
            wall = time.perf_counter_ns() - t0
            if any(h.stats.completion_tokens != n_gen + 1 for h in handles):
                raise LfmEdgeError("a sequence of the tg -np test ended early (an end-of-generation token?)")
            samples.append(wall)
            overhead.append(1.0 - (native.kernel_time_ns() - k0) / wall)
        seq_ts = statistics.mean(n_gen * 1e9 / ns for ns in samples)
        return self.test(0, n_gen, n_depth, samples, tg_overhead=statistics.median(overhead), n_parallel=n_seq,
                         seq_ts=seq_ts)


    def ttft_during_decode(self, n_prompt: int, repetitions: int) -> tuple[float, float, int]:
        """A sequence decodes on one thread; once it has made a few tokens, an n_prompt-token
        request arrives on another. Returns the median of that request's time to first token
        (arrival to its first token's logits), the decoding sequence's longest wait between two
        tokens from the arrival to that first token (the worst over the runs), and the prompt
        chunk the engine would read beside one decoding sequence at the end."""
        from ..engine import Engine

        engine = Engine(self.llm, n_parallel=2)  # one engine for all runs: its prefill speed stays measured
        ttfts, gaps = [], []
        n_running = self.n_ctx - 16  # the decoding sequence runs until cancelled (or its context is full)
        for _ in range(repetitions):
            running = engine.submit(random_ids(self.rng, self.allowed, 16), n_running,
                                    RandomTokens(random_ids(self.rng, self.allowed, n_running)))
            made: list[float] = []
            reader = threading.Thread(target=lambda: made.extend(time.perf_counter() for _ in running.tokens()))
            reader.start()
            while len(made) < 4 and reader.is_alive():  # decoding steadily
                time.sleep(0.01)
            request = engine.submit(random_ids(self.rng, self.allowed, n_prompt), 1,
                                    RandomTokens(random_ids(self.rng, self.allowed, 1)))
            arrived = time.perf_counter()
            list(request.tokens())
            first = arrived + request.stats.prefill_s
            while reader.is_alive() and made[-1] <= first:  # the running sequence's token after it
                time.sleep(0.01)
            running.cancel()
            reader.join()
            if running.stats.finish_reason != "cancelled":
                raise LfmEdgeError("the decoding sequence of --ttft-during-decode filled its context first; "
                                   "a bigger -n leaves it more room")
            during = [arrived] + [t for t in made if t > arrived]
            gaps.append(max(b - a for a, b in zip(during, during[1:])))
            ttfts.append(request.stats.prefill_s)
        return statistics.median(ttfts), max(gaps), engine.chunk_size(1)


def roofline_share(roof: dict, tokens_per_s: float, prefill: bool) -> float:
    """pp: MACs per second over the int8 peak; tg: weight bytes per second over the read bandwidth."""
    if prefill:
        return tokens_per_s * roof["prefill_macs"] / (roof["gmacs"] * 1e9)
    return tokens_per_s * roof["active_bytes"] / (roof["gbps"] * 1e9)


class RandomTokens:
    """Stands for a sampler in tg -np: the given random ids, one a step (llama-bench times no sampling)."""

    def __init__(self, ids: list[int]):
        self.ids = iter(ids)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        return next(self.ids)

    def is_done(self) -> bool:
        return False


def stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def isa() -> str:
    from .. import native

    return native.isa()


# -- output: llama-bench's formats --------------------------------------------------------------
FIELDS = [f for f in Test.__dataclass_fields__ if f not in ("samples_ns", "samples_ts")]
# (display name, width): negative widths are left-aligned, as llama-bench prints them
MD_COLUMNS = [("model", -30), ("size", 10), ("params", 10), ("backend", -10), ("threads", 7), ("test", 15), ("t/s", 20)]


def md_header() -> str:
    head = "|" + "".join(f" {name:{'<' if w < 0 else '>'}{abs(w)}} |" for name, w in MD_COLUMNS)
    rule = "|" + "".join(f" {'-' * (abs(w) - 1)}{'-' if w < 0 else ':'} |" for _, w in MD_COLUMNS)
    return head + "\n" + rule


def md_row(t: Test) -> str:
    size = t.model_size / 2**20
    size_text = f"{size:.2f} MiB" if size < 1024 else f"{size / 1024:.2f} GiB"
    params = f"{t.model_n_params / 1e6:.2f} M" if t.model_n_params < 1e9 else f"{t.model_n_params / 1e9:.2f} B"
    values = [t.model_type, size_text, params, t.backends, str(t.n_threads), t.name,
              f"{t.avg_ts:.2f} ± {t.stddev_ts:.2f}"]
    return "|" + "".join(f" {v:{'<' if w < 0 else '>'}{abs(w)}} |" for v, (_, w) in zip(values, MD_COLUMNS))


class Printer:
    """Writes each test as it finishes, so a long run shows progress and Ctrl-C keeps what was done."""

    def __init__(self, fmt: str, out=sys.stdout):
        self.fmt, self.out, self.rows = fmt, out, 0
        if fmt == "md":
            self.write(md_header())
        elif fmt == "csv":
            self.write(self.csv_line(FIELDS))
        elif fmt == "json":
            self.out.write("[\n")

    def write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    @staticmethod
    def csv_line(values: list) -> str:
        buf = io.StringIO()
        csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="").writerow(values)
        return buf.getvalue()

    def test(self, t: Test) -> None:
        record = asdict(t)
        if self.fmt == "md":
            self.write(md_row(t))
        elif self.fmt == "csv":
            self.write(self.csv_line([record[f] for f in FIELDS]))
        elif self.fmt == "json":
            self.out.write(("," if self.rows else "") + "\n".join("  " + line for line in json.dumps(record, indent=2).splitlines()))
            self.out.write("\n")
            self.out.flush()
        elif self.fmt == "jsonl":
            self.write(json.dumps(record))
        self.rows += 1

    def finish(self, footer: str) -> None:
        if self.fmt == "md":
            self.write("\n" + footer)
        elif self.fmt == "json":
            self.write("]")


def describe_load(bench: Bench) -> str:
    if bench.weights == "cache":
        return "packed weights read from the weight cache"
    return "weights packed" + (f", {bench.saved}" if bench.saved else "")


def footer(bench: Bench, tests: list[Test], repetitions: int) -> str:
    import lfm_edge

    lines = [", ".join([f"lfm-edge {lfm_edge.__version__}", f"kernels {isa()}", f"{bench.llm.kv_cache_type} KV cache",
                        f"load {bench.load_s:.2f} s ({describe_load(bench)})", f"peak RSS {peak_rss_mb():.0f} MB", f"{repetitions} runs each"])]
    for th in dict.fromkeys(t.n_threads for t in tests):
        mine = [t for t in tests if t.n_threads == th]
        ttft = [f"pp{t.n_prompt} {t.ttft_s:.3f} s" for t in mine if t.ttft_s is not None]
        outside = [f"{t.name} {100 * t.tg_overhead:.1f}%" for t in mine if t.tg_overhead is not None]
        per_seq = [f"{t.name} {t.seq_ts:.2f} t/s" for t in mine if t.seq_ts is not None]
        busy = [f"pp{t.n_prompt} {t.ttft_busy_s:.2f} s (alone {t.ttft_s:.2f} s), the decoding sequence's longest "
                f"wait for a token {t.busy_gap_s:.2f} s (chunks of {t.busy_chunk} tokens)"
                for t in mine if t.ttft_busy_s is not None]
        threads = f"{th} thread{'s' if th > 1 else ''}"
        if ttft:
            lines.append(f"{threads}: time to first token {', '.join(ttft)}")
        if outside:
            lines.append(f"{threads}: share of a decode step outside the kernels {', '.join(outside)}")
        if per_seq:
            lines.append(f"{threads}: each sequence's decode speed {', '.join(per_seq)}")
        if busy:
            lines.append(f"{threads}: time to first token of a prompt arriving while another sequence decodes "
                         + ", ".join(busy))
        if th in bench.rooflines:
            roof = bench.rooflines[th]
            shares = [f"{t.name} {100 * t.roofline_share:.0f}%" for t in mine if t.roofline_share is not None]
            lines.append(f"{threads}: of the roofline (pp: int8 peak {roof['gmacs']:.0f} GMAC/s, {roof['instructions']}; "
                         f"tg: read bandwidth {roof['gbps']:.1f} GB/s) {', '.join(shares)}")
    return "\n".join(lines)


def records(bench: Bench, tests: list[Test], threads: list[int], prompts: list[int], gens: list[int],
            depths: list[int], repetitions: int, parallel: Sequence[int | None] = (None,)) -> list[Result]:
    """lfm-edge's --json records: one per (threads, p, n, d, np), its pp and tg tests together."""
    import lfm_edge

    from .. import native

    out = []
    for th in threads:
        for p in prompts:
            for n in gens:
                for d, n_seq in ((d, n_seq) for d in depths for n_seq in parallel):
                    pp = next((t for t in tests if t.n_threads == th and t.n_prompt == p and p), None)
                    tg = next((t for t in tests if t.n_threads == th and t.n_gen == n and t.n_depth == d and n
                               and t.n_parallel == n_seq), None)
                    r = Result(model=str(bench.path), model_bytes=bench.path.stat().st_size, arch=bench.llm.args.arch,
                               isa=isa(), threads=th, n_prompt=p, n_gen=n, ctx_depth=d, repetitions=repetitions,
                               load_s=bench.load_s, weights=bench.weights, rss_mb=peak_rss_mb(), kernel_threads=native.threads(),
                               kv_cache_type=bench.llm.kv_cache_type, version=lfm_edge.__version__)
                    if pp is not None:
                        r.pp_runs, r.ttft_s = pp.samples_ts, pp.ttft_s
                        r.ttft_busy_s, r.busy_gap_s = pp.ttft_busy_s, pp.busy_gap_s
                        r.pp_tps, r.pp_tps_min, r.pp_tps_max = statistics.median(pp.samples_ts), min(pp.samples_ts), max(pp.samples_ts)
                        if th in bench.rooflines:
                            r.pp_roofline_share = roofline_share(bench.rooflines[th], r.pp_tps, prefill=True)
                    if tg is not None:
                        r.tg_runs, r.tg_overhead = tg.samples_ts, tg.tg_overhead
                        r.n_parallel = tg.n_parallel
                        if tg.n_parallel:
                            r.tg_seq_tps = statistics.median(t / tg.n_parallel for t in tg.samples_ts)
                        r.tg_tps, r.tg_tps_min, r.tg_tps_max = statistics.median(tg.samples_ts), min(tg.samples_ts), max(tg.samples_ts)
                        if th in bench.rooflines and not tg.n_parallel:
                            r.tg_roofline_share = roofline_share(bench.rooflines[th], r.tg_tps, prefill=False)
                    if th in bench.rooflines:
                        r.int8_peak_gmacs, r.read_gbps = bench.rooflines[th]["gmacs"], bench.rooflines[th]["gbps"]
                    out.append(r)
    return out


def main(args: argparse.Namespace) -> int:
    if not args.model:
        raise LfmEdgeError("bench needs a model: -m FILE.gguf (or a hub reference)")
    threads = [None] if args.threads is None else counts(args.threads, "-t/--threads", 1)
    for t in threads:
        if t is not None:
            try:
                thread_count(str(t))
            except argparse.ArgumentTypeError as e:
                raise LfmEdgeError(f"-t/--threads: {e}") from None
    prompts = counts(args.n_prompt, "-p/--n-prompt", 0)
    gens = counts(args.n_gen, "-n/--n-gen", 0)
    repetitions = count(args.repetitions, "-r/--repetitions", 1)
    depths = counts(args.ctx_depth, "-d/--ctx-depth", 0)
    parallel: list[int | None] = [None] if args.parallel is None else counts(args.parallel, "-np/--parallel", 1)
    seed = count(args.seed, "--seed", 0)
    if args.output not in OUTPUTS:
        raise LfmEdgeError(f"-o/--output must be one of {', '.join(OUTPUTS)}, got {args.output!r}")
    if args.kv_cache_type is not None and args.kv_cache_type not in ("f16", "f32"):
        raise LfmEdgeError(f"kv_cache_type must be one of f16, f32, got {args.kv_cache_type!r}")
    if max(prompts) == 0 and max(gens) == 0:
        raise LfmEdgeError("nothing to measure: -p and -n are both 0")
    path = resolve_model(args.model)
    n_ctx = max(max(prompts), max(depths) + max(gens) + (args.parallel is not None), 1)  # -np: a 1-token prompt at d0
    if args.ttft_during_decode:
        if max(prompts) == 0:
            raise LfmEdgeError("--ttft-during-decode measures a prompt: give it -p N")
        n_ctx = max(n_ctx, max(prompts) + 16 + 1024)  # room for the decoding sequence's tokens meanwhile
    bench = Bench(path, n_ctx, seed, args.kv_cache_type, args.weight_cache)
    printer = None if args.json else Printer(args.output)
    tests: list[Test] = []
    used_threads = []
    for th in threads:
        used_threads.append(bench.use_threads(th))
        for p in (p for p in prompts if p):
            tests.append(bench.pp(p, repetitions))
            if args.ttft_during_decode:
                busy = bench.ttft_during_decode(p, repetitions)
                tests[-1].ttft_busy_s, tests[-1].busy_gap_s, tests[-1].busy_chunk = busy
            if printer:
                printer.test(tests[-1])
        for d in depths:
            for n in (n for n in gens if n):
                for n_seq in parallel:
                    tests.append(bench.tg(n, d, repetitions) if n_seq is None else bench.tg_parallel(n, d, n_seq, repetitions))
                    if printer:
                        printer.test(tests[-1])
        if args.roofline:
            bench.measure_roofline(used_threads[-1], [t for t in tests if t.n_threads == used_threads[-1]])
    if printer:
        printer.finish(footer(bench, tests, repetitions))
    else:
        for r in records(bench, tests, used_threads, prompts, gens, depths, repetitions, parallel):
            print(json.dumps(asdict(r)))
    return 0
