"""Constrained decoding: replies that follow a JSON schema, a regular expression, a Lark
grammar or LFM2's tool-call syntax, whatever the model would rather write.

A `Grammar` says what may be written; it knows no vocabulary, so one may serve many
requests (the server builds one per request). `Vocabulary` is llguidance's view of a
model's tokens (their bytes from the GGUF file, special tokens marked, the
end-of-generation tokens as EOS), built once per model. `Vocabulary.constraint(grammar)`
compiles a grammar, bounded in time and memory, into a `Constraint`: one sequence's
parser, which the sampler consults at every step:

    constraint.mask(logits)    # tokens the grammar forbids get -inf, in place
    constraint.advance(token)  # the sampled token; starts computing the next mask
    constraint.is_done()       # the grammar is complete: only EOS could follow

The next mask is computed on a worker thread while the model runs its forward pass
(llguidance releases the GIL, and so do the kernels), so the mask costs a decode step
little more than applying it.

`tool_call_grammar` writes LFM2's Pythonic call syntax as a grammar,
`<|tool_call_start|>[name(arg=value, ...)]<|tool_call_end|>`, with names and arguments
that follow the tools' JSON schemas; `chat_grammar` turns OpenAI's `response_format` /
`tool_choice` into one grammar.
"""

from __future__ import annotations

import json
import keyword
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import LfmEdgeError
from .tool_calls import CALL_END, CALL_START, THINK_END

if TYPE_CHECKING:
    from .tokenizer import GGUFTokenizer

# Compilation is bounded: memory by llguidance's limits (a lexer state is ~1-2 kB, so at
# most ~100 MB; llguidance's default is 250,000 states), time by a deadline; a schema
# past either is refused in one sentence. The per-step limits stay llguidance's.
COMPILE_TIMEOUT_S = 2.0
MAX_LEXER_STATES = 50_000
MAX_GRAMMAR_SIZE = 200_000
MAX_SCHEMA_DEPTH = 64  # nesting our own builders follow, and Python's json can encode
# JSON as a small model writes it best: one fixed separator, no free whitespace (a random
# or unsure model fills free whitespace until the budget ends). A schema's own
# "x-guidance" options override these, llguidance's rule.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# escapes that mean the same in a JSON string and a Python string literal (not \/, and
# no \u, whose surrogate pairs Python reads as two characters)
PY_SAFE_ESCAPES = '"\\bfnrt'


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency, but keep plain generation working without it
        raise LfmEdgeError("constrained decoding needs the llguidance package: pip install llguidance") from e
    return llguidance


# -- grammars ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grammar:
    """What a reply may be: Lark text in llguidance's dialect whose `start` rule is the
    reply, plus any grammars it embeds (named `@name` in the text)."""

    lark: str
    what: str  # how errors name it: "the JSON schema", "the regular expression", ...
    parts: tuple[tuple[str, Grammar], ...] = ()

    @classmethod
    def from_lark(cls, source: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (its `start` rule is the reply)."""
        if not isinstance(source, str) or not source.strip():
            raise LfmEdgeError("the grammar must be non-empty Lark text")
        return cls(source, "the grammar")

    @classmethod
    def from_regex(cls, pattern: str) -> Grammar:
        """The whole reply matches `pattern` (Rust regex syntax: no look-around, no backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise LfmEdgeError("the regular expression must be a non-empty string")
        return cls(f"start: /{_llguidance().regex_to_lark(pattern, '')}/\n", "the regular expression")

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any] | str | bool) -> Grammar:
        """The reply is one JSON value valid under `schema` (a dict, or its JSON text)."""
        return cls(f"start: {_json_rule(_load_schema(schema), JSON_OPTIONS)}\n", "the JSON schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls(f"start: {_json_rule({'type': 'object'}, JSON_OPTIONS)}\n", "the JSON object format")

    def either(self, other: Grammar) -> Grammar:
        """This grammar or `other`."""
        return Grammar("start: @a | @b\n", self.what, (("a", self), ("b", other)))

    def after_reasoning(self, think_end: str = THINK_END) -> Grammar:
        """This grammar after free reasoning closed by the special token `think_end`:
        for a prompt that leaves the reply inside `<think>` (LFM2.5)."""
        return Grammar(f"start: REASONING {think_end} @answer\nREASONING: /(?s:.*)/\n", self.what, (("answer", self),))

    def source(self) -> str:
        """llguidance's grammar: this one and every grammar it embeds, by global names."""
        grammars: list[dict[str, str]] = []

        def add(g: Grammar) -> str:
            name = f"g{len(grammars)}"
            entry: dict[str, str] = {"name": name}
            grammars.append(entry)
            lark = g.lark
            for local, part in g.parts:
                lark = re.sub(rf"@{re.escape(local)}\b", "@" + add(part), lark)
            entry["lark_grammar"] = lark
            return name

        add(self)
        return json.dumps({"grammars": grammars}, ensure_ascii=False)


def _load_schema(schema: Any) -> Any:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise LfmEdgeError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep") from None
        except ValueError as e:
            raise LfmEdgeError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise LfmEdgeError(f"a JSON schema must be an object, got {type(schema).__name__}")
    _check_depth(schema)
    return schema


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise LfmEdgeError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        if isinstance(child, (dict, list)):
            _check_depth(child, depth + 1)


def _json_rule(schema: Any, options: dict[str, Any]) -> str:
    """`%json {...}`: llguidance's JSON-schema compiler as one Lark rule body."""
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**options, **(schema.get("x-guidance") or {})}}
    elif schema is True:
        schema = {"x-guidance": options}
    else:  # false: nothing is valid
        raise LfmEdgeError("the JSON schema is false: no value satisfies it")
    try:
        return "%json " + json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LfmEdgeError(f"the JSON schema holds a value JSON cannot write: {e}") from None


# -- LFM2's tool calls ---------------------------------------------------------------------


def tool_call_grammar(tools: Sequence[dict[str, Any]], name: str | None = None, parallel: bool = True) -> Grammar:
    """A forced tool call in LFM2's syntax: `<|tool_call_start|>[f(a=1, b="x")]<|tool_call_end|>`.

    `tools`: OpenAI-shaped ({"type": "function", "function": {...}}) or bare
    ({"name", "parameters"}) definitions. `name`: only this tool may be called (OpenAI's
    named tool_choice); else any. `parallel`: several calls in one block. Arguments are
    keywords in the order of the schema's properties, required ones always present,
    values as Python literals (strings double-quoted, True/False/None).
    """
    defs = [_tool_def(t) for t in tools]
    if not defs:
        raise LfmEdgeError("tool_choice needs tools, and none were given")
    if name is not None:
        chosen = [d for d in defs if d[0] == name]
        if not chosen:
            raise LfmEdgeError(f"tool_choice names {name!r}, which is not one of the tools ({', '.join(d[0] for d in defs)})")
        defs = chosen
    b = _PyLiteralRules()
    calls = [b.call(tool_name, params) for tool_name, params in defs]
    b.rules["call"] = " | ".join(calls)
    body = '"[" call ("," " " call)* "]"' if parallel else '"[" call "]"'
    start = f"start: {CALL_START} {body} {CALL_END}\n"
    return Grammar(start + b.text(), "the tool-call format")


def _tool_def(tool: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(tool, dict):
        raise LfmEdgeError(f"a tool must be an object, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise LfmEdgeError("a tool has no function name")
    name = fn["name"]
    if not all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")):
        raise LfmEdgeError(f"tool name {name!r} cannot be written in LFM2's call syntax (it must be a Python name)")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise LfmEdgeError(f"the parameters of tool {name!r} must be a JSON schema object")
    _check_depth(params)
    return name, params


class _PyLiteralRules:
    """Lark rules for Python literals valid under JSON schemas (the arguments LFM2 writes)."""

    SCALAR_KEYS = {"type", "enum", "const", "description", "title", "default", "examples", "$comment",
                   "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
                   "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}

    def __init__(self):
        self.rules: OrderedDict[str, str] = OrderedDict()
        self.n = 0
        self.root: dict[str, Any] = {}

    def text(self) -> str:
        return "".join(f"{k}: {v}\n" for k, v in self.rules.items())

    def _new(self, hint: str) -> str:
        self.n += 1
        return f"r{self.n}_{re.sub(r'[^a-z0-9]', '_', hint.lower())[:24]}"

    def _rule(self, hint: str, body: str) -> str:
        name = self._new(hint)
        self.rules[name] = body
        return name

    def call(self, name: str, params: dict[str, Any]) -> str:
        self.root = params
        rule = self._new(f"call_{name}")
        args = self._fields(params, name, as_keywords=True)
        self.rules[rule] = f'"{name}(" {args} ")"' if args else f'"{name}()"'
        return rule

    def _fields(self, schema: dict[str, Any], hint: str, as_keywords: bool, depth: int = 0) -> str:
        """The properties of an object schema in their order, required ones always, optional
        ones maybe, separated by ", ": keyword arguments `k=v` or dict items `"k": v`.
        Linear in size: rule first[i] is properties i.. with no separator before the first
        one present, rest[i] the same with a separator before each."""
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise LfmEdgeError(f"'properties' of {hint} must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or any(r not in props for r in required):
            missing = [r for r in required if r not in props] if isinstance(required, list) else required
            raise LfmEdgeError(f"{hint} requires {missing!r}, which its properties do not define")
        if not props:
            return ""
        if as_keywords:
            bad = [k for k in props if not k.isidentifier() or keyword.iskeyword(k)]
            if bad:
                raise LfmEdgeError(f"argument {bad[0]!r} of {hint} cannot be written as a Python keyword argument")
        sep = '", "'
        key = (lambda k: json.dumps(f"{k}=")) if as_keywords else (lambda k: json.dumps(json.dumps(k, ensure_ascii=False) + ": "))
        items = [(key(k), self.value(v, f"{hint}.{k}", depth + 1), k in required) for k, v in props.items()]
        # first[i] is needed while every property before i is optional; rest[0] never is
        n = len(items)
        needed = [True] * n
        for i in range(1, n):
            needed[i] = needed[i - 1] and not items[i - 1][2]
        rest, first = [""] * (n + 1), [""] * (n + 1)  # rule names; "": nothing left
        for i in range(n - 1, -1, -1):
            name, value, req = items[i]
            pair = f"{name} {value}"
            tail = f" {rest[i + 1]}" if rest[i + 1] else ""
            if i > 0:
                rest[i] = self._rule(hint, f"{sep} {pair}{tail}" if req else f"({sep} {pair})?{tail}")
            if needed[i]:
                if req:
                    body = f"{pair}{tail}"
                elif first[i + 1]:
                    body = f"{pair}{tail} | {first[i + 1]}"
                else:
                    body = f"({pair})?"
                first[i] = self._rule(hint, body)
        return first[0]

    def value(self, schema: Any, hint: str, depth: int = 0) -> str:
        """A Lark expression for a Python literal valid under `schema`."""
        if depth > MAX_SCHEMA_DEPTH:
            raise LfmEdgeError(f"the schema of {hint} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if schema is True or schema == {}:
            return self._any()
        if not isinstance(schema, dict):
            raise LfmEdgeError(f"the schema of {hint} must be an object")
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"], hint), hint, depth + 1)
        if "const" in schema:
            return self._literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise LfmEdgeError(f"the enum of {hint} must be a non-empty list")
            return "(" + " | ".join(self._literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise LfmEdgeError(f"the {key} of {hint} must be a non-empty list")
                base = {k: v for k, v in schema.items() if k != key}
                return "(" + " | ".join(self.value({**base, **a} if isinstance(a, dict) else a, hint, depth + 1) for a in alts) + ")"
        if "allOf" in schema:
            raise LfmEdgeError(f"the schema of {hint} uses allOf, which tool arguments do not support")
        kind = schema.get("type")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
            if kind is None:
                return self._any()
        if isinstance(kind, list):
            if not kind:
                raise LfmEdgeError(f"the type list of {hint} is empty")
            return "(" + " | ".join(self.value({**schema, "type": k}, hint, depth + 1) for k in kind) + ")"
        if kind in ("string", "integer", "number"):
            keep = {k: v for k, v in schema.items() if k in self.SCALAR_KEYS}
            rule = self._new(hint)
            self.rules[rule] = _json_rule(keep, {"whitespace_flexible": False, "json_allowed_escapes": PY_SAFE_ESCAPES})
            return rule
        if kind == "boolean":
            return '("True" | "False")'
        if kind == "null":
            return '"None"'
        if kind == "array":
            return self._array(schema, hint, depth)
        if kind == "object":
            return self._object(schema, hint, depth)
        raise LfmEdgeError(f"the schema of {hint} has type {kind!r}, which is not a JSON schema type")

    def _array(self, schema: dict[str, Any], hint: str, depth: int) -> str:
        item = self.value(schema.get("items", True), f"{hint}[]", depth + 1)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or (hi is not None and hi < lo):
            raise LfmEdgeError(f"the item bounds of {hint} are not valid (minItems {lo!r}, maxItems {hi!r})")
        if hi is not None and hi > 1000 or lo > 1000:
            raise LfmEdgeError(f"the item bounds of {hint} are too large for a tool argument (at most 1000)")
        rule = self._new(hint)
        if hi == 0:
            self.rules[rule] = '"[]"'
            return rule
        more_lo, more_hi = max(lo - 1, 0), (hi - 1 if hi is not None else "")
        more = f'("," " " {item}){{{more_lo},{more_hi}}}'
        body = f'"[" {item} {more} "]"'
        self.rules[rule] = body if lo > 0 else f'"[]" | {body}'
        return rule

    def _object(self, schema: dict[str, Any], hint: str, depth: int) -> str:
        rule = self._new(hint)
        if not schema.get("properties"):
            # a free dict: string keys, any literal values
            self.rules[rule] = f'"{{}}" | "{{" {self._pykey()} ": " {self._any()} ("," " " {self._pykey()} ": " {self._any()})* "}}"'
            return rule
        fields = self._fields(schema, hint, as_keywords=False, depth=depth)
        self.rules[rule] = f'"{{" {fields} "}}"'
        return rule

    def _pykey(self) -> str:
        if "PYSTR" not in self.rules:
            self._any()
        return "PYSTR"

    def _any(self) -> str:
        """Any Python literal: strings, numbers, True/False/None, lists and dicts of them."""
        if "py_any" not in self.rules:
            self.rules["PYSTR"] = r'/"([^"\\\x00-\x1f]|\\["\\bfnrt])*"/'
            self.rules["PYNUM"] = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
            self.rules["py_any"] = (
                'PYSTR | PYNUM | "True" | "False" | "None" '
                '| "[" (py_any ("," " " py_any)*)? "]" '
                '| "{" (PYSTR ": " py_any ("," " " PYSTR ": " py_any)*)? "}"'
            )
        return "py_any"

    def _resolve(self, ref: Any, hint: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise LfmEdgeError(f"the schema of {hint} refers to {ref!r}; only references inside the tool's schema (#/...) work")
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise LfmEdgeError(f"the schema of {hint} refers to {ref!r}, which does not exist")
            node = node[part]
        return node

    @staticmethod
    def _literal(value: Any) -> str:
        """A Lark string literal for the Python literal of a JSON value."""
        return json.dumps(_py_repr(value), ensure_ascii=False)


def _py_repr(value: Any) -> str:
    if value is True:
        return "True"
    if value is False:
        return "False"
    if value is None:
        return "None"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_py_repr, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_py_repr(v)}" for k, v in value.items()) + "}"
    raise LfmEdgeError(f"{value!r} is not a JSON value")


def grammar_from(grammar: Grammar | str | None = None, json_schema: Any = None, regex: str | None = None) -> Grammar | None:
    """The one grammar given: a Grammar or Lark text, a JSON schema, or a regular expression."""
    given = [name for name, v in (("grammar", grammar), ("json_schema", json_schema), ("regex", regex)) if v is not None]
    if len(given) > 1:
        raise LfmEdgeError(f"give one of grammar, json_schema and regex, not {' and '.join(given)}")
    if grammar is not None:
        return grammar if isinstance(grammar, Grammar) else Grammar.from_lark(grammar)
    if json_schema is not None:
        return Grammar.from_json_schema(json_schema)
    if regex is not None:
        return Grammar.from_regex(regex)
    return None


# -- OpenAI's response_format and tool_choice ---------------------------------------------


def response_format_grammar(response_format: Any) -> Grammar | None:
    """OpenAI's response_format: {"type": "text"} (None), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise LfmEdgeError('response_format must be an object with a "type"')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise LfmEdgeError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return Grammar.from_json_schema(spec["schema"])
    raise LfmEdgeError(f"response_format type {kind!r} is not supported (text, json_object or json_schema)")


def tool_choice_name(tool_choice: Any) -> str:
    """The function a named tool_choice forces: {"type": "function", "function": {"name": X}}."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
        if isinstance(tool_choice.get("name"), str):  # {"type": "function", "name": X} (Responses API shape)
            return tool_choice["name"]
    raise LfmEdgeError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')


TEXT_ONLY = Grammar("start: TEXT\nTEXT: /(?s:.*)/\n", "the text-only format")  # special tokens never match text


def chat_grammar(
    response_format: Any = None,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
) -> Grammar | None:
    """The grammar a chat reply follows, or None for a free one.

    tool_choice "required" or named: one forced call block (response_format does not
    apply, as in OpenAI's API); "none": text without tool calls; "auto" (the default):
    free, or with a response_format, its JSON or a call block.
    """
    fmt = response_format_grammar(response_format)
    if tool_choice in (None, "auto"):
        if fmt is None or not tools:
            return fmt
        return fmt.either(tool_call_grammar(tools, parallel=parallel_tool_calls))
    if tool_choice == "none":
        return fmt or TEXT_ONLY
    if tool_choice == "required":
        return tool_call_grammar(tools or [], parallel=parallel_tool_calls)
    return tool_call_grammar(tools or [], name=tool_choice_name(tool_choice), parallel=parallel_tool_calls)


# -- from grammar to token masks ------------------------------------------------------------

_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(kind: str) -> ThreadPoolExecutor:
    """Worker threads: "compile" (a compile past its deadline keeps one busy until llguidance's
    limits stop it) apart from "mask" (masks computed during forward passes)."""
    with _POOLS_LOCK:
        if kind not in _POOLS:
            _POOLS[kind] = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"lfm-edge-{kind}")
        return _POOLS[kind]


def _one_sentence(error: str) -> str:
    """llguidance's error (several lines, with a caret picture) as one line."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    head = lines[0]
    detail = next((ln[len("error:") :].strip() for ln in lines[1:] if ln.startswith("error:")), "")
    head = re.sub(r"^at \d+\(\d+\): ", "", head)
    text = f"{head} {detail}" if head.endswith(":") and detail else head.rstrip(":")
    return text if len(text) <= 300 else text[:297] + "..."


class Vocabulary:
    """llguidance's tokenizer for one model: each token's bytes, special tokens marked,
    the end-of-generation tokens as EOS. Build once per model; thread-safe."""

    CACHE_SIZE = 8  # compiled grammars kept, so a repeated schema is not compiled again (each < ~100 MB)

    def __init__(self, tokenizer: GGUFTokenizer):
        llg = _llguidance()
        self.n_vocab = tokenizer.n_vocab
        self.eos_ids = sorted(tokenizer.eog_ids)
        if not self.eos_ids:
            raise LfmEdgeError("constrained decoding needs an end-of-generation token, and the model file names none")
        tok = tokenizer

        class Source:  # what llguidance.TokenizerWrapper reads
            eos_token_id = self.eos_ids[0]
            bos_token_id = tok.bos_id
            tokens = [tok.token_bytes(i) for i in range(tok.n_vocab)]
            special_token_ids = sorted(tok.special_ids)

            def __call__(self, text: bytes) -> list[int]:
                return tok.encode(text.decode("utf-8", "replace"), add_special=False)

        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(Source()), eos_token=self.eos_ids)
        self.limits = llg.LLParserLimits(
            max_lexer_states=MAX_LEXER_STATES, max_grammar_size=MAX_GRAMMAR_SIZE, verbose_errors=False
        )
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar):
        """A fresh llguidance matcher for `grammar`; LfmEdgeError if it cannot be used."""
        source = grammar.source()
        with self._lock:
            template = self._compiled.get(source)
            if template is not None:
                self._compiled.move_to_end(source)
                return template.deep_copy()
        llg = _llguidance()
        job = _pool("compile").submit(llg.LLMatcher, self.ll, source, log_level=0, limits=self.limits)
        try:
            matcher = job.result(timeout=COMPILE_TIMEOUT_S)
        except FutureTimeout:
            # the worker finishes (or hits a limit) on its own; the caller is not kept waiting
            raise LfmEdgeError(f"{grammar.what} is too complex: it did not compile within {COMPILE_TIMEOUT_S:g} s") from None
        if matcher.is_error():
            error = _one_sentence(matcher.get_error())
            if "too large" in error or "limit" in error:
                raise LfmEdgeError(f"{grammar.what} is too large or too complex to use ({error})")
            raise LfmEdgeError(f"{grammar.what} cannot be used: {error}")
        with self._lock:
            self._compiled[source] = matcher.deep_copy()
            while len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, grammar: Grammar, overlap: bool = True) -> Constraint:
        return Constraint(self.compile(grammar), self.n_vocab, grammar.what, overlap)


class Constraint:
    """One sequence held to a grammar: the sampler's hook (mask / advance / is_done).

    overlap: compute each next mask on a worker thread as soon as the token is known,
    so that it runs during the model's forward pass; False computes it in mask().
    """

    def __init__(self, matcher: Any, n_vocab: int, what: str = "the grammar", overlap: bool = True):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.what = what
        self.overlap = overlap
        self.words = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)  # one bit per token
        self._pending: Future | None = None
        self._done = matcher.is_stopped()
        self._stale = True  # self.words is not the current state's mask
        if overlap and not self._done:
            self._start()  # the first mask is computed during the prefill

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)

    def _start(self) -> None:
        self._pending = _pool("mask").submit(self._compute)

    def _join(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
            self._stale = False

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows next."""
        self._join()
        if self._stale:
            self._compute()
            self._stale = False
        if self.matcher.is_error():
            raise LfmEdgeError(f"{self.what} failed: {_one_sentence(self.matcher.get_error())}")
        return np.unpackbits(self.words.view(np.uint8), bitorder="little", count=self.n_vocab).astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Forbidden tokens' logits [V] set to -inf, in place; returns `logits`."""
        np.copyto(logits, -np.inf, where=~self.allowed())
        return logits

    def advance(self, token: int) -> None:
        """The token the sampler chose; the next mask starts computing at once."""
        self._join()  # the matcher is not shared with a running mask
        if not self.matcher.consume_token(token):
            raise LfmEdgeError(f"{self.what} failed: {_one_sentence(self.matcher.get_error())}")
        self._stale = True
        self._done = self.matcher.is_stopped()
        if self.overlap and not self._done:
            self._start()

    def is_done(self) -> bool:
        """The grammar is complete and nothing but an end-of-generation token may follow."""
        return self._done

    def is_accepting(self) -> bool:
        self._join()
        return self.matcher.is_accepting()
