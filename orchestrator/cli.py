"""``python -m orchestrator <verb> ...`` (also installed as the ``mplug2`` console script).

Each verb lives in ``orchestrator/commands/<verb>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; modules import their heavy dependencies inside ``run`` so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.config import ConfigError
from orchestrator.console import configure_logging

# verb -> one-line help.  Order is the order users meet them.
VERBS = {
    "synth": "write the synthetic video-text dataset (real H.264 clips) to a folder or s3:// URI",
    "config": "print the resolved configuration (defaults < YAML < key=value overrides) and exit",
    "shard": "pack clips and annotations into webdataset tar shards",
    "train": "pre-train or fine-tune on Ray Train + DeepSpeed, tracked in MLflow",
    "evaluate": "evaluate a checkpoint (URI or mlflow:<run_id>) on a workload's validation split",
    "sweep": "Ray Tune sweep over fine-tuning hyper-parameters, one MLflow parent run per sweep",
    "demo": "the end-to-end demo: synth data, pre-train, fine-tune and evaluate retrieval",
}


def _available_verbs() -> dict[str, object]:
    mods = {}
    for verb in VERBS:
        try:
            mods[verb] = importlib.import_module(f"orchestrator.commands.{verb}")
        except ModuleNotFoundError as e:
            if e.name != f"orchestrator.commands.{verb}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Pre-train and fine-tune mPLUG-2-style video-language models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own INFO logs from every process of the run")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, mod in _available_verbs().items():
        p = sub.add_parser(verb, help=VERBS[verb], description=(mod.__doc__ or VERBS[verb]).strip())
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    from orchestrator.tracking.redact import redact_exception

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {redact_exception(e)}", file=sys.stderr)
        return 2
    except BaseException as e:  # the traceback printed on the way out carries no credential either
        raise redact_exception(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
