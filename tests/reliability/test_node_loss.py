"""Node loss (issue 17, item 3): a local two-node Ray cluster (``ray start --head`` plus a second
``ray start --address``, each its own raylet); the node holding the training workers is killed for
real (its raylet and every process of it SIGKILLed), once after a spot-preemption notice (the node
drained with reason PREEMPTION: the loop checkpoints at once) and once without one.  The run
resumes on the remaining node from the latest complete checkpoint; the steps and clips that cost
are measured from the run's step journal."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.devtools.faults.report import Injected, Measured, record
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal
from tests.cluster.ray_head import LocalRayHead
from tests.reliability.helpers import (
    REPO,
    checkpoint_problems,
    coco_images,
    last_json,
    registered_checkpoints,
    split_size,
)

pytestmark = pytest.mark.slow
N, WORKERS, BATCH = 32, 2, 4        # 4 steps per epoch
EPOCHS = 2
STEPS = EPOCHS * N // (WORKERS * BATCH)
EVERY = 3                           # scheduled checkpoints at 3, 6, 8: a preemption checkpoint is off that grid
CPUS_PER_WORKER = 2
# The head has room for both workers only once the blocker goes: until the node is lost, the
# workers are placed on the second node (PACK: one node that fits both), the driver and the
# Train controller stay on the head.
HEAD_CPUS, NODE_CPUS, BLOCK_CPUS = 5, 4, 2

BLOCKER = """
import sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1])
@ray.remote
class Hold:
    def ok(self):
        return True
h = Hold.options(num_cpus=float(sys.argv[2]), scheduling_strategy=NodeAffinitySchedulingStrategy(
    ray.get_runtime_context().get_node_id(), soft=False)).remote()
ray.get(h.ok.remote())
print("holding", flush=True)
while True:
    time.sleep(1)
"""


def _train_worker_pids(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _registered(run_dir: str) -> list[int]:
    snap = Path(run_dir) / "checkpoint_manager_snapshot.json"
    return sorted({int(s) for s in re.findall(r"checkpoint_step_(\d{8})", snap.read_text())}) if snap.exists() else []


def _wait(cond, timeout: float, what: str, job: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if job.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}:\n{job.stdout.read()[-6000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("notice", [True, False], ids=["after-preemption-notice", "without-notice"])
def test_node_with_the_workers_lost_run_resumes_on_the_other(tmp_path, notice):
    data = str(tmp_path / "data")
    coco_images(data, N)
    n_split = split_size(data)
    storage_root = str(tmp_path / "store")
    journal = str(tmp_path / "journal")
    spec = {"name": "nodeloss", "storage": storage_root, "data_root": data, "steps": STEPS, "workers": WORKERS,
            "batch": BATCH, "checkpoint_every": EVERY, "max_failures": 2, "sleep_s": 1.0,
            "trace": str(tmp_path / "trace.jsonl"), "over": {"train.cpus_per_worker": CPUS_PER_WORKER}}
    if notice:
        spec["drain_after"] = EVERY
    head = LocalRayHead(num_cpus=HEAD_CPUS)
    blocker = job = None
    try:
        head.start(timeout=600)
        spec["address"] = head.gcs_address
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        node = head.add_node(NODE_CPUS, timeout=600)  # a loaded 2-core machine: joining can take minutes
        env = {**head.env, "PYTHONPATH": str(REPO), STEP_JOURNAL: journal, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}
        blocker = subprocess.Popen([sys.executable, "-c", BLOCKER, head.gcs_address, str(BLOCK_CPUS)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        said = []  # Ray's own log lines come first
        for line in iter(blocker.stdout.readline, ""):
            said.append(line)
            if line.strip() == "holding":
                break
        assert said and said[-1].strip() == "holding", "".join(said)[-3000:]
        job = subprocess.Popen([sys.executable, "-m", "tests.reliability.plane_job", str(tmp_path / "spec.json")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        run_dir = os.path.join(storage_root, "mplug2-tests.reliability.trace_clips", "nodeloss")
        # registered by Ray Train (in its snapshot), not just being written
        _wait(lambda: _registered(run_dir) and max(_registered(run_dir)) >= EVERY, 900, "a registered checkpoint", job)
        if notice:  # the drain's notice makes the loop checkpoint off the schedule
            preempt = _wait(lambda: [s for s in _registered(run_dir) if s % EVERY and s < STEPS], 300,
                            "the preemption checkpoint", job)[0]
        else:       # a step past the checkpoint: work the fault will cost
            _wait(lambda: any(ln["step"] > EVERY for ln in read_journal(journal)), 300, "a step past it", job)
        on_node = _train_worker_pids(head.node_pids(node))
        assert on_node, "no training worker on the second node: the fault would not hit one"
        killed = head.kill_node(node)
        node_lost = killed  # the node's processes, SIGKILLed together: one node lost
        assert set(on_node) <= set(killed)
        time.sleep(2)  # a report already on its way is registered; nothing can resume before the blocker goes
        latest = max(_registered(run_dir))
        first = read_journal(journal)
        computed = max(ln["step"] for ln in first if ln["attempt"] == first[0]["attempt"])  # before the loss
        os.killpg(blocker.pid, 9)  # the head now has room for the restarted workers
        blocker.wait()
        out, _ = job.communicate(timeout=900)
    finally:
        for p in (job, blocker):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        head.stop()
    assert job.returncode == 0, out[-6000:]
    result = last_json(out, "result_step")
    assert result["result_step"] == STEPS, result

    lines = read_journal(journal)
    attempts = list(dict.fromkeys(ln["attempt"] for ln in lines if ln["rank"] == 0))
    assert len(attempts) == 2, attempts
    resumed_at = min(ln["step"] for ln in lines if ln["attempt"] == attempts[1]) - 1
    assert resumed_at == latest, (resumed_at, latest)  # the latest complete checkpoint at the time of the loss
    if notice:
        assert latest == preempt
    measured = Measured.from_journal(lines, split_size=n_split, bad=result["bad"], epochs=EPOCHS)
    assert measured.clips_lost == 0, measured
    assert measured.steps_lost == computed - latest, (measured, computed, latest)
    problems = [p for uri in registered_checkpoints(run_dir) for p in checkpoint_problems(uri)]
    assert not problems, problems
    record("node with the training workers lost (raylet + processes SIGKILLed)"
           + (" after a preemption notice" if notice else ", no notice"), Injected.of([node_lost], "nodes killed"),
           job.returncode == 0, measured,
           f"two-node cluster; resumed on the head from step {resumed_at}"
           + (f" (the notice's checkpoint; schedule: every {EVERY})" if notice else f" (schedule: every {EVERY})")
           + f"; {n_split} clips x {EPOCHS} epochs, 2 workers, shuffle")
