"""`lfm-edge chat`: a streaming multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import os
import select
import sys
from dataclasses import fields
from pathlib import Path

from ..errors import LfmEdgeError
from ..sampling import SamplingParams
from ..session import Session
from ..reply import REASONING, TEXT, TOOL_CALL, Event
from .common import add_model_args, add_sampling_args, load_model, sampling_from_args

HELP = """commands:
  /exit                 leave (or Ctrl-D)
  /clear                forget the conversation (keeps the system prompt)
  /system TEXT          set the system prompt
  /set PARAM VALUE      change a setting: temperature, top_k, top_p, min_p,
                        repetition_penalty, repeat_last_n, seed, max_tokens
  /stats                tokens and speed of the last reply
  /save FILE            save the conversation (JSON)
  /load FILE            load a saved conversation
  /help                 this text
Multi-line input: paste it, start and end it with \"\"\", or end a line with a backslash.
Up and Down recall earlier messages (kept across chats); Ctrl-C stops a reply without leaving the chat."""

DIM, RESET = "\x1b[2m", "\x1b[0m"


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system prompt (-s is the seed, as in llama.cpp)")
    p.add_argument("--show-reasoning", action="store_true", help="show LFM2.5's <think> reasoning (dimmed)")
    p.add_argument("-v", "--verbose", action="store_true", help="time to first token and tokens/s after each reply")
    p.add_argument("--load", default=None, metavar="FILE", help="start from a saved conversation")


class ReplyView:
    """Shows a reply's events (lfm_edge.reply) in the terminal.

    Reasoning is hidden, or dimmed with --show-reasoning (bracketed when the output is not
    a terminal); tool calls are shown as calls at the end.
    """

    def __init__(self, out, show_reasoning: bool, color: bool):
        self.out, self.show_reasoning, self.color = out, show_reasoning, color
        self.in_reasoning = False  # a shown reasoning block is open
        self.calls: list = []

    def feed(self, event: Event) -> None:
        if event.kind == REASONING:
            if self.show_reasoning and event.text:
                if not self.in_reasoning:
                    self._write(DIM if self.color else "[thinking] ")
                    self.in_reasoning = True
                self._write(event.text)
        elif event.kind in (TEXT, TOOL_CALL):
            self._close_reasoning()
            if event.kind == TOOL_CALL:
                self.calls.extend(event.calls)
            else:
                self._write(event.text)

    def finish(self) -> None:
        self._close_reasoning()
        for call in self.calls:
            self.out.write(f"\n→ tool call: {call}")
        self.out.write("\n")
        self.out.flush()

    def _close_reasoning(self) -> None:
        if self.in_reasoning:
            self._write(RESET if self.color else "\n[/thinking]\n")
            self.in_reasoning = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


HISTORY_LENGTH = 1000  # messages kept in the history file
PASTE_GAP_S = 0.03  # more input within this time after Enter is a paste, not typing


def history_path() -> Path:
    """Where the chat history lives: $XDG_DATA_HOME/lfm-edge, else ~/.local/share/lfm-edge."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lfm-edge" / "chat_history"


class LineEditor:
    """readline's line editing (arrows, Ctrl-R, ...) and a message history kept across chats.

    Without readline (some Python builds) input() still works, without editing or history.
    """

    def __init__(self, path: Path):
        try:
            import readline
        except ImportError:
            readline = None
        self.readline, self.path = readline, path
        if readline is None:
            return
        readline.set_auto_history(False)  # one entry per message, not per line of a pasted one
        readline.set_history_length(HISTORY_LENGTH)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
            readline.read_history_file(str(path))
        except OSError:  # a read-only home: edit without a history file
            self.path = None

    def add(self, text: str) -> None:
        if self.readline is None:
            return
        self.readline.add_history(text)
        if self.path is not None:
            try:
                self.readline.append_history_file(1, str(self.path))
            except OSError:
                self.path = None

    def close(self) -> None:
        if self.readline is not None and self.path is not None:
            try:
                self.readline.write_history_file(str(self.path))  # trims it to HISTORY_LENGTH
            except OSError:
                pass


def more_input_waiting() -> bool:
    """Is the rest of a paste already there? (Typed lines come much slower than PASTE_GAP_S.)"""
    try:
        return bool(select.select([sys.stdin], [], [], PASTE_GAP_S)[0])
    except (OSError, ValueError):  # no select() on this stdin (Windows consoles)
        return False


def read_message(interactive: bool) -> str:
    """One user message: a line, pasted lines, a backslash-continued block, or a \"\"\"-fenced block."""
    more = "... " if interactive else ""
    line = input(">>> " if interactive else "")
    if line.startswith('"""'):
        lines = [line[3:]]
        while not lines[-1].endswith('"""'):
            lines.append(input(more))
        return "\n".join(lines)[: -3].strip("\n")
    lines = [line]
    while True:
        if lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(more))
        elif interactive and more_input_waiting():  # a pasted block is one message
            lines.append(input(""))
        else:
            return "\n".join(lines)


def parse_setting(name: str, value: str):
    kinds = {f.name: f.type for f in fields(SamplingParams)} | {"max_tokens": "int"}
    if name not in kinds:
        raise LfmEdgeError(f"unknown setting {name!r}; settings: {', '.join(sorted(kinds))}")
    kind = str(kinds[name])
    try:
        return int(value) if "int" in kind else float(value)
    except ValueError:
        raise LfmEdgeError(f"{name} needs a number, got {value!r}") from None


def print_stats(session: Session, out) -> None:
    s = session.last_stats
    out.write(
        f"{s.prompt_tokens} prompt tokens ({s.cached_tokens} reused), {s.completion_tokens} generated, "
        f"time to first token {s.prefill_s:.2f} s, {s.decode_tps:.1f} tokens/s, finish: {s.finish_reason}\n"
    )


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    llm = load_model(args)
    sampling = sampling_from_args(llm, args)
    if args.load:
        session = Session.load(llm, args.load)
    else:
        session = Session(llm, system=args.system, max_tokens=args.max_tokens, **sampling)
    color = out.isatty()
    interactive = sys.stdin.isatty()
    editor = LineEditor(history_path()) if interactive else None
    if interactive:
        out.write(f"lfm-edge chat with {llm.file.path.name}. /help for commands, Ctrl-D to leave.\n")
    told_dropped = False
    try:
        while True:
            try:
                text = read_message(interactive)
            except EOFError:
                if interactive:
                    out.write("\n")  # leave the shell's prompt on a line of its own
                break
            except KeyboardInterrupt:
                out.write("\n(Ctrl-D or /exit to leave)\n")
                continue
            if not text.strip():
                continue
            if editor is not None:
                editor.add(text)
            try:
                if text.startswith("/"):
                    if handle_command(text, session, out) == "exit":
                        break
                else:
                    reply(session, text, out, args, color)
            except LfmEdgeError as e:
                out.write(f"error: {e}\n")
            except KeyboardInterrupt:  # between two steps, outside a reply
                out.write("\n[stopped]\n")
            if session.dropped_messages and not told_dropped:
                told_dropped = True
                out.write(
                    f"note: the conversation outgrew the {llm.n_ctx}-token context, so its oldest turns are left "
                    "out from now on (/clear starts afresh; -c/--ctx-size sets a larger context)\n"
                )
    finally:
        if editor is not None:
            editor.close()
    return 0


def reply(session: Session, text: str, out, args, color: bool) -> None:
    view = ReplyView(out, args.show_reasoning, color)
    events = session.send_events(text)
    try:
        for event in events:
            view.feed(event)
    except KeyboardInterrupt:
        view.finish()
        out.write("[stopped]\n")
        return
    finally:
        events.close()  # a partial reply stays in the history
    view.finish()
    if args.verbose:
        print_stats(session, out)


def replaced_settings(session: Session, loaded: Session) -> list[str]:
    """"name old -> new" for each setting the loaded conversation changes."""
    old = {**session.sampling, "max_tokens": session.max_tokens}
    new = {**loaded.sampling, "max_tokens": loaded.max_tokens}
    shown = lambda v: "default" if v is None else str(v)  # noqa: E731
    return [f"{k} {shown(old.get(k))} -> {shown(new.get(k))}" for k in sorted(old | new) if old.get(k) != new.get(k)]


def handle_command(text: str, session: Session, out) -> str | None:
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name == "/help":
        out.write(HELP + "\n")
    elif name == "/clear":
        session.clear()
        out.write("conversation cleared\n")
    elif name == "/system":
        if not rest:
            raise LfmEdgeError("usage: /system TEXT")
        session.set_system(rest)
        out.write("system prompt set\n")
    elif name == "/set":
        parts = rest.split()
        if len(parts) != 2:
            raise LfmEdgeError("usage: /set PARAM VALUE")
        value = parse_setting(parts[0], parts[1])
        if parts[0] == "max_tokens":
            if value < 0:
                raise LfmEdgeError("max_tokens must be >= 0")
            session.max_tokens = int(value)
        else:
            session.set(**{parts[0]: value})
        out.write(f"{parts[0]} = {value}\n")
    elif name == "/stats":
        print_stats(session, out)
    elif name == "/save":
        if not rest:
            raise LfmEdgeError("usage: /save FILE")
        folder = Path(rest).expanduser().parent
        if not folder.is_dir():
            raise LfmEdgeError(f"there is no folder {folder}; create it first, or save somewhere else")
        session.save(Path(rest).expanduser())
        out.write(f"saved {len(session.messages)} messages to {rest}\n")
    elif name == "/load":
        if not rest:
            raise LfmEdgeError("usage: /load FILE")
        loaded = Session.load(session.llm, Path(rest).expanduser())
        replaced = replaced_settings(session, loaded)
        session.messages, session.tools = loaded.messages, loaded.tools
        session.sampling, session.max_tokens = loaded.sampling, loaded.max_tokens
        out.write(f"loaded {len(session.messages)} messages from {rest}\n")
        if replaced:
            out.write(f"the file's settings replace the current ones: {', '.join(replaced)}\n")
    else:
        raise LfmEdgeError(f"unknown command {name}; /help lists them")
    return None
