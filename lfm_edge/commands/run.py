"""`lfm-edge run -m MODEL "prompt"`: one-shot generation to stdout, for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import LfmEdgeError
from ..grammar import Grammar
from ..llm import GenerationStats
from ..reply import Reply
from .chat import ReplyView
from .common import add_model_args, add_sampling_args, load_model, sampling_from_args


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' reads it from standard input")
    p.add_argument("-p", "--prompt", dest="prompt_option", default=None, metavar="PROMPT",
                   help="the prompt, as a flag (llama.cpp's spelling)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system prompt (-s is the seed, as in llama.cpp)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--show-reasoning", action="store_true", help="show LFM2.5's <think> reasoning (dimmed)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON record: content, reasoning, tool calls, token counts, timings")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json-schema", metavar="FILE", default=None, help="the answer is JSON valid under this schema")
    form.add_argument("--grammar", metavar="FILE", default=None, help="the answer follows this Lark grammar (llguidance's dialect)")
    form.add_argument("--regex", metavar="PATTERN", default=None, help="the answer matches this regular expression")


def read_form(args: argparse.Namespace) -> Grammar | None:
    """The grammar the flags ask for, read before the model loads."""
    if args.regex is not None:
        return Grammar.from_regex(args.regex)
    path = args.json_schema or args.grammar
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        flag = "--json-schema" if args.json_schema else "--grammar"
        raise LfmEdgeError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    return Grammar.from_json_schema(text) if args.json_schema else Grammar.from_lark(text)


def main(args: argparse.Namespace) -> int:
    if args.prompt is not None and args.prompt_option is not None:
        raise LfmEdgeError("two prompts: give it as an argument or with -p/--prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt is None:
        raise LfmEdgeError("no prompt: lfm-edge run \"PROMPT\" (or -p PROMPT, or '-' to read standard input)")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if not prompt.strip():
        raise LfmEdgeError("the prompt is empty")
    form = read_form(args)
    start = time.perf_counter()
    llm = load_model(args)
    load_s = time.perf_counter() - start
    sampling = sampling_from_args(llm, args)
    stats = GenerationStats()
    if args.raw:
        ids = llm.tokenize(prompt)
        events = llm.generate_events(ids, args.max_tokens, args.stop, stats, raw=True, grammar=form, **sampling)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        events = llm.chat_events(messages, max_tokens=args.max_tokens, stop=args.stop, stats=stats, grammar=form, **sampling)
    if args.json:
        reply = Reply.of(events)
        record = {
            "model": str(llm.file.path),
            "text": reply.text,  # the answer with tool-call blocks as written
            "content": reply.content,
            "reasoning": reply.reasoning,  # null: the reply did not reason
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in reply.calls],
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "finish_reason": stats.finish_reason,
            "load_s": round(load_s, 4),
            "ttft_s": round(stats.prefill_s, 4),
            "decode_s": round(stats.decode_s, 4),
            "decode_tps": round(stats.decode_tps, 2),
            "sampling": sampling,
        }
        print(json.dumps(record, ensure_ascii=False))
        return 0
    view = ReplyView(sys.stdout, args.show_reasoning, sys.stdout.isatty())
    for event in events:
        view.feed(event)
    view.finish()
    return 0
