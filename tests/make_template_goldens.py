"""Regenerate tests/golden/templates/expected.json with transformers' apply_chat_template.

    python tests/make_template_goldens.py            # writes expected.json
    python tests/make_template_goldens.py --check    # renders again and compares, writes nothing

Every template in tests/golden/templates/ (and lfm-edge's tiny-model template) renders
every conversation in CASES. transformers is given `case["messages"]`, except where a case
says what the templates expect instead (`hf`): OpenAI-shaped input (arguments as JSON
strings, content as a list of parts) written the way the templates take it. A template
that never reads `tool_calls` (or `thinking`) gets `case["inline"]` instead: the calls (or
the think block) written into the content by hand, which is what lfm-edge does for it.
`strftime_now` sees the fixed time NOW on both sides.

transformers and tokenizers are imported only by `render_with_transformers`, so the test
suite can read CASES without them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from datetime import datetime

HERE = pathlib.Path(__file__).resolve().parent
TEMPLATE_DIR = HERE / "golden" / "templates"
EXPECTED = TEMPLATE_DIR / "expected.json"

NOW = datetime(2025, 3, 14, 9, 26, 53)
BOS, EOS, PAD = "<|startoftext|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}

# Which templates never read the field, so that lfm-edge writes it into the content
# (classified by reading them; the test checks ChatTemplate detects the same).
CALLS_IN_CONTENT = {"hf-LFM2", "llama.cpp-LFM2-8B-A1B", "llama.cpp-LFM2.5-Instruct", "lfm-edge-tiny"}
THINKING_IN_CONTENT = {"llama.cpp-LFM2.5-Instruct"}


def templates() -> dict[str, str]:
    found = {p.stem: p.read_text() for p in sorted(TEMPLATE_DIR.glob("*.jinja"))}
    from lfm_edge.tiny_models import CHAT_TEMPLATE

    found["lfm-edge-tiny"] = CHAT_TEMPLATE
    return found


# -- conversations --------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city; \"quotes\" and 'apostrophes' and ünïcode kept",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "name": "search",
    "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}},
}

# every JSON type, quotes of both kinds, a backslash, a newline, non-ASCII
ODD_ARGS = {
    "query": "O'Brien said \"hi\" \\ back\nnext line — café",
    "count": 3,
    "ratio": 0.25,
    "exact": True,
    "missing": None,
    "filters": {"lang": "en", "years": [2023, 2024], "deep": {"x": [1, {"y": "z"}]}},
    "tags": ["a", "b'c", 'd"e'],
}


def call(name: str, arguments, call_id: str | None = None) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": call_id, **c} if call_id else c


def lfm2_calls(text: str) -> str:
    return "<|tool_call_start|>" + text + "<|tool_call_end|>"


ODD_PY = (
    "search(query=\"O'Brien said \\\"hi\\\" \\\\ back\\nnext line — café\", count=3, ratio=0.25, exact=True, "
    'missing=None, filters={"lang": "en", "years": [2023, 2024], "deep": {"x": [1, {"y": "z"}]}}, '
    "tags=[\"a\", \"b'c\", \"d\\\"e\"])"
)

CASES: dict[str, dict] = {
    "one-user-turn": {"messages": [{"role": "user", "content": "What is C. elegans?"}]},
    "system-multi-turn": {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant trained by Liquid AI."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a prime."},
        ]
    },
    "no-system-no-generation-prompt": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "add_generation_prompt": False,
    },
    "whitespace-kept": {
        "messages": [
            {"role": "system", "content": "  spaced system \n"},
            {"role": "user", "content": "\n\tindented\n\n  lines  \n"},
            {"role": "assistant", "content": " answer with trailing spaces   \n\n"},
            {"role": "user", "content": " "},
        ]
    },
    "empty-system-with-tools": {
        "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
    },
    "system-and-two-tools": {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find 'x'."}],
        "tools": [WEATHER, SEARCH],
    },
    "tool-round-trip": {
        "messages": [
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris", "days": 2}, "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21.5, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21.5 °C and clear."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER],
        "inline": [
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {"role": "assistant", "content": lfm2_calls('[get_weather(city="Paris", days=2)]')},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21.5, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21.5 °C and clear."},
            {"role": "user", "content": "Thanks"},
        ],
    },
    "odd-arguments-and-two-calls": {
        "messages": [
            {"role": "user", "content": "Search and check the weather."},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [call("search", ODD_ARGS), call("get_weather", {"city": "Zürich"})],
            },
            {"role": "tool", "content": "[]"},
            {"role": "tool", "content": "sunny"},
        ],
        "tools": [WEATHER, SEARCH],
        "inline": [
            {"role": "user", "content": "Search and check the weather."},
            {"role": "assistant", "content": lfm2_calls("[" + ODD_PY + ', get_weather(city="Zürich")]') + "Let me look."},
            {"role": "tool", "content": "[]"},
            {"role": "tool", "content": "sunny"},
        ],
    },
    "openai-string-arguments": {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("get_weather", '{"city": "Paris", "days": 3}', "c1"),
                    call("search", json.dumps(ODD_ARGS), "c2"),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        ],
        "tools": [WEATHER],
        "hf": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    call("get_weather", {"city": "Paris", "days": 3}, "c1"),
                    call("search", ODD_ARGS, "c2"),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        ],
        "inline": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": lfm2_calls('[get_weather(city="Paris", days=3), ' + ODD_PY + "]")},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        ],
    },
    "openai-content-parts": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world\n"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        "hf": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello world\n"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"},
        ],
    },
    "thinking-in-history": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "thinking": "Two and two make four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "thinking": "Three and three."},
        ],
        "add_generation_prompt": False,
        "inline": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>Two and two make four.</think>4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "<think>Three and three.</think>6"},
        ],
    },
    "thinking-in-history-preserved": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "thinking": "Two and two make four."},
            {"role": "user", "content": "And 3+3?"},
        ],
        "kwargs": {"preserve_thinking": True, "keep_past_thinking": True},
        "inline": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>Two and two make four.</think>4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    },
    "thinking-empty-and-absent": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!", "thinking": ""},
        ],
        "add_generation_prompt": False,
    },
    "think-block-inside-content": {
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\n  A1  "},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>new</think>A2"},
        ],
        "add_generation_prompt": False,
    },
    "openai-reasoning-content": {
        # transformers itself copies reasoning_content onto thinking: no rewriting needed
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
        ],
        "add_generation_prompt": False,
        "inline": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>Simple sum.</think>4"},
        ],
    },
    "enable-thinking-off": {
        "messages": [{"role": "user", "content": "Quick answer: capital of France?"}],
        "kwargs": {"enable_thinking": False},
    },
}


def case_input(template: str, case: dict) -> list[dict]:
    """What transformers is given for this case and template."""
    messages = case.get("hf", case["messages"])
    has_calls = any(m.get("tool_calls") for m in case["messages"])
    has_thinking = any(m.get("thinking") or m.get("reasoning_content") for m in case["messages"])
    if "inline" in case and (
        (has_calls and template in CALLS_IN_CONTENT) or (has_thinking and template in THINKING_IN_CONTENT)
    ):
        return case["inline"]
    return messages


# -- rendering ------------------------------------------------------------------------


def render_with_transformers(source: str, case: dict, template: str) -> dict:
    """{"text": ...}, or {"error": ...} when transformers' rendering raises."""
    import transformers.utils.chat_template_utils as ctu
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    class FixedClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        chat_template=source,
        **SPECIAL_TOKENS,
    )
    real = ctu.datetime
    ctu.datetime = FixedClock
    try:
        text = tok.apply_chat_template(
            case_input(template, case),
            tools=case.get("tools"),
            tokenize=False,
            add_generation_prompt=case.get("add_generation_prompt", True),
            **case.get("kwargs", {}),
        )
    except Exception as e:  # a template's own raise_exception, or a failure inside it
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ctu.datetime = real
    return {"text": text}


def compute() -> dict:
    out = {}
    for name, source in templates().items():
        out[name] = {c: render_with_transformers(source, case, name) for c, case in CASES.items()}
    return {"transformers_now": NOW.isoformat(), "templates": out}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = ap.parse_args(argv)
    got = compute()
    if args.check:
        want = json.loads(EXPECTED.read_text())
        bad = [
            (t, c)
            for t in sorted(set(got["templates"]) | set(want["templates"]))
            for c in CASES
            if got["templates"].get(t, {}).get(c) != want["templates"].get(t, {}).get(c)
        ]
        for t, c in bad:
            print(f"differs: {t} / {c}")
        return 1 if bad else 0
    EXPECTED.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    n = sum(len(v) for v in got["templates"].values())
    print(f"wrote {EXPECTED} ({n} renderings)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
