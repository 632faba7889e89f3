"""LFM2.5's vocabulary: specials at the end, <think>/</think> special, its own spelling of the split regex.

LFM2.5's tokenizer.json writes the split regex the way GPT-4's cl100k does (llama.cpp PR #23826)
where LFM2's writes llama-3's; GGUF files carry neither, only `tokenizer.ggml.pre = lfm2`, which
lfm-edge (and llama.cpp) read as llama-3's regex. That is right only if both regexes split every
string the same way, which the first test pins on 200,000 random strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, TokenType
from tokenizers import Regex, Tokenizer, pre_tokenizers

import lfm_edge
from lfm_edge import tiny_models
from lfm_edge.gguf_file import GGUFFile
from lfm_edge.quantize.convert import convert, write_vocab
from lfm_edge.quantize.hf_config import read_config
from lfm_edge.quantize.safetensors_io import Checkpoint, save_file
from lfm_edge.tokenizer import LFM25_SPLIT, LFM25_SPLIT_AS_QUOTED, LLAMA3_SPLIT, GGUFTokenizer

# Characters the regexes treat differently if they differ at all: letters whose case folding is
# unusual (long s, Kelvin sign, dotted/dotless i, sharp s, the st ligature, titlecase dz), the
# contraction letters in both cases, non-ASCII digits and numbers, both apostrophes, and every kind
# of whitespace the alternatives single out.
LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("sdmtlvreSDMTLVRE") * 3
LETTERS += list("ßſKİıéÉçñøЖжΩωαあ日本한글اﬆǅ")
DIGITS = list("0123456789") + list("٣²Ⅳ")
APOSTROPHES = ["'"] * 8 + ["’"]
SPACES = [" "] * 10 + ["\t"] * 3 + ["\r", "\n", "\r\n", "\n\n", "\r\r\n", "\u00a0", "\u2003", "\u3000"] * 2
OTHER = list(".,!?-_()\"#<>|")
PIECES = LETTERS + DIGITS + APOSTROPHES + SPACES + OTHER


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def splitter(regex: str):
    return pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)


def splits(regex: str, strings: list[str]) -> list:
    split = splitter(regex).pre_tokenize_str
    return [split(s) for s in strings]  # [(piece, (start, end)), ...] per string


def differences(regex: str, strings: list[str], want: list) -> list[str]:
    return [s for s, got, w in zip(strings, splits(regex, strings), want) if got != w]


@pytest.fixture(scope="module")
def lfm2_splits():
    strings = random_strings(200_000, seed=23826)
    return strings, splits(LLAMA3_SPLIT, strings)


@pytest.mark.parametrize("lfm25", [LFM25_SPLIT, LFM25_SPLIT_AS_QUOTED], ids=["lfm25", "lfm25-as-quoted-in-pr"])
def test_lfm25_split_regex_splits_like_lfm2s(lfm2_splits, lfm25):
    assert lfm25 != LLAMA3_SPLIT
    diff = differences(lfm25, *lfm2_splits)
    assert not diff, f"{len(diff)} strings split differently, e.g. {diff[:3]!r}"


def test_the_random_strings_would_catch_a_different_regex(lfm2_splits):
    """Regexes that really differ (digit runs of any length; no contractions) are caught."""
    strings, want = (x[:20_000] for x in lfm2_splits)
    assert differences(LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}+"), strings, want)
    assert differences(LFM25_SPLIT.replace(r"'(?i:[sdmt]|ll|ve|re)|", ""), strings, want)


# -- a tiny LFM2.5-style vocabulary through the converter and the GGUF tokenizer ---------------

N_VOCAB = 1024
SPECIAL_IDS = {t: N_VOCAB - len(tiny_models.LFM25_SPECIAL_TOKENS) + i
               for i, t in enumerate(tiny_models.LFM25_SPECIAL_TOKENS)}
TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "don't can't I'm you're we'll they've she'd IT'S DON'T Iſ ſ'S",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est l'église ?",
    "Größere Modelle benötigen mehr Speicher; Übersetzung ist schwierig.",
    "快速的棕色狐狸跳过了懒惰的狗。東京は日本の首都です。빠른 갈색 여우",
    "Привет, мир! नमस्ते สวัสดี שלום مرحبا 🚀🍕👍🏽 👨‍👩‍👧‍👦",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))\r\n\tif x:\n\t\tpass\r\n",
    "a  b   c    d     e \n \n  \n\n\n   trailing   ",
    "numbers 1 12 123 1234 12345 3.14159 2026-11-30 ٣٣٣٣",
    "<|startoftext|><|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>2 and 2 make 4.</think>4<|im_end|>",
    "<think></think><think>\n\nnested? </think></think>",
    "<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>",
    "<|tool_list_start|>[]<|tool_list_end|><|tool_response_start|>{}<|tool_response_end|>",
    "<|pad|><|endoftext|><|fim_pre|>x<|fim_mid|>y<|fim_suf|><|reserved_0|><|reserved_18|>",
    "<think >almost</think <|im_end <|im_start |>",
    "x\u00a0y\u2003z\u200bw",
]


@pytest.fixture(scope="module")
def lfm25_tokenizer_json():
    return tiny_models.build_lfm25_tokenizer_json(N_VOCAB)


def lfm25_checkpoint(root: Path, tok_json: dict) -> Path:
    """Tiny model "moe" with LFM2.5's vocabulary layout: 1024 tokens, specials at 989..1023."""
    ckpt = tiny_models.write_checkpoint("moe", root)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(vocab_size=N_VOCAB, bos_token_id=SPECIAL_IDS["<|startoftext|>"], eos_token_id=SPECIAL_IDS["<|im_end|>"],
               pad_token_id=SPECIAL_IDS["<|pad|>"])
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    (ckpt / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    tcfg.pop("added_tokens_decoder")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tcfg))
    weights = Checkpoint(ckpt)
    tensors = {n: weights.load(n) for n in weights.names()}
    rng = np.random.default_rng(2025)
    tensors["model.embed_tokens.weight"] = (0.5 * rng.standard_normal((N_VOCAB, cfg["hidden_size"]))).astype(np.float32)
    del weights
    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


@pytest.fixture(scope="module")
def pair(lfm25_tokenizer_json, tmp_path_factory):
    root = tmp_path_factory.mktemp("lfm25")
    ckpt = lfm25_checkpoint(root, lfm25_tokenizer_json)
    gguf = convert(ckpt, root / "lfm25.gguf", "f32", log=lambda *_: None)
    return Tokenizer.from_file(str(ckpt / "tokenizer.json")), lfm_edge.load(gguf, n_threads=1, n_ctx=512), gguf


def test_specials_sit_at_the_end_with_their_types(pair):
    theirs, llm, gguf = pair
    f = GGUFFile(gguf)
    tokens = list(f.metadata["tokenizer.ggml.tokens"])
    types = list(f.metadata["tokenizer.ggml.token_type"])
    assert len(tokens) == N_VOCAB == theirs.get_vocab_size(with_added_tokens=True)
    for t, i in SPECIAL_IDS.items():
        assert tokens[i] == t and theirs.token_to_id(t) == i
        want = TokenType.USER_DEFINED if t in tiny_models.LFM25_NOT_SPECIAL else TokenType.CONTROL
        assert types[i] == want, t
    assert all(ty == TokenType.NORMAL for ty in types[: min(SPECIAL_IDS.values())])
    assert f.metadata["tokenizer.ggml.bos_token_id"] == SPECIAL_IDS["<|startoftext|>"]
    assert f.metadata["tokenizer.ggml.eos_token_id"] == SPECIAL_IDS["<|im_end|>"]
    tok = llm.tokenizer
    assert {SPECIAL_IDS["<think>"], SPECIAL_IDS["</think>"]} <= tok.special_ids
    assert SPECIAL_IDS["<|im_end|>"] in tok.eog_ids


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tokenizer_json(pair, text):
    theirs, llm, _ = pair
    assert llm.tokenize(text) == theirs.encode(text).ids
    assert llm.tokenize(text, add_special=False) == theirs.encode(text, add_special_tokens=False).ids
    assert llm.detokenize(llm.tokenize(text, add_special=False)) == text


def test_think_is_one_token(pair):
    _, llm, _ = pair
    ids = llm.tokenize("<think>a</think>", add_special=False)
    assert ids[0] == SPECIAL_IDS["<think>"] and ids[-1] == SPECIAL_IDS["</think>"]
    assert llm.tokenize("<think>")[0] == SPECIAL_IDS["<|startoftext|>"]


def test_random_strings_encode_alike(pair):
    """The whole pipeline (llama-3's regex in the GGUF tokenizer, LFM2.5's in tokenizer.json)."""
    theirs, llm, _ = pair
    specials = list(SPECIAL_IDS)
    rng = random.Random(5)
    for s in random_strings(3000, seed=125):
        if rng.random() < 0.3:
            k = rng.randint(0, len(s))
            s = s[:k] + rng.choice(specials) + s[k:]
        assert llm.tokenize(s, add_special=False) == theirs.encode(s, add_special_tokens=False).ids, repr(s)


def test_full_size_lfm25_vocabulary(lfm25_tokenizer_json, tmp_path):
    """124,928 tokens with <|startoftext|> at 124894, as LFM2.5-8B-A1B: a vocabulary-only GGUF."""
    data = json.loads(json.dumps(lfm25_tokenizer_json))
    n_total, n_special = 124_928, len(tiny_models.LFM25_SPECIAL_TOKENS)
    vocab = data["model"]["vocab"]
    # fillers that no pre-token can equal (letters, digits and punctuation mixed)
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), n_total - n_special)})
    first = n_total - n_special
    for k, t in enumerate(data["added_tokens"]):
        t["id"] = first + k
    data["post_processor"]["special_tokens"]["<|startoftext|>"]["ids"] = [first + 1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.token_to_id("<|startoftext|>") == 124894 and theirs.token_to_id("<think>") == 124901
    cfg = {"model_type": "lfm2_moe", "layer_types": ["conv"] * 32, "vocab_size": n_total,
           "bos_token_id": 124894, "eos_token_id": 124900, "pad_token_id": first}
    writer = GGUFWriter(path=None, arch="lfm2moe")
    write_vocab(writer, tmp_path, read_config(cfg))
    writer.write_header_to_file(path=tmp_path / "vocab.gguf")
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    ours = GGUFTokenizer(GGUFFile(tmp_path / "vocab.gguf"))
    assert ours.n_vocab == n_total and ours.bos_id == 124894 and ours.eos_id == 124900
    assert {124901, 124902} <= ours.special_ids and 124900 in ours.eog_ids
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text).ids, text
