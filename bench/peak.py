"""The int8 multiply-accumulate peak of this CPU, and the prefill roofline it sets for a model file.

    python bench/peak.py                               # GMAC/s with 1 and 2 threads
    python bench/peak.py --model m.gguf -t 1 2         # ... and the prefill roofline in tokens/s

The probe (csrc/probe*.cpp, through lfm_edge.probes.int8_peak) runs independent chains of the
int8 dot product the active kernel table uses, on registers only: AVX2 vpmaddubsw + vpmaddwd +
vpaddd (32 MACs per 256-bit triple), AVX-VNNI vpdpbusd on ymm (32 per instruction), AVX-512 VNNI
vpdpbusd (64 per instruction). Best of the repeats. `LFM_EDGE_ISA=avx2` measures a lower table.
A prompt token multiplies each weight it uses once (the output head only at the last token), so
prefill tokens/s <= peak / MACs per token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bandwidth  # noqa: E402

from lfm_edge import probes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file: also print its MACs per prompt token and the prefill roofline")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("-r", "--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.threads) < 1:
        p.error("--repeats and --threads must be positive")
    peaks = [probes.int8_peak(t, args.repeats) for t in args.threads]
    model = bandwidth.active_bytes(args.model) if args.model else None
    if args.json:
        print(json.dumps({"int8_peak": peaks, "model": model}))
        return 0
    for pk in peaks:
        print(f"int8 peak, {pk['threads']} thread(s): {pk['gmacs']:.1f} GMAC/s "
              f"({pk['isa']}: {pk['instructions']}; runs {', '.join(f'{r:.1f}' for r in pk['runs'])})")
    if model:
        print(f"{args.model}: a prompt token takes {model['prefill_macs'] / 1e9:.3f} GMAC "
              f"({model['decode_macs'] / 1e9:.3f} with the output head)")
        for pk in peaks:
            print(f"prefill roofline, {pk['threads']} thread(s): {pk['gmacs'] * 1e9 / model['prefill_macs']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
