"""``python -m orchestrator <verb> ...`` (also installed as the ``mplug2`` console script).

Each verb lives in ``orchestrator/commands/<verb>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; modules import their heavy dependencies inside ``run`` so ``--help`` is fast.
A mistake the user can fix (:class:`~orchestrator.errors.UserError`: a setting, a file, a run name,
bad data past its limit), raised anywhere, also inside a Ray worker, is printed as its own message,
``error: ...``, with exit status 2 and no traceback (``--verbose`` prints the traceback too).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from orchestrator import errors
from orchestrator.console import configure_logging
from orchestrator.errors import UserError
from orchestrator.tracking.redact import redact_exception, redact_text

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


def _verb_module(verb: str):
    """The verb's module, or None where this installation leaves it out."""
    try:
        return importlib.import_module(f"orchestrator.commands.{verb}")
    except ModuleNotFoundError as e:
        if e.name != f"orchestrator.commands.{verb}":
            raise
        return None


def _chosen_verb(argv: list[str]) -> str | None:
    """The verb on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``verb``'s module is imported (its arguments and ``run``), so ``--help`` and
    every verb start without importing the others' dependencies (Ray, torch, MLflow)."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Pre-train and fine-tune mPLUG-2-style video-language models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own INFO logs from every process of the run")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, help_text in VERBS.items():
        if name != verb:
            sub.add_parser(name, help=help_text)
            continue
        mod = _verb_module(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen_verb(argv))
    args = parser.parse_args(argv)
    configure_logging(args.verbose)

    try:
        return int(args.func(args) or 0)
    except BaseException as e:
        mistake = errors.find(e, (UserError,))  # also inside Ray's wrappers
        if mistake is None or isinstance(e, KeyboardInterrupt):
            redact_exception(e)  # in place: the traceback printed on the way out carries no credential either
            raise
        if args.verbose:
            traceback.print_exception(redact_exception(e))
        print(f"error: {redact_text(errors.message(mistake))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
