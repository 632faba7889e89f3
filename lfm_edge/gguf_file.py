"""Reading GGUF files: metadata and memory-mapped tensors, checked before use.

This module knows the container format only. Which tensors an architecture
needs, and in what shapes, is said by the architecture files in `models/`.
Every way a file can be wrong ends in an `LfmEdgeError` that names the file.

The reader is our own, on a read-only mapping of the file. Every count, length,
dimension, type and offset is checked against the bytes that remain before it
is used, so no file can make it loop, allocate more than the file holds, or
read outside the mapping. Numeric arrays stay numpy views of the mapping,
string arrays are decoded on access (`StringArray`) and the tensors are a table
that makes each `Tensor` when asked for (`TensorTable`), checked with numpy, so
the time and memory of a load follow the file's size, not the number of array
elements or tensors (`tests/big_gguf.py` measures it: a million tensors or ten
million strings open in seconds, in less than twice the file's size).

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

import codecs
import hashlib
import math
import mmap
import operator
import os
import struct
from array import array
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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
# the types stored as plain floats; the others are quantized in blocks
FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
SUPER_BLOCK_TYPES = {t for t in SUPPORTED_TYPES if GGML_QUANT_SIZES[t][0] == 256}
_SUPPORTED_IDS = np.array(sorted(SUPPORTED_TYPES), np.uint32)
# block length and bytes of each supported type id (0 for the others), for numpy lookups
_BLOCK = np.zeros(max(SUPPORTED_TYPES) + 1, np.uint64)
_BLOCK_BYTES = np.zeros_like(_BLOCK)
for _t in SUPPORTED_TYPES:
    _BLOCK[_t], _BLOCK_BYTES[_t] = GGML_QUANT_SIZES[_t]
_QTYPES = {int(t): t for t in SUPPORTED_TYPES}  # id -> type, faster than the enum's own lookup
_F32 = np.uint32(GGMLQuantizationType.F32)
_CHECK_CHUNK = 1 << 16  # tensors checked at once: numpy's scratch stays a few MB

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
_INFO_TAIL = [struct.Struct(f"<{n}QIQ") for n in range(MAX_DIMS + 1)]  # a tensor info's n dims, type and offset


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
        return math.prod(self.shape[:-1])

    @property
    def nbytes(self) -> int:
        return self.n_rows * row_bytes(self.qtype, self.n_cols)

    @property
    def mapping(self) -> mmap.mmap | None:
        """The read-only file mapping this tensor's bytes lie in (None for bytes held elsewhere):
        `packed.Linear` lets the packer drop the pages it has copied from (the mapping stays
        valid; a later read faults them back in from the file)."""
        owner = self.data.base  # the array over the whole mapping, then the buffer it was made from
        while isinstance(owner, np.ndarray | memoryview):
            owner = owner.obj if isinstance(owner, memoryview) else owner.base
        return owner if isinstance(owner, mmap.mmap) else None


class StringArray(Sequence[str]):
    """A metadata array of strings, decoded on access.

    Holds where each string's bytes are in the mapped file (4 bytes per string,
    from the array's start; 8 for an array that spans 4 GiB), not a Python object
    per string: a vocabulary of 125k tokens is cheap to hold and `tolist()`
    decodes it in one pass. The bytes were checked to be UTF-8 when the file was read.
    """

    def __init__(self, buf: Any, starts: np.ndarray, base: int = 0):
        self._buf = buf  # the mapped file
        # [n + 1]: string i's bytes start at base + starts[i] and end 8 bytes before base + starts[i + 1]
        self._starts = starts
        self._base = base

    def __len__(self) -> int:
        return len(self._starts) - 1

    def _bytes(self, i: int) -> bytes:
        base = self._base
        return self._buf[base + int(self._starts[i]) : base + int(self._starts[i + 1]) - _STRING_HEADER]

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
        buf, base, starts = self._buf, self._base, self._starts.tolist()
        return [buf[base + a : base + b - _STRING_HEADER].decode("utf-8") for a, b in zip(starts, starts[1:])]

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
        # Each start depends on the previous length: one pass, keeping 4 bytes per string (8 if
        # the rest of the file spans 4 GiB), counted from the array's first string. The loop
        # leaves the bounds to struct, which stops at the end of the view, and to the array
        # of starts, which refuses a start past 4 GiB; `_string_error` then says what was wrong.
        base, size = self.pos, self.size - self.pos
        starts = array("I" if size + _STRING_HEADER <= 0xFFFF_FFFF else "q", [0]) * (n + 1)
        unpack, pos, i = _U64.unpack_from, 0, 0
        with memoryview(self.buf) as whole, whole[base:] as view:
            try:
                for i in range(n):
                    (length,) = unpack(view, pos)
                    pos += _STRING_HEADER
                    starts[i] = pos
                    pos += length
            except (struct.error, OverflowError):
                raise self._string_error(starts, i, key) from None
        if pos > size:
            raise self._string_error(starts, n, key)
        starts[n] = pos + _STRING_HEADER
        self.pos = base + pos
        offsets = np.frombuffer(starts, np.uint32 if starts.typecode == "I" else np.int64)
        _check_utf8(self.buf, offsets, base, key)
        return StringArray(self.buf, offsets, base)

    def _string_error(self, starts: array, i: int, key: str) -> _Corrupt:
        """Why string i of an array could not be read: the string before it is longer than the
        bytes left, or string i itself starts past the end of the file."""
        size = self.size - self.pos  # positions count from the array's first string
        if i > 0:
            (length,) = _U64.unpack_from(self.buf, self.pos + starts[i - 1] - _STRING_HEADER)
            if length > size - starts[i - 1]:
                return _Corrupt(f"string {i - 1} of metadata array {key} claims {length} bytes, "
                                f"but only {size - starts[i - 1]} remain")
        return _Corrupt(f"string {i} of metadata array {key} starts past the end of the file")


_UTF8_CHUNK_STRINGS = 1 << 16  # strings, and bytes, checked with one decode: the scratch is a few times the bytes
_UTF8_CHUNK_BYTES = 1 << 20


def _check_utf8(buf: Any, starts: np.ndarray, base: int, key: str) -> None:
    """Check that every string of an array is UTF-8, with one decode per chunk of strings joined.

    Joined bytes are UTF-8 and no string starts with a continuation byte exactly
    when each string on its own is UTF-8. Chunks of at most 1 MiB keep the scratch
    memory small; a longer string is decoded alone, a piece at a time.
    """
    lo, n = 0, len(starts) - 1
    while lo < n:
        s = starts[lo : lo + _UTF8_CHUNK_STRINGS + 1].astype(np.int64) + base  # where each string starts
        m = max(1, int(np.searchsorted(s, s[0] + _UTF8_CHUNK_BYTES, side="right")) - 1)  # strings in this chunk
        s = s[: m + 1]
        begin, end = int(s[0]) - _STRING_HEADER, int(s[-1]) - _STRING_HEADER
        if m == 1:
            if not _is_utf8(buf, begin + _STRING_HEADER, end):
                raise _Corrupt(f"string {lo} of metadata array {key} is not valid UTF-8")
            lo += 1
            continue
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
        lo += m


def _is_utf8(buf: Any, begin: int, end: int, piece: int = 1 << 20) -> bool:
    """Whether buf[begin:end] is UTF-8, decoded a MiB at a time (its text is not kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for at in range(begin, end, piece):
            decoder.decode(buf[at : min(at + piece, end)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


class TensorTable(Mapping[str, Tensor]):
    """A file's tensors by name, in file order; each `Tensor` is made when asked for.

    A file may list a million tensors, so the table holds no Python object per
    tensor: where each one's info is in the mapped file, and the names' hashes
    sorted, with the tensor each belongs to (20 bytes a tensor). Everything was
    checked when the file was opened. A tensor asked for by name is kept, so
    asking again gives the same object; iterating `values()` keeps none.
    """

    def __init__(self, buf: Any, data: np.ndarray, data_start: int, infos: np.ndarray, hashes: np.ndarray,
                 order: np.ndarray):
        self._buf = buf  # the mapped file
        self._data = data  # uint8 over the whole file: tensors are views of it
        self._data_start = data_start
        self._infos = infos  # int64 [n]: where tensor i's info (its name's length) starts
        self._hashes = hashes  # int64 [n]: hash() of the names, sorted
        self._order = order  # [n]: the tensor whose name has hash _hashes[j]
        self._made: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        buf = self._buf
        for lo in range(0, len(self._infos), _CHECK_CHUNK):
            for pos in self._infos[lo : lo + _CHECK_CHUNK].tolist():
                yield _name_at(buf, pos)

    def __contains__(self, name: object) -> bool:
        return self._find(name) is not None

    def __getitem__(self, name: str) -> Tensor:
        i = self._find(name)
        if i is None:
            raise KeyError(name)
        if i not in self._made:
            self._made[i] = self._tensor(i)
        return self._made[i]

    def values(self) -> ValuesView[Tensor]:
        return _TensorValues(self)

    def items(self) -> ItemsView[str, Tensor]:
        return _TensorItems(self)

    def _all(self) -> Iterator[Tensor]:
        made = self._made
        return (made[i] if i in made else self._tensor(i) for i in range(len(self)))

    def _find(self, name: object) -> int | None:
        if not isinstance(name, str):
            return None
        h = hash(name)
        j = int(np.searchsorted(self._hashes, h))
        while j < len(self._hashes) and self._hashes[j] == h:  # one candidate, unless two names share a hash
            i = int(self._order[j])
            if _name_at(self._buf, int(self._infos[i])) == name:
                return i
            j += 1
        return None

    def _tensor(self, i: int) -> Tensor:
        buf, pos = self._buf, int(self._infos[i])
        (n,) = _U64.unpack_from(buf, pos)
        pos += _STRING_HEADER + n
        name = buf[pos - n : pos].decode("utf-8")
        (n_dims,) = _U32.unpack_from(buf, pos)
        *dims, type_id, offset = _INFO_TAIL[n_dims].unpack_from(buf, pos + 4)
        qtype = _QTYPES[type_id]
        start = self._data_start + offset
        nbytes = row_bytes(qtype, dims[0]) * math.prod(dims[1:])
        return Tensor(name, qtype, tuple(reversed(dims)), self._data[start : start + nbytes])


class _TensorValues(ValuesView):
    _mapping: TensorTable

    def __iter__(self) -> Iterator[Tensor]:
        return self._mapping._all()


class _TensorItems(ItemsView):
    _mapping: TensorTable

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return ((t.name, t) for t in self._mapping._all())


def _name_at(buf: Any, pos: int) -> str:
    """The tensor name whose length field is at `pos` (checked when the file was opened)."""
    (n,) = _U64.unpack_from(buf, pos)
    return buf[pos + _STRING_HEADER : pos + _STRING_HEADER + n].decode("utf-8")


def _unaligned(buf: Any, size: int, dtype: str) -> np.ndarray:
    """A read-only view whose element i is the `dtype` value at byte i of the file: fields at any offset."""
    dt = np.dtype(dtype)
    return np.ndarray((size - dt.itemsize + 1,), dt, buf, 0, (1,))


class GGUFFile:
    """A GGUF file opened read-only with its tensors memory-mapped.

    `metadata` maps each key to a Python scalar (int, float, bool, str), a
    read-only numpy array (numeric arrays) or a `StringArray`; `tensors` maps
    each tensor's name to its `Tensor` (a `TensorTable`).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._map, self.stat = _map_file(self.path)
        size = len(self._map)
        try:
            self.metadata, infos, hashes, order, data_start = _read_header(self._map, size)
        except _Corrupt as e:
            raise self.error(f"is truncated or corrupt ({e})") from None
        self.alignment: int = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        self.data_offset = data_start
        self._check_tensors(infos, data_start, size)
        data = np.frombuffer(self._map, np.uint8)  # tensor views keep the mapping alive
        self.tensors = TensorTable(self._map, data, data_start, infos, hashes, order)
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

    def _check_tensors(self, infos: np.ndarray, data_start: int, size: int) -> None:
        """Each tensor's dimensions, type, alignment and bytes, and that no two share bytes.

        With numpy, a chunk of tensors at a time (a file may list a million): the
        info fields are read in place through views of the mapping at any byte
        offset, and the first tensor with a problem is handed to `_refuse`, which
        names the problem. `_read_tensor_infos` checked that every info lies
        inside the file and has 1 to MAX_DIMS dimensions.
        """
        n = len(infos)
        offsets, nbytes = np.empty(n, np.int64), np.empty(n, np.int64)
        views = _unaligned(self._map, size, "<u4"), _unaligned(self._map, size, "<u8")
        for lo in range(0, n, _CHECK_CHUNK):
            bad = self._sizes(views, infos[lo : lo + _CHECK_CHUNK], data_start, size,
                              offsets[lo : lo + _CHECK_CHUNK], nbytes[lo : lo + _CHECK_CHUNK])
            if bad.size:
                self._refuse(int(infos[lo + bad[0]]), data_start, size)
        by_offset = np.argsort(offsets, kind="stable")
        starts = offsets[by_offset]
        del offsets
        ends = starts + nbytes[by_offset]
        del nbytes
        clash = np.flatnonzero(ends[:-1] > starts[1:])
        if clash.size:
            j = int(clash[0])
            a, b = (_name_at(self._map, int(infos[by_offset[k]])) for k in (j, j + 1))
            raise self.error(f"is truncated or corrupt (the data of tensors {a} and {b} overlap)")

    def _sizes(self, views: tuple[np.ndarray, np.ndarray], infos: np.ndarray, data_start: int, size: int,
               offsets: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Fill in the offsets and byte sizes of the tensors whose infos start at `infos`;
        return the indices of those that break a rule (see `_refuse`)."""
        u32, u64 = views
        at = infos + _STRING_HEADER + u64[infos].astype(np.int64)  # each info's n_dims
        n_dims = u32[at].astype(np.int64)
        at += 4  # the first dimension: the row length
        row = u64[at]
        values = row.astype(np.float64)  # within 1e-15 of the true count: past 2**62, _refuse checks exactly
        rest = np.ones(len(infos), np.uint64)  # the other dimensions multiplied; exact where values is small
        least = row
        for k in range(1, MAX_DIMS):
            has = n_dims > k
            d = np.where(has, u64[at + 8 * k * has], np.uint64(1))
            least = np.minimum(least, d)
            values *= d
            rest *= d
        at += 8 * n_dims  # the type id, then the offset
        type_ids, offsets[:] = u32[at], np.minimum(u64[at + 4], np.uint64(size + 1))
        bad = (least == 0) | (values >= 2.0**62) | (offsets > size) | ~np.isin(type_ids, _SUPPORTED_IDS)
        type_ids = np.where(bad, _F32, type_ids)  # a type whose blocks are one value, for the arithmetic below
        block, block_bytes = _BLOCK[type_ids], _BLOCK_BYTES[type_ids]
        bad |= (row % block != 0) | (offsets % self.alignment != 0)
        size_ = np.where(bad, 0, row // block * block_bytes * rest)  # fewer than 2**62 values of at most 4 bytes
        nbytes[:] = np.minimum(size_, np.uint64(size + 1))
        bad |= nbytes > size - data_start - offsets
        return np.flatnonzero(bad)

    def _refuse(self, pos: int, data_start: int, size: int) -> NoReturn:
        """Raise the first problem of the tensor whose info starts at `pos`: the one-tensor twin of `_sizes`."""
        name = _name_at(self._map, pos)
        *dims, type_id, offset = self._info_fields(pos)
        if min(dims) < 1 or math.prod(dims) > INT64_MAX:
            raise self.error(f"is truncated or corrupt (tensor {name} has dimensions {dims}, which no tensor can have)")
        if offset > size:
            raise self.error(f"is truncated or corrupt (tensor {name} starts at offset {offset}, past the end of the file)")
        qtype, block, block_bytes = self._encoding(type_id, name)
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
        end = data_start + offset + dims[0] // block * block_bytes * math.prod(dims[1:])
        if end > size:
            raise self.error(f"is truncated: tensor {name} ends at byte {end} but the file has {size} bytes")
        raise AssertionError(f"tensor {name} was flagged but breaks no rule")

    def _info_fields(self, pos: int) -> tuple[int, ...]:
        """dims..., type id, offset of the tensor info whose name's length is at `pos`."""
        (n,) = _U64.unpack_from(self._map, pos)
        pos += _STRING_HEADER + n
        (n_dims,) = _U32.unpack_from(self._map, pos)
        return _INFO_TAIL[n_dims].unpack_from(self._map, pos + 4)

    def error(self, problem: str) -> LfmEdgeError:
        return LfmEdgeError(f"{self.path}: {_one_line(problem)}")

    def header_sha256(self) -> str:
        """SHA-256 of everything before the tensor data: the metadata and the tensor infos."""
        with memoryview(self._map) as view:
            return hashlib.sha256(view[:self.data_offset]).hexdigest()

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


def _map_file(path: Path) -> tuple[mmap.mmap, os.stat_result]:
    """The file mapped read-only, after checking it is a GGUF file at all, and its status."""
    try:
        if not path.exists():
            raise LfmEdgeError(f"{path}: no such file")
        if not path.is_file():
            raise LfmEdgeError(f"{path}: is not a file")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise LfmEdgeError(f"{path}: is not a GGUF file (it does not start with the GGUF magic bytes)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), os.fstat(f.fileno())
    except OSError as e:
        raise LfmEdgeError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_header(buf: Any, size: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, int]:
    """The metadata; where each tensor info starts, the names' hashes sorted and the tensor
    each belongs to (see `TensorTable`); and where the data section starts."""
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
    infos, hashes = _read_tensor_infos(c, n_tensors)
    order = _check_unique_names(buf, infos, hashes)
    hashes = hashes[order]
    if len(order) < 2**31:
        order = order.astype(np.int32)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise _Corrupt(f"general.alignment should be an integer, found {type(alignment).__name__}")
    if not 1 <= alignment <= MAX_ALIGNMENT:
        raise _Corrupt(f"general.alignment = {alignment}; it must be a power of two from 1 to {MAX_ALIGNMENT}")
    if alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment = {alignment} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    if len(infos) and data_start > size:
        raise _Corrupt(f"the tensor data would start at byte {data_start}, past the end of the file ({size} bytes)")
    return metadata, infos, hashes, order, data_start


def _read_tensor_infos(c: _Cursor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each of n tensor infos starts and the hash of its name: int64 [n] each.

    The one pass that must go in order (each info starts where the last one's
    dimensions end), so it does only that, and checks each name (inside the file,
    UTF-8) and dimension count; `GGUFFile._check_tensors` checks the rest.
    """
    infos, hashes = array("q", [0]) * n, array("q", [0]) * n
    buf, pos, size, u32, u64 = c.buf, c.pos, c.size, _U32.unpack_from, _U64.unpack_from
    for i in range(n):
        if pos + _STRING_HEADER > size:
            raise _Corrupt(f"tensor info {i} starts past the end of the file")
        infos[i] = pos
        (k,) = u64(buf, pos)
        pos += _STRING_HEADER
        if k > size - pos:
            raise _Corrupt(f"the name of tensor {i} claims {k} bytes, but only {size - pos} remain")
        try:
            name = buf[pos : pos + k].decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"the name of tensor {i} is not valid UTF-8") from None
        hashes[i] = hash(name)
        pos += k
        if pos + 4 > size:
            raise _Corrupt(f"the info of tensor {name} runs past the end of the file")
        (n_dims,) = u32(buf, pos)
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions; a tensor has 1 to {MAX_DIMS}")
        pos += 4 + 8 * n_dims + 12  # dims, type, offset
        if pos > size:
            raise _Corrupt(f"the info of tensor {name} runs past the end of the file")
    c.pos = pos
    return np.frombuffer(infos, np.int64), np.frombuffer(hashes, np.int64)


def _check_unique_names(buf: Any, infos: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """The tensors in the order of their names' hashes, after checking no name is given twice."""
    order = np.argsort(hashes, kind="stable")
    ranked = hashes[order]
    tied = np.flatnonzero(ranked[1:] == ranked[:-1])
    seen: set[str] = set()
    # a name given twice ends the read at its second sight; 64-bit hashes of different names are rarely equal
    for j in np.union1d(tied, tied + 1).tolist():
        name = _name_at(buf, int(infos[order[j]]))
        if name in seen:
            raise _Corrupt(f"tensor {name} is listed twice")
        seen.add(name)
    return order
