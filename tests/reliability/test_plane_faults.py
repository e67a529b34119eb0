"""S3 faults during a real training run (issue 17, item 2): a run on the real data plane (several
blocks, two workers, shuffle on) whose Ray workers, not just the test process, reach S3 through
the fault-injecting proxy: 503 SlowDown, connection resets, truncated bodies and timeouts on the
clip reads and on the checkpoint uploads.  The run finishes; every clip of every epoch is trained
or counted bad (measured from the run's step journal); every registered checkpoint is complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
)

pytestmark = pytest.mark.slow
N, WORKERS, BATCH = 32, 2, 4          # 4 steps per epoch, no remainder dropped
EPOCHS = 2
# every kind of fault on object reads (GET: clips, annotation, checkpoint restores) and writes (PUT:
# checkpoint uploads); the delay (4 s) is longer than the job's S3 timeout (2 s): a timeout, retried
FAULTS = FaultSpec(slowdown=0.12, reset=0.08, truncate=0.08, delay=0.04, delay_s=4.0)


def test_training_run_through_s3_faults_loses_nothing(s3_server, s3_bucket, tmp_path):
    data = f"{s3_bucket}/data"
    coco_images(data, N)                               # written directly, before any fault
    n_split = split_size(data)
    journal = str(tmp_path / "journal")
    spec = {"name": "s3faults", "storage": f"{s3_bucket}/store", "data_root": data, "steps": EPOCHS * N // (WORKERS * BATCH),
            "workers": WORKERS, "batch": BATCH, "checkpoint_every": 2, "trace": str(tmp_path / "trace.jsonl")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with S3FaultProxy(s3_server.endpoint, {"get": FAULTS, "put": FAULTS}, seed=17, max_consecutive=3) as proxy:
        env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": proxy.endpoint, STEP_JOURNAL: journal,
               "MPLUG2_S3_READ_TIMEOUT_S": "2"}
        env.pop("RAY_ADDRESS", None)
        job = subprocess.run([sys.executable, "-m", "tests.reliability.plane_job", str(tmp_path / "spec.json")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        stats = proxy.stats()
        on_clips = proxy.injected_where("/data/imgs/", "get")
        on_ckpt = proxy.injected_where("/checkpoint_step_", "put")
        fault_kinds = {f for _, p, f in proxy.log if f}
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    result = last_json(job.stdout, "result_step")
    assert result["result_step"] == spec["steps"], result
    # the workers' own requests met the faults: clip reads (Ray Data tasks) and checkpoint uploads (Train workers)
    assert on_clips > 0 and on_ckpt > 0, stats
    assert fault_kinds == {"slowdown", "reset", "truncate", "delay"}, stats

    measured = Measured.from_journal(read_journal(journal), split_size=n_split, bad=result["bad"], epochs=EPOCHS)
    assert measured.evidence["ranks"] == WORKERS, measured
    assert measured.clips_lost == 0, measured           # every clip of every epoch trained or counted bad
    assert measured.steps_lost == 0, measured           # retried in place: no restart, nothing recomputed

    registered = registered_checkpoints(result["run_dir"])
    assert registered, "no checkpoint registered"
    problems = [p for uri in registered for p in checkpoint_problems(uri)]
    assert not problems, problems
    export = resolve_export(storage.join(result["run_dir"], "export"))  # export/step_N, named by its pointer
    assert export is not None and storage.exists(storage.join(export, "model.safetensors")), export
    record("S3 faults on a training run's clip reads + checkpoint uploads (workers through the proxy)",
           Injected.counted(proxy.injected_total(), by="the S3 proxy"), job.returncode == 0, measured,
           f"{n_split} clips x {EPOCHS} epochs, 2 workers, shuffle: {on_clips} faults on clip reads, {on_ckpt} on "
           f"checkpoint uploads; {len(registered)} registered checkpoints all load; {result['bad']} counted bad")
