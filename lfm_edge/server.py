"""An OpenAI-compatible HTTP server for one loaded model, on the standard library alone.

    server = make_server(lfm_edge.load("model.gguf"), port=8080)
    server.serve_forever()      # GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health

Each connection gets a thread (ThreadingHTTPServer), but generations run one at
a time, in arrival order (`FifoLock`): the model has one state, and requests
are never mixed into it. A request that continues the previous one (the next
turn of a chat) reuses its state, as `Session` does. A client that goes away
mid-generation is noticed at the next token and its generation is cancelled,
so the queue moves on.

Replies are split by lfm_edge.reply, as in every front end: reasoning (LFM2.5's
`<think>...</think>`, or a reply that starts inside it because the prompt ends in
`<think>`) becomes `reasoning_content`, streamed as `delta.reasoning_content`; when
the request offered tools, `<|tool_call_start|>[f(a=1)]<|tool_call_end|>` blocks
become `tool_calls` (without tools they stay in the content as written). Whole and
streamed answers are made from the same events, so they agree.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .chat_template import content_text, normalize_messages, parsed_tool_calls
from .errors import LfmEdgeError
from .llm import LLM, GenerationStats, make_sampling_params
from .reply import REASONING, TEXT, TOOL_CALL, Event, Reply, reply_events
from .sampling import Sampler, SamplingParams
from .session import common_prefix
from .tool_calls import CALL_END, CALL_START, ToolCall

log = logging.getLogger("lfm_edge.server")

MAX_BODY = 32 << 20  # bytes; a request bigger than this is refused (413)
ROLES = ("system", "user", "assistant", "tool")
FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "repetition_penalty")
INT_OPTIONS = ("top_k", "repeat_last_n", "seed")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(Exception):
    """A request the client must fix: answered with `status` and OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- from an OpenAI request to a prompt -------------------------------------------


def message_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, null, or a list of text parts (joined as the LFM2.5 templates join them)."""
    if content is None:
        return None
    try:
        return content_text(content, where)
    except LfmEdgeError as e:
        raise RequestError(str(e), f"{where}.content") from None


def render_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` with their JSON-string arguments parsed.

    The template writes them: the LFM2.5 templates render `tool_calls` themselves;
    for one that never reads them, the renderer puts them in the content as LFM2 writes them.
    """
    try:
        return parsed_tool_calls(calls, where)
    except LfmEdgeError as e:
        raise RequestError(str(e), f"{where}.tool_calls") from None


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as the chat template takes them (see chat_template.normalize_messages).

    `developer` becomes `system`; every other field (`reasoning_content`,
    `tool_call_id`, `name`, ...) reaches the template as sent.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with a 'role' and a 'content'", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{where}.role is {m.get('role')!r}; roles are system, developer, user, assistant and tool",
                f"{where}.role",
            )
        message = {k: v for k, v in m.items() if v is not None} | {"role": role}
        content = message_text(m.get("content"), where)
        if content is not None:
            message["content"] = content
        elif role != "assistant":
            raise RequestError(f"{where} has no content", f"{where}.content")
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = render_tool_calls(m["tool_calls"], where)
        else:
            message.pop("tool_calls", None)
        out.append(message)
    try:
        return normalize_messages(out)
    except LfmEdgeError as e:
        raise RequestError(str(e), "messages") from None


def template_tools(tools: Any, tool_choice: Any) -> list[dict] | None:
    """The function definitions to list in the prompt, as LFM2's model card shows them."""
    if tool_choice not in (None, "auto", "none"):
        raise RequestError("tool_choice can be 'auto' or 'none'; forcing a tool call is not supported", "tool_choice")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", "tools")
        functions.append(fn)
    return None if tool_choice == "none" else functions


def number(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] if it is a number of `kind` (JSON has no separate int type, and bool is not a number)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    return kind(value)


def sampling_params(body: dict, defaults: dict[str, Any]) -> SamplingParams:
    options = dict(defaults)
    for name in FLOAT_OPTIONS + INT_OPTIONS:
        value = number(body, name, int if name in INT_OPTIONS else float)
        if value is not None:
            options[name] = value
    if options.get("seed") is not None and options["seed"] < 0:
        raise RequestError(f"seed must be >= 0, got {options['seed']}", "seed")
    # OpenAI's penalties subtract from logits by count; the sampler's penalty
    # divides them. They are checked, then ignored rather than faked.
    for name in ("frequency_penalty", "presence_penalty"):
        value = number(body, name, float)
        if value is not None and not -2 <= value <= 2:
            raise RequestError(f"{name} must be in [-2, 2], got {value}", name)
    try:
        return make_sampling_params(options)
    except LfmEdgeError as e:
        raise RequestError(str(e), next((n for n in options if n in str(e)), None)) from None


def check_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: one choice per request", "n")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError("logprobs are not supported", "logprobs")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise RequestError("suffix is not supported", "suffix")
    if body.get("best_of", 1) not in (1, None):
        raise RequestError("best_of must be 1", "best_of")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format: only {'type': 'text'} is supported", "response_format")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", "stream_options")


def stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("stop must be a string or a list of strings", "stop")
    return [s for s in items if s]


@dataclass
class Job:
    """One validated request, ready to run."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    max_tokens: int
    stop: list[str]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    parse_calls: bool = False  # read tool calls out of the reply (the request offered tools)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


# -- from a reply to an OpenAI message ---------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict:
    out = {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }
    return out if index is None else {"index": index, **out}


def openai_message(reply: Reply, parse_calls: bool) -> dict:
    """The OpenAI assistant message for a whole reply; without tools offered, calls stay in the content."""
    calls = reply.calls if parse_calls else []
    content = reply.content if parse_calls else reply.text
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if calls:
        message["tool_calls"] = [openai_tool_call(c) for c in calls]
    return message


def finish_reason(stats: GenerationStats, has_calls: bool) -> str:
    if stats.finish_reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def usage(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


# -- running generations one at a time ---------------------------------------------


class FifoLock:
    """A lock that serves waiters in the order they came (threading.Lock promises no order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    def __enter__(self) -> FifoLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._now_serving == ticket)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._now_serving += 1
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Requests holding or waiting for the lock."""
        with self._cond:
            return self._next_ticket - self._now_serving


class Engine:
    """The model with one state, shared by all requests in turn, and what they did."""

    def __init__(self, llm: LLM, model_id: str, defaults: dict[str, Any] | None = None):
        self.llm = llm
        self.model_id = model_id
        if defaults is None:
            from .commands.common import card_defaults

            defaults = card_defaults(llm)
        make_sampling_params(defaults)
        self.defaults = dict(defaults)
        self.created = int(time.time())
        self.turn = FifoLock()
        self.cache = llm.new_cache()
        self.cached: list[int] = []  # the ids whose state self.cache holds
        self.mark = None  # (checkpoint, ids): the state one token before the last prompt's end
        self.finished: Counter[str] = Counter()  # generations by finish reason
        self.recent: deque[GenerationStats] = deque(maxlen=64)
        self.closing = threading.Event()
        self.current_cancel: threading.Event | None = None

    # -- requests --------------------------------------------------------------
    def chat_job(self, body: dict) -> Job:
        check_unsupported(body)
        messages = chat_messages(body.get("messages"))
        tools = template_tools(body.get("tools"), body.get("tool_choice"))
        try:
            prompt = self.llm.chat_tokens(messages, tools)
        except LfmEdgeError as e:
            raise RequestError(str(e), "messages") from None
        max_tokens = self._max_tokens(body, default=self.llm.n_ctx)
        return self._job("chat", body, prompt, max_tokens, "messages", parse_calls=tools is not None)

    def completion_job(self, body: dict) -> Job:
        check_unsupported(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (or a list of one string)", "prompt")
        ids = self.llm.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        max_tokens = self._max_tokens(body, default=COMPLETIONS_DEFAULT_MAX_TOKENS)
        return self._job("completion", body, ids, max_tokens, "prompt")

    def _max_tokens(self, body: dict, default: int) -> int:
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        value = number(body, name, int, default)
        if value < 0:
            raise RequestError(f"{name} must be >= 0, got {value}", name)
        return value

    def _job(
        self, kind: str, body: dict, prompt: list[int], max_tokens: int, where: str, parse_calls: bool = False
    ) -> Job:
        if len(prompt) > self.llm.n_ctx:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.llm.n_ctx}"
                " (start the server with a larger -c/--ctx-size)",
                where,
                "context_length_exceeded",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", "stream")
        opts = body.get("stream_options") or {}
        return Job(
            kind=kind,
            prompt=prompt,
            max_tokens=max_tokens,
            stop=stop_strings(body.get("stop")),
            sampling=sampling_params(body, self.defaults),
            stream=stream,
            include_usage=bool(opts.get("include_usage")),
            parse_calls=parse_calls,
            id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
        )

    # -- generation (only while holding self.turn) -------------------------------
    def generate(self, job: Job, stats: GenerationStats, cancel: threading.Event) -> Iterator[Event]:
        """The reply to `job` as events (lfm_edge.reply); stops early when `cancel` is set.

        A completion is a raw continuation: all text, no reasoning or tool calls."""
        history = list(job.prompt)
        stats.prompt_tokens = len(job.prompt)
        try:
            logits = self._prefill(job.prompt, stats)
            start = time.perf_counter()
            tokens = self.llm.sample_tokens(
                logits, history, job.max_tokens, Sampler(job.sampling), self.cache, stats, cancel
            )
            yield from reply_events(
                self.llm.tokenizer, tokens, job.prompt, job.stop, raw=job.kind == "completion", stats=stats
            )
            stats.decode_s = time.perf_counter() - start
        except BaseException:
            self.cached, self.mark = [], None  # the state is unknown: start afresh next time
            self.cache.reset()
            raise
        else:
            # every token of `history` but (perhaps) the last was fed to the cache
            self.cached = history[: self.cache.pos]

    def _prefill(self, prompt: list[int], stats: GenerationStats):
        """Session's prefix reuse: continue from the cache, or from the last prompt's end, or afresh."""
        start = time.perf_counter()
        reuse = common_prefix(self.cached, prompt)
        if reuse == len(self.cached) and reuse < len(prompt):
            pass  # the cache holds a prefix of the prompt
        elif self.mark is not None and len(self.mark[1]) <= reuse and len(self.mark[1]) < len(prompt):
            checkpoint, ids = self.mark
            self.cache.restore(checkpoint)
            reuse = len(ids)
        else:
            self.cache.reset()
            reuse = 0
        self.cached = []  # until the prefill below succeeds
        stats.cached_tokens = reuse
        if reuse < len(prompt) - 1:
            self.llm.prefill(prompt[reuse:-1], self.cache)
        self.mark = (self.cache.checkpoint(), prompt[:-1])
        logits = self.llm.prefill(prompt[-1:], self.cache)
        self.cached = list(prompt)
        stats.prefill_s = time.perf_counter() - start
        return logits

    def record(self, job: Job, stats: GenerationStats) -> None:
        self.finished[stats.finish_reason or "error"] += 1
        self.recent.append(stats)
        log.info(
            "%s %s: %d prompt tokens (%d reused), %d generated, %.1f tok/s, %s",
            job.kind,
            job.id,
            stats.prompt_tokens,
            stats.cached_tokens,
            stats.completion_tokens,
            stats.decode_tps,
            stats.finish_reason,
        )

    def close(self) -> None:
        """Stop the running generation and refuse new ones."""
        self.closing.set()
        if self.current_cancel is not None:
            self.current_cancel.set()


# -- HTTP ------------------------------------------------------------------------------


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
    }

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path.startswith("/v1/models/") and self.command == "GET":
                self._model(path[len("/v1/models/") :])
                return
            route = self.ROUTES.get(path)
            if route is None:
                self.close_connection = True  # the body, if any, was not read
                raise RequestError(
                    f"no such endpoint: {self.command} {path}; try /v1/chat/completions", status=404, code="not_found"
                )
            method, name = route
            if self.command != method:
                self.close_connection = True
                raise RequestError(f"{path} takes {method}, not {self.command}", status=405, code="method_not_allowed")
            getattr(self, name)()
        except RequestError as e:
            self._send_json(e.status, error_body(e.message, e.status, e.param, e.code))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True  # the client left
        except Exception:
            log.exception("internal error in %s %s", self.command, path)
            self.close_connection = True
            self._send_json(500, error_body("internal server error; the server log has the details", 500))

    # -- endpoints -------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.engine.model_id, "object": "model", "created": self.engine.created, "owned_by": "lfm-edge"}

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, model_id: str) -> None:
        if model_id != self.engine.model_id:
            raise RequestError(
                f"no model {model_id!r}; this server has {self.engine.model_id!r}", "model", "model_not_found", 404
            )
        self._send_json(200, self._model_card())

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.engine.model_id, "queued": self.engine.turn.queued})

    def _chat(self) -> None:
        self._run(self.engine.chat_job(self._read_json()))

    def _completions(self) -> None:
        self._run(self.engine.completion_job(self._read_json()))

    # -- one generation ----------------------------------------------------------
    def _run(self, job: Job) -> None:
        engine = self.engine
        cancel = threading.Event()
        stats = GenerationStats(prompt_tokens=len(job.prompt))
        reply = Reply()
        with engine.turn:
            if engine.closing.is_set():
                raise RequestError("the server is shutting down", status=503)
            engine.current_cancel = cancel
            try:
                if self._client_gone():  # it left while waiting in the queue
                    cancel.set()
                elif job.stream:
                    self._stream(job, engine.generate(job, stats, cancel), stats, cancel)
                else:
                    for event in engine.generate(job, stats, cancel):
                        reply.add(event)
                        if not cancel.is_set() and self._client_gone():
                            cancel.set()  # the generator stops at its next token
            except LfmEdgeError as e:  # not expected after the checks in *_job, but a sentence all the same
                stats.finish_reason = "error"
                raise RequestError(str(e)) from None
            except BaseException:
                stats.finish_reason = "error"
                raise
            finally:
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    self.close_connection = True
                engine.current_cancel = None
                engine.record(job, stats)
        if not job.stream and not cancel.is_set():
            self._send_json(200, self._response(job, reply, stats))

    def _response(self, job: Job, reply: Reply, stats: GenerationStats) -> dict:
        head = {
            "id": job.id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": self.engine.model_id,
        }
        if job.kind == "completion":
            choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": finish_reason(stats, False)}
        else:
            message = openai_message(reply, job.parse_calls)
            reason = finish_reason(stats, "tool_calls" in message)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**head, "choices": [choice], "usage": usage(stats)}

    def _stream(self, job: Job, events: Iterator[Event], stats: GenerationStats, cancel: threading.Event) -> None:
        """Server-sent events; a failed write or a closed socket cancels the generation."""
        head = {
            "id": job.id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": self.engine.model_id,
        }
        extra = {"usage": None} if job.include_usage else {}

        def chunk(delta: Any = None, finish: str | None = None) -> dict:
            if job.kind == "chat":
                choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **extra}

        def send(obj: Any) -> None:
            if not cancel.is_set() and not self._send_event(obj):
                cancel.set()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n_calls = 0

        def send_part(event: Event) -> None:
            nonlocal n_calls
            if job.kind == "completion":
                if event.kind == TEXT:
                    send(chunk(event.text))
            elif event.kind == TOOL_CALL and job.parse_calls:
                for call in event.calls:
                    send(chunk({"tool_calls": [openai_tool_call(call, n_calls)]}))
                    n_calls += 1
            elif event.kind in (TEXT, TOOL_CALL) and event.text:  # without tools, a call is content
                send(chunk({"content": event.text}))
            elif event.kind == REASONING and event.text:
                send(chunk({"reasoning_content": event.text}))

        if job.kind == "chat":
            send(chunk({"role": "assistant", "content": ""}))
        try:
            for event in events:  # after a cancel this drains at once
                send_part(event)
                if not cancel.is_set() and self._client_gone():
                    cancel.set()
        except Exception as e:  # the status line is gone: report in the stream, then close it
            stats.finish_reason = "error"
            if isinstance(e, LfmEdgeError):
                send(error_body(str(e), 400))
            else:
                log.exception("internal error while streaming %s", job.id)
                send(error_body("internal server error; the server log has the details", 500))
            self._write_raw(b"0\r\n\r\n")
            self.close_connection = True
            return
        if cancel.is_set():
            return
        send(chunk(None, finish_reason(stats, n_calls > 0)))
        if job.include_usage:
            send({**head, "choices": [], "usage": usage(stats)})
        send("[DONE]")
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

    def _send_event(self, obj: Any) -> bool:
        """One server-sent event, as one chunk of the chunked body."""
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        event = f"data: {data}\n\n".encode()
        return self._write_raw(b"%x\r\n%s\r\n" % (len(event), event))

    def _write_raw(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (OSError, ValueError):
            self.close_connection = True
            return False

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self.ROUTES.get(self.path.split("?", 1)[0].rstrip("/"), ("GET",))[0])
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self._write_raw(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) in OpenAI's shape."""
        self.close_connection = True
        self._send_json(code, error_body(message or HTTPStatus(code).phrase, code))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at exit

    def __init__(self, engine: Engine | None, host: str, port: int):
        self.engine = engine  # None while the model loads: the port is taken first (see listen())
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Stop serving: cancel the running generation, close the socket (after serve_forever returned)."""
        self.engine.close()
        self.server_close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str) -> str | None:
    if is_loopback(host):
        return None
    return (
        f"warning: listening on {host}, not only on this machine: anyone who can reach this port "
        "can use the model (there is no authentication)"
    )


def make_server(
    llm: LLM,
    host: str = "127.0.0.1",
    port: int = 8080,
    model_id: str | None = None,
    defaults: dict[str, Any] | None = None,
    listener: Server | None = None,
) -> Server:
    """A server for `llm` bound to host:port (port 0: any free port); run it with serve_forever().

    `defaults` are the sampling options a request does not set (default: the
    model card's recommendation). `listener`: a socket already taken by listen(host, port).
    """
    engine = Engine(llm, model_id or llm.file.path.stem, defaults)
    server = listen(host, port) if listener is None else listener
    server.engine = engine
    return server


def check_port(port: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise LfmEdgeError(f"the port must be a number from 0 to 65535 (0: any free port), got {port!r}")
    return port


def listen(host: str, port: int) -> Server:
    """Take host:port before the model loads, so a busy port is reported at once; hand the result
    to make_server(listener=...). Requests are only accepted once serve_forever() runs."""
    check_port(port)
    try:
        return Server(None, host, port)
    except OSError as e:  # busy, not allowed, or a host name that does not resolve
        raise LfmEdgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except OverflowError:  # what socket says about a port out of range
        raise LfmEdgeError(f"cannot listen on {host}:{port}: not a valid port") from None
