"""The packed weights of a model saved once, so that later loads skip the packing.

Packing copies every quantized matrix of a GGUF file into the kernels' layout (csrc/packed.h)
in fresh memory: for LFM2-8B-A1B, 4.7 GB, 2.5-3.3 s on the 2-core test VM, more than half of
it the operating system making the new pages. The packed bytes only change when the file or
the layout does, so the first load saves them to a cache file, and every later load maps that
file read-only and hands the kernels views of it. Nothing is copied, and the weights are page
cache: processes loading the same model share them, and memory pressure drops them (to be read
again) instead of holding 4.7 GB of anonymous memory. XNNPACK's weight cache file is the same
idea.

A cache file is one model's packed matrices:

    magic b"LFMPACK\\0", index length (u64), data start (u64, a multiple of 4096), the index
    (UTF-8 JSON), zero bytes up to the data start, then each matrix at a 4096-aligned offset
    from there

    index = {"pack_format": N, "source": {...}, "tensors": {name: {"qtype", "shape", "offset",
             "nbytes", "crc32"}}}

It is only read when its index names this build's PACK_FORMAT and this very GGUF file (its
path, size, modification time, inode and a SHA-256 of its header), holds every packed matrix the model
asks for, with its type and shape, and each matrix's CRC-32 matches (checking it also maps the
pages, which the first token would otherwise fault in). Anything else, a torn write, a stale or
foreign file, is packed from the GGUF and saved again. A file is written as every file lfm-edge
writes (lfm_edge/files.py: a temporary file, fsynced, renamed into place, one writer at a time),
so a reader sees a whole file or none.

Where: the directory in $LFM_EDGE_WEIGHT_CACHE, else $XDG_CACHE_HOME/lfm-edge/packed, else
~/.cache/lfm-edge/packed; LFM_EDGE_WEIGHT_CACHE=off saves and reads nothing. One file per model
path: a changed model replaces its file, and every save removes the files of models that are
gone (a model on a drive that is not mounted counts as gone: it is packed again when it is back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import native
from .errors import LfmEdgeError
from .files import atomic_output
from .gguf_file import FLOAT_TYPES, GGUFFile, Tensor

if TYPE_CHECKING:
    from .packed import Linear

try:  # ISA-L's CRC-32: zlib's polynomial and values at 15 GB/s a core instead of 2.3, where checking
    # a 4.7 GB file took three quarters of a load's CPU time
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels
    from zlib import crc32

log = logging.getLogger("lfm_edge.weight_cache")

ENV_VAR = "LFM_EDGE_WEIGHT_CACHE"
OFF = {"0", "off", "false", "no"}
MAGIC = b"LFMPACK\0"
_PREFIX = struct.Struct("<8sQQ")  # magic, index length, data start
PAGE = 4096  # every matrix starts on a page: aligned for the kernels (64) and for mapping
FREE_MARGIN = 1 << 30  # a save leaves at least this much of the disk free


_saving: set[WeightCache] = set()  # the caches whose save runs now (see saves_in_progress)
_saving_lock = threading.Lock()


def saves_in_progress() -> list[WeightCache]:
    """The saves running now, in this process; it waits for them before it exits."""
    with _saving_lock:
        return list(_saving)


def default_dir() -> Path | None:
    """The cache directory the environment asks for, or None if it turns the cache off."""
    value = os.environ.get(ENV_VAR, "")
    if value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lfm-edge" / "packed"


class WeightCache:
    """One model's cache file: the packed matrices it holds (`get`), and the saving of those the
    model packed (`finish`).

    `status` says what happened, for the front ends to tell the user: "read" (the weights are
    the file's), "saving" (packed, and being saved on a thread of its own, which the process
    waits for before it exits; `wait` waits for it), "written" (packed, then saved), "failed"
    (packed; `reason` says why nothing was saved) or "none" (the model has no matrix to pack).
    """

    def __init__(self, gguf: GGUFFile, directory: Path, n_threads: int):
        self.directory = directory
        self.path = cache_path(gguf, directory)
        self.n_threads = max(1, n_threads)
        self.source = _source_identity(gguf)
        self.status = "none"
        self.reason = ""
        self.nbytes = 0
        self._map: mmap.mmap | None = None
        self._tensors: dict[str, dict[str, Any]] = {}
        self._missed = False  # a matrix asked for that the file did not hold
        self._saver: threading.Thread | None = None
        self.save_s = 0.0  # how long the save took
        self._open()

    # -- reading ---------------------------------------------------------------------
    def _open(self) -> None:
        """Maps the file if it is this model's, whole and intact; else leaves the cache empty."""
        found = _map_cache_file(self.path)
        if found is None:
            return  # no cache yet (or an unreadable one, which the save replaces)
        mapping, index = found
        if not _made_for(index, self.source):
            mapping.close()
            return
        tensors = index["tensors"]
        view = memoryview(mapping)
        try:
            with ThreadPoolExecutor(self.n_threads, thread_name_prefix="lfm-edge-cache") as pool:
                crcs = list(pool.map(lambda e: crc32(view[e["offset"]:e["offset"] + e["nbytes"]]),
                                     tensors.values()))
        finally:
            view.release()
        if any(_hex(crc) != e["crc32"] for crc, e in zip(crcs, tensors.values())):
            mapping.close()
            return
        self._map, self._tensors = mapping, tensors

    def get(self, tensor: Tensor) -> native.PackedMatrix | None:
        """The saved packing of `tensor` (a quantized matrix or stack of them), or None."""
        if tensor.qtype in FLOAT_TYPES:
            return None  # the kernels read these from the GGUF file as they are
        entry = self._tensors.get(tensor.name)
        *stack, n, k = tensor.shape
        if entry is None or entry["qtype"] != int(tensor.qtype) or entry["shape"] != list(tensor.shape):
            self._missed = True
            return None
        data = np.frombuffer(self._map, np.uint8, entry["nbytes"], entry["offset"])
        try:
            return native.PackedMatrix.from_packed(data, int(tensor.qtype), n, k, stack[0] if stack else 1)
        except ValueError:  # a size that is not this type's packing: the file is not ours
            self._missed = True
            return None

    # -- saving ----------------------------------------------------------------------
    def finish(self, matrices: Iterable[Linear]) -> None:
        """Called with every weight matrix once the model is built: saves the packed ones unless
        they all came from the file."""
        packed = [m for m in matrices if m.native.int8_activations]
        self.nbytes = packed_nbytes(packed)
        if not packed:
            self.status = "none"
        elif self._map is not None and not self._missed:
            self.status = "read"
        elif self._room_for(self.nbytes):
            # the model is ready now: the save (seconds for gigabytes, the kernel writing back
            # pages) runs beside its first requests, a CRC thread beside the writes
            self.status = "saving"
            self._saver = threading.Thread(target=self._save, args=(packed,), name="lfm-edge-weight-cache")
            with _saving_lock:
                _saving.add(self)
            try:
                self._saver.start()
            except RuntimeError as e:  # no thread to be had: the model works without the file
                with _saving_lock:
                    _saving.discard(self)
                self._saver = None
                self._failed(f"no thread to save them on ({e})")

    def wait(self) -> str:
        """Waits for a save in progress to end; the status it ended in."""
        if self._saver is not None:
            self._saver.join()
        return self.status

    def _save(self, packed: list[Linear]) -> None:
        start = time.perf_counter()
        try:
            _remove_orphans(self.directory)
            tensors: dict[str, dict[str, Any]] = {}
            offset = 0
            for m in packed:
                # the CRC is known once the bytes are written: eight hex digits either way, so the
                # index keeps its length, and goes in front of them afterwards
                tensors[m.name] = {"qtype": int(m.qtype), "shape": list(m.shape), "offset": offset,
                                   "nbytes": m.nbytes, "crc32": _hex(0)}
                offset += _round_up(m.nbytes, PAGE)
            index = {"pack_format": native.PACK_FORMAT, "source": self.source, "tensors": tensors}
            data_start = _round_up(_PREFIX.size + len(_encode(index)), PAGE)
            views = [m.native.packed_bytes() for m in packed]
            # the CRCs on a thread beside the writes (both let the GIL go), which are slower; a plain
            # thread, as an executor refuses work once the interpreter has begun to exit
            crcs: list[int] = []
            summer = threading.Thread(target=lambda: crcs.extend(map(crc32, views)), name="lfm-edge-crc32")
            summer.start()
            # whole or absent, a dead process's temporary file swept, one writer per file (files.py)
            with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
                try:
                    for e, view in zip(tensors.values(), views):
                        f.seek(data_start + e["offset"])
                        f.write(view)
                finally:
                    summer.join()
                for e, crc in zip(tensors.values(), crcs, strict=True):
                    e["crc32"] = _hex(crc)
                f.seek(0)
                f.write(_PREFIX.pack(MAGIC, len(_encode(index)), data_start) + _encode(index))
            self.status = "written"
        except LfmEdgeError as e:  # atomic_output's one sentence
            self._failed(str(e))
        except OSError as e:
            self._failed(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
        except Exception as e:  # a thread's traceback would reach the user: the model works without the file
            self._failed(f"{type(e).__name__}: {e}")
        finally:
            self.save_s = time.perf_counter() - start
            with _saving_lock:
                _saving.discard(self)

    def _room_for(self, nbytes: int) -> bool:
        """Whether the directory can take a file of nbytes; if not, the status says why."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.directory).free
        except OSError as e:
            self._failed(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
            return False
        if free < nbytes + FREE_MARGIN:
            self._failed(f"{self.directory} has {free / 1e9:.1f} GB free; the packed weights need "
                         f"{nbytes / 1e9:.1f} GB and {FREE_MARGIN >> 30} GB to spare")
            return False
        return True

    def _failed(self, reason: str) -> None:
        self.status, self.reason = "failed", reason
        if threading.current_thread() is self._saver:  # no one is looking at the status now
            log.warning("lfm-edge: the packed weights were not saved to %s (%s)", self.path, reason)


def packed_nbytes(matrices: Iterable[Linear]) -> int:
    """Bytes of the matrices that are packed (and so saved); float ones are read from the GGUF."""
    return sum(m.nbytes for m in matrices if m.native.int8_activations)


def saved_for(gguf: GGUFFile, directory: Path) -> Path | None:
    """The cache file in `directory` that holds this GGUF file's packing, if there is one (its
    index is read; the CRCs are left to the load)."""
    path = cache_path(gguf, directory)
    found = _map_cache_file(path)
    if found is None:
        return None
    mapping, index = found
    mapping.close()
    return path if _made_for(index, _source_identity(gguf)) else None


def cache_path(gguf: GGUFFile, directory: Path) -> Path:
    """Where the cache file of this GGUF file lies: one per real path, named after the path it
    was first loaded by (a hub download's real path is a blob named by its hash)."""
    digest = hashlib.sha256(os.path.realpath(gguf.path).encode()).hexdigest()[:16]
    named = sorted(directory.glob(f"*-{digest}.lfmpack"))
    return named[0] if named else directory / f"{Path(gguf.path).stem}-{digest}.lfmpack"


def _source_identity(gguf: GGUFFile) -> dict[str, Any]:
    """What makes the cache this file's: changed in place or replaced, the file differs in one."""
    st = gguf.stat
    return {"path": os.path.realpath(gguf.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino, "header_sha256": gguf.header_sha256()}


def _made_for(index: dict[str, Any], source: dict[str, Any]) -> bool:
    """Whether a cache file's index is this build's layout of this very GGUF file."""
    return index.get("pack_format") == native.PACK_FORMAT and index.get("source") == source


def _map_cache_file(path: Path) -> tuple[mmap.mmap, dict[str, Any]] | None:
    """The file mapped read-only and its index, each tensor's offset made absolute; None for a
    file that is missing, unreadable, or not a whole cache file (the checks of _read_index and
    _entry_fits)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _PREFIX.size:
                return None
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    # Transparent huge pages for the weights (Linux; a no-op where the filesystem keeps no large
    # folios): pages read from disk from now on come in 2 MB folios mapped whole, instead of the
    # mix readahead makes. After the file had been dropped from the page cache (Sapphire Rapids
    # VM, ext4, 8B-A1B): 100% of it PMD-mapped instead of 60%, decode 13.7-14.1 -> 14.9-15.3
    # tok/s on 1 thread and 24.9-25.8 -> 26.7-28.8 on 2; a cold load 2.7-2.9 -> 4.3 s. Pages
    # already cached keep their size: a warm load is unchanged.
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    index, data_start = _read_index(mapping, size)
    tensors = index.get("tensors") if index is not None else None
    if not isinstance(tensors, dict) or not all(_entry_fits(e, size - data_start) for e in tensors.values()):
        mapping.close()
        return None
    for e in tensors.values():
        e["offset"] += data_start
    return mapping, index


def _encode(index: dict[str, Any]) -> bytes:
    return json.dumps(index, separators=(",", ":"), sort_keys=True).encode()


def _read_index(mapping: mmap.mmap, size: int) -> tuple[dict[str, Any] | None, int]:
    """The index and where the data starts, or (None, 0) for a file that is not a cache file."""
    magic, length, data_start = _PREFIX.unpack_from(mapping, 0)
    if magic != MAGIC or data_start % PAGE or data_start > size or length > data_start - _PREFIX.size:
        return None, 0
    try:
        index = json.loads(mapping[_PREFIX.size:_PREFIX.size + length])
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        return None, 0
    return (index, data_start) if isinstance(index, dict) else (None, 0)


def _entry_fits(entry: Any, size: int) -> bool:
    """An index entry of the right types whose bytes lie page-aligned inside the data's size bytes."""
    if not isinstance(entry, dict):
        return False
    ints = [entry.get(key) for key in ("qtype", "offset", "nbytes")]
    shape = entry.get("shape")
    if not all(type(v) is int for v in ints) or not isinstance(shape, list) or not all(type(d) is int for d in shape):
        return False
    if not isinstance(entry.get("crc32"), str):
        return False
    _, offset, nbytes = ints
    return offset >= 0 and offset % PAGE == 0 and 0 < nbytes <= size - offset


def _remove_orphans(directory: Path) -> None:
    """Cache files whose GGUF file is gone: a deleted model's packing goes at the next save."""
    for path in directory.glob("*.lfmpack"):
        found = _map_cache_file(path)
        if found is None:
            continue  # not a cache file this version reads: its model's next load replaces it
        mapping, index = found
        mapping.close()
        source = index.get("source")
        model = source.get("path") if isinstance(source, dict) else None
        if isinstance(model, str) and not os.path.exists(model):
            path.unlink(missing_ok=True)


def _hex(crc: int) -> str:
    return f"{crc:08x}"


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
