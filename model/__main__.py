"""``python -m model --preset NAME [--task TASK] [--set key=value ...]``: modules and parameter counts.

The model is built on the meta device, so even ``large`` prints instantly without allocating.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import PRESETS, TASKS, MPlugConfig
from .mplug2 import MPlug2


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--task", default="pretrain", choices=sorted(TASKS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    try:
        cfg = MPlugConfig.from_preset(args.preset, **overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = MPlug2(cfg, args.task)
    counts = model.param_counts()
    print(f"preset={args.preset} task={args.task} modules={sorted(TASKS[args.task])}")
    for name, n in counts.items():
        note = " (momentum copies, not optimised)" if name == "momentum" else ""
        print(f"{name:18s} {n:>15,d}{note}")
    trainable = sum(n for k, n in counts.items() if k != "momentum")
    print(f"{'trainable':18s} {trainable:>15,d}")
    print(f"{'total':18s} {sum(counts.values()):>15,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
