"""Reading GGUF files: metadata and memory-mapped tensors, checked before use.

This module knows the container format only. Which tensors an architecture
needs, and in what shapes, is said by the architecture files in `models/`.
Every way a file can be wrong ends in an `LfmEdgeError` that names the file.

The reader is our own, on a read-only mapping of the file. Every count, length,
dimension, type and offset is checked against the bytes that remain before it
is used, so no file can make it loop, allocate more than the file holds, or
read outside the mapping. Numeric arrays stay numpy views of the mapping and
string arrays are decoded on access (`StringArray`), so the time and memory of
a load follow the file's size, not the number of array elements.

Format (little-endian): magic "GGUF", version u32 (2 or 3), tensor count u64,
metadata count u64; then each metadata entry (key string, value type u32,
value); then each tensor's info (name string, n_dims u32, dims u64 x n_dims,
type u32, offset u64); then padding to `general.alignment` (32 by default) and
the tensor data, each tensor at its offset from there. A string is a u64
length and that many UTF-8 bytes; an array is an element type u32, a count u64
and the elements.

Decisions on files llama.cpp would also refuse: a key or a tensor name given
twice is refused; a tensor must have 1 to 4 dimensions, each at least 1; a type
id ggml does not know is refused, as is one lfm-edge does not compute with; two
tensors whose bytes overlap are refused; nested arrays are refused.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from .errors import LfmEdgeError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 had 32-bit counts and lengths
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # any power of two up to 1 MiB; writers use 32 (ggml) or a page
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1

# The tensor encodings this runtime computes with (csrc/qtypes.h is the kernels' table of them).
# GGML_QUANT_SIZES gives each one's block: values per block and bytes per block on disk.
SUPPORTED_TYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.IQ4_NL,
    GGMLQuantizationType.Q2_K,  # these store rows in 256-weight super-blocks
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.IQ4_XS,
}
SUPER_BLOCK_TYPES = {t for t in SUPPORTED_TYPES if GGML_QUANT_SIZES[t][0] == 256}

# metadata value types: the numpy dtype of a fixed-size one (as an array element)
_NUMERIC = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_STRING_HEADER = 8  # the u64 length before a string's bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
# the fewest bytes each item can take, which bounds a count by the bytes left
_MIN_KV_BYTES = _STRING_HEADER + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = _STRING_HEADER + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes one row of `n_cols` values takes in encoding `qtype`."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    return n_cols // block * nbytes


@dataclass(frozen=True)
class Tensor:
    """One tensor as stored: its encoding, its shape and its raw bytes.

    `shape` is in numpy order, the row length last: a weight matrix that maps
    K inputs to N outputs is (N, K); stacked experts are (E, N, K). GGUF itself
    lists dimensions the other way round (ggml's `ne`, fastest first).
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, exactly nbytes long, a view into the mapped file

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.n_rows * row_bytes(self.qtype, self.n_cols)

    def drop_pages(self) -> None:
        """Let the OS drop this tensor's pages of the mapped file from memory.

        For tensors the kernels have copied into a layout of their own: without
        this, the file's pages stay resident next to the copy and peak memory
        is twice the file. The mapping stays valid; a later read faults the
        pages back in from the file.
        """
        owner = self.data.base  # the array over the whole mapping, then the buffer it was made from
        while isinstance(owner, np.ndarray | memoryview):
            owner = owner.obj if isinstance(owner, memoryview) else owner.base
        if not hasattr(mmap, "MADV_DONTNEED") or not isinstance(owner, mmap.mmap):
            return
        page = mmap.PAGESIZE
        start = self.data.ctypes.data
        first = -(-start // page) * page  # only whole pages inside this tensor
        last = (start + self.data.nbytes) // page * page
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


class StringArray(Sequence[str]):
    """A metadata array of strings, decoded on access.

    Holds where each string's bytes are in the mapped file (8 bytes per
    string), not a Python object per string: a vocabulary of 125k tokens is
    cheap to hold and `tolist()` decodes it in one pass. The bytes were checked
    to be UTF-8 when the file was read.
    """

    def __init__(self, buf: Any, starts: np.ndarray):
        self._buf = buf  # the mapped file
        self._starts = starts  # int64 [n + 1]: where string i's bytes start; string i ends 8 bytes before i + 1

    def __len__(self) -> int:
        return len(self._starts) - 1

    def _bytes(self, i: int) -> bytes:
        return self._buf[int(self._starts[i]) : int(self._starts[i + 1]) - _STRING_HEADER]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError("string array index out of range")
        return self._bytes(i % n).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def tolist(self) -> list[str]:
        buf, starts = self._buf, self._starts.tolist()
        return [buf[a : b - _STRING_HEADER].decode("utf-8") for a, b in zip(starts, starts[1:])]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray | list | tuple):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], {len(self)} strings)"


class _Corrupt(Exception):
    """A structural problem, turned into an LfmEdgeError naming the file."""


class _Cursor:
    """Reads the mapped file front to back; every read checked against the bytes left."""

    def __init__(self, buf: Any, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Corrupt(f"{what} needs {n} bytes at byte {self.pos}, but only {self.size - self.pos} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value of type `vtype` (a plain Python value, numpy array or StringArray)."""
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise _Corrupt(f"metadata key {key} has unknown value type {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of metadata key {key}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        dtype = _NUMERIC[vtype]
        self.need(dtype.itemsize, f"the value of metadata key {key}")
        v = np.frombuffer(self.buf, dtype, 1, self.pos)[0].item()
        self.pos += dtype.itemsize
        return v != 0 if vtype == GGUFValueType.BOOL else v

    def array(self, key: str) -> Any:
        etype = self.u32(f"the element type of metadata array {key}")
        n = self.u64(f"the length of metadata array {key}")
        try:
            etype = GGUFValueType(etype)
        except ValueError:
            raise _Corrupt(f"metadata array {key} has unknown element type {etype}") from None
        if etype == GGUFValueType.ARRAY:
            raise _Corrupt(f"metadata array {key} holds arrays, which GGUF readers do not support")
        least = _STRING_HEADER if etype == GGUFValueType.STRING else _NUMERIC[etype].itemsize
        if n > self.left() // least:
            raise _Corrupt(
                f"metadata array {key} claims {n} elements of at least {least} bytes, "
                f"but only {self.left()} bytes remain"
            )
        if etype == GGUFValueType.STRING:
            return self.strings(n, key)
        dtype = _NUMERIC[etype]
        values = np.frombuffer(self.buf, dtype, n, self.pos)  # a read-only view of the mapping
        self.pos += n * dtype.itemsize
        return values != 0 if etype == GGUFValueType.BOOL else values

    def strings(self, n: int, key: str) -> StringArray:
        # each start depends on the previous length: one pass, 8 bytes kept per string
        starts = array("q", [0]) * (n + 1)
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for i in range(n):
            if pos + _STRING_HEADER > size:
                raise _Corrupt(f"string {i} of metadata array {key} starts past the end of the file")
            (length,) = unpack(buf, pos)
            pos += _STRING_HEADER
            starts[i] = pos
            if length > size - pos:
                raise _Corrupt(f"string {i} of metadata array {key} claims {length} bytes, but only {size - pos} remain")
            pos += length
        starts[n] = pos + _STRING_HEADER
        self.pos = pos
        offsets = np.frombuffer(starts, np.int64)
        _check_utf8(buf, offsets, key)
        return StringArray(buf, offsets)


def _check_utf8(buf: Any, starts: np.ndarray, key: str, chunk: int = 1 << 18) -> None:
    """Check that every string of an array is UTF-8, with one decode per chunk of strings joined.

    Joined bytes are UTF-8 and no string starts with a continuation byte exactly
    when each string on its own is UTF-8. Chunks keep the scratch memory small.
    """
    for lo in range(0, len(starts) - 1, chunk):
        s = starts[lo : lo + chunk + 1]
        begin, end = int(s[0]) - _STRING_HEADER, int(s[-1]) - _STRING_HEADER
        region = np.frombuffer(buf, np.uint8, end - begin, begin)
        # mark each 8-byte length field: +1 where it starts, -1 where its string starts
        step = np.zeros(end - begin + 1, np.int8)
        step[s[:-1] - _STRING_HEADER - begin] = 1
        step[s[:-1] - begin] -= 1
        joined = region[np.cumsum(step[:-1], dtype=np.int8) == 0].tobytes()
        lengths = s[1:] - s[:-1] - _STRING_HEADER
        nonempty = np.flatnonzero(lengths > 0)
        bad_start = np.flatnonzero((region[s[:-1][nonempty] - begin] & 0xC0) == 0x80)
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError as e:
            i = lo + int(np.searchsorted(np.cumsum(lengths), e.start, side="right"))  # the string with the bad byte
            raise _Corrupt(f"string {i} of metadata array {key} is not valid UTF-8") from None
        if bad_start.size:
            raise _Corrupt(f"string {lo + int(nonempty[bad_start[0]])} of metadata array {key} is not valid UTF-8")


class _TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # ggml order: the row length first
    type_id: int
    offset: int  # from the start of the data section


class GGUFFile:
    """A GGUF file opened read-only with its tensors memory-mapped.

    `metadata` maps each key to a Python scalar (int, float, bool, str), a
    read-only numpy array (numeric arrays) or a `StringArray`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._map = _map_file(self.path)
        size = len(self._map)
        try:
            self.metadata, infos, data_start = _read_header(self._map, size)
        except _Corrupt as e:
            raise self.error(f"is truncated or corrupt ({e})") from None
        self.alignment: int = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        self.data_offset = data_start
        self.tensors: dict[str, Tensor] = {}
        self._check_tensors(infos, data_start, size)
        self.arch: str = self.get("general.architecture", str)

    def _encoding(self, type_id: int, name: str) -> tuple[GGMLQuantizationType, int, int]:
        """A tensor type's encoding, block length and block bytes; unknown or unsupported types refused."""
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise self.error(f"tensor {name} has unknown type id {type_id}") from None
        if qtype not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise self.error(
                f"tensor {name} is stored as {qtype.name}, which lfm-edge does not support yet "
                f"(supported: {supported})"
            )
        return (qtype, *GGML_QUANT_SIZES[qtype])

    def _check_tensors(self, infos: list[_TensorInfo], data_start: int, file_size: int) -> None:
        data = np.frombuffer(self._map, np.uint8)  # tensor views keep the mapping alive
        encodings: dict[int, tuple[GGMLQuantizationType, int, int]] = {}
        spans = []
        for name, dims, type_id, offset in infos:
            enc = encodings.get(type_id) or encodings.setdefault(type_id, self._encoding(type_id, name))
            qtype, block, block_bytes = enc
            if dims[0] % block:
                kind = "super-blocks" if qtype in SUPER_BLOCK_TYPES else "blocks"
                raise self.error(
                    f"is truncated or corrupt (tensor {name} has rows of {dims[0]} values, "
                    f"not a multiple of {qtype.name}'s {kind} of {block})"
                )
            if offset % self.alignment:
                raise self.error(
                    f"is truncated or corrupt (tensor {name} starts at offset {offset}, "
                    f"not a multiple of the alignment {self.alignment})"
                )
            nbytes = dims[0] // block * block_bytes
            for d in dims[1:]:
                nbytes *= d  # Python integers: no overflow, compared with the file below
            start = data_start + offset
            if start + nbytes > file_size:
                raise self.error(
                    f"is truncated: tensor {name} ends at byte {start + nbytes} but the file has {file_size} bytes"
                )
            self.tensors[name] = Tensor(name, qtype, dims[::-1], data[start : start + nbytes])
            spans.append((offset, nbytes, name))
        spans.sort()
        for (a, n, name), (b, _, other) in zip(spans, spans[1:]):
            if a + n > b:
                raise self.error(f"is truncated or corrupt (the data of tensors {name} and {other} overlap)")

    def error(self, problem: str) -> LfmEdgeError:
        return LfmEdgeError(f"{self.path}: {_one_line(problem)}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The metadata value `key`, checked to be of `kind` (int, float, str, list or a tuple of them).

        Arrays are asked for as `list` and come back as Python lists.
        """
        if key not in self.metadata:
            if default is ...:
                raise self.error(f"metadata key {key} is missing")
            return default
        value = self.metadata[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, np.ndarray | StringArray) and list in kinds:
            return value.tolist()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            value = int(value)
        if not isinstance(value, kind):
            found = "array" if isinstance(value, np.ndarray | StringArray) else type(value).__name__
            raise self.error(f"metadata key {key} should be {' or '.join(k.__name__ for k in kinds)}, found {found}")
        return value


def _one_line(text: str, limit: int = 600) -> str:
    """`text` as one printable line of bounded length: keys, names and values come from the file."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _map_file(path: Path) -> Any:
    """The file mapped read-only, after checking it is a GGUF file at all."""
    try:
        if not path.exists():
            raise LfmEdgeError(f"{path}: no such file")
        if not path.is_file():
            raise LfmEdgeError(f"{path}: is not a file")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise LfmEdgeError(f"{path}: is not a GGUF file (it does not start with the GGUF magic bytes)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise LfmEdgeError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_header(buf: Any, size: int) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    """The metadata, the tensor infos and where the data section starts."""
    c = _Cursor(buf, size)
    c.need(_HEADER.size, "the header")
    _, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    c.pos = _HEADER.size
    if version not in GGUF_VERSIONS:
        if version & 0xFFFF == 0 and version >> 24 in GGUF_VERSIONS:
            raise _Corrupt("it is a big-endian GGUF file, which lfm-edge does not read")
        raise _Corrupt(f"GGUF version {version} is not supported (versions 2 and 3 are)")
    if n_kv > c.left() // _MIN_KV_BYTES:
        raise _Corrupt(f"the header claims {n_kv} metadata entries, more than the {c.left()} bytes left can hold")
    if n_tensors > c.left() // _MIN_TENSOR_INFO_BYTES:
        raise _Corrupt(f"the header claims {n_tensors} tensors, more than the {c.left()} bytes left can hold")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        if key in metadata:
            raise _Corrupt(f"metadata key {key} is given twice")
        metadata[key] = c.value(c.u32(f"the value type of metadata key {key}"), key)

    if n_tensors > c.left() // _MIN_TENSOR_INFO_BYTES:
        raise _Corrupt(f"the header claims {n_tensors} tensors, more than the {c.left()} bytes left can hold")
    infos: list[_TensorInfo] = []
    names: set[str] = set()
    pos, u32, u64 = c.pos, _U32.unpack_from, _U64.unpack_from
    for _ in range(n_tensors):  # inlined reads: a file may list a million tensors
        if pos + 8 > size:
            raise _Corrupt(f"tensor info {len(infos)} starts past the end of the file")
        (n,) = u64(buf, pos)
        pos += 8
        if n > size - pos:
            raise _Corrupt(f"the name of tensor {len(infos)} claims {n} bytes, but only {size - pos} remain")
        try:
            name = buf[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"the name of tensor {len(infos)} is not valid UTF-8") from None
        pos += n
        if name in names:
            raise _Corrupt(f"tensor {name} is listed twice")
        names.add(name)
        if pos + 4 > size:
            raise _Corrupt(f"the info of tensor {name} runs past the end of the file")
        (n_dims,) = u32(buf, pos)
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions; a tensor has 1 to {MAX_DIMS}")
        end = pos + 4 + 8 * n_dims + 12
        if end > size:
            raise _Corrupt(f"the info of tensor {name} runs past the end of the file")
        dims = struct.unpack_from(f"<{n_dims}QIQ", buf, pos + 4)  # dims..., type, offset
        pos = end
        type_id, offset, dims = dims[-2], dims[-1], dims[:-2]
        count = 1
        for d in dims:
            count *= d
        if not 0 < count <= INT64_MAX or min(dims) < 1:
            raise _Corrupt(f"tensor {name} has dimensions {list(dims)}, which no tensor can have")
        if offset > size:
            raise _Corrupt(f"tensor {name} starts at offset {offset}, past the end of the file")
        infos.append(_TensorInfo(name, dims, type_id, offset))
    c.pos = pos

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise _Corrupt(f"general.alignment should be an integer, found {type(alignment).__name__}")
    if not 1 <= alignment <= MAX_ALIGNMENT:
        raise _Corrupt(f"general.alignment = {alignment}; it must be a power of two from 1 to {MAX_ALIGNMENT}")
    if alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment = {alignment} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    if infos and data_start > size:
        raise _Corrupt(f"the tensor data would start at byte {data_start}, past the end of the file ({size} bytes)")
    return metadata, infos, data_start
