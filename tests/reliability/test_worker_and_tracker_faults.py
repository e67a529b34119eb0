"""Training workers SIGKILLed mid-run and the MLflow server gone for a while, in one run.

- A worker killed while the asynchronous upload of a checkpoint is in flight (its files in storage,
  no completion marker yet; issue 32, part 5), after an earlier one (issue 9, item 1): the run
  resumes from the newest complete checkpoint at the kill, not the one in flight, and the final
  model equals the one trained without faults on the same data order: the loop skips the batches
  of the current epoch it already trained on (``epoch_batches`` in the checkpoint).
- The MLflow server goes away mid-run and comes back (issue 9, item 4), and rank 0 (the only sender
  of metrics) is killed while it is away, holding undelivered points (issue 17, item 6): every
  step's metrics reach MLflow.
- Secrets in the environment and in config values never reach MLflow params, tags, metric keys,
  artifacts or the job's logs (item 7).

The two kills are the two worker faults of the run; the final weights are compared with a
fault-free run of the same config (one block, one worker: the same data order)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.devtools.faults.report import Injected, Measured, record
from orchestrator.train.checkpoint import META
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal
from tests.conftest import free_port
from tests.reliability.helpers import (
    MlflowServer,
    checkpoint_steps,
    registered_checkpoints,
    toy_cfg,
    toy_datasets,
    train_workers,
)
from tests.reliability.slow_toy import read_trace

pytestmark = pytest.mark.slow
SECRET = "tok-9f8e7d6c5b4a-DO-NOT-LOG"
MAX_STEPS = 30         # 64 rows / batch 4 = 16 steps per epoch: the run crosses an epoch boundary
EVERY = 5
FIRST_KILL_AFTER = 5   # a worker, past this checkpoint, during the upload of the next one (before the outage)
OUTAGE_AFTER = 10      # the MLflow server goes away once this checkpoint is complete ...
SECOND_KILL_AT = 20    # ... and rank 0 is killed once this one is registered, while it is away
OUTAGE_S = 12


def _all_text_of_run(c, run_id: str, root: Path) -> str:
    run = c.get_run(run_id)
    parts = [str(run.data.params), str(run.data.tags), str(list(run.data.metrics))]
    for f in (root / "artifacts").rglob("*"):
        if f.is_file():
            parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from orchestrator.train.weights import state_dict_from

    return state_dict_from(uri)


def _cfg(root: Path, tracking: str | None, name: str, trace: str, sleep_s: float = 0.0, **over):
    return toy_cfg(str(root / name), tracking, name, trace, sleep_s=sleep_s,
                   **{"train.max_steps": MAX_STEPS, "train.checkpoint_every": EVERY, **over})


def test_workers_killed_and_mlflow_away_mid_run(ray_local, tmp_path, monkeypatch, capfd, mlflow_db_template):
    from mlflow.tracking import MlflowClient

    from orchestrator.trainer.driver import run_training

    ref_trace, trace = str(tmp_path / "ref.jsonl"), str(tmp_path / "faulted.jsonl")
    ref = run_training(_cfg(tmp_path, None, "ref", ref_trace), datasets=toy_datasets())
    assert ref.metrics["step"] == MAX_STEPS

    monkeypatch.setenv("MPLUG2_TEST_API_TOKEN", SECRET)  # a secret-named variable: redacted by value
    monkeypatch.setenv(STEP_JOURNAL, str(tmp_path / "journal"))
    server = MlflowServer(tmp_path, free_port(), mlflow_db_template)
    server.start()
    try:
        cfg = _cfg(tmp_path, server.uri, "faulted", trace, sleep_s=0.15, **{"data.root": f"s3://b/{SECRET}"})
        run_dir = str(tmp_path / "faulted" / cfg.experiment_name() / "faulted")
        killed: list[dict] = []
        outages: list[float] = []
        times: dict[str, float] = {}

        def registered(step: int) -> bool:
            try:
                return any(u.endswith(f"checkpoint_step_{step:08d}") for u in registered_checkpoints(run_dir))
            except FileNotFoundError:
                return False

        def complete(step: int) -> bool:
            return (Path(run_dir) / f"checkpoint_step_{step:08d}" / META).is_file()

        def kill_one(**note) -> None:
            workers = [w for w in train_workers() if w.pid not in {k["pid"] for k in killed}]
            if workers:
                workers[0].kill()
                killed.append({"pid": workers[0].pid, "trace_len": len(read_trace(trace)),
                               "complete": [s for s in checkpoint_steps(run_dir) if complete(s)], **note})

        def faults():
            deadline = time.time() + 300
            while time.time() < deadline and not complete(FIRST_KILL_AFTER):
                time.sleep(0.05)
            # the next checkpoint's upload in flight: its files in storage, its marker not yet (the
            # marker follows at the first step boundary after the upload: 0.15 s of sleep or more)
            while time.time() < deadline and not (OUTAGE_AFTER in checkpoint_steps(run_dir)
                                                  and any((Path(run_dir) / f"checkpoint_step_{OUTAGE_AFTER:08d}")
                                                          .rglob("*.pt"))):
                time.sleep(0.005)
            kill_one(after_ckpt=FIRST_KILL_AFTER)
            while time.time() < deadline and not complete(OUTAGE_AFTER):
                time.sleep(0.1)
            times["down_at"] = time.time()
            outages.append(times["down_at"])
            server.stop()
            # rank 0 dies holding the points it could not send since the outage began: the checkpoint
            # of SECOND_KILL_AT carries them, and the resumed rank 0 sends them once the server is back
            while time.time() < deadline and not registered(SECOND_KILL_AT):
                time.sleep(0.05)
            kill_one(after_ckpt=SECOND_KILL_AT)
            times["killed_at"] = time.time()
            time.sleep(max(0.0, times["down_at"] + OUTAGE_S - time.time()))
            server.start()
            times["up_at"] = time.time()

        t = threading.Thread(target=faults, daemon=True)
        t.start()
        out = run_training(cfg, datasets=toy_datasets())
        t.join(timeout=180)
        assert "up_at" in times, "the outage never happened"
        assert len(killed) == 2, killed
        assert times["killed_at"] < times["up_at"], ("rank 0 was not killed during the outage", times)
        assert out.metrics["step"] == MAX_STEPS

        c = MlflowClient(server.uri)
        run = c.get_run(out.mlflow_run_id)
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in c.get_metric_history(run.info.run_id, "loss")})
        assert steps == list(range(1, MAX_STEPS + 1)), f"missing steps: {set(range(1, MAX_STEPS + 1)) - set(steps)}"
        assert run.data.tags["mplug2.checkpoint_uri"].endswith(f"checkpoint_step_{MAX_STEPS:08d}")
        resumed = sorted(int(m.value) for m in c.get_metric_history(run.info.run_id, "resumed_from_step"))
        # each resume is from the newest checkpoint complete when its worker died: never one whose
        # upload was in flight (the first kill's: files in storage, no marker)
        assert resumed == [max(k["complete"]) for k in killed], (resumed, killed)
        assert OUTAGE_AFTER not in killed[0]["complete"], ("the first kill missed the upload of checkpoint "
                                                           f"{OUTAGE_AFTER}", killed)
        assert resumed == [FIRST_KILL_AFTER, SECOND_KILL_AT], resumed

        # Steps lost: batches trained on beyond the configured steps (the work after each last checkpoint).
        ref_fps, fps = read_trace(ref_trace), read_trace(trace)
        assert len(ref_fps) == MAX_STEPS
        steps_lost = len(fps) - MAX_STEPS
        # each kill loses at most the steps since the last complete checkpoint, and a checkpoint is
        # complete one step after it is taken (its marker follows the upload at a step boundary)
        assert 0 < steps_lost <= 2 * (EVERY + 1), steps_lost
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
        finished = run.info.status == "FINISHED"
        record("training worker SIGKILL (2 per run; one during an async checkpoint upload)", Injected.of(killed, "workers SIGKILLed"),
               finished, measured,
               f"resumed from steps {resumed} (the first kill during the async upload of checkpoint "
               f"{OUTAGE_AFTER}: skipped, no marker); final weights vs fault-free run: max |diff| {diff:.1e}, "
               f"relative L2 {rel:.1e} ({'same' if same_order else 'different'} batch order)")
        record(f"MLflow server down {OUTAGE_S} s mid-run; rank 0 killed during it (the same run)",
               Injected.of(outages + killed[1:], "server outages and rank-0 kills"), finished, measured,
               f"all {MAX_STEPS} steps' metrics delivered after it came back (the dead rank 0's undelivered points "
               "carried by its last checkpoint); run FINISHED")

        # Secrets: the env secret, the S3 secret key, and a secret inside a config value.
        text = _all_text_of_run(c, run.info.run_id, tmp_path)
        logs = capfd.readouterr()
        logs_text = logs.out + logs.err + "".join(f.read_text(errors="replace") for f in tmp_path.glob("server.log"))
        planted = (SECRET, "testing-secret-never-logged")
        for secret in planted:
            assert secret not in text, f"{secret!r} reached MLflow"
            assert secret not in logs_text, f"{secret!r} reached the job logs"
        assert run.data.params["data.root"] == "s3://b/***"
        record("secrets in env/config searched in MLflow + logs", Injected.of(planted, "secrets planted"),
               not any(s in text or s in logs_text for s in planted),
               Measured.not_a_run("a search of the outage run's MLflow records and logs"),
               "params, tags, metric keys, artifacts, driver/worker/server logs: 0 hits")
    finally:
        server.stop()
