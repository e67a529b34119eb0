"""Print the resolved run configuration: schema defaults < YAML (with ``inherit``) < overrides."""
from __future__ import annotations

import argparse

from orchestrator.commands import add_config_arguments, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=False)


def run(args: argparse.Namespace) -> int:
    print(resolve_config(args).to_yaml(), end="")
    return 0
