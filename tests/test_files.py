"""lfm_edge.files: every output is written whole, through symlinks, never over a non-regular
file, with no temporary file left behind (even after kill -9); chat's /save and /load."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lfm_edge
from lfm_edge.commands import chat
from lfm_edge.errors import LfmEdgeError
from lfm_edge.files import atomic_output, sweep_stale, write_atomic
from lfm_edge.session import Session


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lfm-edge-tmp." in p.name)


def test_a_new_file_and_a_replaced_one_keep_no_temporary_file_and_keep_the_mode(tmp_path):
    out = tmp_path / "a.json"
    write_atomic(out, "one")
    assert out.read_text() == "one" and temp_files(tmp_path) == []
    os.chmod(out, 0o640)
    write_atomic(out, b"two")
    assert out.read_bytes() == b"two" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_non_regular_output_is_refused_in_one_sentence_and_left_alone(tmp_path, kind):
    if kind == "directory":
        out = tmp_path / "d"
        out.mkdir()
        words = "a directory"
    elif kind == "fifo":
        out = tmp_path / "f"
        os.mkfifo(out)
        words = "a FIFO"
    else:
        out = Path("/dev/null")
        words = "a device"
    before = os.lstat(out)
    with pytest.raises(LfmEdgeError, match=words) as e:
        write_atomic(out, "x")
    assert "\n" not in str(e.value) and str(e.value).count(". ") == 0
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)  # not replaced
    if kind != "device":
        assert temp_files(out.parent) == []


def test_a_symlink_is_written_through_and_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    assert write_atomic(chain, "new") == real
    assert chain.is_symlink() and link.is_symlink() and os.readlink(link) == "real.json"
    assert real.read_text() == "new" and stat.S_IMODE(real.stat().st_mode) == 0o600
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("made.json")
    write_atomic(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "made.json").read_text() == "made"
    fifo_link = tmp_path / "to-fifo"
    os.mkfifo(tmp_path / "fifo")
    fifo_link.symlink_to("fifo")
    with pytest.raises(LfmEdgeError, match="a FIFO"):
        write_atomic(fifo_link, "x")
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(LfmEdgeError, match="too many levels of symbolic links"):
        write_atomic(loop, "x")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "keep.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert out.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_the_rename_is_followed_by_fsyncs_of_the_file_and_the_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "x", "data")
    assert synced == ["file", "dir"]


SAVER = """
import sys, time
from lfm_edge.files import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(60)
"""


def test_temporary_files_of_killed_savers_are_swept_at_the_next_save(tmp_path):
    out = tmp_path / "chat.json"
    write_atomic(out, "v1")
    start = time.monotonic()
    for _ in range(5):  # each killed (-9) in the middle of its save; each save sweeps the one before's
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert temp_files(tmp_path) == [f".chat.json.lfm-edge-tmp.{proc.pid}"] and out.read_text() == "v1"
    (tmp_path / ".other.json.lfm-edge-tmp.999999999").write_bytes(b"x")  # another file's, its process gone
    live = tmp_path / f".other.lfm-edge-tmp.{os.getpid()}"  # a live process's: left alone
    live.write_bytes(b"busy")
    write_atomic(out, "v2")
    assert out.read_text() == "v2" and temp_files(tmp_path) == [live.name]
    assert sweep_stale(tmp_path) == 0
    print(f"5 kill -9 mid-save, then one save: {time.monotonic() - start:.2f} s, 0 temporary files left")


def test_session_save_and_chat_save_go_through_the_helper(tmp_path):
    real = tmp_path / "real.json"
    link = tmp_path / "chat.json"
    link.symlink_to(real)
    data = {"format": "lfm-edge-session/1", "messages": []}
    from lfm_edge.session import save_json_atomic

    save_json_atomic(link, data)
    assert link.is_symlink() and json.loads(real.read_text()) == data
    with pytest.raises(LfmEdgeError, match="a directory"):
        save_json_atomic(tmp_path, data)
    with pytest.raises(LfmEdgeError, match="not JSON"):
        save_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "real.json"]


@pytest.fixture(scope="module")
def llm(gguf_path):
    m = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=256)
    m.tokenizer.eog_ids = set()
    return m


HAND_EDITED = {
    "role is a list": {"messages": [{"role": ["user"], "content": "hi"}]},
    "sampling is a word": {"sampling": "hot"},
    "an unknown setting": {"sampling": {"heat": 3}},
    "messages is an object": {"messages": {"role": "user"}},
    "tools is a string": {"tools": "all"},
    "max_tokens is text": {"max_tokens": "many"},
    "content is a number": {"messages": [{"role": "user", "content": 5}]},
}


@pytest.mark.parametrize("case", list(HAND_EDITED) + ["nested 5000 deep", "not JSON", "a directory", "binary"])
def test_bad_session_files_are_one_sentence_and_the_chat_goes_on(llm, tmp_path, case):
    path = tmp_path / "s.json"
    if case in HAND_EDITED:
        path.write_text(json.dumps({"format": "lfm-edge-session/1", "messages": [], **HAND_EDITED[case]}))
    elif case == "nested 5000 deep":
        path.write_text('{"format": "lfm-edge-session/1", "messages": ' + "[" * 5000 + "]" * 5000 + "}")
    elif case == "not JSON":
        path.write_text("{oops")
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.mkdir()
    with pytest.raises(LfmEdgeError) as e:
        Session.load(llm, path)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message and str(path) in message
    session = Session(llm, max_tokens=2, temperature=0.0)
    session.messages.append({"role": "user", "content": "kept"})
    out = io.StringIO()
    with pytest.raises(LfmEdgeError):
        chat.handle_command(f"/load {path}", session, out)
    assert session.messages == [{"role": "user", "content": "kept"}]  # nothing lost


def test_chat_save_into_a_directory_or_a_fifo_is_one_sentence(llm, tmp_path):
    session = Session(llm, max_tokens=2, temperature=0.0)
    session.messages.append({"role": "user", "content": "kept"})
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target, words in ((tmp_path, "a directory"), (fifo, "a FIFO")):
        with pytest.raises(LfmEdgeError, match=words):
            chat.handle_command(f"/save {target}", session, io.StringIO())
    out = io.StringIO()
    chat.handle_command(f"/save {tmp_path / 'ok.json'}", session, out)
    assert "saved 1 messages" in out.getvalue()
    assert Session.load(llm, tmp_path / "ok.json").messages == session.messages
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_demo_model_refuses_a_device_or_a_fifo_and_writes_through_a_symlink(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out in (fifo, tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "lfm_edge", "demo-model", str(out)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "only a regular file is replaced" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "model.gguf"
    link.symlink_to("real.gguf")
    proc = subprocess.run(
        [sys.executable, "-m", "lfm_edge", "demo-model", str(link)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and (tmp_path / "real.gguf").stat().st_size > 1000
    assert temp_files(tmp_path) == []
