"""The weight cache (lfm_edge/weight_cache.py): packed matrices saved by one load and borrowed by
the next, only when they are this file's, this layout's and intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import lfm_edge
from lfm_edge import files, native, weight_cache
from lfm_edge.errors import LfmEdgeError
from lfm_edge.gguf_file import FLOAT_TYPES, SUPPORTED_TYPES

PACKED_TYPES = sorted(SUPPORTED_TYPES - FLOAT_TYPES)

# SHA-256 (first 16 hex digits) of packed_case(qtype)'s packed bytes, per packed layout version.
# A change of any layout (csrc/packed.h) must come with a new kPackFormat, or a cache file saved
# before it would be read as the new layout: this test fails until both change.
PACKED_DIGESTS = {
    1: {
        "Q4_0": "ecebd42a678f6378",
        "Q4_1": "b3455bc16a01d73b",
        "Q5_0": "08a7ce7d47242478",
        "Q5_1": "eee04fa15039edfa",
        "Q8_0": "67247c490f0227dd",
        "Q2_K": "361b848321cd342e",
        "Q3_K": "c3ac98308cc15941",
        "Q4_K": "cb28d32705077423",
        "Q5_K": "547f75909cd5c308",
        "Q6_K": "6603d566dd59ec6d",
        "IQ4_NL": "9e8482481acf2f3e",
        "IQ4_XS": "d91e0d7bffe45de4",
    },
}


def packed_case(qtype: Q) -> tuple[np.ndarray, int, int, int]:
    """(GGUF bytes, n, k, n_mats): random bytes (packing only moves them), a last partial row group."""
    n, n_mats = 35, 2
    k = 512
    rng = np.random.default_rng([int(qtype), 7])
    return rng.integers(0, 256, (n_mats * n, native.row_bytes(qtype, k)), dtype=np.uint8), n, k, n_mats


def aligned_copy(data: np.ndarray) -> np.ndarray:
    buf = np.empty(data.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + data.nbytes]
    out[:] = data
    return out


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
def test_packed_bytes_borrowed_back_are_the_same_matrix(qtype):
    raw, n, k, n_mats = packed_case(qtype)
    packed = native.PackedMatrix(raw, qtype, n, k, n_mats)
    saved = packed.packed_bytes()
    assert saved.shape == (packed.nbytes,) and not saved.flags.writeable
    borrowed = native.PackedMatrix.from_packed(aligned_copy(saved), qtype, n, k, n_mats)
    assert borrowed.nbytes == packed.nbytes and borrowed.int8_activations
    np.testing.assert_array_equal(borrowed.gguf_bytes(), raw)  # unpacks to the file's bytes


def test_borrowed_matrix_computes_what_the_packed_one_does():
    from test_kernels_int8 import activations, weights

    raw, _ = weights(Q.Q4_0, 2 * 33, 256)
    packed = native.PackedMatrix(raw, Q.Q4_0, 33, 256, 2)
    borrowed = native.PackedMatrix.from_packed(aligned_copy(packed.packed_bytes()), Q.Q4_0, 33, 256, 2)
    for t in (1, 2, 7):
        x = activations(t, 256)
        np.testing.assert_array_equal(native.linear(x, borrowed, 1), native.linear(x, packed, 1))


def test_the_packed_layout_version_names_the_layouts():
    digests = {}
    for qtype in PACKED_TYPES:
        raw, n, k, n_mats = packed_case(qtype)
        data = native.PackedMatrix(raw, qtype, n, k, n_mats).packed_bytes()
        digests[qtype.name] = hashlib.sha256(data).hexdigest()[:16]
    assert native.PACK_FORMAT in PACKED_DIGESTS, (
        f"no digests for PACK_FORMAT {native.PACK_FORMAT}: pin these {digests}")
    assert digests == PACKED_DIGESTS[native.PACK_FORMAT], (
        "a packed layout changed: raise kPackFormat in csrc/packed.h and pin the new digests")


def test_from_packed_checks_what_it_borrows():
    raw, n, k, n_mats = packed_case(Q.Q4_0)
    data = native.PackedMatrix(raw, Q.Q4_0, n, k, n_mats).packed_bytes()
    good = aligned_copy(data)
    with pytest.raises(ValueError, match="64-byte aligned"):
        native.PackedMatrix.from_packed(aligned_copy(np.concatenate([np.zeros(1, np.uint8), data]))[1:], Q.Q4_0, n, k, n_mats)
    with pytest.raises(ValueError, match="not the packed size of 1 x"):
        native.PackedMatrix.from_packed(good, Q.Q4_0, n, k, 1)
    with pytest.raises(ValueError, match="not the packed size"):
        native.PackedMatrix.from_packed(good[:-64], Q.Q4_0, n, k, n_mats)
    with pytest.raises(ValueError, match="not the packed size"):  # more than the buffer: not multiplied out
        native.PackedMatrix.from_packed(good, Q.Q4_0, 1 << 30, 1 << 20, n_mats)
    with pytest.raises(ValueError, match="the matrices' size is too large"):
        native.PackedMatrix.from_packed(good, Q.Q4_0, 1 << 40, 1 << 40, n_mats)
    with pytest.raises(ValueError, match="F16 matrices are not repacked"):
        native.PackedMatrix.from_packed(good, Q.F16, n, k, n_mats)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        native.PackedMatrix.from_packed(good, Q.Q4_0, n, 33, n_mats)
    for bad_n, bad_mats in ((0, 1), (n, 0), (-1, 1)):
        with pytest.raises(ValueError, match="must be positive"):
            native.PackedMatrix.from_packed(good, Q.Q4_0, bad_n, k, bad_mats)
    with pytest.raises(ValueError, match="not repacked"):
        native.PackedMatrix(np.zeros((2, 8), np.float32), Q.F32, 2, 8).packed_bytes()


# ---------------------------------------------------------------- models


def load(path, directory, **kw) -> lfm_edge.LLM:
    llm = lfm_edge.load(path, n_ctx=64, weight_cache=directory, **kw)
    if llm.weight_cache is not None:
        llm.weight_cache.wait()
    return llm


def logits(llm) -> np.ndarray:
    return llm.prefill([1, 5, 9, 13, 2, 40], llm.new_cache())


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.lfmpack"))


@pytest.fixture
def model(gguf_path, tmp_path):
    """A copy of a tiny Q4_0 MoE model the test may change, and its logits packed at load."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path("moe", "q4_0"), path)
    return path, logits(lfm_edge.load(path, n_ctx=64, weight_cache=False))


@pytest.mark.parametrize("name,out_type", [("moe", "q4_0"), ("moe", "q8_0"), ("dense", "q4_0")])
def test_second_load_borrows_the_saved_packing(gguf_path, tmp_path, name, out_type):
    path = gguf_path(name, out_type)
    first = load(path, tmp_path)
    assert first.weight_cache.status == "written", first.weight_cache.reason
    (saved,) = cache_files(tmp_path)
    assert saved == first.weight_cache.path and saved.stat().st_size > first.weight_cache.nbytes
    second = load(path, tmp_path)
    assert second.weight_cache.status == "read"
    matrices = [m.native for m in second.model.matrices]
    assert matrices and all(not m.int8_activations or _inside(m, saved) for m in matrices)
    np.testing.assert_array_equal(logits(second), logits(first))
    assert cache_files(tmp_path) == [saved]  # read, not written again


def _inside(matrix, path: Path) -> bool:
    """Whether the matrix's bytes are a mapping of the file at `path` (not a copy)."""
    start = matrix.packed_bytes().ctypes.data
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start < hi:
            return len(fields) >= 6 and fields[5] == os.path.realpath(path)
    return False


def test_a_float_model_has_nothing_to_save(gguf_path, tmp_path):
    llm = load(gguf_path("moe", "f32"), tmp_path)
    assert llm.weight_cache.status == "none" and cache_files(tmp_path) == []


def test_a_changed_model_file_is_packed_again(model, tmp_path):
    path, expected = model
    directory = tmp_path / "cache"
    load(path, directory)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was rewritten
    again = load(path, directory)
    assert again.weight_cache.status == "written"
    np.testing.assert_array_equal(logits(again), expected)
    assert load(path, directory).weight_cache.status == "read"
    assert len(cache_files(directory)) == 1  # the stale file was replaced


def test_another_path_has_a_cache_file_of_its_own(model, tmp_path):
    path, _ = model
    directory = tmp_path / "cache"
    other = tmp_path / "other.gguf"
    shutil.copyfile(path, other)
    assert load(path, directory).weight_cache.status == "written"
    assert load(other, directory).weight_cache.status == "written"
    assert len(cache_files(directory)) == 2


def test_a_link_to_the_model_shares_its_cache_file(model, tmp_path):
    path, _ = model
    directory = tmp_path / "cache"
    saved = load(path, directory).weight_cache.path
    link = tmp_path / "LFM2-link.gguf"
    link.symlink_to(path)
    via_link = load(link, directory)
    assert via_link.weight_cache.status == "read" and via_link.weight_cache.path == saved
    blob = tmp_path / "blobs" / "0123abcd"  # as the hub stores a download, behind a named link
    blob.parent.mkdir()
    shutil.copyfile(path, blob)
    named = tmp_path / "LFM2-named.gguf"
    named.symlink_to(blob)
    assert load(named, directory).weight_cache.path.name.startswith("LFM2-named-")


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    prefix = weight_cache._PREFIX
    _, length, start = prefix.unpack_from(data, 0)
    index = json.loads(data[prefix.size:prefix.size + length])
    first = min(index["tensors"].values(), key=lambda e: e["offset"])
    if how == "a flipped bit":
        data[start + first["offset"] + 100] ^= 0x10
    elif how == "torn":  # the end never reached the disk
        del data[len(data) // 2:]
    elif how == "zeroed pages":
        data[start:start + 8192] = bytes(8192)
    elif how == "not json":
        data[prefix.size:prefix.size + 4] = b"\xff\xfe{["
    elif how == "another layout version":
        index["pack_format"] += 1
    elif how == "an offset past the end":
        first["offset"] = 1 << 40
    elif how == "an offset off the page":
        first["offset"] += 64
    elif how == "a huge index length":
        prefix.pack_into(data, 0, weight_cache.MAGIC, 1 << 62, start)
    elif how == "empty":
        data = bytearray()
    if how in ("another layout version", "an offset past the end", "an offset off the page"):
        text = json.dumps(index, separators=(",", ":")).encode()
        assert prefix.size + len(text) <= start
        data[prefix.size:start] = text + bytes(start - prefix.size - len(text))
        prefix.pack_into(data, 0, weight_cache.MAGIC, len(text), start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["a flipped bit", "torn", "zeroed pages", "not json", "another layout version",
                                 "an offset past the end", "an offset off the page", "a huge index length", "empty"])
def test_a_damaged_cache_file_is_not_read(model, tmp_path, how):
    path, expected = model
    directory = tmp_path / "cache"
    saved = load(path, directory).weight_cache.path
    _damage(saved, how)
    again = load(path, directory)
    assert again.weight_cache.status == "written"  # packed from the GGUF and saved whole again
    np.testing.assert_array_equal(logits(again), expected)
    assert load(path, directory).weight_cache.status == "read"


def test_a_cache_that_cannot_be_saved_leaves_the_model_working(model, tmp_path, monkeypatch):
    path, expected = model
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    llm = load(path, blocker / "cache")
    assert llm.weight_cache.status == "failed" and "Not a directory" in llm.weight_cache.reason
    np.testing.assert_array_equal(logits(llm), expected)

    class Full:
        free = 1 << 20

    monkeypatch.setattr(weight_cache.shutil, "disk_usage", lambda _: Full)
    llm = load(path, tmp_path / "full")
    assert llm.weight_cache.status == "failed" and "0.0 GB free" in llm.weight_cache.reason
    assert cache_files(tmp_path / "full") == []


def test_a_save_that_fails_midway_leaves_no_file(model, tmp_path, monkeypatch):
    path, _ = model
    directory = tmp_path / "cache"

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weight_cache.os, "replace", fail)
    llm = load(path, directory)
    assert llm.weight_cache.status == "failed"
    assert llm.weight_cache.reason == f"cannot write {llm.weight_cache.path}: No space left on device"
    assert list(directory.iterdir()) == []  # the temporary file went too


def test_abandoned_temporary_files_are_removed(model, tmp_path):
    path, _ = model
    directory = tmp_path / "cache"
    name = load(path, directory).weight_cache.path.name
    dead = directory / f".{name}{files.TMP_MARK}{(1 << 22) + 1}"  # above any pid Linux hands out
    alive = directory / f".{name}{files.TMP_MARK}1"  # init's: still being written, as far as anyone can tell
    dead.write_bytes(b"half a file")
    alive.write_bytes(b"half a file")
    os.utime(path, ns=(0, 0))  # so the next load saves
    assert load(path, directory).weight_cache.status == "written"
    assert not dead.exists() and alive.exists()


def test_two_loads_at_once_save_one_whole_file(model, tmp_path, monkeypatch):
    path, expected = model
    directory = tmp_path / "cache"
    second_saving = threading.Event()
    replace = os.replace

    def replace_once_the_second_saves(src, dst):
        assert second_saving.wait(60)  # the second load finds no file yet, and its save waits for this one
        replace(src, dst)

    monkeypatch.setattr(weight_cache.os, "replace", replace_once_the_second_saves)
    llms = [lfm_edge.load(path, n_ctx=64, weight_cache=directory)]
    llms.append(lfm_edge.load(path, n_ctx=64, weight_cache=directory))
    assert [llm.weight_cache.status for llm in llms] == ["saving", "saving"]
    second_saving.set()
    assert [llm.weight_cache.wait() for llm in llms] == ["written", "written"]
    monkeypatch.undo()
    again = load(path, directory)
    assert again.weight_cache.status == "read" and len(cache_files(directory)) == 1
    np.testing.assert_array_equal(logits(again), expected)


def test_a_process_that_exits_right_after_loading_still_saves(model, tmp_path):
    path, _ = model
    directory = tmp_path / "cache"
    code = f"import lfm_edge; print(lfm_edge.load({str(path)!r}, weight_cache={str(directory)!r}).weight_cache.status)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # "written" when a tiny model's save is done before the status is read
    assert proc.returncode == 0 and proc.stdout in ("saving\n", "written\n") and proc.stderr == "", proc.stderr
    assert load(path, directory).weight_cache.status == "read"


def test_a_save_removes_the_files_of_models_that_are_gone(model, tmp_path):
    path, _ = model
    directory = tmp_path / "cache"
    gone = tmp_path / "gone.gguf"
    shutil.copyfile(path, gone)
    orphan = load(gone, directory).weight_cache.path
    gone.unlink()
    stranger = directory / "not-ours.lfmpack"
    stranger.write_bytes(b"something else")
    assert load(path, directory).weight_cache.status == "written"
    assert not orphan.exists() and stranger.exists()  # only a file that names a missing model goes


def test_info_says_where_the_packed_weights_are(model, tmp_path):
    path, _ = model
    env = {**os.environ, weight_cache.ENV_VAR: str(tmp_path / "cache")}

    def info(**extra):
        proc = subprocess.run([sys.executable, "-m", "lfm_edge", "info", str(path)], capture_output=True, text=True,
                              timeout=120, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines() if line.startswith("packed:"))

    assert "not saved yet: the next load saves them to " + str(tmp_path / "cache") in info()
    saved = load(path, tmp_path / "cache").weight_cache.path
    assert f"saved in {saved}: loads map it" in info()
    assert "packed at every load" in info(**{weight_cache.ENV_VAR: "off"})


def test_the_cli_says_it_waits_for_a_save_still_running(model, tmp_path, monkeypatch, capsys):
    from lfm_edge import cli

    path, _ = model
    may_finish = threading.Event()
    replace = os.replace

    def replace_when_allowed(src, dst):
        assert may_finish.wait(60)
        replace(src, dst)

    monkeypatch.setattr(weight_cache.os, "replace", replace_when_allowed)
    llm = lfm_edge.load(path, n_ctx=64, weight_cache=tmp_path / "cache")
    assert weight_cache.saves_in_progress() == [llm.weight_cache]
    waiter = threading.Thread(target=cli.finish_saves)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting for the save, and it said so
    assert f"note: finishing the save of the packed weights to {llm.weight_cache.path}" in capsys.readouterr().err
    may_finish.set()
    waiter.join(60)
    assert not waiter.is_alive() and llm.weight_cache.status == "written"
    assert weight_cache.saves_in_progress() == []


def test_the_environment_chooses_the_directory(model, tmp_path, monkeypatch):
    path, _ = model
    monkeypatch.setenv(weight_cache.ENV_VAR, str(tmp_path / "from-env"))
    assert load(path, None).weight_cache.path.parent == tmp_path / "from-env"
    for off in ("off", "0", "OFF", "no"):
        monkeypatch.setenv(weight_cache.ENV_VAR, off)
        assert load(path, None).weight_cache is None
    monkeypatch.delenv(weight_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weight_cache.default_dir() == tmp_path / "xdg" / "lfm-edge" / "packed"
    assert load(path, False).weight_cache is None
    with pytest.raises(LfmEdgeError, match="weight_cache must be a directory, False or None"):
        lfm_edge.load(path, weight_cache=3)


def test_the_cli_says_once_where_the_packed_weights_went(model, tmp_path):
    path, _ = model
    env = {**os.environ, weight_cache.ENV_VAR: str(tmp_path / "cache")}

    def run(*flags):
        argv = ["run", "-m", str(path), "-n", "4", "--temperature", "0", *flags, "Hi"]
        return subprocess.run([sys.executable, "-m", "lfm_edge", *argv], capture_output=True, text=True, timeout=120,
                              env=env)

    off = run("--no-weight-cache")
    assert off.returncode == 0, off.stderr
    assert "packed weights" not in off.stderr and not (tmp_path / "cache").exists()
    first = run()
    assert first.returncode == 0, first.stderr
    assert "note: saving the packed weights" in first.stderr and str(tmp_path / "cache") in first.stderr
    (saved,) = cache_files(tmp_path / "cache")  # the process waited for the save before it exited
    second = run()
    assert second.returncode == 0 and "packed weights" not in second.stderr
    assert second.stdout == first.stdout
