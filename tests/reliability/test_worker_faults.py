"""A training worker SIGKILLed at random steps, several times in one run (issue 9, item 1).

The run finishes the configured steps, each restart resumes from the latest reported checkpoint,
and the final model equals the one trained without faults on the same data order: the loop skips
the batches of the current epoch it already trained on (``epoch_batches`` in the checkpoint).
"""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from orchestrator.devtools.faults.report import Injected, Measured, record
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal
from tests.reliability.helpers import checkpoint_steps, toy_cfg, toy_datasets, train_workers
from tests.reliability.slow_toy import read_trace

pytestmark = pytest.mark.slow
MAX_STEPS = 24       # 64 rows / batch 4 = 16 steps per epoch: the run crosses an epoch boundary
KILL_AFTER = (4, 12)  # kill once after each of these checkpoints, at a random later step


def _weights(export_uri: str) -> dict[str, torch.Tensor]:
    from orchestrator.train.weights import state_dict_from

    return state_dict_from(export_uri)


def test_worker_killed_twice_resumes_and_matches_fault_free_run(ray_local, tmp_path, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.trainer.driver import run_training

    ref_trace, trace = str(tmp_path / "ref.jsonl"), str(tmp_path / "faulted.jsonl")
    ref = run_training(toy_cfg(str(tmp_path / "ref"), None, "ref", ref_trace), datasets=toy_datasets())
    assert ref.metrics["step"] == MAX_STEPS

    cfg = toy_cfg(str(tmp_path / "faulted"), mlflow_uri, "faulted", trace, sleep_s=0.15)
    run_dir = str(tmp_path / "faulted" / cfg.experiment_name() / "faulted")
    rng = random.Random(9)
    killed: list[dict] = []

    def killer():
        for after in KILL_AFTER:
            extra = rng.randint(1, 3)  # steps past the checkpoint: work that will be redone
            deadline = time.time() + 300
            while time.time() < deadline:
                if checkpoint_steps(run_dir) and max(checkpoint_steps(run_dir)) >= after:
                    n0 = len(read_trace(trace))
                    while len(read_trace(trace)) < n0 + extra and time.time() < deadline:
                        time.sleep(0.05)
                    workers = [w for w in train_workers() if w.pid not in {k["pid"] for k in killed}]
                    if workers:
                        workers[0].kill()
                        killed.append({"pid": workers[0].pid, "after_ckpt": after, "trace_len": len(read_trace(trace))})
                        break
                time.sleep(0.1)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    monkeypatch.setenv(STEP_JOURNAL, str(tmp_path / "journal"))
    out = run_training(cfg, datasets=toy_datasets())
    watcher.join(timeout=10)

    assert len(killed) == len(KILL_AFTER), killed
    assert out.metrics["step"] == MAX_STEPS
    c = MlflowClient(mlflow_uri)
    run = c.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    resumed = sorted(int(m.value) for m in c.get_metric_history(run.info.run_id, "resumed_from_step"))
    assert resumed == [4, 12] or (len(resumed) == 2 and resumed[0] >= 4 and resumed[1] >= 12), resumed

    # Steps lost: batches trained on beyond the configured steps (the work after each last checkpoint).
    ref_fps, fps = read_trace(ref_trace), read_trace(trace)
    assert len(ref_fps) == MAX_STEPS
    steps_lost = len(fps) - MAX_STEPS
    assert 0 < steps_lost <= 2 * 4  # each kill loses at most the steps since the last checkpoint
    # The batches that count: before each kill, only those up to the checkpoint it resumed from.
    effective, start = [], 0
    for k, r in zip(killed, resumed):
        effective += fps[start:k["trace_len"]][: r - len(effective)]
        start = k["trace_len"]
    effective += fps[start:]
    same_order = effective == ref_fps

    a, b = _weights(ref.checkpoint_uri), _weights(out.checkpoint_uri)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    rel = float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((a[k] ** 2).sum() for k in a) ** 0.5)
    if same_order:
        assert diff <= 1e-6, f"same data order, yet the final weights differ from the fault-free run by {diff}"
    else:  # Ray Data delivered a different batch order after a restart: bounded, not equal
        assert rel < 0.05, f"final weights {rel:.2%} away from the fault-free run (data order differed)"
    measured = Measured.from_journal(read_journal(str(tmp_path / "journal")))
    # the trace counts every micro-batch started, the journal every optimizer step completed: a
    # kill lands between the two for at most one step per kill
    assert steps_lost - len(killed) <= measured.steps_lost <= steps_lost, (measured, steps_lost)
    assert measured.evidence["attempts"] == len(killed) + 1, measured
    record("training worker SIGKILL (2 per run, random steps)", Injected.of(killed, "workers SIGKILLed"),
           run.info.status == "FINISHED", measured,
           f"resumed from steps {resumed}; final weights vs fault-free run: max |diff| {diff:.1e}, "
           f"relative L2 {rel:.1e} ({'same' if same_order else 'different'} batch order)")
