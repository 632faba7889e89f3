"""The tokenizer stored in a GGUF file, rebuilt with the `tokenizers` library.

LFM2 uses byte-level BPE (`tokenizer.ggml.model = gpt2`). Its pre-tokenizer
`lfm2` is llama-3's split regex, and, as in llama.cpp, a pre-token that is a
whole vocabulary entry is taken as is before any merge (`ignore_merges`).
Tokens of type CONTROL or USER_DEFINED are matched whole, never split.

A chat prompt is tokenized with `encode_prompt`: the text of the messages is
read as plain text there, so a `<|im_start|>` a user types is the characters
`<|`, `im`, `_start`, `|>`, never the control token.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .gguf_file import GGUFFile, StringArray

# llama-3's pre-tokenizer regex, as written in its tokenizer.json
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# LFM2.5's tokenizer.json (LFM2.5-8B-A1B's 124,928-token vocabulary) writes its split regex
# the way GPT-4's cl100k does (llama.cpp PR #23826), and the PR quotes it ending in a bare
# `\s`. Both split every string exactly as LLAMA3_SPLIT does (pinned on random strings by
# tests/test_tokenizer_lfm25.py), so the `lfm2` pre-tokenizer serves LFM2 and LFM2.5.
LFM25_SPLIT = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
LFM25_SPLIT_AS_QUOTED = LFM25_SPLIT[: -len("+")]
# the split regexes a tokenizer.json may carry for the `lfm2` pre-tokenizer
LFM2_SPLITS = (LLAMA3_SPLIT, LFM25_SPLIT, LFM25_SPLIT_AS_QUOTED)
# GGUF pre-tokenizer names that mean llama-3's regex with whole-word lookup
LLAMA3_LIKE = {"lfm2", "llama3", "llama-v3", "llama-bpe"}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decode_byte_level(texts: list[str]) -> list[bytes]:
    """The bytes each byte-level token text stands for; a character that stands for no byte
    is '?'. One table lookup over all the texts at once: a character at a time in Python
    took 0.7 s for a 125k-token vocabulary."""
    decoder = _byte_decoder()
    table = np.full(max(map(ord, decoder)) + 2, ord("?"), dtype=np.uint8)  # code point -> byte
    for c, b in decoder.items():
        table[ord(c)] = b
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    data = table[np.minimum(codes, len(table) - 1)].tobytes()  # the last entry is '?'
    ends = np.cumsum([len(t) for t in texts]).tolist()
    return [data[start:end] for start, end in zip([0, *ends], ends)]


def _bpe(f: GGUFFile, vocab: dict[str, int], merges: list[str]) -> models.BPE:
    """The BPE model of the vocabulary and its merges; a merge that is not two known tokens
    whose joined text is a token too is refused in one sentence naming it."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # `tokenizers` checks each merge's tokens and their join itself, in Rust; a pair with an
    # empty side passes it only if "" is a token, and then only this loop refuses it
    if "" not in vocab and set(map(len, pairs)) <= {2}:
        try:
            return models.BPE(vocab=vocab, merges=pairs, ignore_merges=True, fuse_unk=False, byte_fallback=False)
        except Exception:  # `tokenizers` raises a bare Exception: find the entry and say which
            pass
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(pair) or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise f.error(
                f"tokenizer.ggml.merges entry {i} ({merges[i][:40]!r}) is not two known tokens "
                "whose joined text is a token too"
            )
    return models.BPE(vocab=vocab, merges=pairs, ignore_merges=True, fuse_unk=False, byte_fallback=False)


class GGUFTokenizer:
    def __init__(self, f: GGUFFile):
        model = f.get("tokenizer.ggml.model", str)
        if model != "gpt2":
            raise f.error(f"tokenizer type '{model}' is not supported (LFM2 uses byte-level BPE, 'gpt2')")
        pre = f.get("tokenizer.ggml.pre", str, "default")
        if pre not in LLAMA3_LIKE:
            raise f.error(f"pre-tokenizer '{pre}' is not supported (expected 'lfm2')")
        listed, embd = f.metadata.get("tokenizer.ggml.tokens"), f.tensors.get("token_embd.weight")
        if isinstance(listed, StringArray) and embd is not None and len(listed) != embd.shape[0]:
            # before decoding them: a file may list ten million
            raise f.error(f"the tokenizer has {len(listed)} tokens but token_embd.weight has {embd.shape[0]} rows")
        tokens: list[str] = f.get("tokenizer.ggml.tokens", list)
        types: list[int] = f.get("tokenizer.ggml.token_type", list, [TokenType.NORMAL] * len(tokens))
        merges: list[str] = f.get("tokenizer.ggml.merges", list)
        if len(types) != len(tokens):
            raise f.error(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        for key, values, kind in (("tokens", tokens, str), ("token_type", types, int), ("merges", merges, str)):
            if not set(map(type, values)) <= {kind}:
                raise f.error(f"tokenizer.ggml.{key} should be an array of {'strings' if kind is str else 'integers'}")
        self.n_vocab = len(tokens)
        self.bos_id: int | None = f.get("tokenizer.ggml.bos_token_id", int, None)
        self.eos_id: int | None = f.get("tokenizer.ggml.eos_token_id", int, None)
        self.add_bos = f.get("tokenizer.ggml.add_bos_token", bool, True) and self.bos_id is not None
        for name, tid in (("bos", self.bos_id), ("eos", self.eos_id)):
            if tid is not None and not 0 <= tid < self.n_vocab:
                raise f.error(f"tokenizer.ggml.{name}_token_id = {tid} is outside the vocabulary")

        vocab = dict(zip(tokens, range(len(tokens))))
        if len(vocab) != len(tokens):
            i = next(i for i, t in enumerate(tokens) if vocab[t] != i)
            raise f.error(f"token {tokens[i][:40]!r} is listed twice in the vocabulary (ids {i} and {vocab[tokens[i]]})")
        tok = Tokenizer(_bpe(f, vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Special tokens are in the BPE vocabulary too, so `tokenizers` keeps
        # their GGUF ids; adding them makes them match whole before splitting.
        self.special_ids: set[int] = set()
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (TokenType.CONTROL, TokenType.USER_DEFINED):
                tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
                self.special_ids.add(i)
        self._tok = tok
        self._check_ids(f, tokens)
        self.special_texts = {tokens[i]: i for i in self.special_ids}
        # leftmost-longest, as `tokenizers` finds special tokens in text (Aho-Corasick, LeftmostLongest)
        self.special_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self.special_texts, key=len, reverse=True)) or r"(?!)"
        )
        self._plain: Tokenizer | bool | None = None  # the same tokenizer with special-token text read as text
        self._plain_lock = threading.Lock()
        if self.add_bos:
            bos = tokens[self.bos_id]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        byte_level = [
            i for i, ty in enumerate(types) if ty in (TokenType.NORMAL, TokenType.BYTE) and i not in self.special_ids
        ]
        self._bytes: list[bytes] = [t.encode("utf-8") for t in tokens]  # special and other tokens: their text
        for i, b in zip(byte_level, _decode_byte_level([tokens[i] for i in byte_level])):
            self._bytes[i] = b
        self.eog_ids = {i for i in (self.eos_id,) if i is not None}
        eot = tokens.index("<|im_end|>") if "<|im_end|>" in tokens else None
        if eot is not None:
            self.eog_ids.add(eot)

    def _check_ids(self, f: GGUFFile, tokens: list[str]) -> None:
        for i in sorted(self.special_ids):
            if self._tok.token_to_id(tokens[i]) != i:
                raise f.error(f"special token {tokens[i]!r} (id {i}) is listed twice in the vocabulary")

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it is read as those tokens."""
        return _encode(self._tok, text, add_special)

    def encode_prompt(self, text: str, plain_spans: Sequence[tuple[int, int]], add_special: bool = True) -> list[int]:
        """Token ids of `text`, with special-token text read as those tokens, except where
        it overlaps one of `plain_spans` (character ranges): there it is plain text.

        With no span, or no special token in one, the ids are `encode(text)`'s: the text
        between the special tokens read as such is tokenized exactly as `encode` does.
        """
        if not plain_spans:
            return self.encode(text, add_special)
        spans = sorted(plain_spans)
        ids = [self.bos_id] if add_special and self.add_bos else []
        start, j = 0, 0  # start of the text not yet tokenized; first span that may overlap a match
        pieces: list[str] = []
        kept: list[int] = []
        for m in self.special_pattern.finditer(text):
            while j < len(spans) and spans[j][1] <= m.start():
                j += 1
            if j < len(spans) and spans[j][0] < m.end():  # overlaps message text: plain text
                continue
            pieces.append(text[start : m.start()])
            kept.append(self.special_texts[m.group()])
            start = m.end()
        pieces.append(text[start:])
        for piece, special in zip(pieces, [*kept, None]):
            if piece:
                ids += self._encode_plain(piece)
            if special is not None:
                ids.append(special)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """`text` through the split regex and the BPE, special-token text included."""
        with self._plain_lock:
            if self._plain is None:
                plain = Tokenizer.from_str(self._tok.to_str())
                try:
                    plain.encode_special_tokens = True  # tokenizers >= 0.15.1
                except AttributeError:
                    plain = False
                self._plain = plain
        if self._plain:
            return _encode(self._plain, text, False)
        pieces = self._tok.pre_tokenizer.pre_tokenize_str(text)
        return [t.id for piece, _ in pieces for t in self._tok.model.tokenize(piece)]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        out = b"".join(
            self._bytes[i] for i in ids if 0 <= i < self.n_vocab and not (skip_special and i in self.special_ids)
        )
        return out.decode("utf-8", errors="replace")

    def stream(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Text pieces for a stream of ids, never splitting a UTF-8 character."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            if skip_special and i in self.special_ids:
                continue
            piece = utf8.decode(self._bytes[i])
            if piece:
                yield piece
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail


# Above this many characters, text is encoded through encode_batch, which releases the GIL, so
# a long prompt tokenized in one server thread does not stop the others (Tokenizer.encode holds
# the GIL throughout: other threads ran at 0.7% of their speed during a 2 MB prompt).
_GIL_FREE_CHARS = 4096


def _encode(tok: Tokenizer, text: str, add_special: bool) -> list[int]:
    if len(text) > _GIL_FREE_CHARS:
        return tok.encode_batch([text], add_special_tokens=add_special)[0].ids
    return tok.encode(text, add_special_tokens=add_special).ids
