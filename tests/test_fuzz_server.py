"""The server-request fuzzer (tests/fuzz_server.py): a short seeded run, and the failure classes it found.

The real server (`python -m lfm_edge serve`, its own process) gets mutated OpenAI and ollama
requests; each must be answered with a 2xx or a 4xx with a JSON error (see the fuzzer's
docstring), and afterwards the server must still answer a normal request, with no traceback
in its log.
"""

from __future__ import annotations

import collections
import socket
import threading

import pytest

import fuzz_server as fs

SHORT_SEED, SHORT_CASES = 5, 600


@pytest.fixture(scope="module")
def model(gguf_path) -> str:
    return str(gguf_path("moe", "q8_0"))


def _failures(run: fs.Run, cases: dict) -> list[str]:
    out = [f"{r.outcome}: {r.detail[:200]!r} <- {cases[k].note[:200]}" for k, r in run.results.items() if not r.clean]
    return out + run.server_failures


def test_fuzz_server_short(model, tmp_path):
    """600 seeded requests: each a 2xx or a 4xx with one sentence; the server still answers."""
    cases = {f"{SHORT_SEED}:{i}": fs.make_case(SHORT_SEED, i) for i in range(SHORT_CASES)}
    run = fs.run_cases(model, cases, tmp_path, jobs=2)
    assert len(run.results) == SHORT_CASES
    statuses = collections.Counter(r.status for r in run.results.values())
    assert not _failures(run, cases), "\n".join([str(statuses), *_failures(run, cases)[:20]])
    # the run means something only if requests get through to the model and are refused too
    assert statuses[200] >= SHORT_CASES // 5 and statuses[400] >= SHORT_CASES // 5, statuses
    assert len(statuses) >= 6, statuses


def test_fuzz_server_regressions(model, tmp_path):
    """Each failure class the fuzzer found, kept in tests/fuzz/server/, is now answered cleanly."""
    cases = fs.load_regressions(fs.REGRESSIONS)
    assert cases
    run = fs.run_cases(model, cases, tmp_path, jobs=1)
    assert not _failures(run, cases), _failures(run, cases)


def test_the_fuzzer_sees_a_500_a_bare_body_and_a_hang():
    ok = fs.Request("POST", "/v1/chat/completions", [], b"{}")
    assert fs.judge(ok, fs.Response(500, {}, b'{"error": "x"}', 0.1))[0] == "status 500"
    assert fs.judge(ok, fs.Response(503, {"retry-after": "1"}, b'{"error": "busy"}', 0.1))[0] == "refused"
    assert fs.judge(ok, fs.Response(-1, {}, b'{"error": "x"}', 0.1))[0] == "status -1"
    assert fs.judge(ok, fs.Response(400, {}, b"<html>", 0.1))[0] == "400 without a JSON body"
    assert fs.judge(ok, fs.Response(400, {}, b'{"error": "two\\nlines"}', 0.1))[0] == "400 error not one sentence"
    assert fs.judge(ok, fs.Response(200, {"content-type": "application/json"}, b"{", 0.1))[0].startswith("2xx")
    sse = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    assert fs.judge(ok, fs.Response(200, {"content-type": "text/event-stream"}, sse, 0.1)) == ("ok", "")
    # a server that accepts and never answers
    with socket.create_server(("127.0.0.1", 0)) as silent:
        held = []
        threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
        r = fs.run_one(silent.getsockname()[1], "k", ok, timeout=0.5)
    assert r.outcome == "hang"


def test_cases_are_the_same_on_every_run():
    assert [fs.make_case(7, i) for i in range(100)] == [fs.make_case(7, i) for i in range(100)]
    assert fs.make_case(7, 0) != fs.make_case(8, 0)
