"""S3 faults during a real training run (issue 17, item 2), and a training worker killed mid-epoch
in the same run (issue 12, item 6).

A run on the real data plane (several blocks, two workers, shuffle on, seeded random crops) whose
Ray workers, not just the test process, reach S3 through the fault-injecting proxy: 503 SlowDown,
connection resets, truncated bodies and timeouts on the clip reads, on the checkpoint uploads and
on the restore.  Mid-way through the first epoch one training worker is SIGKILLed: the resumed
epoch must train exactly the clips the fault-free epoch trains, no batch-count skipping can get
that right.  The run finishes; every clip of every epoch is trained exactly once or counted bad
(measured from the run's step journal); the S3 faults cost no step (retried in place), the kill
costs only the steps after the checkpoint it resumed from; every registered checkpoint is complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from orchestrator import storage
from orchestrator.devtools.faults.report import Injected, Measured, record
from orchestrator.devtools.faults.s3_proxy import FaultSpec, S3FaultProxy
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal
from orchestrator.train.manifest import resolve_export
from tests.reliability.helpers import (
    REPO,
    checkpoint_problems,
    coco_images,
    last_json,
    registered_checkpoints,
    split_size,
    train_workers,
)

pytestmark = pytest.mark.slow
N, WORKERS, BATCH = 32, 2, 4          # 4 steps per epoch, no remainder dropped
STEPS_PER_EPOCH = N // (WORKERS * BATCH)
EPOCHS = 2
KILL_AFTER = 2                        # the checkpoint mid first epoch (checkpoint_every=2): kill one step later
# every kind of fault on object reads (GET: clips, annotation, checkpoint restores) and writes (PUT:
# checkpoint uploads); the delay (4 s) is longer than the job's S3 timeout (2 s): a timeout, retried
FAULTS = FaultSpec(slowdown=0.12, reset=0.08, truncate=0.08, delay=0.04, delay_s=4.0)


def _kill_a_worker_mid_epoch(job: subprocess.Popen, run_dir: str, journal: str, killed: list) -> None:
    """Once checkpoint KILL_AFTER is registered and the run computed a step past it, SIGKILL one of
    the job's training workers (its own Ray's, never another run's)."""
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        try:
            done = any(u.endswith(f"checkpoint_step_{KILL_AFTER:08d}") for u in registered_checkpoints(run_dir))
        except Exception:  # no snapshot yet (NoSuchKey)
            done = False
        if done and any(ln["step"] > KILL_AFTER for ln in read_journal(journal)):
            workers = train_workers(job.pid)
            if workers:
                workers[0].kill()
                killed.append(workers[0].pid)
                return
        time.sleep(0.05)


def test_training_run_through_s3_faults_and_a_worker_kill_loses_nothing(s3_server, s3_bucket, tmp_path):
    data = f"{s3_bucket}/data"
    coco_images(data, N)                               # written directly, before any fault
    n_split = split_size(data)
    journal = str(tmp_path / "journal")
    spec = {"name": "s3faults", "storage": f"{s3_bucket}/store", "data_root": data, "steps": EPOCHS * N // (WORKERS * BATCH),
            "workers": WORKERS, "batch": BATCH, "checkpoint_every": 2, "max_failures": 2, "sleep_s": 0.4,
            "trace": str(tmp_path / "trace.jsonl")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_dir = f"{s3_bucket}/store/mplug2-tests.reliability.trace_clips/s3faults"
    killed: list[int] = []
    with S3FaultProxy(s3_server.endpoint, {"get": FAULTS, "put": FAULTS}, seed=17, max_consecutive=3) as proxy:
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": proxy.endpoint, STEP_JOURNAL: journal,
               "MPLUG2_S3_READ_TIMEOUT_S": "2"}
        env.pop("RAY_ADDRESS", None)
        job = subprocess.Popen([sys.executable, "-m", "tests.reliability.plane_job", str(tmp_path / "spec.json")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _kill_a_worker_mid_epoch(job, run_dir, journal, killed)
            out, _ = job.communicate(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        stats = proxy.stats()
        on_clips = proxy.injected_where("/data/imgs/", "get")
        on_ckpt = proxy.injected_where("/checkpoint_step_", "put")
        fault_kinds = {f for _, p, f in proxy.log if f}
    assert job.returncode == 0, out[-6000:]
    assert killed, "no training worker was killed (the run ended first?)"
    result = last_json(out, "result_step")
    assert result["result_step"] == spec["steps"], result
    # the workers' own requests met the faults: clip reads (Ray Data tasks) and checkpoint uploads (Train workers)
    assert on_clips > 0 and on_ckpt > 0, stats
    assert fault_kinds == {"slowdown", "reset", "truncate", "delay"}, stats

    lines = read_journal(journal)
    measured = Measured.from_journal(lines, split_size=n_split, bad=result["bad"], epochs=EPOCHS)
    assert measured.evidence["ranks"] == WORKERS, measured
    assert measured.clips_lost == 0, (measured, result)  # every clip of every epoch trained or counted bad (by reason)
    # ... and none twice: the resumed epoch trained exactly the clips the killed one had not
    assert measured.evidence["trained_twice_per_epoch"] == [0] * EPOCHS, measured
    attempts = list(dict.fromkeys(ln["attempt"] for ln in lines if ln["rank"] == 0))
    assert len(attempts) == 2, attempts                 # one restart: the kill's (the S3 faults were retried in place)
    computed = max(ln["step"] for ln in lines if ln["attempt"] == attempts[0] and ln["rank"] == 0)
    resumed = min(ln["step"] for ln in lines if ln["attempt"] == attempts[1] and ln["rank"] == 0) - 1
    assert 1 <= resumed < STEPS_PER_EPOCH, resumed      # the fault landed mid-epoch
    assert computed > resumed                           # work past the checkpoint was lost and redone
    assert measured.steps_lost == computed - resumed, (measured, computed, resumed)   # the kill's, nothing else

    registered = registered_checkpoints(result["run_dir"])
    assert registered, "no checkpoint registered"
    problems = [p for uri in registered for p in checkpoint_problems(uri)]
    assert not problems, problems
    export = resolve_export(storage.join(result["run_dir"], "export"))  # export/step_N, named by its pointer
    assert export is not None and storage.exists(storage.join(export, "model.safetensors")), export
    survived = job.returncode == 0
    record("S3 faults on a training run's clip reads + checkpoint uploads (workers through the proxy)",
           Injected.counted(proxy.injected_total(), by="the S3 proxy"), survived, measured,
           f"{n_split} clips x {EPOCHS} epochs, 2 workers, shuffle: {on_clips} faults on clip reads, {on_ckpt} on "
           f"checkpoint uploads; {len(registered)} registered checkpoints all load; {result['bad']} counted bad; "
           "the steps lost are the worker kill's (next row), the S3 faults cost none")
    record("training worker SIGKILL mid-epoch, same run (several blocks, 2 workers, shuffle)",
           Injected.of(killed, "training workers killed"), survived, measured,
           f"resumed from step {resumed} of {STEPS_PER_EPOCH} in the epoch; every clip of each epoch trained exactly "
           "once (the resumed epoch left out the clips already trained)")
