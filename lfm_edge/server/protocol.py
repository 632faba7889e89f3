"""The OpenAI API's side of the server: requests checked and turned into Jobs, replies shaped.

Nothing here touches the model's state or the network: a request body (a dict) comes in,
and a `Job` (token ids, budget, sampling, grammar) or a `RequestError` (status, one
sentence, the offending parameter) comes out; events of lfm_edge.reply come back in,
and OpenAI's objects (whole replies, stream chunks, logprobs, usage) come out.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..chat_template import content_text, normalize_messages, parsed_tool_calls
from ..errors import LfmEdgeError
from ..grammar import Constraint, Grammar, chat_grammar, response_format_grammar, tool_call_grammar
from ..llm import GenerationStats, make_sampling_params
from ..reply import REASONING, TEXT, TOOL_CALL, Event, Markers, Reply, opens_reasoning
from ..sampling import SAMPLER_RANGE, SamplingParams
from ..tool_calls import ToolCall

if TYPE_CHECKING:
    from ..llm import LLM

ROLES = ("system", "user", "assistant", "tool")
FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "repetition_penalty")
INT_OPTIONS = ("top_k", "repeat_last_n", "seed")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat); /v1/completions allows 5
TOOL_CHOICES = ("auto", "none", "required")
MAX_JSON_DEPTH = 128  # levels of nesting a request body may have (a schema's own limit is 64)


class RequestError(Exception):
    """A request the client must fix: answered with `status` and the protocol's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Job:
    """One validated request, ready to run."""

    kind: str  # "chat" or "completion" (a raw continuation: all text, no reasoning or calls)
    prompt: list[int]
    max_tokens: int
    stop: list[str]
    sampling: SamplingParams
    constraint: Constraint | None = None  # the reply follows its grammar (response_format, a forced call, ...)
    stream: bool = False
    include_usage: bool = False
    parse_calls: bool = False  # read tool calls out of the reply (the request offered tools)
    logprobs: int | None = None  # None: none; N: each token's logprob and its N likeliest alternatives
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


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
    """An assistant message's `tool_calls` with their arguments as objects (OpenAI sends JSON
    strings, ollama objects). The LFM2.5 templates render `tool_calls` themselves; for one
    that never reads them, the renderer puts them in the content as LFM2 writes them."""
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


def tool_functions(tools: Any) -> list[dict] | None:
    """The function definitions of OpenAI's `tools`, as LFM2's model card lists them in the
    prompt (`strict` is ours to enforce, not the model's to read)."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", "tools")
        if fn.get("strict") not in (None, True, False):
            raise RequestError(f"tools[{i}].function.strict must be true or false", "tools")
        functions.append(fn)
    return functions


def check_tool_choice(tool_choice: Any, functions: list[dict] | None) -> None:
    """tool_choice is "auto", "none", "required" or {"type": "function", "function": {"name": N}}
    naming one of the tools."""
    if tool_choice is None or tool_choice in TOOL_CHOICES:
        if tool_choice == "required" and not functions:
            raise RequestError("tool_choice is 'required' but the request has no tools", "tool_choice")
        return
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    names = [f["name"] for f in functions or []]
    if fn["name"] not in names:
        have = f"the tools are {', '.join(names)}" if names else "the request has no tools"
        raise RequestError(f"tool_choice names {fn['name']!r}, which is not one of the tools ({have})", "tool_choice")


def strict_calls_grammar(functions: list[dict], parallel: bool, think: bool) -> Grammar:
    """tool_choice "auto" with strict tools: free text, and any call block in it follows the
    tools' schemas. think: the vocabulary has <think>/</think> tokens, and a reply may open with
    reasoning."""
    calls = tool_call_grammar(functions, parallel=parallel)
    head = "start: think? answer\nthink: <think> TEXT? </think>\n" if think else "start: answer\n"
    return Grammar(head + "answer: TEXT? (@calls TEXT?)*\nTEXT: /(?s:.+)/\n", "the tool-call format", (("calls", calls),))


def reply_grammar(body: dict, llm: LLM, functions: list[dict] | None, prompt: list[int]) -> Grammar | None:
    """What the reply must follow: response_format, a forced tool call (tool_choice "required"
    or named, under LFM2's call grammar), strict tools' arguments, or nothing."""
    tool_choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    fmt = body.get("response_format")
    try:
        response_format_grammar(fmt)  # checked even where a forced call makes it moot
    except LfmEdgeError as e:
        raise RequestError(str(e), "response_format") from None
    if tool_choice == "none" and not functions:
        tool_choice = None  # nothing to forbid: no mask to compute
    try:
        grammar = chat_grammar(fmt, functions, tool_choice, parallel)
        markers = Markers.of(llm.tokenizer)
        opened = opens_reasoning(llm.tokenizer.decode(prompt[-8:]))
        if grammar is None and functions and tool_choice in (None, "auto") and any(f.get("strict") for f in functions):
            think = markers.think_start is not None and markers.think_end is not None and not opened
            grammar = strict_calls_grammar(functions, parallel, think)
    except LfmEdgeError as e:
        raise RequestError(str(e), "tools" if tool_choice in (None, "auto", "none") else "tool_choice") from None
    return reasoning_first(llm, grammar, prompt)


def reasoning_first(llm: LLM, grammar: Grammar | None, prompt: list[int]) -> Grammar | None:
    """`grammar` after free reasoning when the prompt leaves the reply inside `<think>`
    (LFM2.5-2.6B's template) and a special token closes it; else `grammar` itself."""
    if grammar is None or not opens_reasoning(llm.tokenizer.decode(prompt[-8:])):
        return grammar
    think_end = Markers.of(llm.tokenizer).think_end
    return grammar if think_end is None else grammar.after_reasoning(llm.tokenizer.decode([think_end]))


def compile_grammar(llm: LLM, grammar: Grammar | None, param: str) -> Constraint | None:
    """The grammar compiled for one reply (bounded in time and memory); a schema or grammar
    that cannot be used is a 400 naming `param`."""
    if grammar is None:
        return None
    try:
        return llm.constraint(grammar)
    except LfmEdgeError as e:
        raise RequestError(str(e), param) from None


def number(body: dict, name: str, kind: type, default: Any = None, where: str | None = None) -> Any:
    """body[name] if it is a number of `kind` (JSON has no separate int type, and bool is not a number)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", where or name)
    return kind(value)


def make_sampling(options: dict[str, Any], where: str | None = None) -> SamplingParams:
    """SamplingParams, or a RequestError naming the option at fault (under `where`, if given)."""
    check_sampler_range(options, where)
    try:
        return make_sampling_params(options)
    except LfmEdgeError as e:
        name = next((n for n in options if n in str(e)), None)
        raise RequestError(str(e), where or name) from None


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
    return make_sampling(options)


def check_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: one choice per request (send the request again for another)", "n")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise RequestError("suffix is not supported", "suffix")
    if body.get("best_of", 1) not in (1, None):
        raise RequestError("best_of must be 1", "best_of")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", "stream_options")


def chat_logprobs(body: dict) -> int | None:
    """Chat: `logprobs` true/false, `top_logprobs` 0..20 (only with logprobs)."""
    wanted = body.get("logprobs")
    if wanted not in (None, True, False):
        raise RequestError("logprobs must be true or false", "logprobs")
    top = number(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
    if top is not None and not wanted:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def completion_logprobs(body: dict) -> int | None:
    """/v1/completions: `logprobs` is the number of alternatives, 0..5."""
    value = number(body, "logprobs", int)
    if value is not None and not 0 <= value <= 5:
        raise RequestError(f"logprobs must be from 0 to 5, got {value}", "logprobs")
    return value


def stop_strings(stop: Any, where: str = "stop") -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("stop must be a string or a list of strings", where)
    return [s for s in items if s]


def max_tokens(body: dict, default: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = number(body, name, int, default)
    if value < 0:
        raise RequestError(f"{name} must be >= 0, got {value}", name)
    return value


def check_sampler_range(options: dict[str, Any], where: str | None = None) -> None:
    """temperature and repetition_penalty divide the logits: beyond SAMPLER_RANGE (1e-40,
    1e40, inf) they overflow into NaN, so they are refused here (<= 0: SamplingParams says)."""
    low, high = SAMPLER_RANGE
    for name in ("temperature", "repetition_penalty"):
        value = options.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 and not math.isnan(value):
            continue
        if not low <= value <= high:
            zero = " 0 (greedy) or" if name == "temperature" else ""
            raise RequestError(f"{name} must be{zero} from {low:g} to {high:g}, got {value!r}", where or name)


def check_body(body: Any) -> None:
    """What any request body must be, whatever the endpoint: nested at most MAX_JSON_DEPTH
    levels, and text that UTF-8 can hold (JSON's "\\ud800" is a lone surrogate, not text).
    Walked without recursion, so no depth costs a stack."""
    stack: list[tuple[Any, int, tuple | None]] = [(body, 1, None)]  # (value, depth, (parent's place, key))
    while stack:
        value, depth, place = stack.pop()
        if depth > MAX_JSON_DEPTH:
            top = (json_path(place) or "").split("[")[0].split(".")[0]
            raise RequestError(f"the body is nested more than {MAX_JSON_DEPTH} levels deep", top or None)
        if isinstance(value, dict):
            for k, v in value.items():
                check_text(k, place)
                stack.append((v, depth + 1, (place, k)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, (place, i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            check_text(value, place)


def check_text(text: str, place: tuple | None) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = json_path(place)
        raise RequestError(
            f"{where or 'the body'} holds a lone surrogate (U+{ord(text[e.start]):04X}), which is not text", where
        ) from None


def json_path(place: tuple | None) -> str | None:
    """messages[0].content for ((((None, 'messages'), 0), 'content'))."""
    keys = []
    while place is not None:
        place, key = place
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else f".{key}" if out else str(key)
    return out or None


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prompt_texts(body: dict) -> list[tuple[str, str]]:
    """(param, text) for the text of a request that is certainly in its prompt, as any chat
    template renders it: the content of system, developer, user and tool messages (an
    assistant's may be cut: templates drop past reasoning), a completion's or ollama's
    `prompt`, ollama's `system` (without raw), /tokenize's `content`."""
    out = []
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "tool"):
            continue
        content = m.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                out.append((f"messages[{i}].content", text))
    keys = ("prompt", "content") if body.get("raw") else ("prompt", "content", "system")
    for key in keys:
        value = body.get(key)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                out.append((key, text))
    return out


def check_prompt_size(body: dict, n_ctx: int, longest_token: int) -> None:
    """Refuse, before any tokenizing, a request whose text cannot fit the context. Each token
    stands for at most `longest_token` bytes of text (byte-level BPE: the tokens' bytes are the
    text's), so N bytes of text are at least ceil(N / longest_token) tokens."""
    texts = prompt_texts(body)
    n_bytes = sum(utf8_len(t) for _, t in texts)
    least = -(-n_bytes // max(longest_token, 1))
    if least > n_ctx:
        where = max(texts, key=lambda t: len(t[1]))[0]
        raise RequestError(
            f"the prompt is at least {least} tokens ({n_bytes} bytes of text, and no token is longer than "
            f"{longest_token} bytes) but the context holds {n_ctx} (start the server with a larger -c/--ctx-size)",
            where,
            "context_length_exceeded",
        )


def check_fits(prompt: list[int], n_ctx: int, where: str) -> None:
    if len(prompt) > n_ctx:
        raise RequestError(
            f"the prompt is {len(prompt)} tokens but the context holds {n_ctx}"
            " (start the server with a larger -c/--ctx-size)",
            where,
            "context_length_exceeded",
        )


def stream_flag(body: dict, default: bool = False) -> bool:
    stream = body.get("stream", default)
    if stream is None:
        return default
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    return stream


def grammar_param(body: dict) -> str:
    """Which parameter a grammar that does not compile came from."""
    if body.get("tool_choice") not in (None, "auto", "none"):
        return "tool_choice"
    return "response_format" if body.get("response_format") is not None else "tools"


def chat_job(body: dict, llm: LLM, defaults: dict[str, Any]) -> Job:
    """POST /v1/chat/completions."""
    check_unsupported(body)
    messages = chat_messages(body.get("messages"))
    functions = tool_functions(body.get("tools"))
    check_tool_choice(body.get("tool_choice"), functions)
    listed = None if body.get("tool_choice") == "none" else functions
    shown = [{k: v for k, v in f.items() if k != "strict"} for f in listed] if listed else None
    try:
        prompt = llm.chat_tokens(messages, shown)
    except LfmEdgeError as e:
        raise RequestError(str(e), "messages") from None
    check_fits(prompt, llm.n_ctx, "messages")
    opts = body.get("stream_options") or {}
    return Job(
        kind="chat",
        prompt=prompt,
        max_tokens=max_tokens(body, default=llm.n_ctx),
        stop=stop_strings(body.get("stop")),
        sampling=sampling_params(body, defaults),
        constraint=compile_grammar(llm, reply_grammar(body, llm, functions, prompt), grammar_param(body)),
        stream=stream_flag(body),
        include_usage=bool(opts.get("include_usage")),
        parse_calls=listed is not None,
        logprobs=chat_logprobs(body),
        id="chatcmpl-" + uuid.uuid4().hex[:24],
    )


def completion_job(body: dict, llm: LLM, defaults: dict[str, Any]) -> Job:
    """POST /v1/completions: a raw continuation of the prompt."""
    check_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (or a list of one string)", "prompt")
    ids = llm.tokenize(prompt)
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    check_fits(ids, llm.n_ctx, "prompt")
    try:
        grammar = chat_grammar(body.get("response_format"))  # json_object / json_schema, as llama-server allows
    except LfmEdgeError as e:
        raise RequestError(str(e), "response_format") from None
    opts = body.get("stream_options") or {}
    return Job(
        kind="completion",
        prompt=ids,
        max_tokens=max_tokens(body, default=COMPLETIONS_DEFAULT_MAX_TOKENS),
        stop=stop_strings(body.get("stop")),
        sampling=sampling_params(body, defaults),
        constraint=compile_grammar(llm, grammar, "response_format"),
        stream=stream_flag(body),
        include_usage=bool(opts.get("include_usage")),
        logprobs=completion_logprobs(body),
        id="cmpl-" + uuid.uuid4().hex[:24],
    )


# -- tokens as the client sees them ---------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log-probability under the model, and the likeliest alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_entry(llm: LLM, token: int, logprob: float) -> dict:
    raw = llm.tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", "replace"), "logprob": clean(logprob), "bytes": list(raw)}


def clean(logprob: float) -> float:
    """JSON has no -Infinity: a token the model gives no chance (a masked one) is -9999, as OpenAI writes it."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprobs_content(llm: LLM, entries: Sequence[TokenLogprob]) -> list[dict]:
    return [
        {**token_entry(llm, e.token, e.logprob), "top_logprobs": [token_entry(llm, t, lp) for t, lp in e.top]}
        for e in entries
    ]


def completion_logprobs_object(llm: LLM, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for e in entries:
        text = llm.tokenizer.token_bytes(e.token).decode("utf-8", "replace")
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [clean(e.logprob) for e in entries],
        "top_logprobs": [
            {llm.tokenizer.token_bytes(t).decode("utf-8", "replace"): clean(lp) for t, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


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


class ReplyShapes(Protocol):
    """What the HTTP layer needs of a protocol to answer a job (OpenAIReply, ollama.OllamaReply)."""

    job: Job
    framing: str  # "sse" (server-sent events) or "ndjson" (a JSON object per line)

    def start(self) -> list[Any]: ...  # the stream's first parts
    def event(self, e: Event, logprobs: Sequence[TokenLogprob]) -> list[Any]: ...  # the parts for one event
    def end(self, stats: GenerationStats, logprobs: Sequence[TokenLogprob], trace_ids: Sequence[int]) -> list[Any]: ...
    def stream_error(self, message: str, status: int) -> Any: ...  # an error after the status line went
    def whole(self, reply: Reply, stats: GenerationStats, logprobs: Sequence[TokenLogprob],
              trace_ids: Sequence[int]) -> dict: ...  # the answer in one object


class OpenAIReply:
    """A job's answer in OpenAI's shapes: whole (`whole`) or as stream chunks (`start`,
    `event`, `end`); the HTTP layer frames the chunks as server-sent events."""

    framing = "sse"

    def __init__(self, job: Job, llm: LLM, model_id: str):
        self.job, self.llm, self.model_id = job, llm, model_id
        self.head = {
            "id": job.id,
            "object": ("chat.completion" if job.kind == "chat" else "text_completion"),
            "created": job.created,
            "model": model_id,
        }
        self.n_calls = 0
        self.offset = 0  # completions: characters streamed so far (for text_offset)

    # -- streaming -------------------------------------------------------------
    def _chunk(self, delta: Any = None, finish: str | None = None, logprobs: Sequence[TokenLogprob] = ()) -> dict:
        job = self.job
        lp = self._logprobs(logprobs) if job.logprobs is not None and (logprobs or finish is None) else None
        if job.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        extra = {"usage": None} if job.include_usage else {}
        return {**self.head, "object": obj, "choices": [choice], **extra}

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict:
        if self.job.kind == "chat":
            return {"content": chat_logprobs_content(self.llm, entries)}
        out = completion_logprobs_object(self.llm, entries, self.offset)
        self.offset += sum(len(t) for t in out["tokens"])
        return out

    def start(self) -> list[Any]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.job.kind == "chat" else []

    def event(self, e: Event, logprobs: Sequence[TokenLogprob]) -> list[Any]:
        """The chunks for one event; `logprobs`: the tokens generated since the last chunk."""
        job = self.job
        if job.kind == "completion":
            return [self._chunk(e.text, logprobs=logprobs)] if e.kind == TEXT and (e.text or logprobs) else []
        if e.kind == TOOL_CALL and job.parse_calls:
            out = []
            for call in e.calls:
                out.append(self._chunk({"tool_calls": [openai_tool_call(call, self.n_calls)]}, logprobs=logprobs))
                logprobs, self.n_calls = (), self.n_calls + 1
            return out
        if e.kind in (TEXT, TOOL_CALL) and e.text:  # without tools, a call is content
            return [self._chunk({"content": e.text}, logprobs=logprobs)]
        if e.kind == REASONING and e.text:
            return [self._chunk({"reasoning_content": e.text}, logprobs=logprobs)]
        return []

    def end(self, stats: GenerationStats, logprobs: Sequence[TokenLogprob], trace_ids: Sequence[int]) -> list[Any]:
        out = []
        if logprobs:  # tokens no event showed (held back, then dropped)
            out.append(self._chunk({} if self.job.kind == "chat" else "", logprobs=logprobs))
        last = self._chunk(None, finish_reason(stats, self.n_calls > 0))
        last["choices"][0]["logprobs"] = None
        out.append(last)
        if self.job.include_usage:
            out.append({**self.head, "object": last["object"], "choices": [], "usage": usage(stats)})
        out.append("[DONE]")
        return out

    def stream_error(self, message: str, status: int) -> Any:
        return error_body(message, status)

    # -- whole -------------------------------------------------------------------
    def whole(
        self, reply: Reply, stats: GenerationStats, logprobs: Sequence[TokenLogprob], trace_ids: Sequence[int]
    ) -> dict:
        job = self.job
        if job.kind == "completion":
            lp = completion_logprobs_object(self.llm, logprobs) if job.logprobs is not None else None
            choice = {"index": 0, "text": reply.text, "logprobs": lp, "finish_reason": finish_reason(stats, False)}
        else:
            message = openai_message(reply, job.parse_calls)
            reason = finish_reason(stats, "tool_calls" in message)
            lp = {"content": chat_logprobs_content(self.llm, logprobs)} if job.logprobs is not None else None
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}
        return {**self.head, "choices": [choice], "usage": usage(stats)}
