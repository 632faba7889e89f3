"""GGUF files with a huge tensor table or a huge metadata array, and what reading them costs.

The files are a small model (any GGUF file, e.g. `lfm-edge demo-model`) with, added:
`tensors` N tiny F32 tensors (x.0000000, ... : 8 values each); `strings` one metadata array
`x.strings` of N one-letter strings; `numbers` one array `x.numbers` of N int32. They are
written with numpy, a few seconds for N = 10^6 tensors or 10^7 elements.

Each measurement runs in a fresh Python process: its peak resident memory (VmHWM) over its
resident memory once lfm_edge is imported, and the wall time, for `open` (GGUFFile), `info`
(`lfm-edge info FILE`) and `load` (`lfm_edge.load`). Peak memory counts the file's pages the
process read through the mapping.

    python tests/big_gguf.py --dir /tmp/big            # 10^6 tensors, 10^7 strings, 10^7 numbers
    python tests/big_gguf.py --dir /tmp/big --tensors 100000 --elements 1000000 --ops open

tests/test_gguf_reader.py builds smaller ones and bounds their cost relative to the file size.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import fuzz_gguf as fz  # noqa: E402

KINDS = ("tensors", "strings", "numbers")
EXTRA_TENSOR_VALUES = 8  # F32 values in each added tensor: 32 bytes, the default alignment
STRING_U64 = 8


def _digits(n: int, width: int) -> np.ndarray:
    """uint8 [n, width]: the decimal digits of 0 .. n-1, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (np.arange(n, dtype=np.int64)[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _tensor_infos(n: int, first_offset: int) -> bytes:
    """n tensor infos: name x.NNNNNNN, one dimension of 8, F32, offsets 32 bytes apart."""
    width = max(7, len(str(n - 1)))
    info = np.dtype([("len", "<u8"), ("name", np.uint8, (2 + width,)), ("n_dims", "<u4"),
                     ("dim", "<u8"), ("type", "<u4"), ("offset", "<u8")])  # packed, as in the file
    rows = np.zeros(n, info)
    rows["len"] = 2 + width
    rows["name"][:, :2] = np.frombuffer(b"x.", np.uint8)
    rows["name"][:, 2:] = _digits(n, width)
    rows["n_dims"], rows["dim"], rows["type"] = 1, EXTRA_TENSOR_VALUES, 0
    rows["offset"] = first_offset + 4 * EXTRA_TENSOR_VALUES * np.arange(n, dtype=np.uint64)
    return rows.tobytes()


def _string_array(n: int) -> bytes:
    """The payload of an array of n one-letter strings, a to z in turn."""
    item = np.zeros(n, np.dtype([("len", "<u8"), ("s", np.uint8)]))
    item["len"] = 1
    item["s"] = ord("a") + np.arange(n) % 26
    return struct.pack("<IQ", fz.STRING, n) + item.tobytes()


def write(base: Path, out: Path, kind: str, n: int) -> Path:
    """`base` with n tensors, strings or numbers added (see the module's doc)."""
    g = fz.parse(base.read_bytes())
    kvs = list(g.kvs)
    if kind == "strings":
        kvs.append(fz.KV("x.strings", fz.ARRAY, _string_array(n)))
    elif kind == "numbers":
        kvs.append(fz.KV("x.numbers", fz.ARRAY, struct.pack("<IQ", 5, n) + np.arange(n, dtype="<i4").tobytes()))
    n_added = n if kind == "tensors" else 0
    align = g.alignment
    parts = [struct.pack("<4sIQQ", b"GGUF", g.version, len(g.tensors) + n_added, len(kvs))]
    for kv in kvs:
        parts += [fz.enc_str(kv.key), struct.pack("<I", kv.vtype), kv.payload]
    for t in g.tensors:
        parts += [fz.enc_str(t.name), struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.ttype, t.offset)]
    data = g.data + bytes(-len(g.data) % align)
    if n_added:
        parts.append(_tensor_infos(n_added, len(data)))
    head = sum(len(p) for p in parts)
    parts.append(bytes(-head % align))
    parts.append(data)
    with open(out, "wb") as f:
        for p in parts:
            f.write(p)
        if n_added:
            f.truncate(f.tell() + 4 * EXTRA_TENSOR_VALUES * n_added)  # the added tensors' data: zeros
    return out


# -- measuring, each in a fresh process ----------------------------------------------------------
_CHILD = r"""
import contextlib, io, json, sys, time
def status(field):
    with open("/proc/self/status") as s:
        return next(int(l.split()[1]) for l in s if l.startswith(field + ":")) * 1024
import lfm_edge, lfm_edge.cli
from lfm_edge.errors import LfmEdgeError
from lfm_edge.gguf_file import GGUFFile
op, path = sys.argv[1], sys.argv[2]
base = status("VmRSS")
start = time.perf_counter()
outcome = "ok"
try:
    if op == "open":
        f = GGUFFile(path)
        outcome = f"ok: {len(f.tensors)} tensors"
    elif op == "load":
        lfm_edge.load(path)
    elif op == "info":
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = lfm_edge.cli.main(["info", path])
        outcome = "ok" if rc == 0 else err.getvalue().strip()
except LfmEdgeError as e:
    outcome = f"error: {e}"
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": status("VmHWM") - base, "outcome": outcome}))
"""


def measure(op: str, path: Path, timeout: float = 600) -> dict:
    """{seconds, peak (bytes over the imported baseline), outcome} of `op` on `path`, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _CHILD, op, str(path)], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{op} {path} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="where to write the files")
    p.add_argument("--base", type=Path, help="the model to add to (default: a demo model written here)")
    p.add_argument("--tensors", type=int, default=10**6)
    p.add_argument("--elements", type=int, default=10**7, help="strings and numbers in the arrays")
    p.add_argument("--ops", default="open,info,load", help="which measurements (open, info, load)")
    p.add_argument("--kinds", default=",".join(KINDS))
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    base = args.base
    if base is None:
        base = args.dir / "base.gguf"
        if not base.exists():
            subprocess.run([sys.executable, "-m", "lfm_edge", "demo-model", str(base)], check=True,
                           cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    print(f"base {base}: {base.stat().st_size / 1e6:.2f} MB")
    for kind in args.kinds.split(","):
        n = args.tensors if kind == "tensors" else args.elements
        path = args.dir / f"{kind}-{n}.gguf"
        if not path.exists():
            write(base, path, kind, n)
        size = path.stat().st_size
        for op in args.ops.split(","):
            r = measure(op, path)
            print(f"{kind:8} n={n:<9} file {size / 1e6:7.1f} MB  {op:5} {r['seconds']:7.2f} s  "
                  f"peak +{r['peak'] / 1e6:8.1f} MB ({r['peak'] / size:5.2f}x file)  {r['outcome'][:150]}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
