"""Options shared by the commands that load a model and generate."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..hub import DEFAULT_MODEL, resolve_model
from ..llm import LLM

# The model cards' recommended sampling
LFM2_DEFAULTS = dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05)
LFM25_DEFAULTS = dict(temperature=0.2, top_k=80, repetition_penalty=1.05)
SAMPLING_FLAGS = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "repeat_last_n": int,
    "seed": int,
}


# llama.cpp's and ollama's spellings that mean the same as ours
SAMPLING_ALIASES = {"temperature": ["--temp"], "repetition_penalty": ["--repeat-penalty"], "seed": ["-s"]}
DEFAULT_MAX_TOKENS = 1024
THREADS_PER_CPU = 4  # more kernel threads than this per CPU only slows down: a larger -t is a typo


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", default=None,
        help=f"a .gguf file or a hub reference such as {DEFAULT_MODEL}[:Q8_0] (default: {DEFAULT_MODEL}, Q4_0)",
    )
    p.add_argument("-t", "--threads", type=thread_count, default=None,
                   help="CPU threads the kernels run on (default: one per core this process may use)")
    p.add_argument("-c", "--ctx-size", "--n-ctx", type=positive_int, default=4096, dest="n_ctx",
                   help="context length in tokens: prompt, history and reply together (default 4096)")
    p.add_argument("-ctk", "--kv-cache-type", choices=("f16", "f32"), default=None,
                   help="keys and values in the cache (default: f32 for a float32 model, else f16)")
    add_weight_cache_flag(p)
    add_gpu_flags(p)


def add_weight_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false", default=None,
                   help="neither read nor save the packed weights that make later loads fast (see "
                        "LFM_EDGE_WEIGHT_CACHE; default ~/.cache/lfm-edge/packed)")


def add_gpu_flags(p: argparse.ArgumentParser) -> None:
    """llama.cpp's GPU offload flags, accepted with a note: there is no GPU to offload to."""
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", action=CpuOnly, default=None, help=argparse.SUPPRESS)


class CpuOnly(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: lfm-edge runs on the CPU only; {option_string} is ignored.", file=sys.stderr)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model card's recommendation)")
    for name, kind in SAMPLING_FLAGS.items():
        flags = [f"--{name.replace('_', '-')}", *SAMPLING_ALIASES.get(name, [])]
        g.add_argument(*flags, type=kind, default=None, dest=name)
    g.add_argument("-n", "--max-tokens", "--n-predict", type=non_negative_int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def thread_count(text: str) -> int:
    value = positive_int(text)
    cpus = os.cpu_count() or 1
    if value > THREADS_PER_CPU * cpus:
        raise argparse.ArgumentTypeError(
            f"{value} threads on a machine with {cpus} CPUs would only be slower (at most {THREADS_PER_CPU * cpus})"
        )
    return value


def load_model(args: argparse.Namespace) -> LLM:
    llm = LLM(resolve_model(args.model), n_threads=args.threads, n_ctx=args.n_ctx, kv_cache_type=args.kv_cache_type,
              weight_cache=args.weight_cache)
    if llm.file.metadata.get("lfm_edge.demo"):
        print("note: this is an lfm-edge demo model with random weights; its output is gibberish.", file=sys.stderr)
    note_weight_cache(llm)
    return llm


def note_weight_cache(llm: LLM) -> None:
    """Says once, when the packed weights are first saved, where the disk space went."""
    cache = llm.weight_cache
    if cache is not None and cache.status in ("saving", "written"):  # a small model's save may be done
        print(f"note: saving the packed weights ({cache.nbytes / 1e9:.2f} GB) to {cache.path}, once, so that "
              "later loads of this model skip packing (--no-weight-cache: do not)", file=sys.stderr)
    elif cache is not None and cache.status == "failed":
        print(f"note: the packed weights cannot be saved for faster loads: {cache.reason}", file=sys.stderr)


def card_defaults(llm: LLM) -> dict[str, Any]:
    """LFM2.5 and LFM2 recommend different sampling; tell them apart by name or vocabulary."""
    name = str(llm.file.metadata.get("general.name", "")) + str(llm.file.metadata.get("general.basename", ""))
    is_25 = "2.5" in name or llm.args.n_vocab == 128_000
    return dict(LFM25_DEFAULTS if is_25 else LFM2_DEFAULTS)


def sampling_from_args(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    options = card_defaults(llm)
    options.update({k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None})
    return options
