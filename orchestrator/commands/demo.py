"""The end-to-end demo on embedded defaults: local Ray, ./demo_output as the object store, a local
SQLite MLflow store.  Stages: synthesize the dataset, then every later stage that exists."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_output", help="local folder for data, checkpoints and MLflow")
    p.add_argument("--n", type=int, default=240, help="synthetic clips")


def run(args: argparse.Namespace) -> int:
    from orchestrator import storage  # noqa: PLC0415
    from orchestrator.synth import generate  # noqa: PLC0415

    data = os.path.join(args.out, "synth")
    if storage.exists(os.path.join(data, "manifest.json")):
        print(f"demo: dataset already at {data}")
    else:
        generate(data, n=args.n, seed=0)
    return 0
