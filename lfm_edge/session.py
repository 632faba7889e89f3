"""A conversation with its own state, for apps: prefix reuse, cancelling, callbacks, save/restore.

Several sessions share one loaded LLM; each keeps its own cache. A follow-up
turn reuses the state of everything the cache already holds that the new
prompt starts with, so the history is not recomputed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .chat_template import check_messages
from .engine import Slot, common_prefix  # noqa: F401 -- common_prefix: also imported from here
from .errors import LfmEdgeError
from .files import write_atomic
from .llm import LLM, GenerationStats, check_max_tokens, make_sampling_params
from .reply import Event, Reply, reply_text
from .sampling import Sampler

SAVE_FORMAT = "lfm-edge-session/1"


def turns_to_keep(
    messages: list[dict[str, Any]], count_tokens: Callable[[list[dict[str, Any]]], int], budget: int
) -> list[dict[str, Any]]:
    """The messages to send when the history is too long: the system prompt (if any) and the newest
    turns that fit in `budget` tokens together, the oldest turns dropped first.

    A turn starts at a user message and holds the replies and tool results after it. The newest
    turn is always kept, even when it alone is over budget (the caller decides what then).
    `count_tokens(messages)` is the length of the prompt those messages make.
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user" or i == 0]  # where a kept part may begin
    for start in starts:  # keep rest[start:], oldest start first: the most that fits
        if count_tokens(head + rest[start:]) <= budget:
            return head + rest[start:]
    return head + rest[starts[-1]:] if starts else head + rest


class Session:
    """One conversation: its messages, its cache, its sampling settings.

        s = Session(llm, system="Be brief.", temperature=0.3)
        for piece in s.send("Hi!"):
            print(piece, end="")
        s.send("And then?", stream=False)

    `send` runs on the calling thread; `cancel()` may be called from any other
    thread. `start()` runs a turn on a worker thread and reports through
    callbacks, for GUI toolkits.
    """

    def __init__(
        self,
        llm: LLM,
        system: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict] | None = None,
        max_tokens: int = 1024,
        **sampling: Any,
    ):
        self.llm = llm
        self.messages: list[dict[str, Any]] = list(messages or [])
        check_messages(self.messages)
        if system is not None:
            self.set_system(system)
        self.tools = tools
        check_max_tokens(max_tokens)
        self.max_tokens = max_tokens
        make_sampling_params(sampling)  # validate now, not at the first turn
        self.sampling: dict[str, Any] = dict(sampling)
        self.last_stats = GenerationStats()
        self.dropped_messages = 0  # oldest messages left out so far, to fit the context (see _fit)
        self._slot = Slot(llm.new_cache())  # its cache, kept between turns (see engine.Slot)
        self._busy = threading.Lock()
        self._cancel = threading.Event()

    # -- the conversation ------------------------------------------------------
    def set_system(self, text: str) -> None:
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    def clear(self) -> None:
        """Forget the conversation but keep the system prompt and settings."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]

    def set(self, **sampling: Any) -> None:
        """Change sampling settings for the next turns (validated)."""
        merged = {**self.sampling, **sampling}
        make_sampling_params(merged)
        self.sampling = merged

    def cancel(self) -> None:
        """Stop the running turn after the current token; safe from any thread."""
        self._cancel.set()

    # -- one turn --------------------------------------------------------------
    def send(
        self,
        content: str | None = None,
        role: str = "user",
        stream: bool = True,
        on_text: Callable[[str], None] | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        **sampling: Any,
    ) -> Iterator[str] | str:
        """Add a message (unless content is None) and generate the assistant's reply.

        The reply, complete or cut short by cancel(), joins the history, with its
        reasoning as the message's `thinking`. With stream=True the pieces of the
        answer are yielded (reasoning left out, tool-call blocks as written);
        otherwise the whole answer is returned. `on_text` is called with each piece
        as well. send_events gives the reply as events, reasoning included.
        """
        events = self.send_events(content, role, max_tokens, stop, **sampling)
        pieces = self._text(events, on_text)
        return pieces if stream else "".join(pieces)

    def send_events(
        self,
        content: str | None = None,
        role: str = "user",
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        **sampling: Any,
    ) -> Iterator[Event]:
        """As send, but the reply as events (lfm_edge.reply): reasoning, text, tool calls, stop, end."""
        if content is not None:
            message = {"role": role, "content": content}
            check_messages([message])
            self.messages.append(message)
        params = make_sampling_params({**self.sampling, **sampling})
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        check_max_tokens(max_tokens)
        return self._turn(Sampler(params), max_tokens, list(stop or []), content is not None)

    @staticmethod
    def _text(events: Iterator[Event], on_text: Callable[[str], None] | None) -> Iterator[str]:
        try:
            for piece in reply_text(events):
                if on_text is not None:
                    on_text(piece)
                yield piece
        finally:  # stopping early ends the turn now, not when the events are collected
            events.close()

    def _turn(self, sampler: Sampler, max_tokens: int, stop: list[str], added: bool) -> Iterator[Event]:
        if not self._busy.acquire(blocking=False):
            raise LfmEdgeError("this session is already generating a reply; cancel it or wait")
        try:
            prompt = self._fit(max_tokens)
        except BaseException:  # a message that can never fit must not stay and block every later turn
            if added:
                self.messages.pop()
            self._busy.release()
            raise
        self._cancel.clear()
        reply = Reply()
        stats = self.last_stats = GenerationStats()
        completed = False
        events = None
        try:
            handle = self.llm.engine.submit(prompt, max_tokens, sampler, slot=self._slot, stats=stats, cancel=self._cancel)
            events = handle.events(stop)
            for event in events:
                reply.add(event)
                yield event
            completed = True
        finally:
            if events is not None:
                events.close()  # the request ends now, its cache as of its last whole step
            if not completed:  # the consumer stopped early, or Ctrl-C, or an error
                stats.finish_reason = "cancelled"
            if reply.text or reply.reasoning or self.messages[-1]["role"] != "assistant":
                message = {"role": "assistant", "content": reply.text}
                if reply.reasoning:  # kept, for the templates that show it again (LFM2.5's)
                    message["thinking"] = reply.reasoning
                self.messages.append(message)
            self._busy.release()

    def _fit(self, max_tokens: int) -> list[int]:
        """The prompt for the next reply, after dropping the oldest turns if the history and room
        for the reply (max_tokens, at most a quarter of the context) do not fit the context.

        Then the history is cut to half the context, so that the next turns fit too and the
        shortened history (recomputed once) is reused by the turns after it.
        """
        n_ctx = self.llm.n_ctx
        kept = self.messages
        prompt = self.llm.chat_tokens(kept, self.tools)
        if len(prompt) + min(max_tokens, n_ctx // 4) > n_ctx:
            kept = turns_to_keep(kept, lambda m: len(self.llm.chat_tokens(m, self.tools)), n_ctx // 2)
            prompt = self.llm.chat_tokens(kept, self.tools)
        if len(prompt) > n_ctx:  # the newest message alone is too long: the history stays as it was
            raise LfmEdgeError(
                f"the message is {len(prompt)} tokens with the chat markup"
                f"{' and the system prompt' if kept[0]['role'] == 'system' else ''}, more than the whole"
                f" {n_ctx}-token context: shorten it, or load the model with a larger context (-c/--ctx-size)"
            )
        self.dropped_messages += len(self.messages) - len(kept)
        self.messages = kept
        return prompt

    # -- for GUI toolkits ------------------------------------------------------
    def start(
        self,
        content: str | None,
        on_text: Callable[[str], None],
        on_done: Callable[[GenerationStats, BaseException | None], None] | None = None,
        **kwargs: Any,
    ) -> threading.Thread:
        """Run a turn on a worker thread; callbacks run on that thread.

        GUI code should hand them to its own event loop (e.g. Qt signals,
        tkinter's after()). on_done gets the stats and the error, if any.
        """

        def work() -> None:
            error: BaseException | None = None
            try:
                for _ in self.send(content, stream=True, on_text=on_text, **kwargs):
                    pass
            except BaseException as e:  # reported to on_done, not lost in the thread
                error = e
            if on_done is not None:
                on_done(self.last_stats, error)

        thread = threading.Thread(target=work, name="lfm-edge-session", daemon=True)
        thread.start()
        return thread

    # -- save and restore ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SAVE_FORMAT,
            "messages": self.messages,
            "tools": self.tools,
            "sampling": self.sampling,
            "max_tokens": self.max_tokens,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the conversation as JSON, atomically: a crash never leaves half a file."""
        save_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, llm: LLM, path: str | os.PathLike[str]) -> Session:
        """A conversation saved by `save`; a file that is not one (missing, not JSON, nested
        too deep, fields of the wrong type) is refused in one sentence."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LfmEdgeError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise LfmEdgeError(f"{path}: is a directory, not a saved conversation") from None
        except RecursionError:
            raise LfmEdgeError(f"{path}: is not a saved conversation (its JSON is nested too deeply)") from None
        except (OSError, ValueError) as e:
            raise LfmEdgeError(f"{path}: is not a saved conversation ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise LfmEdgeError(f"{path}: is not a saved lfm-edge conversation")
        messages, tools, sampling = data.get("messages") or [], data.get("tools"), data.get("sampling") or {}
        if not isinstance(messages, list):
            raise LfmEdgeError(f"{path}: 'messages' must be a list of messages, not {type(messages).__name__}")
        if not (tools is None or isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise LfmEdgeError(f"{path}: 'tools' must be a list of tool definitions")
        if not isinstance(sampling, dict):
            raise LfmEdgeError(f"{path}: 'sampling' must be an object of settings, not {type(sampling).__name__}")
        try:
            return cls(llm, messages=messages, tools=tools, max_tokens=data.get("max_tokens", 1024), **sampling)
        except LfmEdgeError as e:
            raise LfmEdgeError(f"{path}: {e}") from None
        except (TypeError, ValueError, RecursionError) as e:  # shapes no check above foresaw
            raise LfmEdgeError(f"{path}: is not a saved conversation ({type(e).__name__}: {e})") from None


def save_json_atomic(path: Path, data: Any) -> None:
    """`data` as JSON, written by lfm_edge.files.write_atomic (whole or not at all; a symlink
    written through; a directory, FIFO or device refused); missing folders are created."""
    try:
        text = json.dumps(data, ensure_ascii=False, indent=1)
    except (TypeError, ValueError, RecursionError) as e:
        raise LfmEdgeError(f"cannot save to {path}: the conversation is not JSON ({e})") from None
    write_atomic(path, text, make_parents=True)
