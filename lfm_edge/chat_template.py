"""Rendering the Jinja chat template stored in a model file, safely.

A template comes from a downloaded file, so it runs in jinja2's immutable
sandbox: it can format messages but cannot reach attributes like
`__class__` or call methods that change state. The environment matches the
one transformers renders with (trim_blocks, lstrip_blocks, loop controls,
a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LfmEdgeError

ROLES = {"system", "user", "assistant", "tool"}


class TemplateError(LfmEdgeError):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], undefined=jinja2.Undefined
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> str:
        check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried something unsafe and was stopped: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from None


def check_messages(messages: Any) -> None:
    """A conversation is a list of {'role': ..., 'content': ...} dicts."""
    if not isinstance(messages, list):
        raise LfmEdgeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LfmEdgeError(f"message {i} must be a dict with a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise LfmEdgeError(f"message {i} has role {m['role']!r}; roles are {', '.join(sorted(ROLES))}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise LfmEdgeError(f"message {i} has content that is not text")
