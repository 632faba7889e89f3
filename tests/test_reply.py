"""The one reply parser (lfm_edge/reply.py): reasoning, text, tool calls, stop strings.

Each case is fed cut at every possible point (every single cut, every pair of cuts,
one character at a time): the split must not depend on how the text arrived.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader, TokenType

import lfm_edge
from lfm_edge.reply import (
    END,
    REASONING,
    STOP,
    TEXT,
    TOOL_CALL,
    Markers,
    Reply,
    ReplyParser,
    decode_pieces,
    opens_reasoning,
    reply_events,
)
from lfm_edge.tiny_models import CHAT_TEMPLATE

import test_bad_input as bad_input

IM_START, IM_END, CALL_START, CALL_END, THINK, END_THINK = 6, 7, 10, 11, 1278, 1279
SPECIAL = frozenset({0, 1, 2, IM_START, IM_END, CALL_START, CALL_END, THINK, END_THINK})
# LFM2.5: <think> and </think> are special tokens
IDS = Markers(THINK, END_THINK, CALL_START, CALL_END, SPECIAL)
# LFM2: they are plain text
TEXT_THINK = Markers(None, None, CALL_START, CALL_END, SPECIAL - {THINK, END_THINK})
THINK_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>"
CALL = '[get_weather(city="Paris")]'
WEATHER = ("get_weather", {"city": "Paris"})


def feed(parts, markers, prompt="", stop=(), raw=False) -> list:
    """Events of a stream of parts: str is text (no token), int a token id."""
    parser = ReplyParser(markers, stop, prompt=prompt, raw=raw)
    events = []
    for p in parts:
        events += parser.feed(p, "<special>") if isinstance(p, int) else parser.feed(None, p)
        if parser.stopped is not None:
            break
    events += parser.finish()
    assert events[-1].kind == END and [e.kind for e in events].count(END) == 1
    return events


def cuts(parts):
    """The parts re-cut in every way with at most two cuts inside the text, and one character at a time."""
    items = [c for p in parts for c in ([p] if isinstance(p, int) else list(p))]

    def pieces(points):
        out, text = [], ""
        for i, item in enumerate(items):
            if i in points and text:
                out.append(text)
                text = ""
            if isinstance(item, int):
                if text:
                    out.append(text)
                    text = ""
                out.append(item)
            else:
                text += item
        return out + ([text] if text else [])

    n = len(items)
    yield pieces(set())
    yield pieces(set(range(n)))
    for i in range(1, n):
        for j in range(i, n):
            yield pieces({i, j})


def summary(events) -> tuple:
    r = Reply.of(events)
    return r.content, r.reasoning, [(c.name, c.arguments) for c in r.calls], r.stop


CASES = [
    # (name, markers, prompt, parts, stop, (content, reasoning, calls, stop))
    ("prompt opens reasoning, ids", IDS, THINK_PROMPT, ["I should think.", END_THINK, "The answer is 4."], (),
     ("The answer is 4.", "I should think.", [], None)),
    ("prompt opens reasoning, text", TEXT_THINK, THINK_PROMPT, ["I should think.</think>The answer is 4."], (),
     ("The answer is 4.", "I should think.", [], None)),
    ("prompt opens reasoning, then whitespace", TEXT_THINK, THINK_PROMPT + "\n", ["\nHmm.\n</think>\n\nFour."], (),
     ("Four.", "Hmm.", [], None)),
    ("reply opens reasoning, ids", IDS, "", ["\n", THINK, "\nLet me see.\n", END_THINK, "\n\nFour."], (),
     ("Four.", "Let me see.", [], None)),
    ("reply opens reasoning, text", TEXT_THINK, "", ["  <think>\nLet me see.\n</think>\n\nFour."], (),
     ("Four.", "Let me see.", [], None)),
    ("<think> later is text", TEXT_THINK, "", ["Four <think>x</think> five"], (),
     ("Four <think>x</think> five", None, [], None)),
    ("<think> token later is dropped", IDS, "", ["Four ", THINK, "x", END_THINK, " five"], (),
     ("Four x five", None, [], None)),
    ("empty reasoning, ids", IDS, "", [THINK, END_THINK, "Four."], (), ("Four.", "", [], None)),
    ("empty reasoning, text", TEXT_THINK, "", ["<think></think>Four."], (), ("Four.", "", [], None)),
    ("empty prompt-opened reasoning", TEXT_THINK, THINK_PROMPT, ["\n</think>\n\nFour."], (), ("Four.", "", [], None)),
    ("tool call after reasoning", IDS, THINK_PROMPT, ["Let me look.", END_THINK, "\n\n", CALL_START, CALL, CALL_END], (),
     ("", "Let me look.", [WEATHER], None)),
    ("tool call after text reasoning", TEXT_THINK, "", ["<think>Look.</think>", CALL_START, CALL, CALL_END, " Done."], (),
     ("Done.", "Look.", [WEATHER], None)),
    ("text around a call", IDS, "", ["Checking. ", CALL_START, CALL, CALL_END, " Done."], (),
     ("Checking. Done.", None, [WEATHER], None)),
    ("two calls in one block, JSON form", IDS, "", [CALL_START, '[{"name": "f", "arguments": {"q": "x"}}, ', '{"name": "g", "arguments": {"n": 2}}]', CALL_END], (),
     ("", None, [("f", {"q": "x"}), ("g", {"n": 2})], None)),
    ("a call that does not parse stays as written", IDS, "", ["x ", CALL_START, '[os.system("ls") + 1]', CALL_END, " y"], (),
     ('x <|tool_call_start|>[os.system("ls") + 1]<|tool_call_end|> y', None, [], None)),
    ("a call cut off stays as written", IDS, "", ["Hello ", CALL_START, "[f(a="], (),
     ("Hello <|tool_call_start|>[f(a=", None, [], None)),
    ("unterminated reasoning at max_tokens", IDS, THINK_PROMPT, ["Still thinking about it"], (),
     ("", "Still thinking about it", [], None)),
    ("unterminated text reasoning", TEXT_THINK, "", ["<think>Still </thin"], (), ("", "Still </thin", [], None)),
    ("control tokens are never text", IDS, "", ["Hi", IM_START, " there", IM_END, 2], (), ("Hi there", None, [], None)),
    ("stop string", TEXT_THINK, "", ["Hello world! Bye"], [" wor"], ("Hello", None, [], " wor")),
    ("stop string in reasoning", IDS, THINK_PROMPT, ["Step one. STOP here", END_THINK, "Four."], ["STOP"],
     ("", "Step one.", [], "STOP")),
    ("stop string after reasoning", TEXT_THINK, THINK_PROMPT, ["a</think>Four. END five"], ["END"],
     ("Four.", "a", [], "END")),
    ("stop string does not cross a marker", IDS, THINK_PROMPT, ["ab", END_THINK, "cd"], ["bc"], ("cd", "ab", [], None)),
    ("stop string not inside a call", IDS, "", [CALL_START, CALL, CALL_END], ["Paris"], ("", None, [WEATHER], None)),
    ("stop string with whitespace", IDS, "", ["Hello World"], [" Wor"], ("Hello", None, [], " Wor")),
    ("leading whitespace is not the answer", IDS, THINK_PROMPT, ["r", END_THINK, "\n\nLine one\nLine two"], ["\n"],
     ("Line one", "r", [], "\n")),
    ("first of two stop strings", IDS, "", ["abcd"], ["bd", "c"], ("ab", None, [], "c")),
    ("empty reply", IDS, "", [], (), ("", None, [], None)),
    ("whitespace only", TEXT_THINK, "", ["  \n "], (), ("", None, [], None)),
]


@pytest.mark.parametrize("name, markers, prompt, parts, stop, expected", CASES, ids=[c[0] for c in CASES])
def test_the_split_does_not_depend_on_the_cuts(name, markers, prompt, parts, stop, expected):
    for stream in cuts(parts):
        assert summary(feed(stream, markers, prompt, stop)) == expected, stream


def test_raw_continuations_are_text_without_specials():
    parts = ["  <think>x", IM_START, "</think> ", THINK, CALL_START, CALL, CALL_END, " end "]
    for stream in cuts(parts):
        events = feed(stream, IDS, THINK_PROMPT, raw=True)
        assert {e.kind for e in events} == {TEXT, END}
        assert "".join(e.text for e in events) == "  <think>x</think> " + CALL + " end "


@pytest.mark.parametrize(
    "pieces, stop, expected",
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello "),
        (["ab", "c<", "|x", "|>d"], ["<|x|>"], "abc"),
        (["no ", "stop ", "here"], ["zzz"], "no stop here"),
        (["STOP"], ["STOP"], ""),
        (["a", "b", "c"], ["bd", "c"], "ab"),
        (["<", "<", "<x"], ["<x"], "<<"),
    ],
)
def test_raw_stop_strings(pieces, stop, expected):
    events = feed(pieces, IDS, stop=stop, raw=True)
    assert "".join(e.text for e in events if e.kind == TEXT) == expected


def test_text_is_held_back_only_while_it_may_start_a_stop_string():
    parser = ReplyParser(IDS, ["<END>"], raw=True)
    assert parser.feed(None, "abc") == [_text("abc")]  # cannot start "<END>": out at once
    assert parser.feed(None, "def<") == [_text("def")]
    assert parser.feed(None, "EN") == []
    assert parser.feed(None, "x") == [_text("<ENx")]
    chat = ReplyParser(IDS, ["<END>"])
    assert chat.feed(None, "Hi") == [_text("Hi")]
    assert chat.feed(None, " <E") == []  # whitespace waits too: it may end the answer
    assert chat.feed(None, "ND>") == [_event(STOP, "<END>")]
    assert chat.finish() == [_event(END)]


def test_reasoning_opens_with_an_event_and_streams():
    parser = ReplyParser(IDS, prompt=THINK_PROMPT + "\n")
    assert parser.in_reasoning
    assert parser.feed(None, "\nOne") == [_event(REASONING, ""), _event(REASONING, "One")]
    assert parser.feed(None, " two\n") == [_event(REASONING, " two")]  # the newline waits
    assert parser.feed(END_THINK, "</think>") == []
    assert not parser.in_reasoning
    assert parser.feed(None, "\n\nFour") == [_text("Four")]
    assert parser.finish() == [_event(END)]
    # a text "<think>" is known at its last character, not before
    parser = ReplyParser(TEXT_THINK)
    assert parser.feed(None, " <thi") == [] and parser.feed(None, "nk>") == [_event(REASONING, "")]
    parser = ReplyParser(TEXT_THINK)
    assert parser.feed(None, " <thi") == [] and parser.feed(None, "s") == [_text("<this")]


def test_a_tool_call_event_carries_the_block_as_written():
    events = feed(["See: ", CALL_START, CALL, CALL_END], IDS)
    (call,) = [e for e in events if e.kind == TOOL_CALL]
    assert call.text == " <|tool_call_start|>" + CALL + "<|tool_call_end|>"
    assert [(c.name, c.arguments) for c in call.calls] == [WEATHER]
    assert Reply.of(events).text == "See: <|tool_call_start|>" + CALL + "<|tool_call_end|>"


def test_opens_reasoning():
    assert opens_reasoning("<|im_start|>assistant\n<think>") and opens_reasoning("x<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n") and not opens_reasoning("<think>x")
    assert not opens_reasoning("</think>")


def _text(t):
    return _event(TEXT, t)


def _event(kind, text=""):
    from lfm_edge.reply import Event

    return Event(kind, text)


# -- on the tiny models' vocabulary -------------------------------------------------------


def rewrite(src: Path, dst: Path, template: str | None = None, plain: tuple[str, ...] = ()) -> Path:
    """Copy a GGUF file with another chat template, and the tokens `plain` made ordinary text."""
    fields = GGUFReader(src).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = [int(TokenType.NORMAL) if tokens[i] in plain else t
             for i, t in enumerate(fields["tokenizer.ggml.token_type"].contents())]
    values = {"tokenizer.ggml.token_type": types}
    if template is not None:
        values["tokenizer.chat_template"] = template
    return bad_input.rewrite(src, dst, values=values)


# the tiny template, ending its generation prompt in <think> as LFM2.5-2.6B's does
THINK_TEMPLATE = CHAT_TEMPLATE.replace('"<|im_start|>assistant\\n"', '"<|im_start|>assistant\\n<think>"')
assert THINK_TEMPLATE != CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tiny(gguf_path):
    return lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=256)


@pytest.fixture(scope="module")
def plain_think(gguf_path, tmp_path_factory):
    """The tiny model with LFM2's vocabulary habit: <think> and </think> are ordinary tokens."""
    path = rewrite(gguf_path("moe", "q8_0"), tmp_path_factory.mktemp("plain") / "plain.gguf", plain=("<think>", "</think>"))
    return lfm_edge.load(path, n_ctx=256)


def test_markers_come_from_the_vocabulary(tiny, plain_think):
    m = Markers.of(tiny.tokenizer)
    assert (m.think_start, m.think_end, m.call_start, m.call_end) == (THINK, END_THINK, CALL_START, CALL_END)
    assert tiny.tokenizer.decode([THINK, END_THINK]) == "<think></think>"
    p = Markers.of(plain_think.tokenizer)
    assert (p.think_start, p.think_end, p.call_start, p.call_end) == (None, None, CALL_START, CALL_END)
    assert THINK not in p.special_ids and IM_END in p.special_ids


@pytest.mark.parametrize("vocab", ["special", "plain"])
def test_token_streams_split_alike_in_both_vocabularies(tiny, plain_think, vocab):
    llm = tiny if vocab == "special" else plain_think
    tok = llm.tokenizer
    words = lambda s: tok.encode(s, add_special=False)  # noqa: E731
    ids = words("\nI should think.\n") + [END_THINK] + words("\n\nThe answer is 4.") + [IM_START]
    prompt = tok.encode(THINK_PROMPT)
    assert summary(reply_events(tok, ids, prompt)) == ("The answer is 4.", "I should think.", [], None)
    # opened by the reply itself, and the same marker later is not reasoning
    ids = [THINK] + words("Hm.") + [END_THINK] + words("Four, ") + [THINK] + words("five")
    got = summary(reply_events(tok, ids, tok.encode("<|im_start|>assistant\n")))
    assert got == (("Four, five" if vocab == "special" else "Four, <think>five"), "Hm.", [], None)
    # a tool call after reasoning, by its marker tokens
    ids = [THINK] + words("Look.") + [END_THINK, CALL_START] + words(CALL) + [CALL_END]
    assert summary(reply_events(tok, ids, [])) == ("", "Look.", [WEATHER], None)


def test_a_character_cut_across_tokens_and_a_special_token(tiny):
    tok = tiny.tokenizer
    lead, tail = (next(i for i in range(tok.n_vocab) if tok.token_bytes(i) == b) for b in (b"\xc3", b"\xa9"))
    pieces = list(decode_pieces(tok, [lead, tail, lead, IM_END, tail]))
    assert pieces == [(lead, ""), (tail, "é"), (lead, ""), (None, "\ufffd"), (IM_END, "<|im_end|>"), (tail, "\ufffd")]
