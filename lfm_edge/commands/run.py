"""`lfm-edge run -m MODEL "prompt"`: one-shot generation to stdout, for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import LfmEdgeError
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


def main(args: argparse.Namespace) -> int:
    if args.prompt is not None and args.prompt_option is not None:
        raise LfmEdgeError("two prompts: give it as an argument or with -p/--prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt is None:
        raise LfmEdgeError("no prompt: lfm-edge run \"PROMPT\" (or -p PROMPT, or '-' to read standard input)")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if not prompt.strip():
        raise LfmEdgeError("the prompt is empty")
    start = time.perf_counter()
    llm = load_model(args)
    load_s = time.perf_counter() - start
    sampling = sampling_from_args(llm, args)
    if args.raw:
        ids = llm.tokenize(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = llm.chat_tokens(messages)
    stats = GenerationStats()
    events = llm.generate_events(ids, args.max_tokens, args.stop, stats, raw=args.raw, **sampling)
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
