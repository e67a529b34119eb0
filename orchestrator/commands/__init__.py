"""One module per CLI verb: ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse

from orchestrator.config import load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--config YAML plus trailing dotted overrides (``train.lr=5e-5``), shared by run verbs."""
    parser.add_argument("--config", required=required, help="run config YAML (see workloads/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides applied after the YAML, e.g. train.lr=5e-5 data.root=s3://b/p")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve_config(args: argparse.Namespace):
    """Load + validate the run config of a verb (raises ConfigError before anything starts)."""
    return load_config(args.config, args.overrides)
