"""The locked environment (requirements/*.lock): complete, hashed, consistent with pyproject.toml,
installed as locked, and the single source of every pin the cluster files use."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def pins_with_hashes(text: str) -> dict[str, list[str]]:
    """``{name: [sha256, ...]}`` for every pinned package of a lock file."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            current = m.group(1).lower()
            out[current] = []
        elif current and line.strip().startswith("--hash=sha256:"):
            out[current].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif not line.startswith(" "):
            current = None
    return out


@pytest.mark.parametrize("name", ["main.lock", "torch-cpu.lock", "torch-cuda.lock"])
def test_every_locked_package_is_exact_and_hashed(name):
    pins = pins_with_hashes((ROOT / "requirements" / name).read_text())
    assert pins, f"{name} pins nothing"
    unhashed = [p for p, hashes in pins.items() if not hashes]
    assert not unhashed, f"{name}: no hash for {unhashed}"
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for hashes in pins.values() for h in hashes)


def test_lock_satisfies_every_range_in_pyproject(lock_module):
    """Every dependency and extra of pyproject.toml is locked, at a version its range admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    main = lock_module.locked_versions(lock_module.MAIN_LOCK.read_text())
    torch_cpu = lock_module.locked_versions(lock_module.TORCH_CPU_LOCK.read_text())["torch"]
    for line in reqs:
        req = Requirement(line)
        name = lock_module._norm(req.name)
        version = torch_cpu if name == "torch" else main.get(name)
        assert version is not None, f"{req.name} (pyproject.toml) is not in the lock: run `make lock`"
        assert req.specifier.contains(version, prereleases=True), \
            f"{line}: the lock has {version}; run `make lock`"


def test_cpu_and_cuda_torch_are_the_same_release_and_cuda_agrees_with_the_lock(lock_module):
    cpu = lock_module.locked_versions(lock_module.TORCH_CPU_LOCK.read_text())
    cuda = lock_module.locked_versions(lock_module.TORCH_CUDA_LOCK.read_text())
    main = lock_module.locked_versions(lock_module.MAIN_LOCK.read_text())
    assert list(cpu) == ["torch"], "the CPU lock holds torch alone (its dependencies are in main.lock)"
    assert cpu["torch"].split("+")[0] == cuda["torch"] == lock_module.torch_version()
    cuda_libs = {n for n in cuda if n != "torch" and n not in main}  # what only the CUDA build needs
    assert {"triton", "nvidia-cublas", "nvidia-nccl-cu13"} <= cuda_libs or any(n.startswith("nvidia-cu") for n in cuda_libs)
    assert "torch" not in main and not cuda_libs & set(main), \
        "main.lock must not pull torch or CUDA libraries onto CPU machines"
    shared = set(cuda) & set(main)
    assert shared and all(cuda[n] == main[n] for n in shared), "torch-cuda.lock is constrained by main.lock"


def test_this_environment_is_the_locked_one(lock_module):
    """`make install` installed exactly the lock (a drifted venv fails here, not on the cluster)."""
    main = lock_module.locked_versions(lock_module.MAIN_LOCK.read_text())
    torch = lock_module.locked_versions(lock_module.TORCH_CPU_LOCK.read_text())["torch"]
    drift = {}
    for name, version in {**main, "torch": torch}.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift[name] = (version, None)
            continue
        if installed != version and installed.split("+")[0] != version.split("+")[0]:
            drift[name] = (version, installed)
    assert not drift, f"installed versions differ from the lock (locked, installed): {drift}; run `make install`"


def test_runtime_env_pins_are_what_make_lock_derives(lock_module):
    text = lock_module.RUNTIME_ENV.read_text()
    assert lock_module.derive_runtime_env(text, lock_module.runtime_pins(lock_module.MAIN_LOCK.read_text())) == text, \
        "cluster/runtime_env.yaml's pins are not the lock's: run `make lock` (or `python requirements/lock.py --derive-only`)"


def test_the_update_command_rewrites_the_derived_pins(lock_module, tmp_path, monkeypatch):
    """`make lock`'s derive step: a new version in the lock becomes the runtime env's pin, and
    nothing outside the generated block changes."""
    lock_text = lock_module.MAIN_LOCK.read_text()
    old = lock_module.locked_versions(lock_text)["boto3"]
    bumped = lock_text.replace(f"\nboto3=={old} ", "\nboto3==99.0.0 ")
    assert bumped != lock_text
    fake_lock = tmp_path / "main.lock"
    fake_lock.write_text(bumped)
    env = tmp_path / "runtime_env.yaml"
    original = lock_module.RUNTIME_ENV.read_text()
    env.write_text(original)
    monkeypatch.setattr(lock_module, "MAIN_LOCK", fake_lock)
    monkeypatch.setattr(lock_module, "RUNTIME_ENV", env)
    assert lock_module.main(["--derive-only"]) == 0
    new = env.read_text()
    assert "- boto3==99.0.0" in new and f"boto3=={old}" not in new
    assert new.replace("boto3==99.0.0", f"boto3=={old}") == original


def test_cluster_files_install_only_the_lock():
    """No cluster file installs a package by range or bare name: only lock files (with hashes) and
    this project's wheel without its dependencies."""
    texts = {p: (ROOT / p).read_text() for p in ("cluster/aws.yaml", "cluster/Dockerfile")}
    for path, text in texts.items():
        installs = re.findall(r"pip install[^\n&]*", text)
        assert installs, path
        for cmd in installs:
            if "-r " in cmd:
                assert "--require-hashes" in cmd and "--no-deps" in cmd and re.search(r"-r \S+\.lock", cmd), (path, cmd)
            else:
                assert "--no-deps" in cmd and "mplug2_ray-" in cmd, f"{path}: unlocked install {cmd!r}"
