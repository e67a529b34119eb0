"""The driver killed and the job resubmitted with the same name (issue 9, item 2), as real processes
with their own local Ray.  The spot preemption of item 5 rides on the node-loss run
(``test_node_loss.py``: a real node drained with reason PREEMPTION, then lost)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.devtools.faults.report import Injected, Measured, record
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal
from tests.reliability.helpers import REPO, checkpoint_steps, last_json

pytestmark = pytest.mark.slow
EXPERIMENT = "mplug2-tests.reliability.slow_toy"


def _job(storage: str, name: str, *extra: str, journal: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    if journal:
        env[STEP_JOURNAL] = journal
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.toy_job", storage, name, *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    kids = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:  # Ray's GCS / raylet / workers, wherever their session is
        try:
            k.kill()
        except psutil.Error:
            pass
    proc.wait()


def test_driver_killed_and_resubmitted_resumes_from_last_complete_checkpoint(tmp_path):
    storage = str(tmp_path / "store")
    run_dir = Path(storage) / EXPERIMENT / "drv"
    journal = str(tmp_path / "journal")
    first = _job(storage, "drv", "--sleep", "2.0", journal=journal)  # slow: still training when the contender is refused
    # one run per name (issue 17, item 7): a second start while the first trains is refused, no training
    contender = None
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoint_steps(str(run_dir)) and max(checkpoint_steps(str(run_dir))) >= 8
                                          and contender is not None and contender.poll() is not None):
        assert first.poll() is None, first.stdout.read()
        if contender is None and (run_dir / "_lease").is_dir():
            contender = _job(storage, "drv")
        time.sleep(0.2)
    c_out, _ = contender.communicate(timeout=120)
    assert contender.returncode != 0 and "run name in use" in c_out, c_out[-3000:]
    assert "resumed from step" not in c_out and "result_step" not in c_out
    assert first.poll() is None, "the running job must not be disturbed by the refused start"
    time.sleep(0.5)  # a little past the checkpoint: those steps are lost
    _kill_tree(first)
    killed_drivers = [first.pid]
    # the latest checkpoint Ray registered (a directory still being persisted is not in the snapshot)
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    # ... whose completion marker was written (rank 0 writes it after every rank's upload, issue 17 item 4)
    last_complete = max(int(s) for s in re.findall(r"checkpoint_step_(\d{8})", snapshot)
                        if (run_dir / f"checkpoint_step_{s}" / "mplug2_checkpoint.json").is_file())
    # a checkpoint that was being written when the fault hit: a shard without the completion marker
    partial = run_dir / "checkpoint_step_99999999" / "ds"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02partial")

    second = _job(storage, "drv", journal=journal)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", out)]
    assert resumed and resumed[0] == last_complete, (resumed, last_complete)
    assert "99999999" not in " ".join(re.findall(r"resumed from step \d+", out))
    result = last_json(out, "result_step")
    assert result["result_step"] == 24 and result["checkpoint"].endswith("checkpoint_step_00000024")
    lines = read_journal(journal)
    measured = Measured.from_journal(lines)
    first_steps = max(ln["step"] for ln in lines if ln["attempt"] == lines[0]["attempt"])  # the killed driver's run
    assert measured.steps_lost == first_steps - last_complete, (measured, first_steps, last_complete)
    record("driver SIGKILL + resubmit same name (+ a half-written checkpoint)", Injected.of(killed_drivers, "drivers"),
           second.returncode == 0, measured,
           f"resumed from step {resumed[0]}; partial checkpoint ignored")
