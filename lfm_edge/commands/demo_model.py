"""`lfm-edge demo-model OUT.gguf`: a tiny random LFM2-MoE to try the whole pipeline offline.

It is the test suite's tiny checkpoint (a trained byte-level BPE tokenizer
with LFM2's special tokens, the real chat template, conv and attention layers,
dense and MoE FFNs), converted by `lfm-edge quantize`. Its weights are random:
it runs every part of lfm-edge but writes gibberish. The file says so in
`general.name` and in the `lfm_edge.demo` flag, which the commands report.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..quantize.convert import OUT_TYPES, convert
from ..tiny_models import MODELS, write_checkpoint

DEMO_NAME = "lfm-edge demo model (random weights, output is gibberish)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="q4_0", choices=list(OUT_TYPES), help="tensor encoding (default q4_0)")
    p.add_argument("--arch", default="moe", choices=MODELS, help="which tiny model (default: moe, an LFM2-MoE)")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="lfm-edge-demo-") as tmp:
        checkpoint = write_checkpoint(args.arch, Path(tmp) / args.arch)
        out = convert(checkpoint, args.out, args.type, log=lambda *_: None, name=DEMO_NAME, flags={"lfm_edge.demo": True})
    print(f"wrote {out}: {DEMO_NAME}")
    return 0
