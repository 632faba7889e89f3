"""The server against hostile clients and web pages (issue 12): Host and CORS checks, content
types, prompts too big for the context refused before tokenizing, a body limit from the
context, stalled and half-closed readers, malformed JSON and extreme sampler values.

Each case prints its measurement (status, time, memory); `pytest -s` shows them.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import tracemalloc

import ollama
import openai
import pytest

import lfm_edge
from lfm_edge.server import http as server_http
from lfm_edge.server import listen, make_server

N_CTX = 2048
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(gguf_path):
    m = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=N_CTX)
    m.tokenizer.eog_ids = set()  # random weights: keep replies a fixed length
    return m


def start(llm, **listen_kw):
    srv = make_server(llm, model_id="tiny-moe", listener=listen(listen_kw.pop("host", "127.0.0.1"), 0, **listen_kw))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv, thread


def stop(srv, thread) -> None:
    srv.shutdown()
    srv.close()
    thread.join(10)


@pytest.fixture(scope="module")
def server(llm):
    srv, thread = start(llm)
    yield srv
    stop(srv, thread)


def request(srv, method: str, path: str, body=None, headers=None, port_host: str = "127.0.0.1"):
    """(status, headers, parsed body, seconds) of one request over a fresh connection."""
    conn = http.client.HTTPConnection(port_host, srv.server_address[1], timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    t = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        took = time.perf_counter() - t
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return resp.status, dict(resp.getheaders()), parsed, took
    finally:
        conn.close()


def one_sentence(reply) -> str:
    message = reply["error"]["message"] if isinstance(reply["error"], dict) else reply["error"]
    assert "\n" not in message and "Traceback" not in message and message.count(". ") == 0, message
    return message


def measured(name: str, status: int, seconds: float, peak_bytes: int | None = None) -> None:
    mem = f", {peak_bytes / 2**20:.1f} MiB peak" if peak_bytes is not None else ""
    print(f"\n[hardening] {name}: {status} in {seconds * 1000:.1f} ms{mem}")


# -- Host and CORS ------------------------------------------------------------------------------


def test_a_foreign_host_is_refused_and_loopback_names_are_served(llm):
    srv, thread = start(llm, allowed_hosts=["my.box"])
    try:
        port = srv.server_address[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "app.localhost", "my.box"):
            status, _, _, _ = request(srv, "GET", "/v1/models", headers={"Host": host})
            assert status == 200, host
        for host in ("evil.example", f"evil.example:{port}", "192.168.1.5", "10.0.0.1:80", "a b", "[zz]"):
            status, headers, reply, took = request(srv, "POST", "/v1/chat/completions", {"messages": USER},
                                                   headers={"Host": host})
            assert status == 403 and "does not answer to the host name" in one_sentence(reply), host
            assert "--allowed-hosts" in reply["error"]["message"]
        measured("Host: evil.example", status, took)
        status, _, reply, _ = request(srv, "POST", "/api/chat", {"model": "tiny-moe", "messages": USER},
                                      headers={"Host": "evil.example"})
        assert status == 403 and set(reply) == {"error"}  # ollama's shape under /api/
    finally:
        stop(srv, thread)


def test_bound_to_every_address_any_ip_and_the_host_name_are_served(llm):
    srv, thread = start(llm, host="0.0.0.0")
    try:
        for host in ("10.1.2.3:8080", "192.168.0.7", socket.gethostname(), "localhost"):
            assert request(srv, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
        assert request(srv, "GET", "/v1/models", headers={"Host": "rebind.attacker.example"})[0] == 403
    finally:
        stop(srv, thread)
    srv, thread = start(llm, allowed_hosts=["*"])
    try:
        assert request(srv, "GET", "/v1/models", headers={"Host": "anything.example"})[0] == 200
    finally:
        stop(srv, thread)


def test_no_cors_headers_unless_asked_for(server):
    page = {"Origin": "http://evil.example"}
    status, headers, _, _ = request(server, "GET", "/v1/models", headers=page)
    assert status == 200 and not [h for h in headers if h.lower().startswith("access-control")]
    preflight = {**page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _, took = request(server, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 405 and not [h for h in headers if h.lower().startswith("access-control")]
    measured("CORS preflight without --cors", status, took)


def test_cors_origin_gets_its_preflight_and_headers(llm):
    app = "http://localhost:3000"
    srv, thread = start(llm, cors=[app])
    try:
        asked = "authorization, content-type, x-stainless-os"
        preflight = {"Origin": app, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
        status, headers, _, took = request(srv, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == app
        assert "POST" in headers["Access-Control-Allow-Methods"] and headers["Access-Control-Allow-Headers"] == asked
        assert headers["Vary"] == "Origin"
        measured("CORS preflight with --cors", status, took)
        body = {"messages": USER, "max_tokens": 2, "temperature": 0}
        for stream in (False, True):
            status, headers, _, _ = request(srv, "POST", "/v1/chat/completions", {**body, "stream": stream},
                                            headers={"Origin": app})
            assert status == 200 and headers["Access-Control-Allow-Origin"] == app
        other = {**preflight, "Origin": "http://evil.example"}
        status, headers, _, _ = request(srv, "OPTIONS", "/v1/chat/completions", headers=other)
        assert status == 405 and "Access-Control-Allow-Origin" not in headers
        status, headers, _, _ = request(srv, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
    finally:
        stop(srv, thread)


# -- content types -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                  None])
def test_a_post_that_is_not_json_is_refused(server, kind):
    """The types a web page may POST without a preflight never reach the model."""
    headers = {"Content-Type": kind} if kind else {}
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    t = time.perf_counter()
    conn.putrequest("POST", "/v1/chat/completions")
    for k, v in headers.items():
        conn.putheader(k, v)
    data = json.dumps({"messages": USER}).encode()
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    conn.close()
    assert resp.status == 415 and "Content-Type: application/json" in one_sentence(reply)
    measured(f"POST as {kind}", resp.status, time.perf_counter() - t)


def test_the_openai_and_ollama_clients_send_json(server, monkeypatch):
    seen: list[str] = []
    read = server_http.Handler._read_json

    def spy(self):
        seen.append(self.headers.get("Content-Type"))
        return read(self)

    monkeypatch.setattr(server_http.Handler, "_read_json", spy)
    oa = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=30)
    assert oa.chat.completions.create(model="tiny-moe", messages=USER, max_tokens=2).choices
    ol = ollama.Client(host=server.base_url)
    assert ol.chat(model="tiny-moe", messages=USER, options={"num_predict": 2}).message is not None
    assert ol.generate(model="tiny-moe", prompt="hi", options={"num_predict": 2}).response is not None
    assert seen and all(s.split(";")[0] == "application/json" for s in seen), seen
    status, _, _, _ = request(server, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 1},
                              headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


# -- sizes ---------------------------------------------------------------------------------------


def test_the_body_limit_is_what_the_context_can_hold(server, llm):
    longest = max(len(llm.tokenizer.token_bytes(i)) for i in range(llm.tokenizer.n_vocab))
    assert server.longest_token == longest
    assert server.max_body == min(server_http.MAX_BODY, N_CTX * longest * server_http.JSON_ESCAPE + server_http.BODY_MARGIN)
    over = server.max_body + 1
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (over - 47) + b'"}]}'
    assert len(body) == over
    status, _, reply, took = request(server, "POST", "/v1/chat/completions", body)
    assert status == 413 and f"at most {server.max_body}" in one_sentence(reply)
    measured(f"body of {over} bytes (limit {server.max_body})", status, took)


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_a_31_mb_request_is_refused_at_once(server, api):
    text = "word " * (31 * 2**20 // 5)
    if api == "openai":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/api/chat", {"model": "tiny-moe", "messages": [{"role": "user", "content": text}]}
    data = json.dumps(body).encode()
    del text, body
    tracemalloc.start()
    try:
        status, _, reply, took = request(server, "POST", path, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 413 and took < 1.0
    one_sentence(reply)
    assert peak < 4 * 2**20  # the body is read away in small pieces, never held
    measured(f"{api}: a {len(data) / 2**20:.0f} MB request", status, took, peak)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/tokenize"])
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server, llm, monkeypatch, path):
    calls = []
    for name in ("encode", "encode_prompt"):
        real = getattr(llm.tokenizer, name)
        monkeypatch.setattr(llm.tokenizer, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    n_bytes = server.max_body // 2  # within the body limit, far beyond the context
    text = "\u00e9" * (n_bytes // 2)  # 2 bytes of UTF-8 each
    body = {
        "/v1/chat/completions": {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": text}]},
        "/v1/completions": {"prompt": text},
        "/api/chat": {"model": "tiny-moe", "messages": [{"role": "user", "content": text}]},
        "/api/generate": {"model": "tiny-moe", "prompt": text},
        "/tokenize": {"content": text},
    }[path]
    data = json.dumps(body, ensure_ascii=False).encode()
    tracemalloc.start()
    try:
        status, _, reply, took = request(server, "POST", path, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = one_sentence(reply)
    least = -(-(2 * len(text) + (1 if "system" in json.dumps(body) else 0)) // server.longest_token)
    assert status == 400 and f"at least {least} tokens" in message and f"context holds {N_CTX}" in message
    assert calls == [] and took < 0.5
    measured(f"{path}: {len(data)} bytes of body that cannot fit", status, took, peak)


def test_tokenizing_happens_off_the_generation_path(server, llm):
    """A long prompt (one that passes the byte bound, then tokenizes past the context) is
    tokenized in its own request's thread while another client's stream goes on."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    body = {"messages": USER, "max_tokens": N_CTX - 50, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    sock = conn.sock
    resp = conn.getresponse()
    gaps, last, stop_reading = [], [time.perf_counter()], threading.Event()

    def read():
        while not stop_reading.is_set():
            try:
                line = resp.fp.readline()
            except (OSError, ValueError):  # the test closed the stream under it (or it timed out)
                break
            if not line:
                break
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)
    text = "ab " * (N_CTX * server.longest_token // 3 - 10)  # just under the bound: ~N_CTX*1.3 tokens
    status, _, reply, took = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})
    time.sleep(0.2)
    stop_reading.set()
    sock.shutdown(socket.SHUT_RDWR)  # the reader may be waiting in readline: this ends it
    conn.close()
    reader.join(10)
    assert not reader.is_alive()
    assert status == 400 and "context holds" in reply["error"]["message"]
    worst = max(gaps[1:])
    print(f"\n[hardening] a {len(text)}-byte prompt tokenized in {took:.2f} s; the other stream's longest pause "
          f"meanwhile: {worst * 1000:.0f} ms ({len(gaps)} chunks)")
    assert worst < max(2.0, 1.5 * took)  # the stream went on (the GIL is shared: see the module's note)


# -- slow and half-closed clients ----------------------------------------------------------------


def test_a_client_that_pipelines_and_never_reads_is_dropped_and_blocks_nobody(llm, monkeypatch):
    monkeypatch.setattr(server_http, "WRITE_TIMEOUT", 1.0)
    srv, thread = start(llm)
    try:
        runner = srv.runner
        host, port = srv.server_address[:2]
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, port))
        body = json.dumps({"messages": USER, "max_tokens": N_CTX - 50, "temperature": 0, "stream": True,
                           "logprobs": True, "top_logprobs": 20}).encode()
        one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        stalled.sendall(one * 100)  # 100 streaming requests, and never a byte read
        before = runner.finished["cancelled"]
        t0 = time.perf_counter()
        latencies = []
        for _ in range(3):  # others are served meanwhile
            status, _, reply, took = request(srv, "POST", "/v1/chat/completions",
                                             {"messages": USER, "max_tokens": 4, "temperature": 0})
            assert status == 200 and reply["usage"]["completion_tokens"] == 4
            latencies.append(took)
        deadline = time.monotonic() + 60
        while runner.finished["cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        dropped_after = time.perf_counter() - t0
        assert runner.finished["cancelled"] == before + 1  # its generation was cancelled, the rest never ran
        stalled.settimeout(5)
        got = b""
        try:
            while chunk := stalled.recv(1 << 20):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        assert got.startswith(b"HTTP/1.1 200") and not got.endswith(b"0\r\n\r\n")  # cut off, not finished
        stalled.close()
        print(f"\n[hardening] a client pipelining 100 streams without reading: others served in "
              f"{max(latencies) * 1000:.0f} ms at worst; it was dropped {dropped_after:.1f} s after it stalled "
              f"(write timeout {server_http.WRITE_TIMEOUT} s)")
        assert runner.queued == 0
    finally:
        stop(srv, thread)


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_gets_its_answer(server, stream):
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"messages": USER, "max_tokens": 8, "temperature": 0, "stream": stream}).encode()
    t = time.perf_counter()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock.shutdown(socket.SHUT_WR)  # nothing more to send; still reading
    got = b""
    while chunk := sock.recv(1 << 16):
        got += chunk
    took = time.perf_counter() - t
    sock.close()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = got[len(interim):] if got.startswith(interim) else got
    assert final.startswith(b"HTTP/1.1 200"), got[:200]
    head, _, payload = final.partition(b"\r\n\r\n")
    if stream:
        assert b"data: [DONE]" in payload
    else:
        assert json.loads(payload)["usage"]["completion_tokens"] == 8
    measured(f"half-closed client ({'stream' if stream else 'whole'})", 200, took)


def test_a_half_closed_client_answered_by_the_http_client_library(server):
    """http.client (urllib, requests) skips the interim 100 Continue."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    body = json.dumps({"messages": USER, "max_tokens": 4, "temperature": 0})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    conn.sock.shutdown(socket.SHUT_WR)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 4
    conn.close()


# -- malformed input: always a 4xx ------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MALFORMED = {
    "JSON nested 5000 deep": (CHAT, b'{"messages": ' + nested(5000) + b"}", "nested"),
    "JSON nested 200 deep": (CHAT, b'{"messages": [{"role": "user", "content": "x", "x": ' + nested(200) + b"}]}",
                             "nested more than 128"),
    "an object nested 100000 deep": (CHAT, b'{"a":' * 100000 + b"1" + b"}" * 100000, "nested"),
    "a lone surrogate in content": (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    "a lone surrogate in a key": (CHAT, b'{"messages": [{"role": "user", "content": "x", "\\udfff": 1}]}',
                                  "lone surrogate"),
    "a lone surrogate to /tokenize": ("/tokenize", b'{"content": "a\\udc80"}', "lone surrogate"),
    "a lone surrogate to ollama": ("/api/chat", b'{"model": "tiny-moe", "messages": [{"role": "user", "content": '
                                   b'"\\ud83d"}]}', "lone surrogate"),
    "NaN": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN is not a JSON number"),
    "Infinity": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', "Infinity"),
    "-Infinity": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}', "-Infinity"),
    "1e400": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', "too large"),
    "an integer of 5000 digits": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "seed": ' + b"9" * 5000 + b"}",
                                  "not valid JSON"),
    "temperature 1e-40": (CHAT, {"messages": USER, "temperature": 1e-40}, "temperature must be 0 (greedy) or from"),
    "temperature 1e40": (CHAT, {"messages": USER, "temperature": 1e40}, "temperature must be"),
    "repetition_penalty 1e-40": (CHAT, {"messages": USER, "repetition_penalty": 1e-40}, "repetition_penalty must be"),
    "repetition_penalty 1e40": (CHAT, {"messages": USER, "repetition_penalty": 1e40}, "repetition_penalty must be"),
    "ollama temperature 1e-40": ("/api/chat", {"model": "tiny-moe", "messages": USER, "options": {"temperature": 1e-40}},
                                 "temperature must be"),
    "ollama repeat_penalty 1e-40": ("/api/generate", {"model": "tiny-moe", "prompt": "x",
                                                      "options": {"repeat_penalty": 1e-40}}, "repetition_penalty must be"),
    "completions repetition_penalty 1e40": ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e40},
                                            "repetition_penalty must be"),
    "a Content-Length that is not a number": (CHAT, None, "Content-Length"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_4xx_never_a_500(server, case):
    path, body, words = MALFORMED[case]
    if body is None:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        t = time.perf_counter()
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "lots")
        conn.endheaders()
        resp = conn.getresponse()
        status, reply, took = resp.status, json.loads(resp.read()), time.perf_counter() - t
        conn.close()
    else:
        status, _, reply, took = request(server, "POST", path, body)
    assert 400 <= status < 500, reply
    assert words in one_sentence(reply), reply
    measured(case, status, took)


def test_deeply_nested_tool_call_arguments_and_schemas_are_4xx_or_served(server):
    """Nesting within the body's limit reaches the template and the grammar: never a 500."""
    deep_args = json.loads('{"a": ' * 100 + "1" + "}" * 100)
    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": deep_args}}]},
               {"role": "tool", "content": "ok"}]
    status, _, reply, _ = request(server, "POST", CHAT, {"messages": history, "max_tokens": 2})
    assert status < 500, reply
    deep_schema = json.loads('{"type": "object", "properties": {"a": ' * 60 + '{"type": "string"}' + "}}" * 60)
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep_schema, "strict": True}}]
    status, _, reply, _ = request(server, "POST", CHAT, {"messages": USER, "tools": tools, "max_tokens": 2,
                                                         "tool_choice": "required"})
    assert status < 500, reply
    status, _, reply, _ = request(server, "POST", CHAT, {"messages": USER, "max_tokens": 2,
                                                         "response_format": {"type": "json_schema", "json_schema": {
                                                             "name": "x", "schema": deep_schema}}})
    assert status < 500, reply
