"""The tokenizer rebuilt from GGUF metadata against the checkpoint's own tokenizer.json."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from lfm_edge.gguf_file import GGUFFile
from lfm_edge.tokenizer import GGUFTokenizer

from conftest import GOLDEN

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 2026; we'll see.",
    "Ça va très bien, merci. Größe und Übermut. ¿Dónde está?",
    "東京は日本の首都です。北京是中国的首都。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "spaces:     five, tabs:\t\t\ttwo, newlines:\n\n\n\nend",
    "   leading and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>",
    "a<|im_end|>b<|startoftext|>c",
    "numbers 1234567890 3.14159 -42 1e-5",
    "",
    "\n",
    " ",
    "'s 't 're 've 'm 'll 'd 'S 'T",
]


@pytest.fixture(scope="module")
def pair(checkpoint, gguf_path):
    ours = GGUFTokenizer(GGUFFile(gguf_path("moe", "q8_0")))
    theirs = Tokenizer.from_file(str(checkpoint("moe") / "tokenizer.json"))
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tokenizer_json(pair, text):
    ours, theirs = pair
    assert ours.encode(text, add_special=True) == theirs.encode(text, add_special_tokens=True).ids
    assert ours.encode(text, add_special=False) == theirs.encode(text, add_special_tokens=False).ids


def test_ids_equal_committed_golden(pair):
    ours, _ = pair
    golden = json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))
    assert ours.n_vocab == golden["vocab_size"] and ours.bos_id == golden["bos_id"] and ours.eos_id == golden["eos_id"]
    assert len(golden["strings"]) >= 10
    for case in golden["strings"]:
        assert ours.encode(case["text"], add_special=True) == case["ids"], case["text"]
        assert ours.encode(case["text"], add_special=False) == case["ids_no_special"], case["text"]
        assert ours.decode(case["ids_no_special"]) == case["decoded"], case["text"]
        assert ours.decode(case["ids_no_special"], skip_special=True) == case["decoded_skip_special"], case["text"]


def test_chat_template_and_ids_equal_transformers_golden(gguf_path):
    import lfm_edge

    llm = lfm_edge.load(gguf_path("moe", "q8_0"))
    golden = json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))
    assert golden["chat"]
    for case in golden["chat"]:
        text = llm.chat_template.render(
            case["messages"], tools=case.get("tools"), add_generation_prompt=case["add_generation_prompt"]
        )
        assert text == case["text"]
        assert llm.tokenize(text, add_special=False) == case["ids"]


def test_bos_and_special_tokens(pair):
    ours, _ = pair
    assert ours.bos_id == 1 and ours.eos_id == 7
    ids = ours.encode("<|im_start|>user", add_special=True)
    assert ids[:2] == [1, 6]  # BOS, then <|im_start|> whole
    assert 7 in ours.eog_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(pair, text):
    ours, _ = pair
    ids = ours.encode(text, add_special=False)
    assert ours.decode(ids) == text


def test_stream_never_splits_a_character(pair):
    ours, _ = pair
    text = "naïve 東京 😀🎉 done"
    ids = ours.encode(text, add_special=False)
    pieces = list(ours.stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)

    def whole_characters(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    # the text must hold a token that is only part of a character, or this test proves nothing
    assert any(not whole_characters(ours.token_bytes(i)) for i in ids)


def test_long_text_encodes_alike_and_lets_other_threads_run(pair):
    import threading
    import time

    from lfm_edge import tokenizer as tokenizer_module

    ours, theirs = pair
    text = "The quick brown fox jumps over the lazy dog, 1234 times! " * 40_000  # 2.3 MB
    assert len(text) > tokenizer_module._GIL_FREE_CHARS
    assert ours.encode(text, add_special=False) == theirs.encode(text, add_special_tokens=False).ids

    # a Python thread counts while the long text is encoded: Tokenizer.encode would hold the GIL
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        start = time.perf_counter()
        ours.encode(text, add_special=False)
        elapsed = time.perf_counter() - start
    finally:
        done.set()
        counter.join()
    assert ticks[0] > 1000 * elapsed, (ticks[0], elapsed)  # >= 1000 counts per second of encoding
