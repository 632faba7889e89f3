"""A GGUF mutation fuzzer: hostile model files end in one sentence, never a crash, hang or blow-up.

Each case is a tiny test model (tests/conftest.py's `gguf_path('moe')`, `gguf_path('dense')`)
with one or two mutations: header counts, string and array lengths, value and tensor types,
tensor dimensions and offsets, alignment, tokenizer metadata, chat templates, tensor data
(NaN, inf, random bytes), truncation and byte flips. Mutations are seeded: case i of seed s is
the same file on every run.

Every case goes through load -> tokenize -> logits -> chat -> generate (a few tokens) in a
worker subprocess under a time limit and an address-space limit (RLIMIT_AS); several cases
share one worker, and a worker that dies or hangs is replaced and the rest of its batch goes
on in a new one. A case passes if it works or ends in an `LfmEdgeError` of one line; any other
exception, a hang, a signal, a non-zero exit or a traceback on stderr is a failure.

    pytest -q tests/test_gguf_reader.py               # the short deterministic run, with the reader's tests
    python tests/fuzz_gguf.py --cases 20000 --seed 7 --jobs 2 --save /tmp/fuzz-failures

The CLI makes its tiny models itself, prints a tally of outcomes and failure classes, and with
--save keeps each failing case as a regression file (see `save_regression`). Regression files
live in tests/fuzz/ and are replayed by tests/test_gguf_reader.py.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_worker import Ended, supervise

HERE = Path(__file__).parent
REGRESSIONS = HERE / "fuzz"
BASES = [("moe", "f32"), ("moe", "q4_0"), ("dense", "q8_0"), ("dense", "f32")]
CASE_TIMEOUT = 30.0  # seconds one case may take (a tiny model needs ~0.2 s)
BATCH = 25  # cases per worker process
WORKER_PATH: list[str] = []  # directories put first on the workers' sys.path (--lfm-edge)

# -- the file format, written and read without trusting anything -----------------------------
# value types: struct code of a scalar (STRING = 8, ARRAY = 9)
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class KV:
    key: str
    vtype: int
    payload: bytes  # the value as serialised after its type


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    ttype: int
    offset: int


@dataclass
class Gguf:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    alignment: int
    data: bytes  # the data section


@dataclass
class Field:
    kind: str  # what the bytes at pos are: "n_tensors", "str_len", "arr_len", ...
    pos: int
    size: int  # 4 or 8


def enc_str(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def enc_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return enc_str(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc_value(etype, v) for v in items)
    return struct.pack("<" + SCALAR[vtype], value)


def parse(data: bytes) -> Gguf:
    """A well-formed file (the fuzzer's own base files) as editable parts."""
    pos = 24
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        return s

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == STRING:
            string()
        elif vtype == ARRAY:
            etype, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == STRING:
                for _ in range(n):
                    string()
            else:
                pos += n * struct.calcsize("<" + SCALAR[etype])
        else:
            pos += struct.calcsize("<" + SCALAR[vtype])

    kvs = []
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        start = pos
        skip(vtype)
        kvs.append(KV(key, vtype, data[start:pos]))
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, start)
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
        ttype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append(TensorInfo(name, dims, ttype, offset))
    start = -(-pos // alignment) * alignment
    return Gguf(version, kvs, tensors, alignment, data[start:])


def serialize(g: Gguf) -> tuple[bytes, list[Field]]:
    """The file's bytes and where each count, length, type and offset lies in them."""
    out = bytearray(b"GGUF")
    fields: list[Field] = []

    def put(kind: str, fmt: str, value: int) -> None:
        fields.append(Field(kind, len(out), struct.calcsize(fmt)))
        out.extend(struct.pack(fmt, value))

    def put_str(kind: str, s: str) -> None:
        raw = s.encode()
        put(kind, "<Q", len(raw))
        out.extend(raw)

    put("version", "<I", g.version)
    put("n_tensors", "<Q", len(g.tensors))
    put("n_kv", "<Q", len(g.kvs))
    for kv in g.kvs:
        put_str("key_len", kv.key)
        put("vtype", "<I", kv.vtype)
        base = len(out)
        out.extend(kv.payload)
        if kv.vtype == STRING:
            fields.append(Field("str_len", base, 8))
        elif kv.vtype == ARRAY and len(kv.payload) >= 12:
            fields.append(Field("arr_type", base, 4))
            fields.append(Field("arr_len", base + 4, 8))
            (etype,) = struct.unpack_from("<I", kv.payload, 0)
            if etype == STRING:  # the first few string lengths of the array
                p = 12
                for _ in range(3):
                    if p + 8 > len(kv.payload):
                        break
                    fields.append(Field("str_len", base + p, 8))
                    p += 8 + struct.unpack_from("<Q", kv.payload, p)[0]
    for t in g.tensors:
        put_str("name_len", t.name)
        put("n_dims", "<I", len(t.dims))
        for d in t.dims:
            put("dim", "<Q", d)
        put("ttype", "<I", t.ttype)
        put("offset", "<Q", t.offset)
    out.extend(bytes(-len(out) % max(g.alignment, 1) if 0 < g.alignment <= 1 << 16 else -len(out) % 32))
    out.extend(g.data)
    return bytes(out), fields


# -- mutations --------------------------------------------------------------------------------
U32 = [0, 1, 2, 3, 5, 7, 9, 13, 0x7F, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]
U64 = U32 + [0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, 10**7, 10**9]
F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
TEMPLATES = [
    "",
    "{{",
    "{% for m in messages %}{{ m.content }}",
    "{{ raise_exception('no') }}",
    "{{ messages[99].content }}",
    "{{ 1 / 0 }}",
    "{{ messages[0].content|int + 'x' }}",
    "{% for m in messages %}{{ m.nope.deeper }}{% endfor %}",
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n",
    "{{ ''.__class__ }}",
    "{{ range(10)|list|sum }}{{ messages|tojson }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(50) }}",
    r"{{ '\udcff' }}",
    "{{ strftime_now('%Y') }}{{ tools|length }}",
]


def _kv(g: Gguf, key: str) -> KV | None:
    return next((kv for kv in g.kvs if kv.key == key), None)


def _set(g: Gguf, key: str, vtype: int, value) -> str:
    payload = enc_value(vtype, value)
    kv = _kv(g, key)
    if kv is None:
        g.kvs.append(KV(key, vtype, payload))
    else:
        kv.vtype, kv.payload = vtype, payload
    return f"set {key} ({vtype}) to {str(value)[:60]!r}"


def _strings(kv: KV) -> list[bytes]:
    etype, n = struct.unpack_from("<IQ", kv.payload, 0)
    out, p = [], 12
    for _ in range(n):
        (m,) = struct.unpack_from("<Q", kv.payload, p)
        out.append(kv.payload[p + 8 : p + 8 + m])
        p += 8 + m
    return out


def _ints(kv: KV) -> tuple[int, list]:
    etype, n = struct.unpack_from("<IQ", kv.payload, 0)
    return etype, list(struct.unpack_from(f"<{n}{SCALAR[etype]}", kv.payload, 12))


def mut_field(g: Gguf, rng: random.Random) -> tuple[bytes, str]:
    data, fields = serialize(g)
    f = rng.choice(fields)
    old = int.from_bytes(data[f.pos : f.pos + f.size], "little")
    pool = U32 if f.size == 4 else U64
    value = rng.choice(pool + [old + 1, max(old - 1, 0), old * 2, rng.randrange(1 << (8 * f.size)), len(data) - f.pos])
    value &= (1 << (8 * f.size)) - 1
    out = bytearray(data)
    out[f.pos : f.pos + f.size] = value.to_bytes(f.size, "little")
    return bytes(out), f"{f.kind} at byte {f.pos}: {old} -> {value}"


def mut_truncate(g: Gguf, rng: random.Random) -> tuple[bytes, str]:
    data, _ = serialize(g)
    meta_end = len(data) - len(g.data)
    cut = rng.randrange(meta_end) if rng.random() < 0.7 else rng.randrange(len(data))
    return data[:cut], f"truncated at byte {cut} of {len(data)}"


def mut_flip(g: Gguf, rng: random.Random) -> tuple[bytes, str]:
    data, _ = serialize(g)
    meta_end = len(data) - len(g.data)
    out = bytearray(data)
    n = rng.choice([1, 2, 4, 16])
    for _ in range(n):
        i = rng.randrange(meta_end) if rng.random() < 0.8 else rng.randrange(len(data))
        out[i] = rng.randrange(256)
    return bytes(out), f"{n} random bytes"


def mut_alignment(g: Gguf, rng: random.Random) -> str:
    if rng.random() < 0.2:
        return _set(g, "general.alignment", STRING, "32")
    value = rng.choice([0, 1, 3, 8, 24, 64, 4096, 1 << 20, 1 << 21, 1 << 31, 0xFFFF_FFFF])
    desc = _set(g, "general.alignment", 4, value)
    if 0 < value <= 1 << 16 and not value & (value - 1):  # a valid one: lay the data out for it
        g.alignment = value
        pos, data = 0, bytearray()
        for t in sorted(g.tensors, key=lambda t: t.offset):
            nxt = [u.offset for u in g.tensors if u.offset > t.offset]
            chunk = g.data[t.offset : min(nxt) if nxt else len(g.data)]
            pos = -(-len(data) // value) * value
            data.extend(bytes(pos - len(data)))
            t.offset = pos
            data.extend(chunk)
        g.data = bytes(data)
    return desc


def mut_kv(g: Gguf, rng: random.Random) -> str:
    kv = rng.choice(g.kvs)
    r = rng.random()
    if r < 0.15:
        g.kvs.remove(kv)
        return f"dropped {kv.key}"
    if r < 0.25:
        g.kvs.append(KV(kv.key, kv.vtype, kv.payload))
        return f"duplicated {kv.key}"
    if r < 0.4:
        return _set(g, kv.key, STRING, rng.choice(["", "x", "lfm2", "lfm2moe"]))
    if r < 0.5 and kv.vtype == STRING:
        kv.payload = enc_str(b"\xff\xfe" + kv.payload[8:20] + b"\xc3")
        return f"invalid UTF-8 in {kv.key}"
    if r < 0.6:
        return _set(g, kv.key, ARRAY, (rng.choice([4, 6, 8]), []))
    vtype = rng.choice([4, 5, 6, 7, 10, 11, 12])
    values = {6: [0.0, -1.0, 1e30, float("nan"), float("inf"), 1e-30], 12: [0.0, -1.0, 1e300, float("nan"), float("inf")],
              7: [True, False], 5: [0, -1, 1, 2**31 - 1, -(2**31)], 11: [0, -1, 2**63 - 1, -(2**63)]}
    value = rng.choice(values.get(vtype, [0, 1, 2, 3, 7, 64, 2**31, 2**32 - 1] if vtype == 4 else [0, 1, 7, 2**40, 2**64 - 1]))
    return _set(g, kv.key, vtype, value)


def mut_tokenizer(g: Gguf, rng: random.Random) -> str:
    tokens_kv, types_kv, merges_kv = (_kv(g, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    try:  # an earlier mutation may have made them something else
        tokens, merges = _strings(tokens_kv), _strings(merges_kv)
        etype, types = _ints(types_kv)
    except (AttributeError, KeyError, struct.error):
        return _set(g, "tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "b"]))
    n = len(tokens)
    if n == 0:  # an earlier mutation emptied the list: give it tokens again
        return _set(g, "tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "b"]))
    choice = rng.randrange(14)
    if choice == 0:
        i, j = rng.randrange(n), rng.randrange(n)
        tokens[i] = tokens[j]
        desc = f"token {i} = token {j}"
    elif choice == 1:
        tokens[rng.randrange(n)] = b""
        desc = "an empty token"
    elif choice == 2:
        tokens[rng.randrange(n)] = b"\x80abc"
        desc = "a token of invalid UTF-8"
    elif choice == 3:
        tokens.pop()
        desc = "one token fewer"
    elif choice == 4:
        types = types[: rng.choice([0, n - 1, n // 2])] if rng.random() < 0.5 else types + [1]
        desc = f"{len(types)} token types"
    elif choice == 5:
        types = [rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 99, 2**31 - 1]) for _ in types]
        desc = "random token types"
    elif choice == 6:
        i = rng.randrange(len(merges))
        merges[i] = rng.choice([b"ab", b"", b" ", b"a b c", b"\xe2\x96\x81zz qq", b"a  b", b"x\x00 y"])
        desc = f"merge {i} = {merges[i]!r}"
    elif choice == 7:
        merges = merges[: rng.randrange(len(merges))] + [b"%d %d" % (rng.randrange(99), rng.randrange(99))]
        desc = "merges cut, one of numbers"
    elif choice == 8:
        desc = _set(g, "tokenizer.ggml.merges", ARRAY, (5, [1, 2, 3]))
    elif choice == 9:
        desc = _set(g, "tokenizer.ggml.tokens", ARRAY, (5, list(range(n))))
    elif choice == 10:
        desc = _set(g, "tokenizer.ggml.token_type", ARRAY, (8, ["1"] * n))
    elif choice == 11:
        which = rng.choice(["bos", "eos", "padding", "unknown"])
        desc = _set(g, f"tokenizer.ggml.{which}_token_id", rng.choice([4, 5, 11]), rng.choice([n, n + 1, 2**31 - 1]))
    elif choice == 12:
        desc = _set(g, rng.choice(["tokenizer.ggml.model", "tokenizer.ggml.pre"]), STRING, rng.choice(["llama", "", "gpt2", "lfm2"]))
    else:
        desc = _set(g, "tokenizer.ggml.add_bos_token", *rng.choice([(7, False), (4, 1), (STRING, "yes")]))
    if choice <= 3:
        tokens_kv.payload = struct.pack("<IQ", STRING, len(tokens)) + b"".join(enc_str(t) for t in tokens)
    if choice in (4, 5):
        types_kv.payload = struct.pack("<IQ", 5, len(types)) + struct.pack(f"<{len(types)}i", *types)
    if choice in (6, 7):
        merges_kv.payload = struct.pack("<IQ", STRING, len(merges)) + b"".join(enc_str(m) for m in merges)
    return desc


def mut_template(g: Gguf, rng: random.Random) -> str:
    kv = _kv(g, "tokenizer.chat_template")
    if kv is not None and kv.vtype == STRING and len(kv.payload) > 8 and rng.random() < 0.3:
        src = kv.payload[8:]
        cut = rng.randrange(len(src))
        kv.payload = enc_str(src[:cut] + bytes([rng.randrange(32, 127)]) + src[cut + 1 :])
        return f"template byte {cut} changed"
    return _set(g, "tokenizer.chat_template", STRING, rng.choice(TEMPLATES))


def mut_tensor(g: Gguf, rng: random.Random) -> str:
    if not g.tensors:
        return mut_kv(g, rng)
    t = rng.choice(g.tensors)
    choice = rng.randrange(9)
    if choice == 0:
        t.ttype = rng.choice([F32, F16, Q4_0, Q8_0, 3, 12, 14, 30, 39, 40, 99, 2**31])
        return f"{t.name} type -> {t.ttype}"
    if choice == 1:
        t.dims = []
        return f"{t.name} has no dimensions"
    if choice == 2:
        t.dims = t.dims[::-1]
        return f"{t.name} dims reversed"
    if choice == 3:
        t.dims = [d * 2 for d in t.dims] if rng.random() < 0.5 else t.dims + [1, 1, 1]
        return f"{t.name} dims {t.dims}"
    if choice == 4:
        other = rng.choice(g.tensors)
        t.offset = other.offset
        return f"{t.name} shares the data of {other.name}"
    if choice == 5:
        t.name = rng.choice(g.tensors).name
        return f"a tensor renamed {t.name}"
    if choice == 6:
        g.tensors.remove(t)
        return f"dropped {t.name}"
    if choice == 7:
        t.offset += rng.choice([1, 2, 32, g.alignment * 1000])
        return f"{t.name} offset moved"
    gate = [u for u in g.tensors if "gate" in u.name and u.ttype != F32]
    up = [u for u in g.tensors if "up" in u.name and u.ttype != F32]
    if gate and up:  # a gate or up weight relabelled, so the pair has two types (and wrong sizes)
        u = rng.choice(gate + up)
        u.ttype = Q8_0 if u.ttype == Q4_0 else Q4_0
        return f"{u.name} relabelled as type {u.ttype}"
    t.ttype = F16 if t.ttype == F32 else F32
    return f"{t.name} relabelled as type {t.ttype}"


def mut_data(g: Gguf, rng: random.Random) -> str:
    if not g.tensors:
        return mut_kv(g, rng)
    data = bytearray(g.data)
    t = rng.choice([u for u in g.tensors if u.ttype in (F32, F16)] or g.tensors)
    n = 1
    for d in t.dims:
        n *= d
    size = n * (4 if t.ttype == F32 else 2 if t.ttype == F16 else 1)
    end = min(t.offset + size, len(data))
    kind = rng.choice(["nan", "inf", "huge", "random", "zero"])
    if t.ttype == F32:
        fill = {"nan": b"\x00\x00\xc0\x7f", "inf": b"\x00\x00\x80\x7f", "huge": b"\xff\xff\x7f\x7f", "zero": bytes(4)}.get(kind)
    else:  # float16 values, or the float16 scale that starts a Q4_0 / Q8_0 block
        fill = {"nan": b"\x00\x7e", "inf": b"\x00\x7c", "huge": b"\xff\x7b", "zero": bytes(2)}.get(kind)
    if fill is None:
        data[t.offset : end] = rng.randbytes(max(0, end - t.offset))
    elif rng.random() < 0.5:
        data[t.offset : end] = (fill * (size // len(fill) + 1))[: end - t.offset]
    else:
        i = t.offset + rng.randrange(max(1, (end - t.offset) // len(fill))) * len(fill)
        data[i : i + len(fill)] = fill
    g.data = bytes(data)
    return f"{t.name} data: {kind}"


SEMANTIC = [mut_alignment, mut_kv, mut_tokenizer, mut_template, mut_tensor, mut_data]
RAW = [mut_field, mut_truncate, mut_flip]


def make_case(bases: dict[str, bytes], seed: int, index: int) -> tuple[bytes, str]:
    """Case `index` of run `seed`: a base file with one or two mutations."""
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(sorted(bases))
    g = parse(bases[base])
    notes = [base]
    for _ in range(rng.choice([1, 1, 1, 2])):
        notes.append(rng.choice(SEMANTIC)(g, rng))
    if rng.random() < 0.45:
        data, note = rng.choice(RAW)(g, rng)
        notes.append(note)
    else:
        data, _ = serialize(g)
    return data, "; ".join(notes)


# -- running cases -----------------------------------------------------------------------------
def run_one(path: str) -> str:
    """The pipeline a user's file meets; returns 'ok' or raises."""
    import lfm_edge

    llm = lfm_edge.load(path, n_threads=1, n_ctx=256)
    ids = llm.tokenize("Hello world, ünïcödé <|im_start|> 123")
    llm.logits(ids)
    llm.chat([{"role": "user", "content": "Hi there"}], max_tokens=3, stream=False, seed=0)
    "".join(llm.generate("Once upon", max_tokens=3, seed=1))
    return "ok"


def worker(paths: list[str]) -> int:
    """Run cases one after another; one JSON line each on stdout."""
    import warnings

    from lfm_edge.errors import LfmEdgeError

    for path in paths:
        print(json.dumps({"start": path}), flush=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome, detail = run_one(path), ""
                if not isinstance(outcome, str):
                    outcome = "ok"
            except LfmEdgeError as e:
                msg = str(e)
                outcome, detail = ("error", msg) if "\n" not in msg.strip() and msg.strip() else ("multi-line error", msg)
            except BaseException as e:  # noqa: BLE001 - a raw exception is what the fuzzer looks for
                tb = traceback.extract_tb(e.__traceback__)
                where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
                outcome, detail = f"exception {type(e).__name__} at {where}", f"{type(e).__name__}: {e}"[:500]
        warned = sorted({f"{w.category.__name__} at {Path(w.filename).name}:{w.lineno}" for w in caught})
        print(json.dumps({"end": path, "outcome": outcome, "detail": detail[:500], "warnings": warned}), flush=True)
    return 0


@dataclass
class Result:
    path: str
    outcome: str  # "ok", "error", or a failure class
    detail: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.outcome in ("ok", "error")


def run_batch(paths: list[str], timeout: float = CASE_TIMEOUT) -> list[Result]:
    """Run `paths` in worker processes, a new one after each death or hang."""
    command = lambda todo: [sys.executable, str(Path(__file__).resolve()), "--worker", *todo]  # noqa: E731
    results = []
    for event in supervise(command, paths, timeout, WORKER_PATH):
        if isinstance(event, Ended):
            m = event.msg
            results.append(Result(m["end"], m["outcome"], m["detail"], m["warnings"]))
        else:
            results.append(Result(event.key, event.outcome, event.detail))
    return results


def run_cases(cases: list[tuple[bytes, str]], workdir: Path, jobs: int = 2, batch: int = BATCH,
              timeout: float = CASE_TIMEOUT) -> list[tuple[Result, str]]:
    """Write the cases to files and run them; each result with its case's description."""
    paths = []
    for i, (data, _) in enumerate(cases):
        p = workdir / f"case{i:06d}.gguf"
        p.write_bytes(data)
        paths.append(str(p))
    batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(jobs) as pool:
        done = [r for rs in pool.map(lambda b: run_batch(b, timeout), batches) for r in rs]
    by_path = {r.path: r for r in done}
    return [(by_path[p], desc) for p, (_, desc) in zip(paths, cases)]


def make_bases(root: Path) -> dict[str, bytes]:
    """The tiny test models as GGUF files (the conftest fixtures' recipe)."""
    from lfm_edge import tiny_models
    from lfm_edge.quantize.convert import convert

    out = {}
    for name, qtype in BASES:
        ck = root / "hf" / name
        if not (ck / "config.json").exists():
            ck = tiny_models.write_checkpoint(name, root / "hf")
        out[f"{name}-{qtype}"] = Path(convert(ck, root / f"{name}-{qtype}.gguf", qtype, log=lambda *_: None)).read_bytes()
    return out


# -- regression files: a case as a delta against its base file ----------------------------------
def save_regression(path: Path, base_name: str, base: bytes, case: bytes, note: str) -> None:
    """Keep a case as JSON: the base it came from, and the bytes that differ (head and tail shared)."""
    head = 0
    while head < min(len(base), len(case)) and base[head] == case[head]:
        head += 1
    tail = 0
    while tail < min(len(base), len(case)) - head and base[-1 - tail] == case[-1 - tail]:
        tail += 1
    middle = case[head : len(case) - tail]
    path.write_text(json.dumps({"base": base_name, "note": note, "head": head, "middle": middle.hex(),
                                "tail": tail, "size": len(case)}, indent=1) + "\n")


def load_regression(path: Path, bases: dict[str, bytes]) -> bytes:
    r = json.loads(path.read_text())
    base = bases[r["base"]]
    data = base[: r["head"]] + bytes.fromhex(r["middle"]) + (base[len(base) - r["tail"] :] if r["tail"] else b"")
    assert len(data) == r["size"], path
    return data


def replay(folder: Path, jobs: int, timeout: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        bases = make_bases(Path(tmp))
        files = sorted(folder.glob("*.json"))
        (Path(tmp) / "cases").mkdir()
        results = run_cases([(load_regression(f, bases), f.name) for f in files], Path(tmp) / "cases", jobs, timeout=timeout)
    for r, name in results:
        print(f"{'clean ' if r.clean else 'FAILED'} {name}: {r.outcome} {r.detail[:150]!r}")
    return 0 if all(r.clean for r, _ in results) else 1


# -- the command line --------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    # the cases' packed weights go to a folder of this run's (the workers inherit it), not to the
    # user's weight cache, which a run of 2000 cases filled with hundreds of files
    cache = tempfile.mkdtemp(prefix="lfm-edge-fuzz-weight-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["LFM_EDGE_WEIGHT_CACHE"] = cache
    ap = argparse.ArgumentParser(description="GGUF mutation fuzzer (see the module docstring)")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="index of the first case")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=CASE_TIMEOUT)
    ap.add_argument("--save", type=Path, help="write each failing case here as a regression file")
    ap.add_argument("--lfm-edge", type=Path, help="run the cases against the lfm_edge package in this directory "
                    "(e.g. an older commit's, with its compiled extension copied in)")
    ap.add_argument("--replay", type=Path, help="run the regression files in this directory instead")
    args = ap.parse_args(argv)
    if args.lfm_edge:
        WORKER_PATH.append(str(args.lfm_edge.resolve()))
    if args.replay:
        return replay(args.replay, args.jobs, args.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bases = make_bases(root)
        start = time.monotonic()
        tally: collections.Counter = collections.Counter()
        failures: dict[str, list[tuple[Result, str, int]]] = collections.defaultdict(list)
        warned: collections.Counter = collections.Counter()
        chunk = 500
        for first in range(args.first, args.first + args.cases, chunk):
            idx = list(range(first, min(first + chunk, args.first + args.cases)))
            cases = [make_case(bases, args.seed, i) for i in idx]
            (root / "cases").mkdir(exist_ok=True)
            for (r, desc), i, (data, _) in zip(run_cases(cases, root / "cases", args.jobs, timeout=args.timeout), idx, cases):
                tally["clean" if r.clean else "failed"] += 1
                tally[r.outcome if not r.clean else r.outcome] += 1
                warned.update(r.warnings)
                if not r.clean:
                    failures[r.outcome].append((r, desc, i))
                    if args.save:
                        args.save.mkdir(parents=True, exist_ok=True)
                        save_regression(args.save / f"seed{args.seed}-case{i}.json", desc.split(";")[0], bases[desc.split(";")[0]], data,
                                        f"{r.outcome}: {desc}")
            print(f"{idx[-1] + 1 - args.first} cases, {time.monotonic() - start:.0f} s: {dict(tally)}", flush=True)
        for outcome, items in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            r, desc, i = items[0]
            print(f"\n{len(items)} x {outcome}\n  e.g. case {i}: {desc}\n  {r.detail[:300]}")
        if warned:
            print("\nwarnings:", dict(warned.most_common(10)))
    return 1 if tally["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
