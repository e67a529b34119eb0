"""``cluster/runtime_env.yaml``: Ray accepts it, its pins are the locked versions, and it carries no
secrets."""
from __future__ import annotations

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


def test_pins_are_exact_and_equal_the_lock(lock_module):
    """Cluster pins = tested versions: each pin is the version in requirements/*.lock."""
    locked = lock_module.locked_versions(lock_module.MAIN_LOCK.read_text())
    torch = lock_module.locked_versions(lock_module.TORCH_CUDA_LOCK.read_text())["torch"]
    names = set()
    for line in load()["pip"]["packages"]:
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{line}: pin an exact version"
        name = lock_module._norm(req.name)
        want = torch if name == "torch" else locked.get(name)
        assert spec[0].version == want, \
            f"{line}: the lock has {req.name} {want}; run `make lock` instead of editing the pins by hand"
        names.add(name)
    assert {"torch", "ray", "deepspeed", "transformers", "mlflow", "decord"} <= names


def test_env_vars_carry_no_secrets():
    env_vars = load()["env_vars"]
    for key, value in env_vars.items():
        assert isinstance(value, str), f"{key}: runtime_env env_vars must be strings"
        assert not SECRETISH.search(key), f"{key} looks like a credential; use the cluster's identity or secrets"
    text = RUNTIME_ENV.read_text()
    assert "AKIA" not in text and "aws_secret_access_key" not in text.lower()
