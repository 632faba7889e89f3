"""lfm-edge against llama.cpp on the same GGUF file, threads and settings, in one run.

    python bench/compare.py --model /tmp/lfm2-8b-a1b-q4_0.gguf -t 1 2 -p 512 -n 128 -r 3

For each thread count it runs llama.cpp's `llama-bench -o json` and `lfm-edge bench --json`, one
after the other, each in its own process (peak RSS is that process's, from wait4), plus the memory
bandwidth probe (bench/bandwidth.py) and the int8 peak probe (bench/peak.py), and prints a markdown
report: pp and tg tokens/s of both, the ratio lfm-edge / llama.cpp, pp as a percentage of the int8
roofline (peak GMAC/s / GMAC per prompt token) and tg of the bandwidth roofline (GB/s / GB read
per token), time to first token, load time and peak RSS against the file size.

With --np 1 2 4 8 it compares decoding several sequences at once instead: llama.cpp's
`llama-batched-bench -npp D -ntg N -npl 1,2,4,8 --output-format jsonl` against `lfm-edge bench
-p 0 -n N -d D -np 1,2,4,8 --json`, aggregate and per-sequence decode tokens/s side by side (see
BATCHED_METHOD for what both time).

llama-bench is built by bench/build_llama_bench.sh from the llama-cpp-python sdist (cached under
~/.cache/lfm-edge/llama.cpp), or given with --llama-bench. It is a native build, so on a CPU with
AMX it repacks Q4_0/Q8_0 for AMX: that is llama.cpp's real speed there. If it crashes, the crash
is reported and the test is run again with the same native build minus AMX (AVX-512 and
Q4_0/Q8_0 repacking kept; built on demand), then with --repack 0 (the plain CPU path); the table
says which one gave the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bandwidth

from lfm_edge import probes
from lfm_edge.commands.bench import peak_rss_of


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    rss_mb: float  # peak resident set of the process
    seconds: float
    others_cpu: float  # share of all cores other processes used meanwhile (noise), 0..1


def cpu_busy_seconds() -> float:
    """CPU seconds all processes have spent busy, summed over cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPU over 3 s.

    On a 2-core machine one busy neighbour halves a 2-thread run or worse (spinning thread pools
    wait on a descheduled thread), so runs start in a quiet moment when there is one.
    Returns the busy share seen last.
    """
    deadline = time.monotonic() + max_wait
    while True:
        t0, b0 = time.monotonic(), cpu_busy_seconds()
        time.sleep(3)
        busy = (cpu_busy_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        if busy < threshold or time.monotonic() > deadline:
            return busy
        print(f"  waiting for a quiet CPU ({busy:.0%} busy) ...", file=sys.stderr)


def run_measured(cmd: list[str], timeout: float) -> Proc:
    """Run cmd to completion: its output, its own peak RSS and CPU time (os.wait4 gives the child's
    rusage), and how much CPU everything else took meanwhile. The peak RSS is the child's VmHWM, read
    every 50 ms while it runs: the rusage's ru_maxrss of a child started by vfork + exec includes
    this process's own peak (the bandwidth probe's 1 GiB buffer)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start, busy0 = time.perf_counter(), cpu_busy_seconds()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        peaks: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak = peak_rss_of(proc.pid)
                if peak is not None:
                    peaks.append(peak)
                done.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.perf_counter() - start
        others = cpu_busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime
        out.seek(0)
        err.seek(0)
        return Proc(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                    max(peaks) if peaks else usage.ru_maxrss / 1024, seconds,
                    max(0.0, others / (seconds * (os.cpu_count() or 1))))


def describe_failure(p: Proc) -> str:
    if p.returncode < 0:
        try:
            return f"crashed ({signal.Signals(-p.returncode).name})"
        except ValueError:
            return f"killed by signal {-p.returncode}"
    tail = p.stderr.strip().splitlines()[-1:] or ["no message"]
    return f"failed (exit {p.returncode}: {tail[0][:160]})"


def build_llama_bench(no_amx: bool = False, target: str = "llama-bench") -> Path | None:
    """The cached llama-bench or llama-batched-bench (built on first use); None if the build fails."""
    script = HERE / "build_llama_bench.sh"
    variant = " without AMX" if no_amx else ""
    print(f"building {target}{variant} ({script}; cached after the first time) ...", file=sys.stderr)
    env = {**os.environ, **({"LLAMA_BENCH_NO_AMX": "1"} if no_amx else {})}
    out = subprocess.run(["bash", str(script), target], stdout=subprocess.PIPE, text=True, env=env, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return Path(out.stdout.strip().splitlines()[-1])


def llama_configs(args: argparse.Namespace):
    """llama.cpp setups in order of preference: (label, binary, repack). The next is tried only
    when the one before fails; the label says which one gave the numbers."""
    yield "", args.llama_bench, True
    no_amx = args.llama_bench_no_amx or (None if args.no_build else build_llama_bench(no_amx=True))
    if no_amx is not None:
        yield "native build without AMX", no_amx, True
    yield "--repack 0", args.llama_bench, False


def run_llama(binary: Path, args: argparse.Namespace, threads: int, repack: bool) -> tuple[dict, Proc]:
    cmd = [str(binary), "-m", args.model, "-t", str(threads), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.repetitions), "-o", "json", "--repack", "1" if repack else "0"]
    if args.ctx_depth:
        cmd += ["-d", f"0,{args.ctx_depth}"]
    p = run_measured(cmd, args.timeout)
    if p.returncode != 0:
        return {}, p
    tests = {}
    for t in json.loads(p.stdout):
        depth = t.get("n_depth", 0)
        if t["n_prompt"] and not t["n_gen"] and not depth:
            key = "pp"
        elif t["n_gen"] and not t["n_prompt"]:
            key = "tg_depth" if depth else "tg"
        else:
            continue
        tests[key] = t
    return tests, p


def run_lfm_edge(args: argparse.Namespace, threads: int, depth: int) -> tuple[dict, Proc]:
    # the depth run measures tg only: -p 0
    cmd = [sys.executable, "-m", "lfm_edge", "bench", "-m", args.model, "-t", str(threads),
           "-p", str(0 if depth else args.n_prompt), "-n", str(args.n_gen), "-d", str(depth),
           "-r", str(args.repetitions), "--json"]
    p = run_measured(cmd, args.timeout)
    if p.returncode != 0:
        return {}, p
    return json.loads(p.stdout.strip().splitlines()[-1]), p


BATCHED_METHOD = (
    "Both sides measure the same thing: np sequences, each with its own {d}-token prompt of random "
    "ids read first and not timed, then {n} steps that each decode one token of every sequence "
    "(positions {d}..{last}, logits of every row); timed from the end of the prompts to the end of "
    "the last step. Aggregate = np x {n} tokens / that time (llama-batched-bench's S_TG); per "
    "sequence = {n} tokens / that time. Neither times sampling: llama-batched-bench feeds random "
    "ids, lfm-edge hands back random ids in place of a sampler (after its check that the logits "
    "are finite). llama.cpp: one process per thread count running every np, one run each unless "
    "-r says more (then the median); lfm-edge: the median of -r runs."
)


def run_llama_batched(binary: Path, args: argparse.Namespace, threads: int) -> tuple[dict[int, dict], Proc]:
    """llama-batched-bench's TG of each np: {np: its jsonl record}, the median run by speed_tg."""
    n_ctx = max(args.np) * (args.ctx_depth + args.n_gen)  # its KV cache is split among n_seq_max sequences
    cmd = [str(binary), "-m", args.model, "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
           "-npp", str(args.ctx_depth), "-ntg", str(args.n_gen), "-npl", ",".join(map(str, args.np)),
           "--output-format", "jsonl"]
    runs: dict[int, list[dict]] = {}
    for _ in range(args.repetitions):
        p = run_measured(cmd, args.timeout)
        if p.returncode != 0:
            return {}, p
        for line in (p.stdout + "\n" + p.stderr).splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                record = json.loads(line)
                runs.setdefault(record["pl"], []).append(record)
    best = {}
    for pl, rs in runs.items():
        rs.sort(key=lambda r: r["speed_tg"])
        best[pl] = rs[len(rs) // 2]
    return best, p


def run_lfm_edge_batched(args: argparse.Namespace, threads: int) -> tuple[dict[int, dict], Proc]:
    cmd = [sys.executable, "-m", "lfm_edge", "bench", "-m", args.model, "-t", str(threads), "-p", "0",
           "-n", str(args.n_gen), "-d", str(args.ctx_depth), "-np", ",".join(map(str, args.np)),
           "-r", str(args.repetitions), "--json"]
    p = run_measured(cmd, args.timeout)
    if p.returncode != 0:
        return {}, p
    return {r["n_parallel"]: r for r in map(json.loads, p.stdout.strip().splitlines())}, p


def batched_report(args, rows, notes) -> str:
    d, n = args.ctx_depth, args.n_gen
    out = [
        f"### lfm-edge vs llama.cpp, several sequences decoding at once: `{Path(args.model).name}`",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_name()}, {os.cpu_count()} cores; "
        f"llama.cpp: llama-batched-bench from the llama-cpp-python {args.llama_version} sdist, native build.",
        "",
        BATCHED_METHOD.format(d=d, n=n, last=d + n - 1),
        "",
        "| threads | np | llama.cpp t/s | lfm-edge t/s | lfm-edge / llama.cpp | per sequence: llama.cpp | "
        "per sequence: lfm-edge | x np1: llama.cpp | x np1: lfm-edge |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ll1, ours1 = r["llama"].get(1), r["lfm"].get(1)
        for np_ in args.np:
            ll, ours = r["llama"].get(np_), r["lfm"].get(np_)
            ll_ts = ll["speed_tg"] if ll else None
            ours_ts = ours["tg_tps"] if ours else None
            out.append(" | ".join([
                f"| {r['threads']}", str(np_),
                fmt(ll_ts) if ll else (r["llama_error"] or "n/a"),
                fmt(ours_ts) if ours else (r["lfm_error"] or "n/a"),
                fmt(ours_ts / ll_ts, 3) if ll and ours else "n/a",
                fmt(ll_ts / np_) if ll else "n/a",
                fmt(ours["tg_seq_tps"]) if ours else "n/a",
                fmt(ll_ts / ll1["speed_tg"]) if ll and ll1 else "n/a",
                fmt(ours_ts / ours1["tg_tps"]) if ours and ours1 else "n/a",
            ]) + " |")
    out += ["", *[f"- {x}" for x in notes]]
    return "\n".join(out)


def main_batched(args: argparse.Namespace) -> int:
    notes = []
    rows, raw = [], {"runs": []}
    for t in args.threads:
        row = {"threads": t, "llama": {}, "lfm": {}, "llama_error": None, "lfm_error": None}
        for tool in ("llama-batched-bench", "lfm-edge"):
            busy = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
            print(f"[{t} thread(s)] {tool} -np {' '.join(map(str, args.np))} ... (CPU {busy:.0%} busy before)",
                  file=sys.stderr)
            if tool == "lfm-edge":
                results, proc = run_lfm_edge_batched(args, t)
            else:
                results, proc = run_llama_batched(args.llama_batched_bench, args, t)
            key = "lfm" if tool == "lfm-edge" else "llama"
            if proc.returncode != 0:
                row[f"{key}_error"] = describe_failure(proc)
                notes.append(f"{tool} -t {t}: {row[f'{key}_error']}")
            else:
                row[key] = results
                notes.append(f"{tool} -t {t}: {proc.seconds:.0f} s, peak RSS {proc.rss_mb:.0f} MB; other processes "
                             f"used {proc.others_cpu:.0%} of the CPU during it ({busy:.0%} busy before)")
            raw["runs"].append({"threads": t, "tool": tool, "results": results, "rss_mb": proc.rss_mb,
                                "others_cpu": proc.others_cpu, "error": row[f"{key}_error"]})
        rows.append(row)
    notes.append(f"load average (1/5/15 min) at the end: {loadavg()}")
    print(batched_report(args, rows, notes))
    if args.json_out:
        args.json_out.write_text(json.dumps(raw, indent=1, default=str))
    return 0


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(args, model_info, bw, peaks, rows, notes) -> str:
    size_mb = model_info["file_bytes"] / 1e6
    act, macs = model_info["active_bytes"], model_info["prefill_macs"]
    out = [
        f"### lfm-edge vs llama.cpp: `{Path(args.model).name}` ({model_info['file_bytes'] / 1e9:.2f} GB)",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_name()}, {os.cpu_count()} cores; "
        f"-p {args.n_prompt} -n {args.n_gen} -r {args.repetitions}"
        + (f", tg also at depth {args.ctx_depth}" if args.ctx_depth else "")
        + f"; llama.cpp: llama-bench from the llama-cpp-python {args.llama_version} sdist, native build.",
        "",
        f"A decoded token reads {act / 1e9:.3f} GB of weights ("
        + ", ".join(f"{g} {b / 1e9:.3f}" for g, b in model_info["by_group"].items() if b >= 1e6)
        + "). Read bandwidth: "
        + ", ".join(f"{b['threads']} thread{'s' if b['threads'] > 1 else ''} {b['gbps']:.1f} GB/s "
                    f"({b['gbps_min']:.1f}-{b['gbps_max']:.1f})" for b in bw.values())
        + " -> decode roofline "
        + ", ".join(f"{b['gbps'] * 1e9 / act:.1f} tok/s @ {t}t" for t, b in bw.items())
        + f". A prompt token takes {macs / 1e9:.3f} GMAC; int8 peak ("
        + f"{next(iter(peaks.values()))['instructions']}): "
        + ", ".join(f"{pk['gmacs']:.0f} GMAC/s @ {t}t" for t, pk in peaks.items())
        + " -> prefill roofline "
        + ", ".join(f"{pk['gmacs'] * 1e9 / macs:.0f} tok/s @ {t}t" for t, pk in peaks.items())
        + ".",
        "",
        "| threads | test | llama.cpp t/s | lfm-edge t/s (min-max) | lfm-edge / llama.cpp | % of roofline: llama.cpp / lfm-edge |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        roofs = {"pp": peaks[r["threads"]]["gmacs"] * 1e9 / macs, "tg": bw[r["threads"]]["gbps"] * 1e9 / act}
        for test, label in (("pp", f"pp{args.n_prompt}"), ("tg", f"tg{args.n_gen}"),
                            ("tg_depth", f"tg{args.n_gen} @ d{args.ctx_depth}")):
            ll, ours = r["llama"].get(test), r["lfm"].get(test)
            if ll is None and ours is None:
                continue
            ll_s = (f"{ll['avg_ts']:.2f} ± {ll['stddev_ts']:.2f}" + (f" ({r['llama_config']})" if r["llama_config"] else "")
                    if ll else r["llama_error"] or "n/a")
            ours_s = (f"{ours['tps']:.2f} ({ours['min']:.2f}-{ours['max']:.2f})" if ours else r["lfm_error"] or "n/a")
            ratio = fmt(ours["tps"] / ll["avg_ts"], 3) if ll and ours else "n/a"
            roof = roofs[test[:2]]
            pct = (f"{100 * ll['avg_ts'] / roof:.0f}%" if ll else "n/a") + " / " + \
                  (f"{100 * ours['tps'] / roof:.1f}%" if ours else "n/a")
            out.append(f"| {r['threads']} | {label} | {ll_s} | {ours_s} | {ratio} | {pct} |")
    out += [
        "",
        (
            f"| threads | TTFT {args.n_prompt} tok: lfm-edge | TTFT: llama.cpp (p / pp t/s) | load s: lfm-edge | "
            "peak RSS MB: lfm-edge | peak RSS MB: llama-bench | file MB |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lfm, ll = r["lfm_raw"], r["llama"].get("pp")
        ttft_ll = f"{args.n_prompt / ll['avg_ts']:.2f} s" if ll else "n/a"
        ttft = f"{lfm['ttft_s']:.2f} s" if lfm.get("ttft_s") is not None else "n/a"
        rss_l = f"{r['lfm_rss']:.0f} ({r['lfm_rss'] / size_mb:.2f}x)" if r["lfm_rss"] else "n/a"
        rss_ll = f"{r['llama_rss']:.0f} ({r['llama_rss'] / size_mb:.2f}x)" if r["llama_rss"] else "n/a"
        load = fmt(lfm.get("load_s")) + (" (weight cache)" if lfm.get("weights") == "cache" else "")
        out.append(f"| {r['threads']} | {ttft} | {ttft_ll} | {load} | {rss_l} | {rss_ll} | {size_mb:.0f} |")
    out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a GGUF file both can load")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-d", "--ctx-depth", type=int, default=0, help="also measure tg after this many tokens")
    p.add_argument("--np", type=int, nargs="+",
                   help="compare decoding this many sequences at once (e.g. --np 1 2 4 8) with llama-batched-bench "
                        "instead: -d is each sequence's prompt (default 128 here), -n the tokens each decodes")
    p.add_argument("--llama-bench", type=Path, help="a llama-bench binary (default: build it)")
    p.add_argument("--llama-batched-bench", type=Path, help="a llama-batched-bench binary, for --np (default: build it)")
    p.add_argument("--llama-bench-no-amx", type=Path,
                   help="a llama-bench built without AMX, tried if the first crashes (default: build it then)")
    p.add_argument("--no-build", action="store_true", help="never build llama-bench variants")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed per benchmark process")
    p.add_argument("--json-out", type=Path, help="also write every raw result here")
    p.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer of the bandwidth probe (MiB)")
    p.add_argument("--wait-idle", type=float, default=600,
                   help="before each run wait up to this many seconds for other processes to leave the CPU "
                        "(default 600; 0: do not wait)")
    args = p.parse_args(argv)
    if not Path(args.model).is_file():
        p.error(f"{args.model}: no such file")
    args.llama_version = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
    if args.np:
        if min(args.np) < 1 or args.n_gen < 1:
            p.error("--np takes sequence counts >= 1, and -n must be at least 1")
        args.np = list(dict.fromkeys(args.np))
        args.ctx_depth = args.ctx_depth or 128
        args.llama_batched_bench = args.llama_batched_bench or build_llama_bench(target="llama-batched-bench")
        if args.llama_batched_bench is None:
            p.error("could not build llama-batched-bench; see bench/build_llama_bench.sh or pass --llama-batched-bench")
        return main_batched(args)
    args.llama_bench = args.llama_bench or build_llama_bench()
    if args.llama_bench is None:
        p.error("could not build llama-bench; see bench/build_llama_bench.sh or pass --llama-bench")

    notes = []

    def quiet(what: str) -> str:
        busy = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
        print(f"{what} ... (CPU {busy:.0%} busy before)", file=sys.stderr)
        return f"{busy:.0%} busy before"

    def noise(what: str, before: str, proc: Proc) -> None:
        notes.append(f"{what}: {proc.seconds:.0f} s; other processes used {proc.others_cpu:.0%} of the CPU "
                     f"during it ({before})")

    model_info = bandwidth.active_bytes(args.model)
    bw = {}
    for t in args.threads:
        before = quiet(f"bandwidth probe, {t} thread(s)")
        bw[t] = bandwidth.measure(t, args.bandwidth_mb)
        bw[t]["busy_before"] = before
    peaks = {}
    for t in args.threads:
        before = quiet(f"int8 peak probe, {t} thread(s)")
        peaks[t] = probes.int8_peak(t)
        peaks[t]["busy_before"] = before
    rows, raw = [], {"bandwidth": bw, "int8_peak": peaks, "model": model_info, "runs": []}
    for t in args.threads:
        row = {"threads": t, "llama": {}, "lfm": {}, "lfm_raw": {}, "llama_error": None, "lfm_error": None,
               "llama_config": None, "llama_rss": None, "lfm_rss": None}
        failures = []
        for label, binary, repack in llama_configs(args):
            before = quiet(f"[{t} thread(s)] llama-bench {label}")
            tests, proc = run_llama(binary, args, t, repack)
            if proc.returncode == 0:
                row["llama_config"] = label
                break
            failures.append(f"{label or 'native build (AMX)'} {describe_failure(proc)}")
        if failures:
            row["llama_error"] = "; ".join(failures)
            notes.append(f"llama-bench -t {t}: {row['llama_error']}"
                         + (f"; its numbers are from the {row['llama_config']} run" if proc.returncode == 0 else ""))
        if proc.returncode == 0:
            noise(f"llama-bench -t {t} {row['llama_config']}".rstrip(), before, proc)
        row["llama"], row["llama_rss"] = tests, proc.rss_mb if proc.returncode == 0 else None
        raw["runs"].append({"threads": t, "tool": "llama-bench", "config": row["llama_config"], "tests": tests,
                            "rss_mb": proc.rss_mb, "others_cpu": proc.others_cpu, "error": row["llama_error"]})

        before = quiet(f"[{t} thread(s)] lfm-edge bench")
        res, proc = run_lfm_edge(args, t, 0)
        if proc.returncode != 0:
            row["lfm_error"] = describe_failure(proc)
        else:
            row["lfm_raw"], row["lfm_rss"] = res, proc.rss_mb
            if res.get("pp_tps") is not None:
                row["lfm"]["pp"] = {"tps": res["pp_tps"], "min": res["pp_tps_min"], "max": res["pp_tps_max"]}
            if res.get("tg_tps") is not None:
                row["lfm"]["tg"] = {"tps": res["tg_tps"], "min": res["tg_tps_min"], "max": res["tg_tps_max"]}
            noise(f"lfm-edge -t {t} (ISA {res['isa']}, kernel threads {res.get('kernel_threads')}, KV cache "
                  f"{res.get('kv_cache_type')})", before, proc)
            if res.get("tg_overhead") is not None:
                notes.append(f"lfm-edge -t {t}: {100 * res['tg_overhead']:.1f}% of a decode step outside the kernels")
        raw["runs"].append({"threads": t, "tool": "lfm-edge", "result": res, "rss_mb": proc.rss_mb,
                            "others_cpu": proc.others_cpu, "error": row["lfm_error"]})
        if args.ctx_depth:
            before = quiet(f"[{t} thread(s)] lfm-edge bench at depth {args.ctx_depth}")
            res, proc = run_lfm_edge(args, t, args.ctx_depth)
            if proc.returncode == 0 and res.get("tg_tps") is not None:
                row["lfm"]["tg_depth"] = {"tps": res["tg_tps"], "min": res["tg_tps_min"], "max": res["tg_tps_max"]}
                noise(f"lfm-edge -t {t} -d {args.ctx_depth}", before, proc)
            raw["runs"].append({"threads": t, "tool": "lfm-edge", "depth": args.ctx_depth, "result": res,
                                "others_cpu": proc.others_cpu})
        rows.append(row)
    notes.append(f"load average (1/5/15 min) at the end: {loadavg()}")
    text = report(args, model_info, bw, peaks, rows, notes)
    print(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
