"""`lfm-edge run` and `lfm-edge chat` as a user drives them."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

import lfm_edge
from lfm_edge.commands.chat import ReplyView


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_edge", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def model(gguf_path):
    return str(gguf_path("moe", "q8_0"))


def test_run_prints_the_chat_reply(model):
    proc = cli("run", "-m", model, "Hello there", "-n", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    llm = lfm_edge.load(model)
    ids = llm.chat_tokens([{"role": "user", "content": "Hello there"}])
    expected = "".join(llm.generate(ids, max_tokens=12, temperature=0.0, repetition_penalty=1.05, min_p=0.15))
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


def render(pieces, show_reasoning=False, color=False):
    out = io.StringIO()
    view = ReplyView(out, show_reasoning, color)
    for p in pieces:
        view.feed(p)
    view.finish()
    return out.getvalue()


def test_reasoning_is_hidden_or_dimmed_even_when_split_across_pieces():
    pieces = ["<th", "ink>let me ", "think</th", "ink>The answer", " is 4."]
    assert render(pieces) == "The answer is 4.\n"
    assert render(pieces, show_reasoning=True, color=True) == "\x1b[2mlet me think\x1b[0mThe answer is 4.\n"


def test_tool_calls_are_shown_as_calls():
    pieces = ["Checking.", "<|tool_call_", 'start|>[get_weather(city="Paris", days=2)]', "<|tool_call_end|>"]
    assert render(pieces) == "Checking.\n→ tool call: get_weather(city='Paris', days=2)\n"


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
