"""`lfm-edge chat` in a pseudo-terminal, as a person types into it: line editing, history,
pasting, Ctrl-D, and a conversation that outgrows its context."""

from __future__ import annotations

import json
import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

UP = "\x1b[A"
NOTE = "note: the conversation outgrew the 256-token context"


@pytest.fixture(scope="module")
def model(gguf_path):
    return str(gguf_path("moe", "q8_0"))


@pytest.fixture
def data_home(tmp_path):
    return tmp_path / "data"


def spawn(model, data_home, *args):
    env = {**os.environ, "XDG_DATA_HOME": str(data_home), "TERM": "xterm"}
    child = pexpect.spawn(
        sys.executable, ["-m", "lfm_edge", "chat", "-m", model, *args],
        env=env, timeout=90, encoding="utf-8", dimensions=(40, 2000),
    )
    child.expect_exact(">>> ")
    return child


def user_messages(path) -> list[str]:
    return [m["content"] for m in json.loads(path.read_text())["messages"] if m["role"] == "user"]


def leave(child) -> str:
    """Ctrl-D on an empty line: the chat ends, on a line of its own."""
    child.sendeof()
    child.expect(pexpect.EOF)
    rest = child.before
    child.close()
    assert child.exitstatus == 0
    return rest


def test_a_long_chat_keeps_going_past_the_context_and_up_recalls(model, data_home, tmp_path):
    # replies of up to 60 tokens in a 256-token context: the third or fourth turn no longer fits
    child = spawn(model, data_home, "-c", "256", "-n", "60", "--temperature", "1", "--seed", "3",
                  "--system", "You are terse.")
    out = []
    try:
        for i in range(8):
            child.sendline(f"Tell me the long story number {i}, please")
            child.expect_exact(">>> ")
            out.append(child.before)
        child.send(UP + UP)  # the message before the last comes back, to be sent again with Enter
        child.send("\r")
        child.expect_exact(">>> ")
        out.append(child.before)
        child.sendline("/stats")
        child.expect_exact(">>> ")
        out.append(child.before)
        save = tmp_path / "chat.json"
        child.sendline(f"/save {save}")
        child.expect_exact(">>> ")
        rest = leave(child)
    finally:
        child.close(force=True)
    text = "".join(out)
    assert "error" not in text and "does not fit" not in text
    assert text.count(NOTE) == 1, text  # told once, in one line, with what to do
    note = next(line for line in text.splitlines() if NOTE in line)
    assert "/clear" in note and "-c/--ctx-size" in note
    assert "generated" in out[-1] and "finish:" in out[-1]
    data = json.loads(save.read_text())
    assert data["messages"][0] == {"role": "system", "content": "You are terse."}  # the system prompt is kept
    users = user_messages(save)
    assert len(users) < 9  # the oldest turns were dropped ...
    assert users[-1] == "Tell me the long story number 6, please"  # ... the newest kept: Up, Up recalled it
    assert rest.strip() == "" and rest.endswith("\n")  # Ctrl-D: a newline, not the shell prompt after ">>> "


def test_history_is_kept_across_chats(model, data_home, tmp_path):
    child = spawn(model, data_home, "-n", "3")
    child.sendline("what is a nematode?")
    child.expect_exact(">>> ")
    leave(child)
    history = data_home / "lfm-edge" / "chat_history"
    assert "what is a nematode?" in history.read_text()
    child = spawn(model, data_home, "-n", "3")
    save = tmp_path / "again.json"
    try:
        child.send(UP)
        child.send("\r")
        child.expect_exact(">>> ")
        child.sendline(f"/save {save}")
        child.expect_exact(">>> ")
        leave(child)
    finally:
        child.close(force=True)
    assert user_messages(save) == ["what is a nematode?"]


def test_a_pasted_block_is_one_message(model, data_home, tmp_path):
    child = spawn(model, data_home, "-n", "3")
    save = tmp_path / "paste.json"
    try:
        child.send("first pasted line\nsecond pasted line\nthird\n")  # one write, as a terminal pastes
        child.expect_exact(">>> ")
        shown = child.before
        child.sendline(f"/save {save}")
        child.expect_exact(">>> ")
        leave(child)
    finally:
        child.close(force=True)
    assert user_messages(save) == ["first pasted line\nsecond pasted line\nthird"]
    assert "..." not in shown


def test_a_message_longer_than_the_context_is_one_sentence_and_the_chat_goes_on(model, data_home):
    child = spawn(model, data_home, "-c", "64", "-n", "3")
    try:
        child.sendline("word " * 100)
        child.expect_exact(">>> ")
        said = child.before
        child.sendline("Hi")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect_exact(">>> ")
        stats = child.before
        leave(child)
    finally:
        child.close(force=True)
    error = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "more than the whole 64-token context" in error[0] and "-c/--ctx-size" in error[0]
    assert "Traceback" not in said
    assert "generated" in stats and "finish:" in stats  # the next message was answered
