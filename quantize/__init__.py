"""`lfm-edge quantize`: convert a Hugging Face LFM2 checkpoint into a GGUF file."""

from __future__ import annotations

import argparse

from .convert import OUT_TYPES, convert


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=list(OUT_TYPES), help="tensor encoding of the weight matrices")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list tensors as they are written")


def main(args: argparse.Namespace) -> int:
    out = convert(args.hf_dir, args.out, args.type, log=(lambda *_: None) if args.quiet else print)
    print(f"wrote {out}")
    return 0
