"""Write the synthetic video-text dataset: real H.264 clips of a coloured shape moving left, right,
up or down, with captions/questions/labels that need the frames in order, in several annotation
formats (Youku-mPLUG CSV, MSR-VTT JSONL, MSRVTT-QA, SST-2 TSV) and a tokenizer covering them."""
from __future__ import annotations

import argparse

from orchestrator.devtools.synth import ClipSpec, generate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="destination: a local folder or s3://bucket/prefix")
    p.add_argument("--n", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=4.0, help="clip length in seconds")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--no-tokenizer", action="store_true", help="skip building <out>/tokenizer")


def run(args: argparse.Namespace) -> int:
    spec = ClipSpec(width=args.width, height=args.height, fps=args.fps, seconds=args.seconds, gop=2 * args.fps)
    generate(args.out, n=args.n, seed=args.seed, spec=spec, with_tokenizer=not args.no_tokenizer)
    return 0
