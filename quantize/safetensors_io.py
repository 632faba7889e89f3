"""Reading safetensors files with numpy, bf16 included.

The `safetensors` package's numpy loader cannot return bf16 (numpy has no
such dtype), and the published LFM2 checkpoints are bf16. The format is a
little-endian u64 header length, a JSON header, then raw tensor bytes, so we
map the file and widen bf16 to float32 ourselves.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from lfm_edge.errors import LfmEdgeError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                self.header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise LfmEdgeError(f"{path}: is not a readable safetensors file ({e})") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.map = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (float64 stays float64)."""
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise LfmEdgeError(f"{self.path}: tensor {name} has dtype {info['dtype']}, expected F32, F16 or BF16")
        begin, end = info["data_offsets"]
        raw = self.map[self.data_start + begin : self.data_start + end]
        shape = tuple(info["shape"])
        if raw.size != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise LfmEdgeError(f"{self.path}: tensor {name} is truncated")
        arr = raw.view(dtype).reshape(shape)
        if info["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32) if dtype is np.float16 else arr


class Checkpoint:
    """All tensors of a Hugging Face checkpoint, from one file or an index of shards."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError("no tensors")
            except (ValueError, KeyError, TypeError) as e:
                raise LfmEdgeError(f"{index}: is not a safetensors index with a weight_map ({e})") from None
            files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
            self.where = {name: files[f] for name, f in weight_map.items()}
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise LfmEdgeError(f"{directory}: no .safetensors weights found")
            self.where = {}
            for p in shards:
                f = SafetensorsFile(p)
                for name in f.names():
                    self.where[name] = f

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def load(self, name: str) -> np.ndarray:
        return self.where[name].load(name)


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write float32/float16 numpy arrays as a safetensors file (what `safetensors.numpy.save_file` does)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in names:
            raise ValueError(f"{name}: dtype {arr.dtype} is not float32 or float16")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
