"""Metric delivery (issue 17, item 6): MetricLogger.close() drains until its deadline and reports
honestly what was not delivered (a chunk in flight included); a point the server refuses is split
out, dropped and counted, never blocking the points after it; an MLflow outage that spans the
close, against a real ``mlflow server`` that is stopped and started."""
from __future__ import annotations

import threading
import time

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from orchestrator.tracking import mlflow_run


class Recording:
    """A client that keeps what it was sent; refuses batches holding a key named ``bad*`` (as a
    server refuses an invalid metric), or blocks each call until ``gate`` opens."""

    def __init__(self, gate: threading.Event | None = None):
        self.points, self.calls, self.gate = [], 0, gate

    def log_batch(self, run_id, metrics):
        self.calls += 1
        if self.gate is not None and not self.gate.wait(30):
            raise ConnectionError("no answer")
        if any(m.key.startswith("bad") for m in metrics):
            raise MlflowException("Invalid metric name", error_code=INVALID_PARAMETER_VALUE)
        self.points.extend(metrics)


def _logger(fake, **kw) -> mlflow_run.MetricLogger:
    logger = mlflow_run.MetricLogger("http://127.0.0.1:9", "run", flush_every_s=3600, **kw)
    logger._client = fake
    return logger


def test_a_refused_point_is_split_out_counted_and_does_not_block_later_points():
    fake = Recording()
    logger = _logger(fake, max_batch=8)
    for step in range(20):
        logger.log({"loss": float(step), **({"bad metric!": 1.0} if step == 5 else {})}, step)
    assert logger.flush() is True  # refused points are not retried forever
    for step in range(20, 25):  # later points go through
        logger.log({"loss": float(step)}, step)
    stats = logger.close(timeout_s=10)
    assert stats == {"sent": 25, "undelivered": 0, "dropped": 0, "rejected": 1, "failed_flushes": 0}
    assert sorted(m.step for m in fake.points) == list(range(25))


def test_close_counts_a_chunk_still_in_flight_at_the_deadline():
    gate = threading.Event()  # the server never answers before the deadline
    fake = Recording(gate)
    logger = _logger(fake, max_batch=4)
    for step in range(10):
        logger.log({"loss": float(step)}, step)
    stats = logger.close(timeout_s=2)
    assert stats["undelivered"] == 10 and stats["sent"] == 0, stats  # not 0 while a chunk is in flight
    gate.set()


def test_an_outage_through_the_close_is_drained_when_the_server_returns():
    class Flaky(Recording):
        down_until = time.time() + 3

        def log_batch(self, run_id, metrics):
            if time.time() < self.down_until:
                self.calls += 1
                raise MlflowException("API request to http://x failed with exception ConnectionError")
            super().log_batch(run_id, metrics)

    fake = Flaky()
    logger = _logger(fake)
    for step in range(50):
        logger.log({"loss": float(step)}, step)
    stats = logger.close(timeout_s=30)
    assert stats["undelivered"] == 0 and stats["sent"] == 50 and stats["failed_flushes"] >= 1, stats
    assert fake.calls > 1


@pytest.mark.slow
def test_a_real_mlflow_outage_spanning_the_close(tmp_path, monkeypatch, mlflow_db_template):
    """Points logged before and during an outage; the close starts while the server is down. Comes back
    in time: every point is in the server and 0 undelivered. Stays down: 'undelivered' is exactly
    what the server lacks once it is up again."""
    from mlflow.tracking import MlflowClient

    from orchestrator.devtools.faults.report import Injected, Measured, record
    from tests.conftest import free_port
    from tests.reliability.helpers import MlflowServer

    server = MlflowServer(tmp_path, free_port(), mlflow_db_template)
    server.start()
    try:
        c = MlflowClient(server.uri)
        outages, delivered_as_reported = [], []
        for name, back_after_s, timeout_s in (("back", 4.0, 300.0), ("gone", None, 4.0)):
            run_id = mlflow_run.open_run(server.uri, "delivery", name, {}, {})
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the logger's retry is under test
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            logger = mlflow_run.MetricLogger(server.uri, run_id, flush_every_s=0.5)
            for step in range(1, 11):
                logger.log({"loss": float(step)}, step)
            time.sleep(1.5)  # delivered by the sender thread
            server.stop()
            outages.append(name)
            for step in range(11, 31):
                logger.log({"loss": float(step)}, step)
            restart = threading.Timer(back_after_s, server.start) if back_after_s else None
            if restart:
                restart.start()
            stats = logger.close(timeout_s=timeout_s)
            if restart:
                restart.join()
            else:
                server.start()
            monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # the check itself: MLflow's own retries
            monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
            got = sorted(m.step for m in c.get_metric_history(run_id, "loss"))
            if back_after_s:
                assert stats["undelivered"] == 0 and got == list(range(1, 31)), (stats, got)
            else:
                assert stats["undelivered"] == 30 - len(got) and stats["undelivered"] >= 20, (stats, got)
            assert stats["failed_flushes"] >= 1
            delivered_as_reported.append(stats["undelivered"] == 30 - len(got))
        record("MLflow down through the close of the metric logger", Injected.of(outages, "server outages"),
               all(delivered_as_reported),
               Measured.not_a_run("a metric logger in the test process, points counted on the server"),
               "back in time: 30/30 points delivered; down for good: undelivered = points missing from the server")
    finally:
        server.stop()


def test_pending_points_travel_with_a_checkpoint_and_are_stored_once(tmp_path, mlflow_uri):
    """Rank 0's undelivered points (in flight and buffered) go into the checkpoint folder; a new
    logger sends them first; points already delivered are stored once, not twice."""
    gate = threading.Event()
    logger = _logger(Recording(gate), max_batch=4)
    for step in range(1, 11):
        logger.log({"loss": float(step)}, step)
    sender = threading.Thread(target=logger.flush)
    sender.start()  # the first chunk is now in flight, never answered
    deadline = time.time() + 10
    while not logger._inflight and time.time() < deadline:
        time.sleep(0.01)
    logger.log({"loss": 11.0}, 11)
    points = logger.pending()
    assert [p["step"] for p in points] == list(range(1, 12))  # in flight first, then the buffer
    mlflow_run.write_pending(str(tmp_path), points)
    gate.set()
    sender.join(10)

    c = mlflow_run.client(mlflow_uri)
    run_id = c.create_run(c.create_experiment("pending")).info.run_id
    c.log_batch(run_id, metrics=[Metric(p["key"], p["value"], p["timestamp"], p["step"])
                                 for p in points[:3]])  # delivered after all, before the rank died
    resumed = mlflow_run.MetricLogger(mlflow_uri, run_id, flush_every_s=3600)
    resumed.requeue(mlflow_run.read_pending(str(tmp_path)))
    resumed.log({"loss": 12.0}, 12)
    assert resumed.close(timeout_s=30)["undelivered"] == 0
    history = c.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 13))  # each step once


@pytest.mark.parametrize("content", ['{"not": "a list"}', '[{"key": 5, "value": 1, "timestamp": 1, "step": 1}]',
                                     '[{"key": "loss"}]', "not json", '[{"key": "x", "value": "inf", '
                                     '"timestamp": 1, "step": 1}]'])
def test_pending_points_from_storage_are_untrusted(tmp_path, content, caplog):
    (tmp_path / mlflow_run.PENDING_FILE).write_text(content)
    assert mlflow_run.read_pending(str(tmp_path)) == []
    assert "not read" in caplog.text
    assert mlflow_run.read_pending(str(tmp_path / "none")) == []


def test_a_wake_up_sends_once_and_the_sender_then_sleeps():
    """The sender thread once spun on a wake-up event it never cleared (a core of rank 0 burnt)."""
    fake = Recording()
    logger = _logger(fake)
    flushes = []
    real_flush = logger.flush
    logger.flush = lambda: flushes.append(1) or real_flush()
    logger.requeue([{"key": "loss", "value": 1.0, "timestamp": 1, "step": 1}])
    time.sleep(1.0)
    assert [m.step for m in fake.points] == [1]
    assert len(flushes) <= 2, f"{len(flushes)} flushes in 1 s with flush_every_s=3600: the sender spins"
    logger.requeue([])  # nothing to send: no wake-up
    time.sleep(0.3)
    assert len(flushes) <= 2
    assert logger.close(timeout_s=5)["undelivered"] == 0
