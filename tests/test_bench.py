"""The benchmark harness: `lfm-edge bench`, bench/make_synthetic.py, bench/bandwidth.py, bench/compare.py.

The synthetic file here is the real LFM2-8B-A1B cut to its first 3 layers (a dense conv layer, a
dense conv layer, an attention + MoE layer): every tensor kind at full width, ~350 MB, written once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lfm_edge
from lfm_edge import native, ops

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bandwidth
import make_synthetic

REQUIRED = ("pp_tps", "tg_tps", "load_s", "rss_mb", "isa", "threads", "ttft_s", "model", "n_prompt", "n_gen",
            "pp_tps_min", "pp_tps_max", "tg_tps_min", "tg_tps_max")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_edge", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "lfm2-8b-a1b-3layers-q4_0.gguf"
    proc = subprocess.run([sys.executable, str(BENCH / "make_synthetic.py"), str(out), "--layers", "3", "-q"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def synthetic_llm(synthetic):
    return lfm_edge.load(synthetic, n_ctx=64)


def test_synthetic_file_has_the_real_shapes_and_metadata(synthetic, synthetic_llm):
    a = synthetic_llm.args
    assert (a.hidden, a.n_head, a.head_dim, a.n_vocab, a.n_ctx_train) == (2048, 32, 64, 65536, 32768)
    assert (a.n_expert, a.n_expert_used, a.expert_ffn_dim, a.n_dense_layers, a.ffn_dim) == (32, 4, 1792, 2, 7168)
    assert [a.is_attention(i) for i in range(a.n_layer)] == [False, False, True]
    assert a.rope_base == 1e6 and a.conv_kernel == 3
    f = synthetic_llm.file
    assert f.tensors["blk.2.ffn_gate_exps.weight"].shape == (32, 1792, 2048)
    assert f.tensors["blk.2.ffn_down_exps.weight"].shape == (32, 2048, 1792)
    assert f.tensors["token_embd.weight"].qtype.name == "Q4_0" and "output.weight" not in f.tensors
    # every byte is a planned tensor: the writer streamed exactly what plan() promised
    cfg = make_synthetic.Config(**{**make_synthetic.MODELS["lfm2-8b-a1b"].__dict__, "n_layer": 3,
                                   "attention_layers": (2,)})
    planned = make_synthetic.plan(cfg, make_synthetic.TYPES["q4_0"][0])
    assert {s.name: s.shape for s in planned} == {n: t.shape for n, t in f.tensors.items()}


@pytest.mark.parametrize("out_type", [t for t in make_synthetic.TYPES if t not in ("q4_0", "q8_0")])
def test_synthetic_blocks_of_every_type_have_the_intended_scale(out_type):
    # the other --type choices: valid blocks of that type whose weights have RMS GAIN/sqrt(K)
    import gguf.quants as gguf_quants

    qtype = make_synthetic.TYPES[out_type][0]
    spec = make_synthetic.Spec("blk.0.ffn_down.weight", (64, 1792), qtype, "matrix")
    raw = make_synthetic.random_blocks(np.random.default_rng(3), spec)
    assert raw.nbytes == spec.nbytes
    w = gguf_quants.dequantize(raw.reshape(64, -1), qtype).reshape(64, 1792).astype(np.float64)
    rms, expected = float(np.sqrt(np.mean(w**2))), make_synthetic.GAIN / np.sqrt(1792)
    assert 0.8 * expected < rms < 1.25 * expected, (out_type, rms, expected)


def test_synthetic_weights_have_the_intended_scale(synthetic_llm):
    # std GAIN/sqrt(K) keeps every matrix's output O(1) through 24 layers
    for name in ("blk.2.attn_q.weight", "blk.0.ffn_down.weight"):
        w = synthetic_llm.file.tensors[name]
        std = float(ops.to_float(w).std())
        expected = make_synthetic.GAIN / np.sqrt(w.n_cols)
        assert 0.8 * expected < std < 1.25 * expected, (name, std, expected)


def test_synthetic_tokenizer_and_chat_template(synthetic_llm):
    tok = synthetic_llm.tokenizer
    assert tok.bos_id == 1 and tok.eos_id == 7
    assert [tok.decode([i]) for i in range(14)] == make_synthetic.SPECIAL_TOKENS
    text = "Hello world, the quick brown fox 123 !?"
    ids = synthetic_llm.tokenize(text)
    assert ids[0] == 1 and synthetic_llm.detokenize(ids[1:]) == text
    assert len(ids) < len(text)  # the merges are used, not just bytes
    chat = synthetic_llm.chat_tokens([{"role": "user", "content": "Hi"}])
    assert chat[:2] == [1, 6] and chat.count(1) == 1  # <|startoftext|><|im_start|>, one BOS


@pytest.fixture(scope="module")
def synthetic_lfm25(tmp_path_factory) -> Path:
    """LFM2.5-8B-A1B cut to its first layer: its vocabulary (specials at the end) and its template."""
    out = tmp_path_factory.mktemp("synthetic") / "lfm2.5-8b-a1b-1layer-q4_0.gguf"
    proc = subprocess.run([sys.executable, str(BENCH / "make_synthetic.py"), str(out), "--model", "lfm2.5-8b-a1b",
                           "--layers", "1", "-q"], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_synthetic_lfm25_has_the_published_vocabulary_and_template(synthetic_lfm25):
    llm = lfm_edge.load(synthetic_lfm25, n_ctx=64)
    a, tok = llm.args, llm.tokenizer
    assert (a.n_vocab, a.n_ctx_train, a.rope_base) == (124928, 128000, 5e6)
    assert a.norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    # the published ids of LFM2.5's special tokens
    assert (tok.bos_id, tok.eos_id) == (124894, 124900)
    for text, want in (("<|im_start|>", 124899), ("<think>", 124901), ("</think>", 124902),
                       ("<|tool_call_start|>", 124905), ("<|tool_call_end|>", 124906)):
        assert llm.tokenize(text, add_special=False) == [want], text
    template = (ROOT / "tests" / "golden" / "templates" / "hf-LFM2.5-8B-A1B.jinja").read_text(encoding="utf-8")
    assert llm.file.metadata["tokenizer.chat_template"] == template
    prompt = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.chat_tokens([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [124894, 124899] and ids.count(124894) == 1
    # it runs: `lfm-edge run` on the chat template, greedy, a few tokens
    proc = cli("run", "-m", str(synthetic_lfm25), "-n", "4", "--temp", "0", "Hi")
    assert proc.returncode == 0, proc.stderr


def test_synthetic_merges_are_consistent_with_the_vocabulary():
    cfg = make_synthetic.Config("small", n_vocab=3000)
    tokens, types, merges = make_synthetic.vocabulary(cfg, seed=0)
    assert len(tokens) == len(types) == 3000 and len(set(tokens)) == 3000
    rank = {t: i for i, t in enumerate(tokens)}
    for m in merges:
        a, b = m.split(" ")
        assert rank[a] < rank[a + b] and rank[b] < rank[a + b], m


def test_synthetic_file_runs_with_finite_logits(synthetic_llm):
    cache = synthetic_llm.new_cache()
    logits = synthetic_llm.prefill(synthetic_llm.tokenize("The quick brown fox"), cache)
    assert logits.shape == (65536,) and np.isfinite(logits).all() and logits.std() > 0.05
    step = synthetic_llm.decode_one_token(int(logits.argmax()), cache)
    assert np.isfinite(step).all() and not np.array_equal(step, logits)


def test_synthetic_file_loads_in_llama_cpp(synthetic, synthetic_llm, llama_cpp_plain_buffers):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "Hello world, the quick brown fox <|im_end|>"
    llm = llama_cpp.Llama(model_path=str(synthetic), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert ids == synthetic_llm.tokenize(text)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ours = synthetic_llm.logits(ids)
    assert np.isfinite(theirs).all()
    # random routers sit near ties, so a few expert choices differ; the logits still track each other
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.9


def test_bench_json_has_the_required_keys(gguf_path):
    path = gguf_path("moe", "q4_0")
    proc = cli("bench", "-m", str(path), "-t", "1", "-p", "16", "-n", "4", "-r", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    for key in REQUIRED:
        assert key in r, key
    for key in ("pp_tps", "tg_tps", "load_s", "rss_mb", "ttft_s"):
        assert r[key] > 0, key
    assert r["threads"] == 1 and r["n_prompt"] == 16 and r["n_gen"] == 4 and r["model"] == str(path)
    assert r["isa"] == native.isa()
    assert r["kernel_threads"] in (None, 1)  # -t reaches the kernels' thread pool
    assert len(r["pp_runs"]) == len(r["tg_runs"]) == 2
    assert r["pp_tps_min"] <= r["pp_tps"] <= r["pp_tps_max"]
    assert r["tg_tps_min"] <= r["tg_tps"] <= r["tg_tps_max"]
    assert 0 < r["tg_overhead"] < 1  # Python's share of a decode step: some, never all
    # TTFT is one 16-token prefill: consistent with the pp rate
    assert r["ttft_s"] >= 0.9 * 16 / r["pp_tps_max"]


def md_table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_bench_table_and_context_depth(gguf_path):
    path = gguf_path("moe", "q4_0")
    proc = cli("bench", "-m", str(path), "-p", "0", "-n", "3", "-r", "1", "--ctx-depth", "40")
    assert proc.returncode == 0, proc.stderr
    header, rule, *rows = md_table(proc.stdout)
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]  # llama-bench's columns
    assert [r[5] for r in rows] == ["tg3 @ d40"] and rows[0][0] == "lfm2moe Q4_0" and rows[0][3] == "CPU"
    assert rows[0][6].endswith("± 0.00")  # one run: no spread
    assert "peak RSS" in proc.stdout and "f16 KV cache" in proc.stdout


def test_bench_comma_lists_and_llama_bench_formats(gguf_path):
    path = str(gguf_path("moe", "q4_0"))
    proc = cli("bench", "-m", path, "-t", "1,2", "-p", "8,16", "-n", "2", "-r", "3", "-o", "jsonl")
    assert proc.returncode == 0, proc.stderr
    tests = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(t["n_threads"], t["n_prompt"], t["n_gen"]) for t in tests] == [
        (1, 8, 0), (1, 16, 0), (1, 0, 2), (2, 8, 0), (2, 16, 0), (2, 0, 2)]
    for t in tests:  # llama-bench's fields and their meaning: mean and sample deviation of the runs
        assert len(t["samples_ts"]) == len(t["samples_ns"]) == 3
        tokens = t["n_prompt"] or t["n_gen"]
        assert t["samples_ts"] == pytest.approx([tokens * 1e9 / ns for ns in t["samples_ns"]])
        assert t["avg_ts"] == pytest.approx(np.mean(t["samples_ts"]))
        assert t["stddev_ts"] == pytest.approx(np.std(t["samples_ts"], ddof=1))
        assert t["model_filename"] == path and t["backends"] == "CPU" and t["model_n_params"] > 100_000
    md = md_table(cli("bench", "-m", path, "-t", "1,2", "-p", "8", "-n", "0", "-r", "2").stdout)
    assert [(r[4], r[5]) for r in md[2:]] == [("1", "pp8"), ("2", "pp8")]
    assert all(" ± " in r[6] for r in md[2:])
    whole = json.loads(cli("bench", "-m", path, "-p", "8", "-n", "2", "-r", "1", "-o", "json").stdout)
    assert [t["n_prompt"] for t in whole] == [8, 0] and "avg_ns" in whole[0]
    lines = cli("bench", "-m", path, "-p", "8", "-n", "0", "-r", "1", "-o", "csv").stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith('"model_filename","model_type","model_size","model_n_params"')
    assert '"avg_ts","stddev_ts"' in lines[0]
    # the --json record per configuration stays what bench/compare.py reads
    records = [json.loads(x) for x in cli("bench", "-m", path, "-t", "1,2", "-p", "8", "-n", "2", "-r", "1",
                                          "--json").stdout.splitlines()]
    assert [r["threads"] for r in records] == [1, 2] and all(r["pp_tps"] > 0 and r["tg_tps"] > 0 for r in records)


def test_bench_roofline_gives_each_test_its_share(gguf_path):
    path = gguf_path("moe", "q4_0")
    proc = cli("bench", "-m", str(path), "-t", "1", "-p", "8", "-n", "2", "-r", "1", "--roofline", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    counts = bandwidth.active_bytes(path)
    assert r["int8_peak_gmacs"] > 0 and r["read_gbps"] > 0
    assert r["pp_roofline_share"] == pytest.approx(r["pp_tps"] * counts["prefill_macs"] / (r["int8_peak_gmacs"] * 1e9))
    assert r["tg_roofline_share"] == pytest.approx(r["tg_tps"] * counts["active_bytes"] / (r["read_gbps"] * 1e9))
    # the probe's 1 GiB buffer lives in a child process: this run's own peak (VmHWM) stays far below
    plain = cli("bench", "-m", str(path), "-t", "1", "-p", "8", "-n", "2", "-r", "1", "--json")
    assert r["rss_mb"] < 1024 and r["rss_mb"] < json.loads(plain.stdout)["rss_mb"] + 512
    footer = cli("bench", "-m", str(path), "-t", "1", "-p", "8", "-n", "2", "-r", "1", "--roofline").stdout
    assert re.search(r"1 thread: of the roofline \(pp: int8 peak \d+ GMAC/s, .*\) pp8 \d+%, tg2 \d+%", footer), footer


def test_bench_takes_the_kv_cache_type(gguf_path):
    proc = cli("bench", "-m", str(gguf_path("moe", "q4_0")), "-p", "0", "-n", "2", "-r", "1", "-ctk", "f32", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_cache_type"] == "f32"


def test_bench_parallel_reports_aggregate_and_per_sequence_speed(gguf_path):
    path = str(gguf_path("moe", "q4_0"))
    proc = cli("bench", "-m", path, "-t", "1", "-p", "0", "-n", "6", "-np", "1,3", "-r", "2", "-o", "jsonl")
    assert proc.returncode == 0, proc.stderr
    tests = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(t["n_parallel"], t["n_gen"]) for t in tests] == [(1, 6), (3, 6)]
    for t in tests:  # every sequence makes n tokens in the time of a run: the aggregate is n_parallel times each's rate
        assert t["samples_ts"] == pytest.approx([t["n_parallel"] * 6 * 1e9 / ns for ns in t["samples_ns"]])
        assert t["seq_ts"] == pytest.approx(t["avg_ts"] / t["n_parallel"])
    md = cli("bench", "-m", path, "-t", "1", "-p", "0", "-n", "4", "-np", "2", "-d", "8", "-r", "1").stdout
    assert [r[5] for r in md_table(md)[2:]] == ["tg4 np2 @ d8"]
    assert "1 thread: each sequence's decode speed tg4 np2 @ d8" in md
    records = [json.loads(x) for x in cli("bench", "-m", path, "-t", "1", "-p", "8", "-n", "2", "-np", "1,2", "-r", "1",
                                          "--json").stdout.splitlines()]
    assert [r["n_parallel"] for r in records] == [1, 2] and all(r["pp_tps"] > 0 for r in records)
    assert records[1]["tg_seq_tps"] == pytest.approx(records[1]["tg_tps"] / 2)


def test_bench_ttft_during_decode_reports_the_prompt_and_the_running_stream(gguf_path):
    path = str(gguf_path("moe", "q4_0"))
    proc = cli("bench", "-m", path, "-t", "1", "-p", "40", "-n", "0", "-r", "2", "--ttft-during-decode", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    # the prompt's first token came after the arrival; the running sequence waited at least
    # once between two tokens meanwhile (its gap is measured from the arrival too)
    assert 0 < r["ttft_busy_s"] < 60 and 0 < r["busy_gap_s"] < 60
    md = cli("bench", "-m", path, "-t", "1", "-p", "40", "-n", "0", "-r", "1", "--ttft-during-decode").stdout
    line = next(x for x in md.splitlines() if "arriving while another sequence decodes" in x)
    assert line.startswith("1 thread: time to first token of a prompt arriving while another sequence decodes pp40 ")
    assert "the decoding sequence's longest wait for a token" in line and "(chunks of " in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["-m", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf", "no such file"]),
        ([], ["-m FILE"]),
        (["-m", "MODEL", "-p", "abc"], ["-p/--n-prompt", "'abc'"]),
        (["-m", "MODEL", "-t", "0"], ["-t/--threads", "at least 1"]),
        (["-m", "MODEL", "-r", "-2"], ["-r/--repetitions"]),
        (["-m", "MODEL", "-n", "1.5"], ["-n/--n-gen"]),
        (["-m", "MODEL", "-p", "0", "-n", "0"], ["nothing to measure"]),
        (["-m", "MODEL", "-ctk", "q4"], ["kv_cache_type must be one of f16, f32", "'q4'"]),
        (["-m", "MODEL", "-t", "1,x"], ["-t/--threads", "'x'"]),
        (["-m", "MODEL", "-t", "2,100000"], ["-t/--threads", "100000 threads"]),
        (["-m", "MODEL", "-p", "16,-3"], ["-p/--n-prompt", "at least 0"]),
        (["-m", "MODEL", "-o", "xml"], ["-o/--output", "md, csv, json, jsonl"]),
        (["-m", "MODEL", "-np", "0"], ["-np/--parallel", "at least 1"]),
        (["-m", "MODEL", "-p", "0", "--ttft-during-decode"], ["--ttft-during-decode", "-p N"]),
        (["-m", "/"], ["/: is a directory"]),
        (["-m", "MODEL", "--bogus"], ["unrecognized arguments: --bogus", "see lfm-edge bench --help"]),
    ],
)
def test_bench_bad_arguments_fail_with_one_line(args, words, gguf_path):
    args = [str(gguf_path("moe", "q4_0")) if a == "MODEL" else a for a in args]
    proc = cli("bench", *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_active_bytes_counts_top_k_of_the_experts(synthetic, synthetic_llm):
    act = bandwidth.active_bytes(synthetic)
    tensors = synthetic_llm.file.tensors.values()
    total = sum(t.nbytes for t in tensors)
    experts = sum(t.nbytes for t in tensors if "_exps." in t.name)
    assert act["active_bytes"] == pytest.approx(total - experts * (1 - 4 / 32))
    assert act["by_group"]["experts"] == pytest.approx(experts * 4 / 32)
    assert act["by_group"]["head/embedding"] == synthetic_llm.file.tensors["token_embd.weight"].nbytes  # tied


def test_bandwidth_probe_measures_something():
    b = bandwidth.measure(1, size_mb=64, repeats=2)
    assert len(b["runs"]) == 2 and 0.5 < b["gbps"] < 2000


FAKE_LLAMA_BENCH = """\
#!{python}
import json, os, signal, sys
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
if opt("--repack") == "1":
    os.kill(os.getpid(), signal.SIGSEGV)  # like the AMX path on this machine
t, p, n = int(opt("-t")), int(opt("-p")), int(opt("-n"))
common = dict(backends="CPU", repack=False, n_threads=t, n_depth=0)
print(json.dumps([dict(common, n_prompt=p, n_gen=0, avg_ts=100.0 * t, stddev_ts=1.0),
                  dict(common, n_prompt=0, n_gen=n, avg_ts=20.0 * t, stddev_ts=0.5)]))
"""


def test_compare_reports_both_and_survives_a_llama_cpp_crash(gguf_path, tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--model", str(gguf_path("moe", "q4_0")), "-t", "1",
         "-p", "16", "-n", "4", "-r", "1", "--llama-bench", str(fake), "--no-build", "--wait-idle", "0", "--bandwidth-mb", "64", "--json-out", str(raw)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| 1 | pp16 | 100.00 ± 1.00 (--repack 0) |" in out
    assert "| 1 | tg4 | 20.00 ± 0.50 (--repack 0) |" in out
    assert "crashed (SIGSEGV)" in out
    runs = json.loads(raw.read_text())["runs"]
    ours = next(r["result"] for r in runs if r["tool"] == "lfm-edge")
    row = next(line for line in out.splitlines() if line.startswith("| 1 | tg4 |"))
    # the ratio column is lfm-edge / llama.cpp
    assert f"| {ours['tg_tps'] / 20.0:.3f} |" in row
    # the last column: pp against the int8 peak's roofline, tg against the bandwidth's
    raw_all = json.loads(raw.read_text())
    pp_roof = raw_all["int8_peak"]["1"]["gmacs"] * 1e9 / raw_all["model"]["prefill_macs"]
    pp_row = next(line for line in out.splitlines() if line.startswith("| 1 | pp16 |"))
    assert pp_row.endswith(f"| {100 * 100.0 / pp_roof:.0f}% / {100 * ours['pp_tps'] / pp_roof:.1f}% |")


FAKE_BATCHED_BENCH = """\
#!{python}
import json, sys
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
assert opt("--output-format") == "jsonl" and int(opt("-c")) >= 4 * (int(opt("-npp")) + int(opt("-ntg")))
print("llama_batched_bench: some log line")
for pl in map(int, opt("-npl").split(",")):
    print(json.dumps(dict(pp=int(opt("-npp")), tg=int(opt("-ntg")), pl=pl, n_threads=int(opt("-t")),
                          speed_tg=10.0 * pl ** 0.5, t_tg=1.0)))
"""


def test_compare_np_puts_batched_decode_beside_llama_batched_bench(gguf_path, tmp_path):
    fake = tmp_path / "llama-batched-bench"
    fake.write_text(FAKE_BATCHED_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--model", str(gguf_path("moe", "q4_0")), "-t", "1",
         "--np", "1", "4", "-d", "8", "-n", "4", "-r", "1", "--llama-batched-bench", str(fake), "--wait-idle", "0",
         "--json-out", str(raw)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "each with its own 8-token prompt" in out and "positions 8..11" in out
    ours = next(r["results"] for r in json.loads(raw.read_text())["runs"] if r["tool"] == "lfm-edge")
    rows = {int(line.split("|")[2]): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| 1 | ")}
    assert sorted(rows) == [1, 4]
    for np_, row in rows.items():  # threads, np, llama t/s, ours, ratio, per seq x2, x np1 x2
        mine = ours[str(np_)]
        assert row[2] == f"{10.0 * np_ ** 0.5:.2f}" and row[3] == f"{mine['tg_tps']:.2f}"
        assert row[4] == f"{mine['tg_tps'] / (10.0 * np_ ** 0.5):.3f}"
        assert row[5] == f"{10.0 * np_ ** 0.5 / np_:.2f}" and row[6] == f"{mine['tg_seq_tps']:.2f}"
        assert row[7] == f"{np_ ** 0.5:.2f}" and row[8] == f"{mine['tg_tps'] / ours['1']['tg_tps']:.2f}"


# The dense models' parameter counts as llama.cpp reports them for the real files (llama-bench:
# 354.48 M and 1.17 B), and their SwiGLU widths (block_ff_dim through Lfm2MLP's adjustment).
@pytest.mark.parametrize("model, ffn, params", [("lfm2-350m", 4608, 354_483_968), ("lfm2-1.2b", 8192, 1_170_340_608),
                                                ("lfm2.5-1.2b", 8192, 1_170_340_608)])
def test_synthetic_dense_models_have_the_published_shapes(model, ffn, params):
    cfg = make_synthetic.MODELS[model]
    specs = make_synthetic.plan(cfg, make_synthetic.TYPES["q4_0"][0])
    assert not cfg.moe and cfg.ffn_dim == ffn
    assert sum(int(np.prod(s.shape)) for s in specs) == params
    assert not any("exps" in s.name or "gate_inp" in s.name for s in specs)


def test_synthetic_dense_file_loads_as_lfm2_and_runs(tmp_path):
    out = tmp_path / "lfm2-350m-3layers-q8_0.gguf"  # full width, the first 3 layers: conv, conv, attention
    proc = subprocess.run([sys.executable, str(BENCH / "make_synthetic.py"), str(out), "--model", "lfm2-350m",
                           "--layers", "3", "--type", "q8_0", "-q"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    llm = lfm_edge.load(out, n_ctx=64)
    assert llm.args.arch == "lfm2" and llm.args.hidden == 1024 and llm.args.ffn_dim == 4608
    assert llm.args.n_kv_heads == (0, 0, 8)
    cache = llm.new_cache()
    logits = llm.prefill(llm.tokenize("The quick brown fox"), cache)
    assert logits.shape == (65536,) and np.isfinite(logits).all() and logits.std() > 0.05


def test_compare_reports_each_tools_own_peak_rss():
    """A child started by vfork + exec inherits its parent's peak in ru_maxrss: compare.py reads the
    child's own VmHWM instead, so a small tool run from a big parent is reported small."""
    import compare

    ballast = np.ones(640 << 17)  # 640 MB touched: this process's peak is at least that
    proc = compare.run_measured([sys.executable, "-c", "import time; time.sleep(0.3)"], timeout=60)
    assert proc.returncode == 0
    assert ballast.sum() > 0 and proc.rss_mb < 200
