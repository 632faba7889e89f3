"""Rendering the Jinja chat template stored in a model file, as transformers does, safely.

A template comes from a downloaded file, so it runs in jinja2's immutable
sandbox: it can format messages but cannot reach attributes like
`__class__` or call methods that change state; and in the bounds of
template_sandbox.py: time, the text it makes, loops, recursion. Whatever goes
wrong in a template is one sentence (a TemplateError) when a chat renders it,
never when the model loads. The environment is the one transformers'
`apply_chat_template` renders with, rebuilt here (not imported):

- trim_blocks, lstrip_blocks, loop controls, the default `Undefined`;
- `{% generation %}...{% endgeneration %}` renders its body (transformers only
  uses the block to find the assistant's tokens for training masks);
- `tojson` keeps non-ASCII text and takes indent / separators / sort_keys;
- globals `raise_exception`, `strftime_now`, a `dict` that only builds dicts,
  and a `namespace` that refuses attribute names starting with `_`;
- variables `messages`, `tools` (as given), `documents` (None),
  `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...)
  and any keyword the caller adds (`enable_thinking`, `preserve_thinking`,
  `keep_past_thinking`, ...), which override the special tokens.

Messages pass through `normalize_messages` first. For messages shaped the way
transformers takes them it changes nothing but what transformers changes too
(keys whose value is None are dropped; `reasoning_content` / `thinking` /
`reasoning` are copied onto each other), so the text is byte-for-byte
transformers'. OpenAI-shaped input is made into that shape: `arguments` given
as a JSON string are parsed (the newest templates refuse strings), content
given as a list of text parts is joined (the LFM2.5 templates join parts with
nothing between them, so this is what they render either way). And where a
template never reads a field the model was trained to see, the field is
written where the template does look: assistant `tool_calls` become LFM2's
`<|tool_call_start|>[f(a="x")]<|tool_call_end|>` at the start of the content
(the LFM2 and LFM2.5-Instruct templates, which transformers would let drop
the calls silently), and `thinking` becomes `<think>...</think>` before the
content for a template that only looks for `</think>` inside the content.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.utils import Namespace, pass_environment

from .errors import LfmEdgeError
from .template_sandbox import MAX_INDENT, BoundedEnvironment, Budget, TemplateError, TemplateLimit, input_size
from .tool_calls import CALL_END, CALL_START, THINK_END, THINK_START

ROLES = {"system", "user", "assistant", "tool"}
# the names transformers reads a message's reasoning under, the one templates read first
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# variables the renderer sets itself; a caller's keyword may not replace them
RESERVED = {"messages", "tools", "documents", "add_generation_prompt"}
MAX_STRFTIME = 1000

__all__ = ["ChatTemplate", "TemplateError", "TemplateLimit", "normalize_messages"]


# -- the environment -------------------------------------------------------------------


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: the body is rendered as if the tags were absent.

    Like transformers, the body runs as a call block (a scope of its own), so a
    variable set inside it is not seen after `{% endgeneration %}`.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class TemplateNamespace(Namespace):
    """jinja's `namespace`, refusing names that start with `_` (a way towards Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")


class DictFactory:
    """The template's `dict`: builds dicts, and is not the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise(message: Any) -> None:
    raise TemplateError(f"chat template: {one_line(message)}")


def one_line(message: Any, limit: int = 300) -> str:
    """A message as one short line (a template's exception may hold newlines or megabytes)."""
    text = " ".join(str(message)[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@pass_environment
def _tojson(
    env: BoundedEnvironment, value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys=False
) -> str:
    """json.dumps's text, made a piece at a time under the render's bounds."""
    sizes = [len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0]
    sizes += [len(s) for s in separators if isinstance(s, str)] if isinstance(separators, (list, tuple)) else []
    if max(sizes) > MAX_INDENT:
        raise TemplateLimit(
            f"the chat template asked tojson for an indent or separator of more than {MAX_INDENT} characters"
        )
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.join_text(encoder.iterencode(value))


def _strftime(clock: Callable[[], datetime], fmt: Any) -> str:
    if isinstance(fmt, str) and len(fmt) > MAX_STRFTIME:  # each %c can become 24 characters
        raise TemplateLimit(f"the chat template gave strftime_now a format of more than {MAX_STRFTIME} characters")
    return clock().strftime(fmt)


def _environment(clock: Callable[[], datetime]) -> BoundedEnvironment:
    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols], undefined=jinja2.Undefined
    )
    env.set_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: _strftime(clock, fmt)
    env.globals["dict"] = DictFactory()
    env.globals["namespace"] = TemplateNamespace
    return env


# -- the template ----------------------------------------------------------------------


class ChatTemplate:
    """A chat template, parsed once; `render` turns messages into the prompt text.

    `clock` gives the time `strftime_now` formats (tests pin it).
    """

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        special_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = datetime.now,
    ):
        self.source = source
        self.clock = clock
        self._pinned = threading.local()
        self._env = env = _environment(self._now)
        try:
            # Python warns about what jinja2 makes of a template (an invalid escape in a string,
            # the code of `{{ 5[0] }}`): stderr is no place for it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast = env.parse(source)
                names, strings = _names_read(ast), _strings(ast)
                self._template = env.from_string(env.bound(ast))
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not parse: {one_line(e.message)} (line {e.lineno})") from None
        except Exception as e:  # a template nested past the parser's recursion, ...
            raise TemplateError(f"the chat template cannot be compiled: {_reason(e)}") from None
        # transformers passes the tokenizer's named special tokens as variables
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        self.bos_token, self.eos_token = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        self.reads_tool_calls = "tool_calls" in names
        self.reads_thinking = any(f in names for f in REASONING_FIELDS)
        self.splits_thinking = any(THINK_END in s for s in strings)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text; `template_kwargs` become template variables (e.g. enable_thinking=False)."""
        messages = normalize_messages(
            messages,
            calls_in_content=not self.reads_tool_calls,
            thinking_in_content=self.splits_thinking and not self.reads_thinking,
        )
        clash = RESERVED.intersection(template_kwargs)
        if clash:
            raise LfmEdgeError(f"{sorted(clash)[0]!r} is set by the renderer and cannot be a template variable")
        check_tools(tools)
        variables = {**self.special_tokens, **plain_data(template_kwargs)}
        tools = plain_data(tools)
        budget = Budget(*input_size((messages, tools, variables)))
        try:
            with self._env.bounded(budget):
                text = self._template.render(
                    messages=messages,
                    tools=tools,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **variables,
                )
        except LfmEdgeError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried something unsafe and was stopped: {one_line(e)}") from None
        except Exception as e:  # a template is a program: TypeError, UndefinedError, ... all mean it failed
            raise TemplateError(f"the chat template failed: {_reason(e)}") from None
        if len(text) > budget.output_limit:
            raise TemplateLimit(
                f"the chat template wrote {len(text):,} characters, "
                f"more than the {budget.output_limit:,} a prompt may have"
            )
        check_unicode(text, "the rendered prompt holds")
        return text

    def render_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        control_tokens: Collection[str] = (),
        **template_kwargs: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text, and where in it control-token text came from the messages or tools.

        Those (start, end) character ranges are to be tokenized as plain text
        (GGUFTokenizer.encode_prompt), so text a user, a tool or a document
        holds can never end a turn or start a role. An assistant message may
        hold its own reasoning and tool-call markers (`<think>`, `</think>`,
        `<|tool_call_start|>`, `<|tool_call_end|>`): the model wrote them as
        those tokens, and they stay tokens; every other control token in it is text.
        See `protected_spans` for how they are found.
        """
        self._pinned.now = self.clock()  # both renders see the same strftime_now
        try:
            text = self.render(messages, tools, add_generation_prompt, **template_kwargs)
            spans = protected_spans(self, text, messages, tools, add_generation_prompt, control_tokens, template_kwargs)
        finally:
            self._pinned.now = None
        return text, spans

    def _now(self) -> datetime:
        pinned = getattr(self._pinned, "now", None)
        return pinned if pinned is not None else self.clock()


def _reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "it ran out of memory"
    if isinstance(e, RecursionError):
        return "it recursed too deeply"
    return one_line(e) or type(e).__name__


def check_unicode(text: str, where: str) -> None:
    """Text that UTF-8 can hold: a lone surrogate (from JSON's "\\ud800", say) cannot be tokenized."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LfmEdgeError(
            f"{where} a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not text"
        ) from None


def _names_read(ast: nodes.Template) -> set[str]:
    """Attribute and item names the template reads (`message.tool_calls`, `message["thinking"]`)."""
    names = {n.attr for n in ast.find_all(nodes.Getattr)}
    return names | _strings(ast)


def _strings(ast: nodes.Template) -> set[str]:
    return {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)} | {
        n.data for n in ast.find_all(nodes.TemplateData)
    }


# -- message text stays text --------------------------------------------------------------

# the markers an assistant message may hold as tokens: the model itself writes them as such
ASSISTANT_MARKERS = frozenset({THINK_START, THINK_END, CALL_START, CALL_END})
# private-use characters, one of which marks control-token text in a second render
MARKS = range(0xE000, 0xF900)


def protected_spans(
    template: ChatTemplate,
    text: str,
    messages: Any,
    tools: Any,
    add_generation_prompt: bool,
    control_tokens: Collection[str],
    template_kwargs: dict[str, Any],
) -> list[tuple[int, int]]:
    """Where control-token text in `text` (the render of `messages` and `tools`) came from them.

    Most conversations hold none, and cost one regular-expression search. When
    one does, the messages and tools are rendered again with a private-use
    character put inside each such control-token text (`<` + mark + `|im_end|>`):
    the template treats the text as before (it strips it, splits it at
    `</think>`, ...), so with the marks taken out the second render is the
    first, and each mark points at text that came from a message. A template
    that changes message text so that this fails (cuts it at a length, say)
    falls back to finding each such string verbatim in the prompt; a control
    token found neither way is refused in one sentence, never read as a token.
    """
    if not control_tokens:
        return []
    pattern = _token_pattern(tuple(sorted(control_tokens)))
    mark = next((chr(c) for c in MARKS if chr(c) not in text and chr(c) not in template.source), None)
    if mark is None or not isinstance(messages, list):
        return []
    found: list[tuple[str, list[tuple[int, int]]]] = []  # each string holding control-token text: (text, spans)
    marked_messages = [
        _mark(m, pattern, ASSISTANT_MARKERS if m.get("role") == "assistant" else frozenset(), mark, found)
        if isinstance(m, Mapping) else m
        for m in messages
    ]
    marked_tools = _mark(tools, pattern, frozenset(), mark, found)
    if not found:
        return []
    try:
        marked = template.render(marked_messages, marked_tools, add_generation_prompt, **template_kwargs)
    except LfmEdgeError:
        marked = None
    if marked is not None and marked.replace(mark, "") == text:
        spans, k, p = [], 0, marked.find(mark)
        while p != -1:
            at = p - k - 1  # the control token's first character, in `text`
            m = pattern.match(text, at)
            if m:
                spans.append(m.span())
            k, p = k + 1, marked.find(mark, p + 1)
        return spans
    return _verbatim_spans(text, marked, pattern, found)


def _verbatim_spans(
    text: str, marked: str | None, pattern: re.Pattern, found: list[tuple[str, list[tuple[int, int]]]]
) -> list[tuple[int, int]]:
    """Control-token text of the strings in `found` wherever a string appears whole in `text`."""
    spans: set[tuple[int, int]] = set()
    for string, inside in found:
        at = text.find(string)
        while at != -1:
            spans.update((at + a, at + b) for a, b in inside)
            at = text.find(string, at + len(string))
    # every control token the messages added to the prompt must be among them: the marked
    # render (where their text is broken) tells how many of each the template wrote itself
    unplaced = None
    if marked is None:
        unplaced = next((s[a:b] for s, inside in found if s not in text for a, b in inside), None)
    else:
        made, located = _count(pattern, marked), _count(pattern, "".join(text[a:b] + " " for a, b in spans))
        for token, n in _count(pattern, text).items():
            if located.get(token, 0) < n - made.get(token, 0):
                unplaced = token
    if unplaced is not None:
        raise LfmEdgeError(
            f"a message holds the control token {unplaced!r} where this chat template rewrites the text "
            "around it, so it cannot be kept as plain text; take it out of the message"
        )
    return sorted(spans)


def _count(pattern: re.Pattern, text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in pattern.finditer(text):
        counts[m.group()] = counts.get(m.group(), 0) + 1
    return counts


def _mark(value: Any, pattern: re.Pattern, keep: frozenset[str], mark: str, found: list) -> Any:
    """`value` with `mark` after the first character of each control-token text not in `keep`."""
    if isinstance(value, str):
        inside = [m.span() for m in pattern.finditer(value) if m.group() not in keep]
        if not inside:
            return value
        found.append((value, inside))
        out, last = [], 0
        for a, _ in inside:
            out += [value[last : a + 1], mark]
            last = a + 1
        return "".join(out) + value[last:]
    if isinstance(value, Mapping):
        return {_mark(k, pattern, keep, mark, found): _mark(v, pattern, keep, mark, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mark(v, pattern, keep, mark, found) for v in value)
    return value


@functools.lru_cache(maxsize=8)
def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Leftmost-longest matches of the tokens' text, as the tokenizer finds them."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


# -- messages ---------------------------------------------------------------------------


def check_messages(messages: Any) -> None:
    """A conversation is a list of {'role': ..., 'content': ...} dicts."""
    normalize_messages(messages)


def normalize_messages(
    messages: Any, calls_in_content: bool = False, thinking_in_content: bool = False
) -> list[dict[str, Any]]:
    """Messages as the chat templates take them (see the module's docstring); the input is not changed.

    `calls_in_content` / `thinking_in_content` write `tool_calls` / `thinking`
    into the content, for a template that does not read those fields.
    """
    if not isinstance(messages, list):
        raise LfmEdgeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise LfmEdgeError(f"message {i} must be a dict with a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise LfmEdgeError(f"message {i} has role {m['role']!r}; roles are {', '.join(sorted(ROLES))}")
        # transformers drops keys whose value is None (OpenAI sends "content": null with tool calls)
        m = {k: plain_data(v) for k, v in m.items() if v is not None}
        if "content" in m:
            m["content"] = content_text(m["content"], f"message {i}")
            check_unicode(m["content"], f"message {i} holds")
        m = alias_reasoning(m)
        if "tool_calls" in m:
            m["tool_calls"] = parsed_tool_calls(m["tool_calls"], f"message {i}")
        if m["role"] == "assistant":
            m = _into_content(m, calls_in_content, thinking_in_content)
        out.append(m)
    return out


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined with nothing between them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise LfmEdgeError(f"{where} has a content part {j} of type {kind!r}; only text parts are supported")
        return "".join(texts)
    raise LfmEdgeError(f"{where} has content that is not text (a string or a list of text parts)")


def alias_reasoning(m: dict[str, Any]) -> dict[str, Any]:
    """transformers' rule: `thinking` (unless given) and `reasoning_content` take the first reasoning field set."""
    reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is None:
        return m
    return {"thinking": reasoning, **m, "reasoning_content": reasoning}


def parsed_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """`tool_calls` with every `arguments` a mapping: JSON strings parsed, a missing or empty one is {}."""
    if not isinstance(calls, list):
        raise LfmEdgeError(f"{where} has tool_calls that are not a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise LfmEdgeError(f"{where}: tool_calls[{j}] needs a function with a name")
        args = fn.get("arguments")
        if args is None or (isinstance(args, str) and not args.strip()):
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise LfmEdgeError(f"{where}: tool_calls[{j}].function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise LfmEdgeError(f"{where}: tool_calls[{j}].function.arguments must be a JSON object")
        fn = {**fn, "arguments": args}
        out.append({**call, "function": fn} if "function" in call else fn)
    return out


def _into_content(m: dict[str, Any], calls: bool, thinking: bool) -> dict[str, Any]:
    """Write `tool_calls` / `thinking` into the content, LFM2's way: think block, calls, then words."""
    head = ""
    if thinking and isinstance(m.get("thinking"), str) and m["thinking"]:
        head += THINK_START + m["thinking"] + THINK_END
        m = {k: v for k, v in m.items() if k not in REASONING_FIELDS}
    if calls and m.get("tool_calls"):
        head += call_text([c.get("function", c) for c in m["tool_calls"]])
        m = {k: v for k, v in m.items() if k != "tool_calls"}
    if head:
        m["content"] = head + m.get("content", "")
    return m


def call_text(functions: list[dict[str, Any]]) -> str:
    """Calls the way LFM2 writes them: `<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>`.

    Argument names Python cannot spell fall back to the JSON form, which LFM2 also reads.
    """
    pythonic = all(k.isidentifier() for f in functions for k in f["arguments"]) and all(
        all(p.isidentifier() for p in f["name"].split(".")) for f in functions
    )
    if pythonic:
        body = "[" + ", ".join(
            f["name"] + "(" + ", ".join(f"{k}={py_literal(v)}" for k, v in f["arguments"].items()) + ")"
            for f in functions
        ) + "]"
    else:
        body = json.dumps([{"name": f["name"], "arguments": f["arguments"]} for f in functions], ensure_ascii=False)
    return CALL_START + body + CALL_END


def py_literal(value: Any) -> str:
    """A JSON value as the Python literal LFM2 writes in its calls (strings in double quotes)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {py_literal(v)}" for k, v in value.items()) + "}"
    raise LfmEdgeError(f"a tool call argument is not a JSON value: {value!r}")


def check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list) or not all(isinstance(t, (Mapping, str)) for t in tools):
        raise LfmEdgeError(
            "tools must be a list of JSON schemas (dicts such as {'type': 'function', 'function': {...}})"
        )


def plain_data(value: Any) -> Any:
    """A copy made of plain JSON-like types only, as transformers gives the template.

    Subclasses of str / int / float lose their extra methods; any other object
    becomes a placeholder naming its type, so nothing with dangerous methods
    reaches the sandbox. A container that appears twice is copied once (and
    stays shared), so `[a, a]` nested 40 deep does not become 2**40 copies.
    """
    try:
        return _plain(value, {})
    except RecursionError:
        raise LfmEdgeError("the messages or tools are nested too deeply to render") from None


def _plain(value: Any, copies: dict[int, Any]) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in copies:
            return copies[id(value)]
        if isinstance(value, Mapping):
            out = copies[id(value)] = {}
            out.update((_plain(k, copies), _plain(v, copies)) for k, v in value.items())
        elif isinstance(value, list):
            out = copies[id(value)] = []
            out.extend(_plain(v, copies) for v in value)
        else:
            out = copies[id(value)] = tuple(_plain(v, copies) for v in value)
        return out
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item(), copies)  # a numpy scalar
    return f"<{type(value).__name__}>"
