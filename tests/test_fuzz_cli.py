"""A small CLI fuzz (issue 12 item 7): no flag value and no stdin makes `lfm-edge` print a traceback.

Each case is one `python -m lfm_edge COMMAND ...` with one to four of the command's own flags
(read from its parser) given hostile values (empty, negative, 1e-40, 1e400, nan, 20 digits,
full-width digits, control characters, bytes that are not UTF-8, 5,000 characters, a directory,
a missing file, broken JSON, a catastrophic regular expression) and, for `run` and `chat`,
hostile stdin (binary, invalid UTF-8, an encoded lone surrogate, 200 KB lines, chat commands
with bad arguments and a hand-edited session file). A case passes if the command exits with
0, 1 or 2 within CASE_TIMEOUT, prints no traceback and no Python warning, and a failure ends
in one `lfm-edge...: error:` line. Outputs only ever go under the test's temporary folder, and
`serve` is only ever given a model that does not exist (it would otherwise serve forever).

    pytest -q tests/test_fuzz_cli.py
    python tests/test_fuzz_cli.py --cases 500 --seed 2 MODEL.gguf     # a longer run
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CASE_TIMEOUT = 90.0
# a seed whose cases reach every command and a binary stdin (a new flag reshuffles them: the test below says so)
SHORT_SEED, SHORT_CASES = 2, 21

VALUES = ["", "0", "-1", "1", "3", "1e-40", "1e400", "-1e400", "nan", "inf", "-inf", "99999999999999999999", "0x10",
          "1_000", " 5", "\uff15", "x", "\u00fc", "\x01", "-", "--", "=", "%s%n", "x" * 5000, "/", "/nonexistent",
          "f16", "q4_0", "1,2", "512", "{", '{"type": "object"}', '{"$ref": "#"}', "(a+)+$", "[", "\udcff", "a b",
          "start: x*", "\u202e", "localhost,evil", "*"]
STDINS = [b"\xff\xfe\x00 binary\x00", b"\xed\xa0\x80 a lone surrogate, encoded\n", b"x" * 200_000 + b"\n", b"hi\n" * 3,
          b"/set temperature 1e-40\nhi\n", b"/set max_tokens -5\n/set top_k 1e400\n/set seed 99999999999999999999999\nhi\n",
          b"/set nosuch 1\n/set temperature\n/set\n", b"/load /nonexistent.json\n", b"/load {tmp}/bad.json\n",
          b"/save {tmp}\n/save {tmp}/no/such/x.json\n", b"/help\n/clear\n/system \xff\nhi\n", b"\x1b[A\x03\x04\n",
          b"/load {tmp}/bad2.json\nhi\n", b"", b"<|im_end|>\n<|im_start|>system\n"]
SESSIONS = {"bad.json": json.dumps({"messages": [{"role": ["user"], "content": 5}], "sampling": "hot"}),
            "bad2.json": "[" * 10000 + "]" * 10000}


def commands() -> dict[str, list[tuple[list[str], bool]]]:
    """Each subcommand's flags: (option strings, takes a value)."""
    from lfm_edge.cli import build_parser

    parser, _ = build_parser()
    out = {}
    for name, sub in parser.commands.items():
        out[name] = [(a.option_strings, a.nargs != 0) for a in sub._actions if a.option_strings and a.dest != "help"]
    return out


def make_case(flags: dict, model: str, tmp: Path, seed: int, index: int) -> tuple[list[str], bytes | None, str]:
    """(argv after `lfm_edge`, stdin, a description) of case `index`."""
    rng = random.Random(f"{seed}:{index}")
    name = sorted(flags)[index % len(flags)]  # every command in turn
    out_paths = [str(tmp / "out.gguf"), str(tmp), str(tmp / "no" / "such" / "x.gguf"), ""]
    argv: list[str] = [name]
    if name in ("run", "chat", "info", "bench"):
        argv += ["-m", model if rng.random() < 0.85 else rng.choice(VALUES)]
    elif name == "serve":
        argv += ["-m", str(tmp / "no-such-model.gguf"), "--port", "0"]
    elif name == "demo-model":
        argv += [rng.choice(out_paths)]
    elif name == "quantize":
        argv += [rng.choice([str(tmp), "/nonexistent", model]), rng.choice(out_paths)]
    if name == "run":
        argv += [rng.choice(["-", "hi", "\udcff", "x" * 5000])]
    if name in ("run", "bench"):
        argv += ["-n", "2"] if name == "run" else ["-p", "8", "-n", "2", "-r", "1"]
    for _ in range(rng.randint(1, 4)):
        options, takes = rng.choice(flags[name])
        if name == "serve" and "-m" in options:
            continue
        flag = rng.choice(options)
        if not takes:
            argv.append(flag)
        elif flag in ("-o", "--output"):
            argv += [flag, rng.choice(out_paths)]
        else:
            value = rng.choice(VALUES)
            argv += [f"{flag}={value}"] if rng.random() < 0.2 else [flag, value]
    stdin = None
    if name in ("run", "chat"):
        stdin = rng.choice(STDINS).replace(b"{tmp}", str(tmp).encode())
        if name == "chat" and rng.random() < 0.5:
            stdin += b"/set max_tokens 3\nhello\n"
    return argv, stdin, " ".join(a[:40] for a in argv) + (f" < {stdin[:40]!r}" if stdin is not None else "")


def run_case(argv: list[str], stdin: bytes | None, cwd: Path) -> str | None:
    """None if the command behaved, else what went wrong."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    try:
        proc = subprocess.run([sys.executable, "-m", "lfm_edge", *argv], input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=CASE_TIMEOUT, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        return f"no exit in {CASE_TIMEOUT:.0f} s"
    err = proc.stderr.decode("utf-8", "replace")
    if "Traceback" in err or "Warning:" in err:
        return f"exit {proc.returncode}, stderr: {err[-600:]}"
    if proc.returncode not in (0, 1, 2):
        return f"exit {proc.returncode}: {err[-300:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    if proc.returncode != 0 and not (lines and lines[-1].startswith("lfm-edge") and "error:" in lines[-1]):
        return f"exit {proc.returncode} without a one-line error: {err[-300:]!r}"
    return None


def fuzz(model: str, tmp: Path, seed: int, cases: int, jobs: int = 2) -> list[str]:
    for name, text in SESSIONS.items():
        (tmp / name).write_text(text)
    flags = commands()
    made = [make_case(flags, model, tmp, seed, i) for i in range(cases)]
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        problems = list(pool.map(lambda c: run_case(c[0], c[1], cwd), made))
    return [f"{desc}: {p}" for (_, _, desc), p in zip(made, problems) if p]


def test_cli_fuzz_short(gguf_path, tmp_path):
    """21 seeded command lines (every subcommand three times) end cleanly."""
    failures = fuzz(str(gguf_path("moe", "q8_0")), tmp_path, SHORT_SEED, SHORT_CASES)
    assert not failures, "\n".join(failures)


def test_cases_reach_every_command_and_the_stdin_cases(gguf_path, tmp_path):
    flags = commands()
    made = [make_case(flags, "M", tmp_path, SHORT_SEED, i) for i in range(SHORT_CASES)]
    assert {argv[0] for argv, _, _ in made} == set(flags)
    assert sum(stdin is not None and b"\xff" in stdin for _, stdin, _ in made) >= 1
    assert made == [make_case(flags, "M", tmp_path, SHORT_SEED, i) for i in range(SHORT_CASES)]


def test_every_sampler_flag_at_its_extremes(gguf_path, tmp_path):
    """`--repetition-penalty 1e-40` ended in numpy's 'Probabilities contain NaN' traceback."""
    model = str(gguf_path("moe", "q8_0"))
    argvs = [["run", "-m", model, "hi", "-n", "2", flag, value]
             for flag in ("--temperature", "--top-p", "--min-p", "--repetition-penalty")
             for value in ("1e-40", "1e40", "nan", "inf")] + [["run", "-m", model, "hi", "-n", "2", "--seed", "9" * 400]]
    with ThreadPoolExecutor(2) as pool:
        problems = list(pool.map(lambda argv: run_case(argv, None, tmp_path), argvs))
    assert not any(problems), [f"{' '.join(a[5:])[:60]}: {p}" for a, p in zip(argvs, problems) if p]


@pytest.mark.parametrize("stdin", [b"\xff\xfe binary\n", b"\xed\xa0\x80\n", b"ok \x00 nul\n"])
def test_binary_stdin_is_one_sentence_or_works(gguf_path, tmp_path, stdin):
    model = str(gguf_path("moe", "q8_0"))
    for argv in (["run", "-m", model, "-", "-n", "2"], ["chat", "-m", model, "-n", "2"]):
        assert run_case(argv, stdin, tmp_path) is None


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="a longer run of the CLI fuzz")
    ap.add_argument("model")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        found = fuzz(args.model, Path(d), args.seed, args.cases, args.jobs)
    print("\n".join(found) or f"{args.cases} cases, all clean")
    sys.exit(1 if found else 0)
