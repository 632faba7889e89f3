"""HTTP: the handler, the routes and the wire (JSON bodies, server-sent events, NDJSON).

Each connection gets a thread (ThreadingHTTPServer); what a request asks is checked by
protocol.py (OpenAI) or ollama.py, run by runner.py, and its answer shaped by them again.
A client that goes away mid-generation is noticed at the next event and its generation
is cancelled, so the queue moves on. With an API key set, every endpoint but /health
wants it (`Authorization: Bearer KEY` or `X-Api-Key: KEY`, as llama-server takes it).

Against hostile clients and web pages (each case measured in tests/test_server_hardening.py):
- Host: a request must name the server by the address it is bound to, a loopback name
  (localhost, *.localhost, 127.x, ::1) or a name given with --allowed-hosts ("*": any);
  bound to a wildcard (0.0.0.0, ::), any IP address and this machine's host name are
  accepted too. Anything else, a DNS-rebinding page's own name say, gets a 403.
- CORS: no Access-Control-* header at all unless --cors ORIGIN names the page's origin;
  then that origin's preflight (OPTIONS) is answered and its requests carry its headers.
- A POST body must be `Content-Type: application/json` (415): the types a page may send
  without a preflight (text/plain, forms) are refused.
- The body may be as big as the context can hold (Server.max_body), and its text is
  weighed before it is tokenized: N bytes are at least N / (longest token's bytes) tokens,
  so a prompt that cannot fit is a 400 at once, whatever its size.
- Any JSON: at most MAX_JSON_DEPTH levels, no NaN/Infinity, no lone surrogate (400s).
- Writes: WRITE_TIMEOUT seconds each, STALL_LIMIT in all for one response, then the
  client is dropped and its generation cancelled (the engine buffers each request's
  tokens, so a reader that stalls holds nothing another request needs).
- A client that half-closes its side after sending (shutdown(SHUT_WR)) is answered: a
  read-side end of file is not a disconnect. It is probed with an interim
  `100 Continue` (which HTTP/1.1 clients skip); a client that really left answers that
  with a reset, and its generation is cancelled.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import __version__
from ..errors import LfmEdgeError
from ..llm import LLM, GenerationStats
from ..reply import Event, Reply
from . import ollama, protocol
from .protocol import OpenAIReply, ReplyShapes, RequestError, error_body
from .runner import RETRY_AFTER_S, Runner, Trace

log = logging.getLogger("lfm_edge.server")

MAX_BODY = 32 << 20  # bytes: the most any body may be, whatever the context (see Server.max_body)
MAX_MESSAGE = 600  # characters of an error message (one that quotes a client's value is clipped)
BODY_MARGIN = 1 << 20  # bytes a body may have beyond its text: tools, schemas, the JSON around it
JSON_ESCAPE = 6  # body bytes one byte of text can take in JSON ("\u0001")
WRITE_TIMEOUT = 20.0  # seconds one write to a client may block before the client is dropped
STALL_LIMIT = 60.0  # seconds all writes of one response may block in all
DRAIN_LIMIT, DRAIN_S = 64 << 20, 2.0  # a refused body is read away (so its client sees the answer), up to this
TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection the peer reset (Linux)
HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
PUBLIC = {"/health", "/v1/health"}  # answered without the API key, as llama-server does


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    server_version = f"lfm-edge/{__version__}"
    timeout = 120  # seconds a socket may sit idle (a stalled reader, an idle keep-alive)

    ROUTES = {
        "/v1/chat/completions": ("POST", "_chat"),
        "/v1/completions": ("POST", "_completions"),
        "/v1/models": ("GET", "_models"),
        "/health": ("GET", "_health"),
        "/tokenize": ("POST", "_tokenize"),
        "/detokenize": ("POST", "_detokenize"),
        "/api/chat": ("POST", "_ollama_chat"),
        "/api/generate": ("POST", "_ollama_generate"),
        "/api/tags": ("GET", "_ollama_tags"),
        "/api/show": ("POST", "_ollama_show"),
        "/api/version": ("GET", "_ollama_version"),
        "/api/ps": ("GET", "_ollama_ps"),
    }

    @property
    def runner(self) -> Runner:
        return self.server.runner

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _is_ollama(self) -> bool:
        return self._path().startswith("/api/")

    def _dispatch(self) -> None:
        path = self._path()
        self._started, self._body_read, self._blocked = False, False, 0.0
        self._peer_eof = getattr(self, "_peer_eof", False)  # for the connection: once seen, it stays
        try:
            self.connection.settimeout(WRITE_TIMEOUT)
            if self.request_version == "HTTP/0.9":  # no headers, no status line, no framing: refused
                self.request_version, self.close_connection = "HTTP/1.0", True
                raise RequestError("HTTP/0.9 is not supported; send HTTP/1.1", status=505)
            self._check_host()
            if self.command == "OPTIONS" and self._preflight():
                return
            self._authorize(path)
            if path.startswith("/v1/models/") and self.command == "GET":
                self._model(path[len("/v1/models/") :])
                return
            route = self.ROUTES.get(path)
            if route is None:
                self.close_connection = True  # the body, if any, was not read
                hint = "/api/chat" if self._is_ollama() else "/v1/chat/completions"
                raise RequestError(f"no such endpoint: {self.command} {path}; try {hint}", status=404, code="not_found")
            method, name = route
            if self.command != method:
                self.close_connection = True
                raise RequestError(f"{path} takes {method}, not {self.command}", status=405, code="method_not_allowed")
            getattr(self, name)()
        except RequestError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True  # the client left
        except RecursionError:  # a shape nested deeper than some check foresaw: the client's to fix
            self._send_error(RequestError("the request is nested too deeply to be read"))
        except Exception:
            log.exception("internal error in %s %s", self.command, path)
            self.close_connection = True
            self._send_error(RequestError("internal server error; the server log has the details", status=500))
        finally:
            if self.close_connection and not self._body_read:
                self._discard_body()
            try:
                self.connection.settimeout(self.timeout)  # idle keep-alive until the next request
            except OSError:
                pass

    def _check_host(self) -> None:
        """Refuse a Host that is not this server's (DNS rebinding: a page whose name now points here)."""
        given = self.headers.get("Host")
        if given is None:
            return  # HTTP/1.0 without Host: no browser sends that
        name = host_name(given)
        if name is None or not self.server.host_allowed(name):
            self.close_connection = True
            shown = name if name is not None else given
            raise RequestError(
                f"this server does not answer to the host name {shown!r}; start it with --allowed-hosts {shown} "
                "to allow it",
                status=403,
                code="host_not_allowed",
            )

    def _cors_origin(self) -> str | None:
        """The Origin to allow in the answer: the request's, if --cors names it (or is "*")."""
        origins = self.server.cors
        headers = getattr(self, "headers", None)
        origin = headers.get("Origin") if headers is not None and origins else None
        if origin is None:
            return None
        return origin if origin in origins else "*" if "*" in origins else None

    def _preflight(self) -> bool:
        """Answer a CORS preflight from an allowed origin (204); else False: OPTIONS is a 405 as before."""
        if self._cors_origin() is None or "Access-Control-Request-Method" not in self.headers:
            return False
        asked = self.headers.get("Access-Control-Request-Headers", "")
        allowed = asked if asked and HEADER_LIST.match(asked) else "Authorization, Content-Type, X-Api-Key"
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", allowed)
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def end_headers(self) -> None:
        origin = self._cors_origin()
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def send_response(self, code: int, message: str | None = None) -> None:
        if code >= 200:
            self._started = True  # no interim 100 Continue after this (see _client_gone)
        super().send_response(code, message)

    def _discard_body(self) -> None:
        """Read away the body of a refused request (up to DRAIN_LIMIT bytes, DRAIN_S seconds),
        so that closing the connection does not reset it before the client reads the answer."""
        try:
            left = int(self.headers.get("Content-Length", "0"))
        except (ValueError, AttributeError):
            return
        if not 0 < left <= DRAIN_LIMIT:
            return
        deadline = time.monotonic() + DRAIN_S
        try:
            self.connection.settimeout(DRAIN_S)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass
        self._body_read = True

    def _authorize(self, path: str) -> None:
        key = self.server.api_key
        if not key or path in PUBLIC:
            return
        given = self.headers.get("Authorization", "")
        given = given[len("Bearer ") :] if given.startswith("Bearer ") else given or self.headers.get("X-Api-Key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            self.close_connection = True  # the body was not read
            raise RequestError(
                "invalid or missing API key: send it as 'Authorization: Bearer KEY'", status=401, code="invalid_api_key"
            )

    # -- OpenAI endpoints -------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.runner.model_id, "object": "model", "created": self.runner.created, "owned_by": "lfm-edge"}

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, model_id: str) -> None:
        if model_id != self.runner.model_id:
            raise RequestError(
                f"no model {model_id!r}; this server has {self.runner.model_id!r}", "model", "model_not_found", 404
            )
        self._send_json(200, self._model_card())

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.runner.model_id, "queued": self.runner.queued})

    def _chat(self) -> None:
        job = protocol.chat_job(self._read_prompt(), self.runner.llm, self.runner.defaults)
        self._run(job, OpenAIReply(job, self.runner.llm, self.runner.model_id))

    def _completions(self) -> None:
        job = protocol.completion_job(self._read_prompt(), self.runner.llm, self.runner.defaults)
        self._run(job, OpenAIReply(job, self.runner.llm, self.runner.model_id))

    def _read_prompt(self) -> dict:
        """The body of a request with a prompt: refused at once if its text cannot fit the
        context (tokenizing what can is done here, in the request's own thread)."""
        body = self._read_json()
        protocol.check_prompt_size(body, self.runner.llm.n_ctx, self.server.longest_token)
        return body

    def _tokenize(self) -> None:
        """llama-server's /tokenize: {"content": text or [text | id, ...], "add_special": false,
        "with_pieces": false} -> {"tokens": [id, ...] or [{"id", "piece"}, ...]}."""
        body = self._read_prompt()
        llm = self.runner.llm
        content = body.get("content", "")
        add_special, pieces = body.get("add_special", False), body.get("with_pieces", False)
        flags = (("add_special", add_special), ("with_pieces", pieces), ("parse_special", body.get("parse_special", True)))
        for name, value in flags:
            if not isinstance(value, bool):
                raise RequestError(f"{name} must be true or false", name)
        if body.get("parse_special") is False:
            raise RequestError(
                "parse_special false is not supported: special-token text is always read as the token", "parse_special"
            )
        parts = content if isinstance(content, list) else [content]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                ids += llm.tokenize(part, add_special=add_special and i == 0)
            elif isinstance(part, int) and not isinstance(part, bool) and 0 <= part < llm.tokenizer.n_vocab:
                ids.append(part)
            else:
                raise RequestError("content must be a string, or a list of strings and token ids", "content")
        if not pieces:
            self._send_json(200, {"tokens": ids})
            return
        out = []
        for t in ids:
            raw = llm.tokenizer.token_bytes(t)
            try:
                piece: Any = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)  # part of a character: its bytes, as llama-server gives them
            out.append({"id": t, "piece": piece})
        self._send_json(200, {"tokens": out})

    def _detokenize(self) -> None:
        """llama-server's /detokenize: {"tokens": [id, ...]} -> {"content": text}."""
        body = self._read_json()
        llm = self.runner.llm
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError("tokens must be a list of token ids", "tokens")
        bad = [t for t in tokens if not 0 <= t < llm.tokenizer.n_vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{llm.tokenizer.n_vocab - 1})", "tokens")
        self._send_json(200, {"content": llm.detokenize(tokens)})

    # -- ollama endpoints -------------------------------------------------------------
    def _ollama_chat(self) -> None:
        body = self._read_prompt()
        job = ollama.chat_job(body, self.runner)
        if job is None:
            self._send_json(200, ollama.loaded(body, self.runner.model_id, chat=True))
            return
        self._run(job, ollama.OllamaReply(job, self.runner.llm, self.runner.model_id, "chat", ollama.think_flag(body)))

    def _ollama_generate(self) -> None:
        body = self._read_prompt()
        job = ollama.generate_job(body, self.runner)
        if job is None:
            self._send_json(200, ollama.loaded(body, self.runner.model_id, chat=False))
            return
        self._run(job, ollama.OllamaReply(job, self.runner.llm, self.runner.model_id, "generate", ollama.think_flag(body)))

    def _ollama_tags(self) -> None:
        self._send_json(200, ollama.tags(self.runner))

    def _ollama_show(self) -> None:
        self._send_json(200, ollama.show(self._read_json(), self.runner))

    def _ollama_version(self) -> None:
        self._send_json(200, ollama.version())

    def _ollama_ps(self) -> None:
        self._send_json(200, ollama.ps(self.runner))

    # -- one generation ----------------------------------------------------------
    def _run(self, job: protocol.Job, out: ReplyShapes) -> None:
        """Run `job` and answer with `out`'s shapes (OpenAIReply or ollama.OllamaReply)."""
        cancel = threading.Event()
        stats = GenerationStats(prompt_tokens=len(job.prompt))
        trace = Trace()
        events = self.runner.generate(job, stats, cancel, trace, abandoned=self._client_gone)
        with closing(events):
            if job.stream:
                self._stream(out, events, stats, cancel, trace)
                return
            reply = Reply()
            for event in events:
                reply.add(event)
                if not cancel.is_set() and self._client_gone():
                    cancel.set()  # the generator stops at its next token
            if cancel.is_set():
                self.close_connection = True
                return
            self._send_json(200, out.whole(reply, stats, trace.logprobs[: len(trace.ids)], trace.ids))

    def _stream(
        self, out: ReplyShapes, events: Iterator[Event], stats: GenerationStats, cancel: threading.Event, trace: Trace
    ) -> None:
        """Server-sent events or NDJSON lines; a failed write or a closed socket cancels the generation."""
        first = next(events, None)  # errors before the first event (a full queue, ...) are plain error replies
        if first is None:  # cancelled while waiting
            self.close_connection = True
            return
        sent = 0  # logprobs handed out so far

        def new_logprobs() -> list:
            nonlocal sent
            entries = trace.logprobs[sent : len(trace.ids)]
            sent += len(entries)
            return entries

        def send(obj: Any) -> None:
            if not cancel.is_set() and not self._send_part(obj, out.framing):
                cancel.set()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if out.framing == "sse" else "application/x-ndjson")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in out.start():
            send(part)
        try:
            event: Event | None = first
            while event is not None:  # after a cancel this drains at once
                for part in out.event(event, new_logprobs()):
                    send(part)
                if not cancel.is_set() and self._client_gone():
                    cancel.set()
                event = next(events, None)
        except Exception as e:  # the status line is gone: report in the stream, then close it
            stats.finish_reason = "error"
            if isinstance(e, (LfmEdgeError, RequestError)):
                send(out.stream_error(str(e), 400))
            else:
                log.exception("internal error while streaming %s", out.job.id)
                send(out.stream_error("internal server error; the server log has the details", 500))
            self._write_raw(b"0\r\n\r\n")
            self.close_connection = True
            return
        if cancel.is_set():
            self.close_connection = True
            return
        for part in out.end(stats, new_logprobs(), trace.ids):
            send(part)
        if not cancel.is_set():
            self._write_raw(b"0\r\n\r\n")  # the end of the chunked body

    # -- the wire ----------------------------------------------------------------
    def _read_json(self) -> dict:
        kind = self.headers.get("Content-Type", "")
        if kind.split(";", 1)[0].strip().lower() != "application/json":
            self.close_connection = True  # the body is not read
            raise RequestError(
                "send the body as JSON, with 'Content-Type: application/json'"
                + (f" (this request's is {kind[:100]!r})" if kind else " (this request has none)"),
                status=415,
                code="unsupported_media_type",
            )
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("send the body with a Content-Length, not chunked", status=411)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        limit = self.server.max_body
        if length < 0 or length > limit:
            self.close_connection = True
            if length < 0:
                raise RequestError("the Content-Length must be a number of bytes")
            raise RequestError(
                f"the body is {length} bytes but this server takes at most {limit} "
                f"(what its {self.runner.llm.n_ctx}-token context can hold)",
                status=413,
                code="body_too_large",
            )
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(raw, parse_constant=no_constant, parse_float=finite_float)
        except RecursionError:
            raise RequestError(f"the body is nested more than {protocol.MAX_JSON_DEPTH} levels deep") from None
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        protocol.check_body(body)
        return body

    def _client_gone(self) -> bool:
        """True if the client left (checked without blocking). An end of file on the read side
        is not enough: a client may half-close (shutdown(SHUT_WR)) and wait for the answer. So
        the first time one is seen, before the answer's status line, the client gets an interim
        `100 Continue` (HTTP/1.1 clients skip it); one that really left resets the connection."""
        conn = self.connection
        try:
            if self._peer_eof:
                return peer_reset(conn)
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable or conn.recv(1, socket.MSG_PEEK) != b"":
                return False  # nothing, or a pipelined request waiting: the client is there
        except (OSError, ValueError):
            return True
        self._peer_eof = True
        if not self._started and self.request_version >= "HTTP/1.1":
            self.close_connection = True  # nothing more will come from this client
            return not self._write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        return False

    def _send_part(self, obj: Any, framing: str) -> bool:
        """One server-sent event or NDJSON line, as one chunk of the chunked body."""
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        part = (f"data: {data}\n\n" if framing == "sse" else data + "\n").encode()
        return self._write_raw(b"%x\r\n%s\r\n" % (len(part), part))

    def _write_raw(self, data: bytes) -> bool:
        """Write to the client: False (and the connection to be closed) if it failed, if it
        blocked WRITE_TIMEOUT seconds (the socket's timeout while a request is served), or if
        this response's writes have blocked STALL_LIMIT seconds in all: a client that reads
        too slowly is dropped, and its generation cancelled."""
        start = time.monotonic()
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (OSError, ValueError):
            self.close_connection = True
            return False
        self._blocked = getattr(self, "_blocked", 0.0) + time.monotonic() - start
        if self._blocked > STALL_LIMIT:
            log.info("%s reads too slowly (%.0f s blocked): dropped", self.address_string(), self._blocked)
            self.close_connection = True
            return False
        return True

    def _send_error(self, e: RequestError) -> None:
        message = clip(e.message)
        if self._is_ollama():
            self._send_json(e.status, ollama.error_body(message))
        else:
            self._send_json(e.status, error_body(message, e.status, e.param, e.code))

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self.ROUTES.get(self._path(), ("GET",))[0])
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if status == 503:  # busy (a full queue) or shutting down
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self._write_raw(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) in the path's protocol's shape."""
        self.close_connection = True
        if not hasattr(self, "path"):  # the request line did not parse
            self.path = "/"
        if self.request_version == "HTTP/0.9":
            # a request line that did not parse ("HTTP/2.0", "HTTP/1.1x", two words) leaves
            # http.server's default, HTTP/0.9, which answers with a bare body: give it a status line
            self.request_version = "HTTP/1.0"
        self._send_error(RequestError(message or HTTPStatus(code).phrase, status=code))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at exit

    def __init__(
        self,
        runner: Runner | None,
        host: str,
        port: int,
        api_key: str | None = None,
        allowed_hosts: Sequence[str] = (),
        cors: Sequence[str] = (),
    ):
        self.runner = runner  # None while the model loads: the port is taken first (see listen())
        self.api_key = api_key or None
        self.host = host
        self.allowed_hosts = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self.cors = {o.strip().rstrip("/") for o in cors if o.strip()}  # origins: scheme://host[:port], or "*"
        self._longest: tuple[Any, int] | None = None
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    def host_allowed(self, name: str) -> bool:
        """Whether a request naming `name` in its Host header is for this server (see the module's docstring)."""
        if "*" in self.allowed_hosts or name in self.allowed_hosts or is_loopback(name) or name.endswith(".localhost"):
            return True
        if name in (self.host.lower().rstrip("."), str(self.server_address[0]).lower()):
            return True
        if self.host in ("", "0.0.0.0", "::"):  # every address of the machine, by the user's choice
            return is_ip(name) or name == socket.gethostname().lower()
        return False

    @property
    def longest_token(self) -> int:
        """Bytes of the vocabulary's longest token: no token stands for more text than that."""
        llm = self.runner.llm
        if self._longest is None or self._longest[0] is not llm:
            tok = llm.tokenizer
            self._longest = (llm, max(len(tok.token_bytes(i)) for i in range(tok.n_vocab)))
        return self._longest[1]

    @property
    def max_body(self) -> int:
        """The biggest body taken: the most text the context can hold (its tokens x the longest
        token's bytes), as JSON may escape it, plus a margin; at most MAX_BODY."""
        return min(MAX_BODY, self.runner.llm.n_ctx * self.longest_token * JSON_ESCAPE + BODY_MARGIN)

    @property
    def engine(self) -> Runner:
        """The runner (its name before the server was split into parts)."""
        return self.runner

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    @property
    def base_url(self) -> str:
        """The root the ollama clients take (they add /api/...)."""
        return self.url[: -len("/v1")]

    def close(self) -> None:
        """Stop serving: cancel the running generation, close the socket (after serve_forever returned)."""
        self.runner.close()
        self.server_close()


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error message of at most `limit` characters: one that quotes a client's 100 KB role
    or path keeps its start and end, the part that says what to do."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    return message[: limit - tail - 5] + " ... " + message[-tail:]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header ("Name:8080" -> "name", "[::1]:8080" -> "::1"); None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or rest and not re.fullmatch(r":\d{1,5}", rest):
            return None
        return name if is_ip(name) else None
    name, _, port = header.partition(":")
    if port and not port.isdigit() or not re.fullmatch(r"[a-z0-9_.-]+", name or "-"):
        return None
    return name.rstrip(".") or None


def no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]} is too large")
    return value


def peer_reset(conn: socket.socket) -> bool:
    """Whether the peer of a connection whose read side has ended reset it (it closed, and
    then our data reached it): a pending error, or (Linux) the TCP state CLOSE."""
    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        return True
    if hasattr(socket, "TCP_INFO"):
        return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE
    return False


def bind_warning(host: str, api_key: str | None = None) -> str | None:
    if is_loopback(host):
        return None
    if api_key:
        return f"warning: listening on {host}, not only on this machine: anyone with the API key can use the model"
    return (
        f"warning: listening on {host}, not only on this machine: anyone who can reach this port "
        "can use the model (there is no authentication; see --api-key)"
    )


def make_server(
    llm: LLM,
    host: str = "127.0.0.1",
    port: int = 8080,
    model_id: str | None = None,
    defaults: dict[str, Any] | None = None,
    listener: Server | None = None,
    api_key: str | None = None,
    parallel: int = 4,
    max_queued: int = 16,
) -> Server:
    """A server for `llm` bound to host:port (port 0: any free port); run it with serve_forever().

    `defaults` are the sampling options a request does not set (default: the
    model card's recommendation). `listener`: a socket already taken by listen(host, port).
    `api_key`: required of every request but /health. `parallel`: requests decoded together;
    `max_queued`: more that may wait (beyond, a 503 with Retry-After).
    """
    runner = Runner(llm, model_id or llm.file.path.stem, defaults, parallel=parallel, max_queued=max_queued)
    server = listen(host, port) if listener is None else listener
    server.runner = runner
    if api_key is not None:
        server.api_key = api_key or None
    return server


def check_port(port: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise LfmEdgeError(f"the port must be a number from 0 to 65535 (0: any free port), got {port!r}")
    return port


def listen(
    host: str, port: int, api_key: str | None = None, allowed_hosts: Sequence[str] = (), cors: Sequence[str] = ()
) -> Server:
    """Take host:port before the model loads, so a busy port is reported at once; hand the result
    to make_server(listener=...). Requests are only accepted once serve_forever() runs.
    `allowed_hosts`: more names the Host header may give; `cors`: origins whose pages may call
    the server from a browser (see the module's docstring)."""
    check_port(port)
    try:
        return Server(None, host, port, api_key, allowed_hosts, cors)
    except OSError as e:  # busy, not allowed, or a host name that does not resolve
        raise LfmEdgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except OverflowError:  # what socket says about a port out of range
        raise LfmEdgeError(f"cannot listen on {host}:{port}: not a valid port") from None
