"""Node loss (issue 17, item 3) and spot preemption (issue 9, item 5), in one run on a local
three-node Ray cluster (``ray start --head`` plus two ``ray start --address``, each its own raylet).

The training workers start on one of the two worker nodes.  First that node is drained with
reason PREEMPTION (the notice a spot reclaim gives: the loop checkpoints at once, off its
schedule) and then killed for real (its raylet and every process of it SIGKILLed); the run
resumes on the other worker node from the notice's checkpoint.  Then that node is killed without
any notice; the run resumes on the head from its latest complete checkpoint.  The steps and clips
each loss cost are measured from the run's step journal, per fault."""
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
EPOCHS = 3
STEPS = EPOCHS * N // (WORKERS * BATCH)
EVERY = 3                           # scheduled checkpoints at 3, 6, 9, 12: a preemption checkpoint is off that grid
CPUS_PER_WORKER = 2
# Until the blocker goes, the head has no room for both workers (PACK: one node that fits both):
# they run on a worker node, the driver and the Train controller on the head.
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


def _node_with_workers(head: LocalRayHead, nodes: list[int], job: subprocess.Popen) -> int:
    """The index of the worker node the training workers run on (a list: index 0 is a found node)."""
    found = _wait(lambda: [n for n in nodes if _train_worker_pids(head.node_pids(n))], 300,
                  "the training workers on a worker node", job)
    return found[0]


def _attempts(journal: str) -> list[str]:
    return list(dict.fromkeys(ln["attempt"] for ln in read_journal(journal) if ln["rank"] == 0))


def _lost(lines: list[dict], attempts: list[str], i: int) -> int:
    """Steps the fault that ended ``attempts[i]`` cost: steps it computed that a later attempt computed again."""
    def steps(a: str) -> set[int]:
        return {ln["step"] for ln in lines if ln["attempt"] == a and ln["rank"] == 0}
    later = set().union(*(steps(a) for a in attempts[i + 1:]))
    return len(steps(attempts[i]) & later)


def test_nodes_with_the_workers_lost_after_a_notice_and_without_one(tmp_path):
    data = str(tmp_path / "data")
    coco_images(data, N)
    n_split = split_size(data)
    storage_root = str(tmp_path / "store")
    journal = str(tmp_path / "journal")
    spec = {"name": "nodeloss", "storage": storage_root, "data_root": data, "steps": STEPS, "workers": WORKERS,
            "batch": BATCH, "checkpoint_every": EVERY, "max_failures": 3, "sleep_s": 1.0,
            "drain_request": str(tmp_path / "drain_request"),
            "trace": str(tmp_path / "trace.jsonl"), "over": {"train.cpus_per_worker": CPUS_PER_WORKER}}
    head = LocalRayHead(num_cpus=HEAD_CPUS)
    blocker = job = None
    killed: list[list[int]] = []
    try:
        head.start(timeout=600)
        spec["address"] = head.gcs_address
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        nodes = [head.add_node(NODE_CPUS, timeout=600) for _ in range(2)]  # a loaded machine: joining takes minutes
        env = {**head.env, "PYTHONPATH": str(REPO), STEP_JOURNAL: journal, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
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

        # 1. the notice: the drained node's workers checkpoint off the schedule, then the node goes
        first = _node_with_workers(head, nodes, job)
        _wait(lambda: _registered(run_dir) and max(_registered(run_dir)) >= EVERY, 900, "a registered checkpoint", job)
        (tmp_path / "drain_request").write_text(str(head.node_temp_dir(first)))  # the notice, to that node only
        preempt = _wait(lambda: [s for s in _registered(run_dir) if s % EVERY and s < STEPS], 300,
                        "the preemption checkpoint", job)[0]
        on_node = _train_worker_pids(head.node_pids(first))
        assert on_node, "no training worker on the drained node: the fault would not hit one"
        killed.append(head.kill_node(first))
        assert set(on_node) <= set(killed[0])
        time.sleep(2)  # a report already on its way is registered
        latest_1 = max(_registered(run_dir))
        attempt_1 = _attempts(journal)[0]
        computed_1 = max(ln["step"] for ln in read_journal(journal) if ln["attempt"] == attempt_1)

        # 2. no notice: the other worker node, once the resumed run has checkpointed and gone a step past it
        second = nodes[1 - nodes.index(first)]
        _wait(lambda: len(_attempts(journal)) >= 2, 600, "the run resumed on the other node", job)
        attempt_2 = _attempts(journal)[1]
        assert _train_worker_pids(head.node_pids(second)), "the resumed workers are not on the other worker node"
        _wait(lambda: max(_registered(run_dir)) > max(latest_1, preempt) and any(
            ln["step"] > max(_registered(run_dir)) for ln in read_journal(journal) if ln["attempt"] == attempt_2),
            600, "a checkpoint of the resumed run and a step past it", job)
        killed.append(head.kill_node(second))
        time.sleep(2)
        latest_2 = max(_registered(run_dir))
        computed_2 = max(ln["step"] for ln in read_journal(journal) if ln["attempt"] == attempt_2)
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
    drained = last_json(out, "drained")
    assert drained["ok"], drained
    assert "node preemption signalled" in out, out[-3000:]   # the loop saw the notice and checkpointed at once

    lines = read_journal(journal)
    attempts = list(dict.fromkeys(ln["attempt"] for ln in lines if ln["rank"] == 0))
    assert attempts[:2] == [attempt_1, attempt_2] and len(attempts) == 3, attempts
    resumed = [min(ln["step"] for ln in lines if ln["attempt"] == a) - 1 for a in attempts[1:]]
    assert resumed == [latest_1, latest_2], (resumed, latest_1, latest_2)  # the latest complete checkpoint each time
    assert latest_1 == preempt                                  # after the notice: the notice's own checkpoint
    measured = Measured.from_journal(lines, split_size=n_split, bad=result["bad"], epochs=EPOCHS)
    assert measured.clips_lost == 0, measured
    lost = [_lost(lines, attempts, 0), _lost(lines, attempts, 1)]
    assert lost == [computed_1 - latest_1, computed_2 - latest_2], (lost, computed_1, latest_1, computed_2, latest_2)
    assert measured.steps_lost == sum(lost), (measured, lost)
    problems = [p for uri in registered_checkpoints(run_dir) for p in checkpoint_problems(uri)]
    assert not problems, problems
    survived = job.returncode == 0
    record("spot preemption notice (node drain, reason PREEMPTION), then that node lost", Injected.of(killed[:1],
           "nodes drained, then killed"), survived, measured,
           f"three-node cluster; checkpoint taken at step {preempt} on the notice (schedule: every {EVERY}); resumed "
           f"from it on the other worker node, {lost[0]} steps lost to this fault")
    record("node with the training workers lost (raylet + processes SIGKILLed), no notice", Injected.of(
           killed[1:], "nodes killed"), survived, measured,
           f"the same run, later; resumed on the head from step {latest_2} (schedule: every {EVERY}), {lost[1]} steps "
           f"lost to this fault; {n_split} clips x {EPOCHS} epochs, 2 workers, shuffle; steps/clips columns: the run")
