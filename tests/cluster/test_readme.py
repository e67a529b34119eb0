"""cluster/README.md stays true to the repository: every verb of the CLI has a submit line, every
file it lists exists, and the commands name the files this folder really has."""
from __future__ import annotations

import re
from pathlib import Path

from orchestrator.cli import VERBS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "cluster" / "README.md").read_text()


def test_every_verb_has_a_submit_line():
    submitted = set(re.findall(r"\$SUBMIT -- python -m orchestrator (\w+)", README))
    assert submitted == set(VERBS), f"missing: {set(VERBS) - submitted}, unknown: {submitted - set(VERBS)}"


def test_listed_files_exist():
    listed = re.findall(r"^\| `([\w./-]+)` \|", README, flags=re.M)
    assert len(listed) >= 6
    for name in listed:
        assert (ROOT / "cluster" / name).is_file(), f"cluster/README.md lists {name}, which does not exist"
    for path in set(re.findall(r"cluster/[\w./-]+\.(?:yaml|png)|cluster/Dockerfile", README)):
        assert (ROOT / path).is_file(), path
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / "cluster" / image).is_file(), image


def test_lifecycle_commands_are_all_there():
    for cmd in ("ray up cluster/aws.yaml", "ray job submit", "ray job logs -f", "ray down cluster/aws.yaml",
                "kubectl apply -f cluster/kuberay/rayjob-pretrain.yaml", "MLFLOW_TRACKING_URI"):
        assert cmd in README, cmd
