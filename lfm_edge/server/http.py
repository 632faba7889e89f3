"""HTTP: the handler, the routes and the wire (JSON bodies, server-sent events, NDJSON).

Each connection gets a thread (ThreadingHTTPServer); what a request asks is checked by
protocol.py (OpenAI) or ollama.py, run by runner.py, and its answer shaped by them again.
A client that goes away mid-generation is noticed at the next event and its generation
is cancelled, so the queue moves on. With an API key set, every endpoint but /health
wants it (`Authorization: Bearer KEY` or `X-Api-Key: KEY`, as llama-server takes it).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import select
import socket
import threading
from collections.abc import Iterator
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

MAX_BODY = 32 << 20  # bytes; a request bigger than this is refused (413)
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
        try:
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
        except Exception:
            log.exception("internal error in %s %s", self.command, path)
            self.close_connection = True
            self._send_error(RequestError("internal server error; the server log has the details", status=500))

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
        job = protocol.chat_job(self._read_json(), self.runner.llm, self.runner.defaults)
        self._run(job, OpenAIReply(job, self.runner.llm, self.runner.model_id))

    def _completions(self) -> None:
        job = protocol.completion_job(self._read_json(), self.runner.llm, self.runner.defaults)
        self._run(job, OpenAIReply(job, self.runner.llm, self.runner.model_id))

    def _tokenize(self) -> None:
        """llama-server's /tokenize: {"content": text or [text | id, ...], "add_special": false,
        "with_pieces": false} -> {"tokens": [id, ...] or [{"id", "piece"}, ...]}."""
        body = self._read_json()
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
        body = self._read_json()
        job = ollama.chat_job(body, self.runner)
        if job is None:
            self._send_json(200, ollama.loaded(body, self.runner.model_id, chat=True))
            return
        self._run(job, ollama.OllamaReply(job, self.runner.llm, self.runner.model_id, "chat", ollama.think_flag(body)))

    def _ollama_generate(self) -> None:
        body = self._read_json()
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
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("send the body with a Content-Length, not chunked", status=411)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise RequestError(f"the body must be 0..{MAX_BODY} bytes", status=413 if length > 0 else 400)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def _client_gone(self) -> bool:
        """True if the client closed its end (checked without blocking)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send_part(self, obj: Any, framing: str) -> bool:
        """One server-sent event or NDJSON line, as one chunk of the chunked body."""
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        part = (f"data: {data}\n\n" if framing == "sse" else data + "\n").encode()
        return self._write_raw(b"%x\r\n%s\r\n" % (len(part), part))

    def _write_raw(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (OSError, ValueError):
            self.close_connection = True
            return False

    def _send_error(self, e: RequestError) -> None:
        if self._is_ollama():
            self._send_json(e.status, ollama.error_body(e.message))
        else:
            self._send_json(e.status, error_body(e.message, e.status, e.param, e.code))

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
        self._send_error(RequestError(message or HTTPStatus(code).phrase, status=code))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at exit

    def __init__(self, runner: Runner | None, host: str, port: int, api_key: str | None = None):
        self.runner = runner  # None while the model loads: the port is taken first (see listen())
        self.api_key = api_key or None
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
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


def listen(host: str, port: int, api_key: str | None = None) -> Server:
    """Take host:port before the model loads, so a busy port is reported at once; hand the result
    to make_server(listener=...). Requests are only accepted once serve_forever() runs."""
    check_port(port)
    try:
        return Server(None, host, port, api_key)
    except OSError as e:  # busy, not allowed, or a host name that does not resolve
        raise LfmEdgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except OverflowError:  # what socket says about a port out of range
        raise LfmEdgeError(f"cannot listen on {host}:{port}: not a valid port") from None
