"""The Python API: load a model, tokenize, compute logits, generate, chat.

Generation runs on the model's engine (lfm_edge.engine, `LLM.engine`), which decodes every
request of every front end together; `generate` and `chat` turn its token stream into text,
and `generate_events` / `chat_events` into the events of lfm_edge.reply. `prefill` and
`decode_one_token` are the model's single steps on a cache of the caller's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from . import native
from .cache import Cache
from .chat_template import ChatTemplate, TemplateError
from .engine import PREFILL_CHUNK, Engine, GenerationStats
from .errors import LfmEdgeError
from .gguf_file import GGUFFile
from .grammar import Constraint, Grammar, Vocabulary, chat_grammar, grammar_from
from .models import build_model
from .reply import TEXT, Event, Markers, opens_reasoning, reply_text
from .sampling import Sampler, SamplingParams
from .tokenizer import GGUFTokenizer
from .weight_cache import WeightCache, default_dir

KV_CACHE_TYPES = {"f16": np.float16, "f32": np.float32}


class LLM:
    """A loaded model with its tokenizer and chat template.

    Several threads may share one LLM (one Session each): their requests are decoded
    together by the LLM's engine, each sequence with its own cache.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_threads: int | None = None,
        n_ctx: int = 4096,
        kv_cache_type: str | None = None,
        weight_cache: str | os.PathLike[str] | bool | None = None,
    ):
        """weight_cache: the directory the packed weights are saved in and read from (see
        lfm_edge.weight_cache), False for none; by default the environment's choice."""
        if kv_cache_type is not None and kv_cache_type not in KV_CACHE_TYPES:
            raise LfmEdgeError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise LfmEdgeError(f"n_threads must be a positive integer, got {n_threads!r}")
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise LfmEdgeError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        directory = _weight_cache_dir(weight_cache)
        self.file = GGUFFile(path)
        self.n_threads = n_threads or usable_cores()
        # the tokenizer is built beside the weights' packing (or the check of the saved packing),
        # which run in native code with the GIL released; a model error still comes first, the
        # tokenizer's then
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm-edge-tokenizer") as background:
            tokenizer = background.submit(GGUFTokenizer, self.file)
            self.weight_cache = WeightCache(self.file, directory, self.n_threads) if directory else None
            self.model = build_model(self.file, self.weight_cache)
            self.tokenizer = tokenizer.result()
        self.args = self.model.args
        if self.tokenizer.n_vocab != self.args.n_vocab:
            raise self.file.error(
                f"the tokenizer has {self.tokenizer.n_vocab} tokens but the model's vocabulary is {self.args.n_vocab}"
            )
        if n_ctx > self.args.n_ctx_train:
            raise LfmEdgeError(f"n_ctx = {n_ctx} is more than the {self.args.n_ctx_train} tokens the model was trained for")
        self.n_ctx = n_ctx
        # float16 keys and values halve what attention reads at long context (llama.cpp's
        # default too); a float32 model keeps float32 ones, so that it stays exact
        self.kv_cache_type = kv_cache_type or ("f32" if self._float32_weights() else "f16")
        self._compute = threading.Lock()  # one model call at a time
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._vocabulary: Vocabulary | None = None  # built by the first constrained request
        self._vocabulary_lock = threading.Lock()
        self._longest_token: int | None = None  # bytes of the longest token, found when first needed
        native.set_threads(self.n_threads)  # one pool for the process: the last load sets its size
        # a template that cannot be used is reported when a chat needs it: generate() still works
        self.chat_template: ChatTemplate | None = None
        self.chat_template_error: LfmEdgeError | None = None
        source = self.file.metadata.get("tokenizer.chat_template")
        if isinstance(source, str):
            try:
                self.chat_template = ChatTemplate(source, **self._special_tokens())
            except TemplateError as e:
                self.chat_template_error = e

    # -- text <-> tokens ---------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise LfmEdgeError("expected a non-empty list of token ids")
        bad = arr[(arr < 0) | (arr >= self.args.n_vocab)]
        if bad.size:
            raise LfmEdgeError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.args.n_vocab - 1})")
        if arr.size > self.n_ctx:
            raise LfmEdgeError(f"the prompt is {arr.size} tokens but the context holds {self.n_ctx} (raise n_ctx)")
        return arr.astype(np.int32)

    # -- the model ---------------------------------------------------------------
    def _float32_weights(self) -> bool:
        return all(t.qtype == GGMLQuantizationType.F32 for t in self.file.tensors.values())

    def new_cache(self) -> Cache:
        return self.model.make_cache(self.n_ctx, KV_CACHE_TYPES[self.kv_cache_type])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), n_vocab] of every position, from a fresh state."""
        return self.model(self._check_ids(ids), self.new_cache())

    def prefill(self, ids: Sequence[int], cache: Cache) -> np.ndarray:
        """Consume the prompt; the logits [V] of its last token."""
        arr = self._check_ids(ids)
        if cache.pos + arr.size > cache.n_ctx:
            raise LfmEdgeError(f"the prompt does not fit: {cache.pos + arr.size} tokens for a context of {cache.n_ctx}")
        # in chunks, as llama.cpp's ubatch: a long prompt's activations stay small, and Ctrl-C
        # (handled between two model calls) does not wait for a whole 100k-token layer
        for start in range(0, arr.size, PREFILL_CHUNK):
            with self._compute:
                logits = self.model(arr[start : start + PREFILL_CHUNK], cache, all_logits=False)[0]
        return logits

    def decode_one_token(self, token: int, cache: Cache) -> np.ndarray:
        with self._compute:
            return self.model(np.array([token], dtype=np.int32), cache, all_logits=False)[0]

    @property
    def engine(self) -> Engine:
        """The engine every generation of this LLM runs on (made at the first use)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self)
            return self._engine

    def sample_tokens(
        self,
        logits: np.ndarray,
        history: list[int],
        max_tokens: int,
        sampler: Sampler,
        cache: Cache,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[int]:
        """Tokens sampled after a prefill of `cache` that gave `logits`; each is fed back into `cache`.

        Ends at an end-of-generation token ("stop"), after max_tokens or when the
        context is full ("length"), or when `cancel` is set ("cancelled").
        `history` (the ids so far) grows as tokens are made.
        """
        def tokens() -> Iterator[int]:  # queued at the first next(), as a generator runs
            yield from self.engine.continue_cache(
                cache, [], max_tokens, sampler, stats=stats, cancel=cancel, logits=logits, history=history
            ).tokens()

        return tokens()

    def decode_tokens(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        sampler: Sampler,
        cache: Cache | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[int]:
        """Read `prompt` (after what `cache` holds, if given), then sample up to max_tokens
        tokens (see sample_tokens)."""
        ids = self._check_ids(prompt)

        def tokens() -> Iterator[int]:
            if cache is None:
                handle = self.engine.submit(ids, max_tokens, sampler, stats=stats, cancel=cancel)
            else:
                handle = self.engine.continue_cache(cache, ids, max_tokens, sampler, stats=stats, cancel=cancel)
            yield from handle.tokens()

        return tokens()

    # -- constrained decoding --------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary as llguidance sees it, built once (~0.1-1 s) at the first use."""
        with self._vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer)
            return self._vocabulary

    def constraint(self, grammar: Grammar) -> Constraint:
        """A Constraint for one sequence (Sampler(params, constraint)); compiling is
        bounded, and a grammar that cannot be used is an LfmEdgeError of one sentence."""
        return self.vocabulary.constraint(grammar)

    # -- text generation -------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
        grammar: Grammar | str | None = None,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Text pieces continuing `prompt` (text or token ids) as it is; stops at any `stop` string.

        Special tokens are left out of the text. Pass a GenerationStats to read token
        counts and timings afterwards, and a threading.Event to stop the generation
        from another thread. At most one of `grammar` (a lfm_edge.grammar.Grammar, or
        Lark text), `json_schema` and `regex` holds the text to that form.
        """
        events = self.generate_events(prompt, max_tokens, stop, stats, cancel, raw=True,
                                      grammar=grammar, json_schema=json_schema, regex=regex, **sampling)
        return (e.text for e in events if e.kind == TEXT)

    def generate_events(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
        raw: bool = False,
        grammar: Grammar | str | None = None,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        **sampling: Any,
    ) -> Iterator[Event]:
        """The reply to `prompt` as events (lfm_edge.reply): reasoning, text, tool calls, stop, end.

        A prompt that ends in `<think>` starts the reply inside reasoning. raw=True: a plain
        continuation, all text (what `generate` gives). grammar / json_schema / regex: see
        generate; the reply follows it from its first token (finish_reason "stop" once
        it is complete, "length" if the budget ends first).
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        params = make_sampling_params(sampling)
        check_max_tokens(max_tokens)
        self._check_ids(ids)
        form = grammar_from(grammar, json_schema, regex)
        sampler = Sampler(params, self.constraint(form) if form is not None else None)
        stats = stats if stats is not None else GenerationStats()

        def events() -> Iterator[Event]:  # queued at the first next(), as a generator runs
            handle = self.engine.submit(ids, max_tokens, sampler, stats=stats, cancel=cancel)
            yield from handle.events(list(stop or []), raw=raw)

        return events()

    # -- chat ------------------------------------------------------------------
    def _special_tokens(self) -> dict[str, Any]:
        """The named special tokens, which transformers passes to the template as variables."""
        tok = self.tokenizer
        named = {"pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}
        extra = {}
        for name, key in named.items():
            tid = self.file.metadata.get(key)
            if isinstance(tid, int) and 0 <= tid < tok.n_vocab:
                extra[name] = tok.decode([tid])
        return {
            "bos_token": tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
            "eos_token": tok.decode([tok.eos_id]) if tok.eos_id is not None else "",
            "special_tokens": extra,
        }

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text the model file's chat template makes of `messages`, as transformers renders it.

        `tools` are JSON schemas, listed as given. Keywords become template
        variables: `enable_thinking=False`, `preserve_thinking=True`,
        `keep_past_thinking=True`, or any the template reads. OpenAI-shaped
        messages are accepted too (`reasoning_content`, `arguments` as a JSON
        string, content as a list of text parts).
        """
        return self._chat_template().render(messages, tools, add_generation_prompt, **template_kwargs)

    def _chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            if self.chat_template_error is not None:
                raise TemplateError(f"{self.file.path}: {self.chat_template_error}")
            raise LfmEdgeError(f"{self.file.path}: the model file has no chat template (tokenizer.chat_template)")
        return self.chat_template

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, **template_kwargs: Any) -> str:
        """The prompt for the assistant's next reply (apply_chat_template with the generation prompt)."""
        return self.apply_chat_template(messages, tools, add_generation_prompt=True, **template_kwargs)

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, **template_kwargs: Any) -> list[int]:
        """The token ids of render_chat's prompt, with the messages' text read as text.

        A `<|im_end|>` or `<|im_start|>` typed in a message (or in a tool's result or
        schema) is tokenized as those characters, never as the control token; the
        template's own markup keeps its tokens (ChatTemplate.render_prompt).
        """
        tok = self.tokenizer
        text, plain = self._chat_template().render_prompt(messages, tools, True, tok.special_texts, **template_kwargs)
        self._check_prompt_fits(text)
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else None
        # the template writes the BOS token itself; do not add a second one
        return tok.encode_prompt(text, plain, add_special=not (bos and text.startswith(bos)))

    def _check_prompt_fits(self, text: str) -> None:
        """Refuse, before tokenizing, a rendered prompt that cannot fit the context: a template
        may write megabytes (tokenizing 7 MB took 19 s and 1.8 GB). No token stands for more
        than the vocabulary's longest token's bytes, so N bytes are at least N / longest tokens."""
        if len(text) <= self.n_ctx:
            return
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        if self._longest_token is None:
            tok = self.tokenizer
            self._longest_token = max(1, max(len(tok.token_bytes(i)) for i in range(tok.n_vocab)))
        least = -(-n_bytes // self._longest_token)
        if least > self.n_ctx:
            raise LfmEdgeError(
                f"the chat template made a prompt of {n_bytes:,} bytes, at least {least:,} tokens, "
                f"but the context holds {self.n_ctx}"
            )

    def chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        stream: bool = True,
        max_tokens: int = 1024,
        stop: Sequence[str] | None = None,
        response_format: dict[str, Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        **sampling: Any,
    ) -> Iterator[str] | str:
        """The assistant's answer to `messages`: text pieces, or the whole text with stream=False.

        Reasoning is left out (chat_events has it); tool-call blocks stay in, as written.
        response_format, tool_choice, parallel_tool_calls: as in OpenAI's API (see chat_events).
        """
        events = self.chat_events(messages, tools, max_tokens=max_tokens, stop=stop, response_format=response_format,
                                  tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **sampling)
        pieces = reply_text(events)
        return pieces if stream else "".join(pieces)

    def chat_events(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        max_tokens: int = 1024,
        stop: Sequence[str] | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
        response_format: dict[str, Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        grammar: Grammar | str | None = None,
        **sampling: Any,
    ) -> Iterator[Event]:
        """The assistant's reply to `messages` as events: reasoning, text, tool calls, stop, end.

        response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": {...}}}: the answer is that JSON. tool_choice: "auto" (default), "none"
        (no tool call), "required" (one call block, of any tool), or {"type": "function",
        "function": {"name": ...}} (a call of that tool); a forced call follows the tool's
        JSON schema, as TOOL_CALL events. parallel_tool_calls=False: one call per block.
        grammar: any other lfm_edge.grammar.Grammar for the answer. A reply that opens in
        reasoning (a prompt ending in <think>) reasons freely first.
        """
        ids = self.chat_tokens(messages, tools)
        form = chat_grammar(response_format, tools, tool_choice, parallel_tool_calls)
        if grammar is not None:
            if form is not None:
                raise LfmEdgeError("give grammar or response_format / tool_choice, not both")
            form = grammar if isinstance(grammar, Grammar) else Grammar.from_lark(grammar)
        if form is not None and opens_reasoning(self.tokenizer.decode(ids[-8:])):
            think_end = Markers.of(self.tokenizer).think_end
            if think_end is not None:  # a special token ends the reasoning, and the answer follows it
                form = form.after_reasoning(self.tokenizer.decode([think_end]))
        return self.generate_events(ids, max_tokens, stop, stats, cancel, grammar=form, **sampling)


def usable_cores() -> int:
    """Physical cores this process may run on: the default thread count.

    Two threads on the hyper-threads of one core share its load and SIMD units and only add
    barrier waits to a bandwidth-bound decode step (llama.cpp counts physical cores too).
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
        except OSError:
            return len(cpus)  # no topology (not Linux, or a sandbox): count logical CPUs
        cores.add(siblings.strip())
    return max(1, len(cores))


def make_sampling_params(options: dict[str, Any]) -> SamplingParams:
    unknown = set(options) - SamplingParams.names()
    if unknown:
        raise LfmEdgeError(f"unknown sampling option {sorted(unknown)[0]!r}; options: {', '.join(sorted(SamplingParams.names()))}")
    return SamplingParams(**options)


def check_max_tokens(max_tokens: Any) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise LfmEdgeError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")


def load(
    path: str | os.PathLike[str],
    n_threads: int | None = None,
    n_ctx: int = 4096,
    kv_cache_type: str | None = None,
    weight_cache: str | os.PathLike[str] | bool | None = None,
) -> LLM:
    """Open a GGUF model file for inference.

    kv_cache_type: "f16" or "f32" keys and values; by default f32 for a float32 model, else f16.
    weight_cache: where the packed weights are saved for the next load (lfm_edge.weight_cache):
    a directory, False for nowhere, None for the environment's choice (LFM_EDGE_WEIGHT_CACHE,
    else ~/.cache/lfm-edge/packed).
    """
    return LLM(path, n_threads=n_threads, n_ctx=n_ctx, kv_cache_type=kv_cache_type, weight_cache=weight_cache)


def _weight_cache_dir(setting: str | os.PathLike[str] | bool | None) -> Path | None:
    if setting is None or setting is True:
        return default_dir()
    if setting is False:
        return None
    if isinstance(setting, (str, os.PathLike)):
        return Path(setting).expanduser()
    raise LfmEdgeError(f"weight_cache must be a directory, False or None, got {setting!r}")


__all__ = ["LLM", "GenerationStats", "load"]
