"""Small pieces of the train loop that need no Ray."""
import os
import time

import pytest

from orchestrator.data.mix import TextMix
from orchestrator.train.extensions import clear_stale_extension_locks, node_build_lock


def test_stale_extension_lock_is_removed_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (stale, fresh):
        p.parent.mkdir(parents=True)
        p.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_extension_locks(max_age_s=600) == [str(stale)]
    assert not stale.exists() and fresh.exists()  # a build in progress elsewhere keeps its lock


def test_the_node_build_lock_is_released_when_its_holder_dies(tmp_path, monkeypatch):
    """A killed builder leaves torch's lock file behind but never the node's build lock: the next
    process gets it at once, and inside it removes the dead builder's torch lock (it waited forever)."""
    import subprocess
    import sys

    from orchestrator.train.extensions import load_cpu_comm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom orchestrator.train.extensions import node_build_lock\n"
         "with node_build_lock():\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert holder.stdout.readline().strip() == "held"
    dead = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    dead.parent.mkdir(parents=True)
    dead.write_text("")                                   # the torch lock a killed builder left, just now
    holder.kill()
    holder.wait()
    t0 = time.monotonic()
    with node_build_lock():
        assert time.monotonic() - t0 < 5                  # the dead holder's flock went with it
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # the package's `torch` attribute is torch itself
    monkeypatch.setattr(ds_comm, "build_shm_op", lambda: "op")  # the build itself is not under test
    assert load_cpu_comm_op() == "op" and not dead.exists()


def test_text_mix_is_the_same_on_every_rank_and_follows_the_weight():
    class Shard:
        def __init__(self):
            self.n = 0

    def draws(seed, step):
        mix = TextMix(Shard(), 1 / 3, 4, None, seed)
        mix._next_text = lambda: "text"  # the coin is what is under test
        return list(mix.interleave(iter(["media"] * 3000), step))

    a, b = draws(0, 7), draws(0, 7)
    assert a == b                                    # every rank: same draws at the same step
    assert a != draws(0, 8)
    frac = a.count("text") / len(a)
    assert 0.30 < frac < 0.37 and a.count("media") == 3000


def test_finished_run_needs_the_export_and_a_marker_at_max_steps(tmp_path):
    """What lets a rerun of a finished name skip Ray Train: an export and a complete checkpoint
    (its marker) at or past max_steps; anything less trains (resumes) as usual."""
    import json

    from orchestrator.train.checkpoint import META, finished_run

    run = tmp_path / "exp" / "run"

    def ckpt(step, marker=True):
        d = run / f"checkpoint_step_{step:08d}"
        (d / "ds").mkdir(parents=True)
        (d / "ds" / "w.pt").write_bytes(b"w")
        if marker:  # it lists the files it vouches for: a marker without a list is refused (issue 31)
            (d / META).write_text(json.dumps({"complete": True, "step": step, "metrics": {"loss": 1.5},
                                              "files": {"ds/w.pt": {"size": 1, "sha256": None}}}))

    ckpt(4)
    ckpt(8)
    assert finished_run(str(run), 8) is None                   # no export yet
    (run / "export").mkdir()
    (run / "export" / "model.safetensors").write_bytes(b"x")
    uri, meta = finished_run(str(run), 8)
    assert uri == str(run / "checkpoint_step_00000008") and meta["metrics"] == {"loss": 1.5}
    assert finished_run(str(run), 12) is None                  # more steps asked for: train on
    ckpt(12, marker=False)                                     # a checkpoint some rank never finished
    assert finished_run(str(run), 12) is None
    assert finished_run(str(run), 8)[1]["step"] == 8


@pytest.mark.slow  # on a machine without the op built yet, it is built here (about a minute)
def test_deepspeeds_op_build_uses_the_locked_ninja_whatever_path_the_worker_got(tmp_path):
    """A worker whose PATH finds another ninja first (here: one that only records that it ran)
    still loads DeepSpeed's CPU op with the environment's own: two ninja versions each discard
    the other's build log and rebuild the op from scratch (3 rebuilds in one run of the slow tests)."""
    import subprocess
    import sys
    from pathlib import Path

    other = tmp_path / "bin"
    other.mkdir()
    mark = tmp_path / "other-ninja-ran"
    (other / "ninja").write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    here = str(Path(sys.executable).parent)
    path = os.pathsep.join([str(other)] + [p for p in os.environ["PATH"].split(os.pathsep) if p != here])
    probe = ("import os, shutil; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
             "from orchestrator.train.extensions import use_locked_build_tools\n"
             "print(use_locked_build_tools(), shutil.which('ninja'))\n"
             "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder\n"
             "ShareMemCommBuilder().load(verbose=False)\n")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PATH": path}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == [here, os.path.join(here, "ninja")], out.stdout
    assert not mark.exists(), mark.read_text()
