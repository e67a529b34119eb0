"""What a new user sees: the shipped tiny config, run from a folder where its relative default
``data.root: ./demo_output/synth`` exists, as ``python -m orchestrator train``: it trains (the
relative paths reach the workers), prints one progress line per logged step and a summary, and
none of Ray's internal chatter (nor Ray Train's per-report "Reporting training result" lines of
the workers); ``--verbose`` brings Ray's INFO logs back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "workloads" / "configs" / "pretrain_tiny.yaml"
RAY_NOISE = ("Failed to query Ray Train Controller", "State API may be temporarily unavailable",
             "Reporting training result",
             "Started a local Ray instance", "Registered dataset logger", "Starting execution of Dataset")


def _train(cwd: Path, *extra: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MPLUG2_VERBOSE"))}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "orchestrator", *(["--verbose"] if verbose else []), "train", "--config", str(CONFIG),
           "storage=./store", f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", "train.max_steps=4", "train.log_every=2",
           "train.checkpoint_every=4", "train.batch_size_per_worker=4", "train.num_workers=2", *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_shipped_tiny_config_runs_from_its_relative_root_with_a_quiet_console(tmp_path, mlflow_db_template):
    import shutil

    from orchestrator.devtools.synth import ClipSpec, generate

    generate(str(tmp_path / "demo_output" / "synth"), n=24, seed=0,
             spec=ClipSpec(width=96, height=64, fps=8, seconds=2.0, gop=8), log=lambda *_: None)
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")  # a migrated store: what is tested is the console
    out = _train(tmp_path, "name=quiet")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    progress = [line for line in text.splitlines() if "quiet: step " in line]
    assert len(progress) >= 2, text[-4000:]        # steps 2 and 4 (log_every=2)
    assert " 4/4" in progress[-1] and "samples/s" in progress[-1] and "data wait" in progress[-1]
    assert "quiet: finished step 4/4" in text
    for noise in RAY_NOISE:
        assert noise not in text, f"Ray chatter on the default console: {noise!r}"
    # a screen, not pages: Ray's per-process chatter is gone (lines of a placement-group cleaner that
    # finds this test machine's other local Ray instances are not the run's own output)
    own = [ln for ln in out.stderr.splitlines() if "(PlacementGroupCleaner" not in ln]
    assert len(own) < 40, f"{len(own)} lines:\n" + "\n".join(own)
    verbose = _train(tmp_path, "name=loud", "train.max_steps=2", verbose=True)
    assert verbose.returncode == 0, verbose.stderr[-4000:]
    loud = verbose.stdout + verbose.stderr
    assert any(noise in loud for noise in RAY_NOISE[3:]), "--verbose shows Ray's logs"
    assert "Reporting training result" in loud, "--verbose shows Ray Train's per-report lines"
