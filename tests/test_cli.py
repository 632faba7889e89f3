"""`lfm-edge run` and `lfm-edge chat` as a user drives them."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lfm_edge
from lfm_edge.commands.chat import ReplyView
from lfm_edge.reply import ReplyParser
from test_reply import CALL_END, CALL_START, IDS, TEXT_THINK, THINK_TEMPLATE, rewrite


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_edge", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def model(gguf_path):
    return str(gguf_path("moe", "q8_0"))


def test_run_prints_the_chat_reply(model):
    proc = cli("run", "-m", model, "Hello there", "-n", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    llm = lfm_edge.load(model)
    messages = [{"role": "user", "content": "Hello there"}]
    expected = llm.chat(messages, stream=False, max_tokens=12, temperature=0.0, repetition_penalty=1.05, min_p=0.15)
    assert proc.stdout == expected + "\n"


def test_run_json_and_stdin(model):
    proc = cli("run", "-m", model, "-", "-n", "6", "--seed", "1", "--json", stdin="Tell me a story")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["completion_tokens"] <= 6 and record["prompt_tokens"] > 5
    assert record["finish_reason"] in ("length", "stop")
    assert record["sampling"] == {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05, "seed": 1}
    assert record["ttft_s"] > 0 and record["load_s"] > 0
    again = json.loads(cli("run", "-m", model, "-", "-n", "6", "--seed", "1", "--json", stdin="Tell me a story").stdout)
    assert again["text"] == record["text"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "-m", "missing.gguf", "hi"], "missing.gguf: no such file"),
        (["run", "-m", "MODEL", "hi", "--min-p", "2"], "min_p must be in [0, 1]"),
        (["run", "-m", "MODEL", "   "], "the prompt is empty"),
        (["run", "-m", "MODEL", "hi", "-c", "8"], "context holds 8"),
    ],
)
def test_run_errors_are_one_sentence(model, args, message):
    proc = cli(*[model if a == "MODEL" else a for a in args])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_bad_flag(model):
    proc = cli("run", "-m", model, "hi", "--temperature", "warm")
    assert proc.returncode == 2 and "invalid float value" in proc.stderr


def test_chat_commands_over_a_pipe(model, tmp_path):
    save = tmp_path / "conv.json"
    script = "\n".join(
        [
            "/set temperature 0",
            "/set max_tokens 6",
            "/system You are terse.",
            "Hello",
            '"""first line',
            'second line"""',
            "/stats",
            f"/save {save}",
            "/set bogus 1",
            "/clear",
            "/exit",
        ]
    )
    proc = cli("chat", "-m", model, stdin=script + "\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "temperature = 0.0" in out and "max_tokens = 6" in out and "system prompt set" in out
    assert "6 generated" in out and "error: unknown setting 'bogus'" in out
    data = json.loads(save.read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][3]["content"] == "first line\nsecond line"
    assert data["sampling"]["temperature"] == 0.0
    # and /load brings it back
    proc = cli("chat", "-m", model, stdin=f"/load {save}\n/exit\n")
    assert "loaded 5 messages" in proc.stdout


def test_ctrl_c_stops_the_reply_but_not_the_chat(model):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable, ["-m", "lfm_edge", "chat", "-m", model, "-n", "100000", "--temperature", "1"],
        timeout=60, encoding="utf-8",
    )
    try:
        child.expect(">>> ")
        child.sendline("Tell me everything")
        child.expect_exact("everything\r\n")  # the terminal's echo of the line
        child.expect(".", timeout=30)  # the first piece of the reply
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("finish: cancelled")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def render(parts, show_reasoning=False, color=False, markers=TEXT_THINK, prompt=""):
    """What chat shows for a reply made of `parts` (str: text, int: a token id)."""
    out = io.StringIO()
    view = ReplyView(out, show_reasoning, color)
    parser = ReplyParser(markers, prompt=prompt)
    for p in parts:
        for event in parser.feed(p, "") if isinstance(p, int) else parser.feed(None, p):
            view.feed(event)
    for event in parser.finish():
        view.feed(event)
    view.finish()
    return out.getvalue()


def test_reasoning_is_hidden_or_dimmed_even_when_split_across_pieces():
    pieces = ["<th", "ink>let me ", "think</th", "ink>The answer", " is 4."]
    assert render(pieces) == "The answer is 4.\n"
    assert render(pieces, show_reasoning=True, color=True) == "\x1b[2mlet me think\x1b[0mThe answer is 4.\n"
    assert render(pieces, show_reasoning=True) == "[thinking] let me think\n[/thinking]\nThe answer is 4.\n"
    # only at the start of a reply
    assert render(["Yes, <think> is a tag."], show_reasoning=True) == "Yes, <think> is a tag.\n"
    # opened by the prompt, cut off before it closes
    assert render(["still thinking"], show_reasoning=True, color=True, prompt="<think>") == "\x1b[2mstill thinking\x1b[0m\n"
    assert render(["still thinking"], prompt="<think>") == "\n"


def test_tool_calls_are_shown_as_calls():
    parts = ["Checking.", CALL_START, '[get_weather(city="Paris", days=2)]', CALL_END]
    assert render(parts, markers=IDS) == "Checking.\n→ tool call: get_weather(city='Paris', days=2)\n"


CANNED_RUN = """
import sys
from lfm_edge.engine import Engine

SAID = sys.argv.pop(1)


def next_token(self, request, logits):
    if not hasattr(request, "canned"):
        request.canned = iter(self.llm.tokenize(SAID, add_special=False) + [self.llm.tokenizer.eos_id])
    return next(request.canned)

Engine.next_token = next_token  # the model 'says' argv[1], then ends
from lfm_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def canned(reply: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CANNED_RUN, reply, *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def think_model(model, tmp_path_factory):
    """The tiny model with a template whose generation prompt ends in <think> (LFM2.5-2.6B's habit)."""
    return str(rewrite(Path(model), tmp_path_factory.mktemp("think") / "think.gguf", template=THINK_TEMPLATE))


def test_chat_and_run_split_a_reply_that_starts_inside_reasoning(think_model):
    said = "I should think.</think>The answer is 4."
    record = json.loads(canned(said, "run", "-m", think_model, "What is 2+2?", "--json").stdout)
    assert (record["reasoning"], record["content"], record["text"]) == ("I should think.", "The answer is 4.", "The answer is 4.")
    assert canned(said, "run", "-m", think_model, "What is 2+2?").stdout == "The answer is 4.\n"
    shown = canned(said, "run", "-m", think_model, "What is 2+2?", "--show-reasoning").stdout
    assert shown == "[thinking] I should think.\n[/thinking]\nThe answer is 4.\n"
    chat = canned(said, "chat", "-m", think_model, "--show-reasoning", stdin="What is 2+2?\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith(shown)
    hidden = canned(said, "chat", "-m", think_model, stdin="What is 2+2?\n/exit\n").stdout
    assert hidden.startswith("The answer is 4.\n") and "think" not in hidden
    # a tool call after the reasoning
    said = 'Use the tool.</think><|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    record = json.loads(canned(said, "run", "-m", think_model, "Weather?", "--json").stdout)
    assert record["reasoning"] == "Use the tool." and record["content"] == ""
    assert record["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


def test_chat_and_run_json_agree_on_a_real_generation(think_model):
    args = ("-m", think_model, "-n", "12", "--temperature", "0")
    record = json.loads(cli("run", *args, "Hello there", "--json").stdout)
    assert record["reasoning"]  # the prompt opened it
    shown = cli("chat", *args, "--show-reasoning", stdin="Hello there\n/exit\n").stdout
    expected = "[thinking] " + record["reasoning"] + "\n[/thinking]\n" + record["content"] + "\n"
    assert shown.startswith(expected) if record["content"] else shown.startswith(expected[: -len("\n")])


def test_demo_model_is_labelled_and_runs(tmp_path):
    out = tmp_path / "demo.gguf"
    proc = cli("demo-model", str(out), "--type", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stdout and out.stat().st_size > 100_000
    llm = lfm_edge.load(out)
    assert llm.file.metadata["lfm_edge.demo"] is True
    assert "random weights" in llm.file.metadata["general.name"]
    run = cli("run", "-m", str(out), "Hello", "-n", "4")
    assert run.returncode == 0 and "demo model with random weights" in run.stderr
    bad = cli("demo-model", str(tmp_path / "no" / "such" / "dir.gguf"))
    assert bad.returncode == 1 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr


def test_hub_reference_offline_and_cached(model, tmp_path):
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lfm_edge", *a], capture_output=True, text=True, timeout=120, env=env
    )
    # nothing cached and no network: one sentence that says how to get a model
    proc = run("run", "hi")  # the default model, LiquidAI/LFM2-8B-A1B-GGUF (Q4_0)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "LiquidAI/LFM2-8B-A1B-GGUF:Q4_0 is not in the local Hugging Face cache" in proc.stderr
    assert "huggingface-cli download" in proc.stderr and "demo-model" in proc.stderr
    # a file in the Hugging Face cache layout is found offline, by quantization
    repo = tmp_path / "hf" / "hub" / "models--LiquidAI--LFM2-8B-A1B-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "LFM2-8B-A1B-Q8_0.gguf").symlink_to(model)
    proc = run("run", "-m", "LiquidAI/LFM2-8B-A1B-GGUF:Q8_0", "hi", "-n", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"].endswith("LFM2-8B-A1B-Q8_0.gguf")
    assert "is not in the local" in run("run", "-m", "LiquidAI/LFM2-8B-A1B-GGUF", "hi").stderr  # no Q4_0 there


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_llama_cpp_spellings_of_the_flags(model):
    ours = cli("run", "-m", model, "Tell me", "-n", "5", "--temperature", "0", "--repetition-penalty", "1.2",
               "--seed", "3", "--n-ctx", "256", "--json")
    theirs = cli("run", "-m", model, "-p", "Tell me", "-n", "5", "--temp", "0", "--repeat-penalty", "1.2",
                 "-s", "3", "--ctx-size", "256", "--json")
    assert ours.returncode == theirs.returncode == 0, theirs.stderr
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert b["sampling"] == {"temperature": 0.0, "min_p": 0.15, "repetition_penalty": 1.2, "seed": 3}
    assert a["text"] == b["text"] and a["prompt_tokens"] == b["prompt_tokens"]
    # -s is the seed, not a system prompt: the prompt has no system turn; --system adds one
    system = json.loads(cli("run", "-m", model, "-p", "Tell me", "-n", "1", "--system", "Be brief.", "--json").stdout)
    assert system["prompt_tokens"] > b["prompt_tokens"]
    # a context too small for the prompt, through -c
    assert "context holds 8" in one_line_error(cli("run", "-m", model, "Tell me", "-c", "8"))


def test_gpu_flags_get_a_sentence_and_are_ignored(model):
    proc = cli("run", "-m", model, "-p", "Hi", "-n", "2", "-ngl", "99")
    assert proc.returncode == 0, proc.stderr
    assert "lfm-edge runs on the CPU only; -ngl is ignored" in proc.stderr
    proc = cli("bench", "-m", model, "-p", "4", "-n", "0", "-r", "1", "--n-gpu-layers", "0", "-o", "jsonl")
    assert proc.returncode == 0 and "runs on the CPU only; --n-gpu-layers is ignored" in proc.stderr


def test_info_takes_the_model_as_an_argument_or_with_m(model):
    positional, flag = cli("info", model), cli("info", "-m", model)
    assert positional.returncode == flag.returncode == 0, flag.stderr
    assert positional.stdout == flag.stdout and "arch:        lfm2moe" in flag.stdout
    assert "info needs a model" in one_line_error(cli("info"))


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["serve", "--port", "99999"], 2, ["--port", "0 to 65535", "see lfm-edge serve --help"]),
        (["serve", "--port", "-1"], 2, ["--port", "0 to 65535"]),
        (["serve", "--port", "http"], 2, ["--port", "must be an integer"]),
        (["serve", "-np", "0"], 2, ["-np/--parallel", "must be a positive integer"]),
        (["serve", "--max-queue", "-1"], 2, ["--max-queue", "must be >= 0"]),
        (["run", "-m", "MODEL", "hi", "-n", "-1"], 2, ["-n/--max-tokens", ">= 0", "see lfm-edge run --help"]),
        (["run", "-m", "MODEL", "hi", "-c", "-5"], 2, ["-c/--ctx-size", "positive"]),
        (["chat", "-m", "MODEL", "-c", "0"], 2, ["-c/--ctx-size", "positive"]),
        (["run", "-m", "MODEL", "hi", "-t", "100000"], 2, ["-t/--threads", "100000 threads"]),
        (["run", "-m", "MODEL", "hi", "-t", "0"], 2, ["-t/--threads"]),
        (["run", "-m", "MODEL", "hi", "--top-k", "-3"], 1, ["top_k must be >= 0"]),
        (["run", "-m", "MODEL", "hi", "--temperature", "warm"], 2, ["invalid float value: 'warm'", "see lfm-edge run --help"]),
        (["run", "-m", "MODEL", "hi", "--bogus"], 2, ["unrecognized arguments: --bogus", "see lfm-edge run --help"]),
        (["run", "-m", "/", "hi"], 1, ["/: is a directory"]),
        (["info", "/"], 1, ["/: is a directory"]),
        (["serve", "-m", "/", "--port", "0"], 1, ["/: is a directory"]),
        (["run", "-m", "MODEL"], 1, ["no prompt"]),
        (["run", "-m", "MODEL", "hi", "-p", "there"], 1, ["two prompts"]),
        (["frobnicate"], 2, ["invalid choice: 'frobnicate'", "see lfm-edge --help"]),
    ],
)
def test_bad_flag_values_are_one_line_without_traceback(model, args, code, words):
    line = one_line_error(cli(*[model if a == "MODEL" else a for a in args]), code)
    for w in words:
        assert w in line, line


def test_a_fifo_as_the_model_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for command in (["run", "-m", str(fifo), "hi"], ["info", str(fifo)], ["bench", "-m", str(fifo)]):
        line = one_line_error(cli(*command))  # cli() times out if anything opens the pipe
        assert "is not a regular file" in line, line


def test_serve_checks_the_port_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist: had it been loaded first, that would be the error
        line = one_line_error(cli("serve", "-m", "/nonexistent/model.gguf", "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


def test_chat_save_refuses_missing_folders_and_load_reports_replaced_settings(model, tmp_path):
    save = tmp_path / "c.json"
    script = [f"/save {tmp_path}/no/such/c.json", "/set temperature 0", "/set max_tokens 4", "Hi", f"/save {save}",
              "/set temperature 0.7", f"/load {save}", "/exit"]
    proc = cli("chat", "-m", model, stdin="\n".join(script) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert f"error: there is no folder {tmp_path}/no/such; create it first" in proc.stdout
    assert not (tmp_path / "no").exists()
    assert "loaded 2 messages" in proc.stdout
    assert "the file's settings replace the current ones: temperature 0.7 -> 0.0" in proc.stdout


def test_hub_references_for_bench_and_info(model, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    snap = tmp_path / "hf" / "hub" / "models--LiquidAI--LFM2-8B-A1B-GGUF" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    (snap / "LFM2-8B-A1B-Q8_0.gguf").symlink_to(model)
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lfm_edge", *a], capture_output=True, text=True, timeout=120, env=env
    )
    info = run("info", "-m", "LiquidAI/LFM2-8B-A1B-GGUF:Q8_0")
    assert info.returncode == 0 and "LFM2-8B-A1B-Q8_0.gguf" in info.stdout, info.stderr
    bench = run("bench", "-m", "LiquidAI/LFM2-8B-A1B-GGUF:Q8_0", "-p", "4", "-n", "0", "-r", "1", "-o", "jsonl")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["model_filename"].endswith("LFM2-8B-A1B-Q8_0.gguf")


def test_a_source_folder_without_kernels_says_what_to_do(tmp_path):
    from lfm_edge.native import missing_extension

    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "csrc").mkdir()
    package = tmp_path / "lfm_edge"
    package.mkdir()
    message = str(missing_extension(ImportError("No module named 'lfm_edge._C'"), package))
    assert f"source folder {tmp_path}" in message and "`pip install -e .`" in message and "another folder" in message
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # built, but does not load
    message = str(missing_extension(ImportError("undefined symbol: foo"), package))
    assert "undefined symbol: foo" in message and "pip install -e" not in message and "`pip install .`" in message
