"""Fixtures of the training tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ds_checkpoints(tmp_path_factory) -> Path:
    """Real DeepSpeed checkpoints and the deferred-copy runs, written once by one subprocess
    (``make_ds_checkpoints.py``: one DeepSpeed start on CPU, gloo)."""
    out = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(20000 + os.getpid() % 20000)}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "make_ds_checkpoints.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
