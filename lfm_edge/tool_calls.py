"""LFM2's tool calls: the markers, and the body of a call block.

LFM2 calls tools as a Python list of calls between special tokens,
`<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>`, and
sometimes as JSON (`[{"name": ..., "arguments": {...}}]`). The Python form is
parsed with `ast` and only literal values are accepted: nothing is evaluated.
LFM2.5 may reason first, between `<think>` and `</think>`. Where these markers
are found in a reply is decided in one place, lfm_edge/reply.py.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


def parse_call_list(body: str) -> list[ToolCall] | None:
    """The calls in the body of a call block, or None if it is neither form."""
    body = body.strip()
    return _from_json(body) if body[:1] in "[{" and _looks_json(body) else _from_python(body)


def _looks_json(body: str) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _from_json(body: str) -> list[ToolCall] | None:
    data = json.loads(body)
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], args))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _from_python(body: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None or any(k.arg is None for k in node.keywords):
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except (ValueError, SyntaxError, TypeError):
            return None
        calls.append(ToolCall(name, args))
    return calls
