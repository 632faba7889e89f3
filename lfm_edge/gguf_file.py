"""Reading GGUF files: metadata and memory-mapped tensors, checked before use.

This module knows the container format only. Which tensors an architecture
needs, and in what shapes, is said by the architecture files in `models/`.
Every way a file can be wrong ends in an `LfmEdgeError` that names the file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from .errors import LfmEdgeError

GGUF_MAGIC = b"GGUF"

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
        if not hasattr(mmap, "MADV_DONTNEED") or not isinstance(self.data.base, np.memmap | mmap.mmap):
            return
        page = mmap.PAGESIZE
        start = self.data.ctypes.data
        first = -(-start // page) * page  # only whole pages inside this tensor
        last = (start + self.data.nbytes) // page * page
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


class GGUFFile:
    """A GGUF file opened read-only with its tensors memory-mapped."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        reader = _open_reader(self.path)
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = _field_value(field)
        self.tensors: dict[str, Tensor] = {}
        file_size = self.path.stat().st_size
        for t in reader.tensors:
            self.tensors[t.name] = self._check_tensor(reader, t, file_size)
        self.arch: str = self.get("general.architecture", str)

    def _check_tensor(self, reader: GGUFReader, t: Any, file_size: int) -> Tensor:
        name = t.name
        try:
            qtype = GGMLQuantizationType(int(t.tensor_type))
        except ValueError:
            raise self.error(f"tensor {name} has unknown type id {int(t.tensor_type)}") from None
        if qtype not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise self.error(
                f"tensor {name} is stored as {qtype.name}, which lfm-edge does not support yet "
                f"(supported: {supported})"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, _ = GGML_QUANT_SIZES[qtype]
        if qtype in SUPER_BLOCK_TYPES and all(d > 0 for d in shape) and shape[-1] % block:
            raise self.error(
                f"tensor {name} has rows of {shape[-1]} values, but {qtype.name} stores rows in "
                f"super-blocks of {block}, so the row length must be a multiple of {block}"
            )
        if any(d <= 0 for d in shape) or shape[-1] % block:
            raise self.error(f"tensor {name} has shape {shape}, invalid for {qtype.name}")
        start = int(t.data_offset)
        tensor = Tensor(name, qtype, shape, np.empty(0, np.uint8))
        end = start + tensor.nbytes
        if end > file_size:
            raise self.error(
                f"is truncated: tensor {name} ends at byte {end} but the file has {file_size} bytes"
            )
        data = reader.data[start:end]
        return Tensor(name, qtype, shape, data)

    def error(self, problem: str) -> LfmEdgeError:
        return LfmEdgeError(f"{self.path}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The metadata value `key`, checked to be of `kind` (int, float, str, list or a tuple of them)."""
        if key not in self.metadata:
            if default is ...:
                raise self.error(f"metadata key {key} is missing")
            return default
        value = self.metadata[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            value = int(value)
        if not isinstance(value, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(f"metadata key {key} should be {kinds}, found {type(value).__name__}")
        return value


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _open_reader(path: Path) -> GGUFReader:
    if not path.exists():
        raise LfmEdgeError(f"{path}: no such file")
    if not path.is_file():
        raise LfmEdgeError(f"{path}: is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LfmEdgeError(f"{path}: is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError) as e:
        # The gguf package raises these when a length or offset runs past the
        # end of the mapping, i.e. the file was cut short or is corrupt.
        raise LfmEdgeError(f"{path}: is truncated or corrupt ({e})") from None


def _field_value(field: Any) -> Any:
    """A metadata field as a plain Python value (arrays become lists)."""
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value
