"""ollama's API on the same server: /api/chat, /api/generate, /api/tags, /api/show,
/api/version, /api/ps, in the shapes of ollama's docs/api.md (what the official `ollama`
Python client reads).

The differences from the OpenAI side are only of shape: streaming is on by default and is
newline-delimited JSON; sampling comes in `options` (num_predict, num_ctx, temperature,
top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop; the rest of ollama's
options, which choose hardware or samplers we do not have, are ignored as ollama ignores
what a runner lacks); `format` is "json" or a JSON schema, through the same constrained
decoding as response_format; tool-call arguments are objects, not JSON strings;
reasoning is `thinking`. Errors are {"error": "..."}.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import LfmEdgeError
from ..grammar import Grammar
from ..llm import GenerationStats
from ..reply import REASONING, TEXT, TOOL_CALL, Event, Reply
from .protocol import (
    Job,
    RequestError,
    TokenLogprob,
    chat_messages,
    check_fits,
    clean,
    compile_grammar,
    make_sampling,
    reasoning_first,
    stop_strings,
    stream_flag,
    tool_functions,
)

if TYPE_CHECKING:
    from ..llm import LLM
    from .runner import Runner

# ollama's option -> ours
OPTION_NAMES = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
}
INT_OPTIONS = ("top_k", "repeat_last_n", "seed", "num_predict", "num_ctx")
NEVER_EXPIRES = "9999-12-31T23:59:59Z"  # the model stays loaded for the server's life


def error_body(message: str) -> dict:
    return {"error": message}


def now() -> str:
    """ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- the model, as /api/tags, /api/show and /api/ps describe it -------------------------------


def check_model(body: dict, model_id: str, key: str = "model") -> None:
    """ollama answers 404 for a model it does not have; ours is model_id (":latest" is its default tag)."""
    name = body.get(key)
    if name is None and key == "model":
        name = body.get("name")  # /api/show's older spelling
    if not isinstance(name, str) or not name:
        raise RequestError("model is required", "model")
    if name not in (model_id, f"{model_id}:latest"):
        raise RequestError(f"model '{name}' not found; this server has '{model_id}'", "model", status=404)


def details(llm: LLM) -> dict:
    meta = llm.file.metadata
    arch = str(meta.get("general.architecture", llm.args.arch))
    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in llm.file.tensors.values())
    kinds: dict[str, int] = {}
    for t in llm.file.tensors.values():
        kinds[t.qtype.name] = kinds.get(t.qtype.name, 0) + t.nbytes
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": meta.get("general.size_label") or size_label(n_params),
        "quantization_level": max(kinds, key=kinds.get) if kinds else "",
    }


def size_label(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def digest(llm: LLM) -> str:
    """An identifier of the file (its path, size and time), not the hash of its bytes: hashing
    gigabytes would take seconds."""
    st = llm.file.path.stat()
    return hashlib.sha256(f"{llm.file.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def modified_at(llm: LLM) -> str:
    mtime = llm.file.path.stat().st_mtime
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")


def capabilities(llm: LLM) -> list[str]:
    """What the model does, as ollama names it: "completion" always; "tools" and "thinking" when
    the chat template writes tool lists / reasoning."""
    caps = ["completion"]
    template = llm.chat_template
    source = template.source if template is not None else ""
    if "tools" in source:
        caps.append("tools")
    if "<think>" in source or "enable_thinking" in source:
        caps.append("thinking")
    return caps


def model_entry(runner: Runner) -> dict:
    llm = runner.llm
    return {
        "name": runner.model_id,
        "model": runner.model_id,
        "modified_at": modified_at(llm),
        "size": llm.file.path.stat().st_size,
        "digest": digest(llm),
        "details": details(llm),
    }


def tags(runner: Runner) -> dict:
    return {"models": [model_entry(runner)]}


def ps(runner: Runner) -> dict:
    entry = model_entry(runner)
    entry.pop("modified_at")
    return {"models": [{**entry, "expires_at": NEVER_EXPIRES, "size_vram": 0, "context_length": runner.llm.n_ctx}]}


def version() -> dict:
    return {"version": __version__}


def show(body: dict, runner: Runner) -> dict:
    check_model(body, runner.model_id)
    llm = runner.llm
    info = {k: v for k, v in llm.file.metadata.items() if isinstance(v, (str, int, float, bool))}
    info.pop("tokenizer.chat_template", None)  # it is `template`
    params = "\n".join(f"{name} {runner.defaults[ours]}" for name, ours in OPTION_NAMES.items() if ours in runner.defaults)
    return {
        "modelfile": f"FROM {llm.file.path}\n",
        "parameters": params,
        "template": llm.chat_template.source if llm.chat_template is not None else "",
        "details": details(llm),
        "model_info": info,
        "capabilities": capabilities(llm),
        "modified_at": modified_at(llm),
    }


# -- requests --------------------------------------------------------------------------


def options(body: dict, defaults: dict[str, Any], n_ctx: int) -> tuple[dict[str, Any], int, int, list[str]]:
    """ollama's `options` as (sampling options, num_predict, num_ctx, stop strings)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise RequestError("options must be an object", "options")
    sampling = dict(defaults)
    for name, value in opts.items():
        if value is None:
            continue
        kind = int if name in INT_OPTIONS else float
        if name in OPTION_NAMES or name in ("num_predict", "num_ctx"):
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if not ok or isinstance(value, bool):
                kind_name = "an integer" if kind is int else "a number"
                raise RequestError(f"options.{name} must be {kind_name}, got {value!r}", "options")
        if name in OPTION_NAMES:
            sampling[OPTION_NAMES[name]] = kind(value)
    num_predict = opts.get("num_predict")
    num_predict = -1 if num_predict is None else num_predict
    if num_predict < -2:
        raise RequestError(
            f"options.num_predict must be -1 (no limit), -2 (fill the context) or >= 0, got {num_predict}", "options"
        )
    # the context is the server's (-c): a smaller num_ctx limits this request, a larger one
    # cannot grow it (ollama would reload the model; this server keeps its one context)
    num_ctx = opts.get("num_ctx")
    num_ctx = n_ctx if num_ctx is None or num_ctx <= 0 else min(num_ctx, n_ctx)
    return sampling, num_predict, num_ctx, stop_strings(opts.get("stop"), "options")


def format_grammar(fmt: Any) -> Grammar | None:
    """`format`: "json" (any JSON object), a JSON schema, or ""/null for free text."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return Grammar.json_object()
    if isinstance(fmt, dict):
        try:
            return Grammar.from_json_schema(fmt)
        except LfmEdgeError as e:
            raise RequestError(str(e), "format") from None
    raise RequestError('format must be "json" or a JSON schema object', "format")


def think_flag(body: dict) -> bool | None:
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think
    if think in ("high", "medium", "low"):
        return True
    raise RequestError('think must be true, false, "high", "medium" or "low"', "think")


def logprobs_flag(body: dict) -> int | None:
    wanted = body.get("logprobs")
    if wanted not in (None, True, False):
        raise RequestError("logprobs must be true or false", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
        raise RequestError(f"top_logprobs must be an integer from 0 to 20, got {top!r}", "top_logprobs")
    return (top or 0) if wanted else None


def ollama_messages(messages: Any) -> list[dict]:
    """ollama's messages: OpenAI's, plus `thinking`, `tool_name`, and arguments as objects."""
    if isinstance(messages, list):  # anything else is chat_messages' to refuse
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("images"):
                raise RequestError(f"messages[{i}] has images; this model reads text only", "messages")
        messages = [{k: v for k, v in m.items() if k != "images"} if isinstance(m, dict) else m for m in messages]
    out = chat_messages(messages)
    for m in out:  # the templates name a tool's result by `name`
        if m.get("role") == "tool" and "tool_name" in m and "name" not in m:
            m["name"] = m["tool_name"]
    return out


def _job(body: dict, runner: Runner, kind: str, prompt: list[int], where: str, grammar: Grammar | None,
         parse_calls: bool) -> Job:
    llm = runner.llm
    sampling, num_predict, num_ctx, stop = options(body, runner.defaults, llm.n_ctx)
    check_fits(prompt, num_ctx, where)
    room = num_ctx - len(prompt)
    budget = room if num_predict < 0 else min(num_predict, room)
    return Job(
        kind=kind,
        prompt=prompt,
        max_tokens=budget,
        stop=stop,
        sampling=make_sampling(sampling, "options"),
        constraint=compile_grammar(llm, reasoning_first(llm, grammar, prompt), "format"),
        stream=stream_flag(body, default=True),
        parse_calls=parse_calls,
        logprobs=logprobs_flag(body),
        id=uuid.uuid4().hex[:24],
    )


def template_kwargs(think: bool | None) -> dict[str, Any]:
    return {} if think is None else {"enable_thinking": think}


def chat_job(body: dict, runner: Runner) -> Job | None:
    """POST /api/chat; None: no messages (ollama's way to load a model: answered at once)."""
    check_model(body, runner.model_id)
    if not body.get("messages"):
        return None
    messages = ollama_messages(body.get("messages"))
    functions = tool_functions(body.get("tools"))
    think = think_flag(body)
    try:
        prompt = runner.llm.chat_tokens(messages, functions, **template_kwargs(think))
    except LfmEdgeError as e:
        raise RequestError(str(e), "messages") from None
    return _job(body, runner, "chat", prompt, "messages", format_grammar(body.get("format")), functions is not None)


def generate_job(body: dict, runner: Runner) -> Job | None:
    """POST /api/generate; None: an empty prompt (ollama's way to load a model)."""
    check_model(body, runner.model_id)
    llm = runner.llm
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string", "prompt")
    for name in ("suffix", "template", "images"):
        if body.get(name):
            raise RequestError(f"{name} is not supported", name)
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(i, int) and 0 <= i < llm.tokenizer.n_vocab for i in context):
        raise RequestError("context must be a list of token ids from an earlier reply", "context")
    if not prompt and not context:
        return None
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise RequestError("system must be a string", "system")
    think = think_flag(body)
    if body.get("raw"):
        ids = context + llm.tokenize(prompt, add_special=not context)
        kind = "completion"
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            ids = context + llm.chat_tokens(messages, **template_kwargs(think))
        except LfmEdgeError as e:
            raise RequestError(str(e), "prompt") from None
        kind = "chat"
    if not ids:
        return None
    return _job(body, runner, kind, ids, "prompt", format_grammar(body.get("format")), False)


def loaded(body: dict, model_id: str, chat: bool) -> dict:
    """The answer to a request with nothing to generate: the model is loaded."""
    out = {"model": model_id, "created_at": now(), "done": True, "done_reason": "load"}
    return out | ({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})


# -- replies ---------------------------------------------------------------------------------


def tool_call(call: Any) -> dict:
    return {"function": {"name": call.name, "arguments": call.arguments}}


class OllamaReply:
    """A job's answer in ollama's shapes (chat or generate), whole or as NDJSON lines."""

    framing = "ndjson"

    def __init__(self, job: Job, llm: LLM, model_id: str, endpoint: str, think: bool | None):
        self.job, self.llm, self.model_id = job, llm, model_id
        self.chat = endpoint == "chat"
        self.think = think

    def _line(self, content: str = "", thinking: str | None = None, calls: Sequence[Any] = (),
              logprobs: Sequence[TokenLogprob] = ()) -> dict:
        out: dict[str, Any] = {"model": self.model_id, "created_at": now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking is not None:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [tool_call(c) for c in calls]
            out["message"] = message
        else:
            out["response"] = content
            if thinking is not None:
                out["thinking"] = thinking
        if self.job.logprobs is not None and logprobs:
            out["logprobs"] = self._logprobs(logprobs)
        out["done"] = False
        return out

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> list[dict]:
        def one(token: int, lp: float) -> dict:
            raw = self.llm.tokenizer.token_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": clean(lp), "bytes": list(raw)}

        return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]

    def _stats(self, stats: GenerationStats, trace_ids: Sequence[int]) -> dict:
        out = {
            "done": True,
            "done_reason": "length" if stats.finish_reason == "length" else "stop",
            "total_duration": int((stats.prefill_s + stats.decode_s) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": int(stats.prefill_s * 1e9),
            "eval_count": stats.completion_tokens,
            "eval_duration": int(stats.decode_s * 1e9),
        }
        if not self.chat and self.job.kind == "chat":  # /api/generate, not raw: the context to continue from
            out["context"] = list(self.job.prompt) + list(trace_ids)
        return out

    def start(self) -> list[Any]:
        return []

    def event(self, e: Event, logprobs: Sequence[TokenLogprob]) -> list[Any]:
        if e.kind == TOOL_CALL and self.job.parse_calls:
            return [self._line(calls=e.calls, logprobs=logprobs)]
        if e.kind in (TEXT, TOOL_CALL) and e.text:
            return [self._line(e.text, logprobs=logprobs)]
        if e.kind == REASONING and e.text and self.think is not False:
            return [self._line(thinking=e.text, logprobs=logprobs)]
        return [self._line(logprobs=logprobs)] if logprobs and self.job.logprobs is not None else []

    def end(self, stats: GenerationStats, logprobs: Sequence[TokenLogprob], trace_ids: Sequence[int]) -> list[Any]:
        last = self._line(logprobs=logprobs)
        last.update(self._stats(stats, trace_ids))
        return [last]

    def stream_error(self, message: str, status: int) -> Any:
        return error_body(message)

    def whole(
        self, reply: Reply, stats: GenerationStats, logprobs: Sequence[TokenLogprob], trace_ids: Sequence[int]
    ) -> dict:
        calls = reply.calls if self.job.parse_calls else []
        content = reply.content if self.job.parse_calls else reply.text
        thinking = reply.reasoning if self.think is not False else None
        out = self._line(content, thinking, calls, logprobs)
        out.update(self._stats(stats, trace_ids))
        return out
