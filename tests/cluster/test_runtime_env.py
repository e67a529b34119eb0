"""``cluster/runtime_env.yaml``: Ray accepts it, its pins are the versions this checkout runs, and
it carries no secrets."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
SECRETISH = re.compile(r"SECRET|PASSWORD|(^|_)TOKEN($|_)|ACCESS_KEY|CREDENTIAL|API_KEY", re.I)


def load() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def test_ray_accepts_the_runtime_env():
    env = load()
    parsed = RuntimeEnv(**env)  # Ray's own validation of every field
    assert parsed["working_dir"] == "."
    assert {".venv", ".git", "demo_output"} <= set(env["excludes"])


def test_pins_are_exact_and_match_the_installed_versions():
    packages = load()["pip"]["packages"]
    names = set()
    for line in packages:
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{line}: pin an exact version"
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), \
            f"{line}: this checkout runs {req.name} {installed}; update the pin or the environment"
        names.add(req.name.lower())
    assert {"torch", "ray", "deepspeed", "transformers", "mlflow", "decord"} <= names


def test_env_vars_carry_no_secrets():
    env_vars = load()["env_vars"]
    for key, value in env_vars.items():
        assert isinstance(value, str), f"{key}: runtime_env env_vars must be strings"
        assert not SECRETISH.search(key), f"{key} looks like a credential; use the cluster's identity or secrets"
    text = RUNTIME_ENV.read_text()
    assert "AKIA" not in text and "aws_secret_access_key" not in text.lower()
