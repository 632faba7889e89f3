"""Reading a reply as the model writes it: reasoning, text, tool calls, stop strings.

Every front end (`LLM.generate` / `chat`, `Session`, `lfm-edge chat` and `run`, the
server) turns generated tokens into events here, so they all split a reply the same way:

    TEXT       a piece of the answer
    REASONING  a piece of the reasoning; the first one (maybe empty) says reasoning opened
    TOOL_CALL  one `<|tool_call_start|>[...]<|tool_call_end|>` block, parsed (`calls`)
    STOP       a stop string matched (`text`); nothing follows but END
    END        the reply is over

The rules, in one place:
- Reasoning can only open at the start of a reply: the rendered prompt ends in `<think>`
  (the newest LFM2.5 templates end the generation prompt so; whitespace after it is
  allowed), or the reply opens with `<think>` after optional whitespace. It closes at
  `</think>`. A `<think>` later in a reply is not reasoning.
- `<think>` / `</think>` are matched as token ids where the vocabulary has them as special
  tokens (LFM2.5), and as text where it does not (LFM2, whose vocabulary spells them
  out); text that may still grow into the marker is held back until it is known.
- Tool calls are recognised by their marker tokens, special in both vocabularies, and
  parsed by `tool_calls.parse_call_list`. A block that does not parse, or is cut off,
  comes out as text exactly as written, markers included, so a failed call stays visible.
- Other special tokens (`<|im_start|>`, `<|im_end|>`, ...) are never text. A marker token
  out of place (`</think>` outside reasoning, `<think>` after the start) is dropped too.
- Stop strings are matched in the reasoning and in the answer, never across a marker or
  inside a tool call; text is held back only while it may still be the start of one.
- Reasoning and answer are each stripped of surrounding whitespace (the "\\n\\n" after
  `</think>`, the newline before it); whitespace inside is passed on as written.

A raw continuation (`raw=True`: `LLM.generate`, /v1/completions) has no reasoning and no
tool calls: every token is text except special tokens, and only stop strings apply.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .tool_calls import CALL_END, CALL_START, THINK_END, THINK_START, ToolCall, parse_call_list

if TYPE_CHECKING:
    from .llm import GenerationStats
    from .tokenizer import GGUFTokenizer

TEXT, REASONING, TOOL_CALL, STOP, END = "text", "reasoning", "tool_call", "stop", "end"


@dataclass(frozen=True)
class Event:
    kind: str  # TEXT, REASONING, TOOL_CALL, STOP or END
    text: str = ""  # the piece; TOOL_CALL: the block as written; STOP: the stop string
    calls: tuple[ToolCall, ...] = ()  # TOOL_CALL: the calls of the block, in order


@dataclass(frozen=True)
class Markers:
    """Which marker is a token id in this vocabulary; None means it is matched as text."""

    think_start: int | None = None
    think_end: int | None = None
    call_start: int | None = None
    call_end: int | None = None
    special_ids: frozenset[int] = frozenset()  # never text

    @classmethod
    def of(cls, tokenizer: GGUFTokenizer) -> Markers:
        by_text = {tokenizer.token_bytes(i).decode("utf-8", "replace"): i for i in tokenizer.special_ids}
        return cls(
            think_start=by_text.get(THINK_START),
            think_end=by_text.get(THINK_END),
            call_start=by_text.get(CALL_START),
            call_end=by_text.get(CALL_END),
            special_ids=frozenset(tokenizer.special_ids),
        )


def opens_reasoning(prompt_tail: str) -> bool:
    """True if a prompt ending so leaves the reply inside reasoning."""
    return prompt_tail.rstrip().endswith(THINK_START)


class ReplyParser:
    """A reply's tokens in, events out; see the module's rules.

        parser = ReplyParser(Markers.of(tokenizer), stop=["\\n\\n"], prompt=prompt_text)
        for token_id, piece in decode_pieces(tokenizer, tokens):
            events = parser.feed(token_id, piece)   # stop feeding once parser.stopped
        events = parser.finish()                   # the rest, then END

    `piece` is the token's text from a streaming UTF-8 decoder (possibly empty, for a
    token that ends inside a character); token_id None marks text of no token.
    """

    def __init__(self, markers: Markers, stop: Iterable[str] = (), prompt: str = "", raw: bool = False):
        """prompt: the end of the rendered prompt, enough to see whether it opens reasoning."""
        self.m = markers
        self.stops = [s for s in stop if s]
        self.raw = raw
        self.mode = "text" if raw else "start"  # start -> [reasoning ->] text <-> call; "done" after a stop
        self.buf = ""  # text of the current channel not yet emitted
        self.call = ""  # the body of a tool call while it streams
        self.space = ""  # whitespace ending what the channel emitted, passed on if text follows
        self.started = False  # the current channel has emitted text
        self.stopped: str | None = None  # the stop string that ended the reply
        self.finished = False
        self._out: list[Event] = []
        if not raw and opens_reasoning(prompt):
            self._open_reasoning(self._out)

    @property
    def in_reasoning(self) -> bool:
        """Inside reasoning (after finish: the reasoning was never closed)."""
        return self.mode == "reasoning"

    # -- input ---------------------------------------------------------------------
    def feed(self, token_id: int | None, piece: str) -> list[Event]:
        out, self._out = self._out, []
        if self.mode == "done" or self.finished:
            return out
        m = self.m
        if not self.raw and token_id is not None and token_id in (m.think_start, m.think_end, m.call_start, m.call_end):
            self._marker(token_id, out)
        elif token_id is not None and token_id in m.special_ids:
            pass  # a control token, never text
        elif self.mode == "call":
            self.call += piece
        else:
            self.buf += piece
            self._scan(out)
        return out

    def finish(self) -> list[Event]:
        """What is left, then END. Unterminated reasoning stays reasoning."""
        out, self._out = self._out, []
        if self.finished:
            return out
        if self.mode == "call":  # cut off inside a call: the block as written
            self.mode, self.buf = "text", self._call_text(self.call, closed=False)
        if self.mode != "done":
            self._scan(out, flush=True, closing=True)
        self.finished = True
        out.append(Event(END))
        return out

    # -- the state machine ----------------------------------------------------------
    def _marker(self, token_id: int, out: list[Event]) -> None:
        m = self.m
        if token_id == m.think_start:
            if self.mode == "start" and not self.buf.strip():
                self.buf = ""
                self._open_reasoning(out)
        elif token_id == m.think_end:
            if self.mode == "reasoning":
                self._scan(out, flush=True, closing=True)
                if self.mode != "done":
                    self._to_channel("text")
        elif token_id == m.call_start:
            if self.mode in ("start", "text"):
                self.mode = "text"
                self._scan(out, flush=True)
                if self.mode != "done":
                    self.mode, self.call = "call", ""
        elif token_id == m.call_end:
            if self.mode == "call":
                calls = parse_call_list(self.call)
                block = self._call_text(self.call, closed=True)
                self.mode = "text"
                if calls is None:
                    self.buf += block
                    self._scan(out)
                else:  # the whitespace before it goes with it: the answer reads on without it
                    out.append(Event(TOOL_CALL, self.space + block, tuple(calls)))
                    self.space = ""

    def _scan(self, out: list[Event], flush: bool = False, closing: bool = False) -> None:
        """Emit what is certain of self.buf. flush: a marker or the end follows, hold nothing;
        closing: the channel ends, its trailing whitespace goes."""
        while True:
            if self.mode == "start":
                head = self.buf.lstrip()
                if self.m.think_start is None and head.startswith(THINK_START):
                    self.buf = head[len(THINK_START) :]
                    self._open_reasoning(out)
                    continue
                if not flush and (not head or (self.m.think_start is None and THINK_START.startswith(head))):
                    return  # may still open reasoning
                self.mode = "text"
            kind = REASONING if self.mode == "reasoning" else TEXT
            if not self.raw and not self.started:
                self.buf = self.buf.lstrip()  # not part of the channel, so no stop string sees it
            buf = self.buf
            cut, length, stop = self._find(buf, kind)
            if cut >= 0:
                self._emit(out, kind, buf[:cut], closing=True)
                self.buf = buf[cut + length :]
                if stop is not None:
                    self.stopped, self.mode, self.buf = stop, "done", ""
                    out.append(Event(STOP, stop))
                    return
                self._to_channel("text")  # "</think>" as text closed the reasoning
                continue
            keep = 0 if flush else self._held(buf, kind)
            self._emit(out, kind, buf[: len(buf) - keep], closing)
            self.buf = buf[len(buf) - keep :]
            return

    def _find(self, buf: str, kind: str) -> tuple[int, int, str | None]:
        """(index, length, stop string or None) of the first stop string or text `</think>`; index -1: none."""
        best = (-1, 0, None)
        if kind == REASONING and self.m.think_end is None:
            i = buf.find(THINK_END)
            if i >= 0:
                best = (i, len(THINK_END), None)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best[0] < 0 or i < best[0]):
                best = (i, len(s), s)
        return best

    def _held(self, buf: str, kind: str) -> int:
        """How much of the end of buf must wait: a possible start of a stop string or of
        a text `</think>`, and (in a reply) trailing whitespace, which may end the channel."""
        keep = 0
        candidates = list(self.stops)
        if kind == REASONING and self.m.think_end is None:
            candidates.append(THINK_END)
        for k in range(min(len(buf), max(map(len, candidates), default=1) - 1), 0, -1):
            if any(c.startswith(buf[-k:]) for c in candidates):
                keep = k
                break
        if not self.raw:
            keep = max(keep, len(buf) - len(buf.rstrip()))
        return keep

    def _emit(self, out: list[Event], kind: str, text: str, closing: bool) -> None:
        if self.raw:
            if text:
                out.append(Event(kind, text))
            return
        body = text.rstrip()
        if body:
            out.append(Event(kind, (self.space if self.started else "") + body))
            self.space, self.started = "", True
        if self.started:
            self.space += text[len(body) :]
        if closing:
            self.space = ""

    def _open_reasoning(self, out: list[Event]) -> None:
        self._to_channel("reasoning")
        out.append(Event(REASONING, ""))

    def _to_channel(self, mode: str) -> None:
        self.mode, self.started, self.space = mode, False, ""

    def _call_text(self, body: str, closed: bool) -> str:
        return CALL_START + body + (CALL_END if closed else "")


# -- from tokens to events ------------------------------------------------------------


def decode_pieces(tokenizer: GGUFTokenizer, ids: Iterable[int]) -> Iterator[tuple[int | None, str]]:
    """(id, text) per token, never splitting a UTF-8 character: a token that ends inside
    one has the text "", the next one carries it. A special token's text is its name."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        if i in tokenizer.special_ids:
            cut = utf8.decode(b"", final=True)  # a character left unfinished before it
            if cut:
                yield None, cut
            yield i, tokenizer.token_bytes(i).decode("utf-8", "replace")
        else:
            yield i, utf8.decode(tokenizer.token_bytes(i))
    cut = utf8.decode(b"", final=True)
    if cut:
        yield None, cut


def reply_events(
    tokenizer: GGUFTokenizer,
    tokens: Iterable[int],
    prompt: Sequence[int] = (),
    stop: Iterable[str] = (),
    raw: bool = False,
    stats: GenerationStats | None = None,
) -> Iterator[Event]:
    """The events of a reply: `tokens` as they are generated after `prompt` (ids).

    Stops pulling tokens at a stop string (and sets stats.finish_reason to "stop").
    """
    tail = "" if raw else tokenizer.decode(list(prompt[-8:]))
    parser = ReplyParser(Markers.of(tokenizer), stop, prompt=tail, raw=raw)
    for token_id, piece in decode_pieces(tokenizer, tokens):
        yield from parser.feed(token_id, piece)
        if parser.stopped is not None:
            if stats is not None:
                stats.finish_reason = "stop"
            break
    yield from parser.finish()


def reply_text(events: Iterable[Event]) -> Iterator[str]:
    """A reply as plain text: its answer with tool-call blocks as written; no reasoning."""
    for e in events:
        if e.kind in (TEXT, TOOL_CALL) and e.text:
            yield e.text


@dataclass
class Reply:
    """A whole reply, gathered from its events."""

    text: str = ""  # the answer with tool-call blocks as written (what reply_text gives)
    content: str = ""  # the answer alone
    reasoning: str | None = None  # None: the reply did not reason
    calls: list[ToolCall] = field(default_factory=list)
    stop: str | None = None

    def add(self, e: Event) -> None:
        if e.kind == REASONING:
            self.reasoning = (self.reasoning or "") + e.text
        elif e.kind in (TEXT, TOOL_CALL):
            self.text += e.text
            if e.kind == TEXT:
                self.content += e.text
            self.calls.extend(e.calls)
        elif e.kind == STOP:
            self.stop = e.text

    @classmethod
    def of(cls, events: Iterable[Event]) -> Reply:
        reply = cls()
        for e in events:
            reply.add(e)
        return reply
