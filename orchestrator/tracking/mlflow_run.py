"""MLflow for every run.

The driver opens (or, for a rerun of the same name, re-opens) the run, logs the flattened resolved
config as params, the config YAML as an artifact and the lineage/environment tags; rank 0 of the
training workers logs per-step metrics through :class:`MetricLogger`, which buffers and retries so
that a tracking server that goes away for a while costs no training time and loses no metrics.
Nothing is logged without passing through :mod:`orchestrator.tracking.redact`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.mappings import flatten
from orchestrator.tracking import lineage
from orchestrator.tracking.redact import redact, redact_text

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///demo_output/mlflow.db"
RUN_NAME_TAG = "mplug2.run_name"
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a local SQLite store (made absolute)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def get_or_create_experiment(c, name: str, tracking_uri: str | None = None) -> str:
    """The experiment's id, created (or restored) as a model-training experiment."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    else:
        try:
            exp_id = c.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name),
                                         tags={lineage.EXPERIMENT_KIND_TAG: lineage.EXPERIMENT_KIND})
        except Exception:  # created concurrently by another trial
            exp_id = c.get_experiment_by_name(name).experiment_id
    lineage.mark_training_experiment(c, exp_id)
    return exp_id


def _artifact_location(uri: str | None, experiment: str) -> str | None:
    """A SQLite store keeps its artifacts beside the database (not in ./mlruns of whatever the
    current directory is); servers and other stores decide for themselves."""
    if uri and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def find_run(c, experiment_id: str, run_name: str):
    runs = c.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                         max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_run(uri: str, experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None) -> str:
    """Create the MLflow run for ``run_name`` or re-open it (a rerun of the same name resumes).

    Logs flattened params (redacted), the resolved config YAML as an artifact and the tags.
    Returns the run id.
    """
    import yaml

    c = client(uri)
    exp_id = get_or_create_experiment(c, experiment, uri)
    existing = find_run(c, exp_id, run_name)
    safe_cfg = redact(config)
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name,
                **lineage.source_tags(tags.get("mplug2.git_commit") or git_commit()),
                **{k: str(v) for k, v in tags.items() if v is not None}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags = redact(all_tags)
    if existing is not None:
        run_id = existing.info.run_id
        c.update_run(run_id, status="RUNNING")
        for k, v in all_tags.items():
            c.set_tag(run_id, k, v)
        c.set_tag(run_id, "mplug2.resumed", "true")
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(safe_cfg).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    c.log_text(run_id, yaml.safe_dump(safe_cfg, sort_keys=False, allow_unicode=True), "config/resolved.yaml")
    return run_id


CLOSE_RETRY_S = float(os.environ.get("MPLUG2_MLFLOW_CLOSE_RETRY_S", "300"))


def retry_until(fn, what: str, budget_s: float, first_wait_s: float = 1.0):
    """``fn()``, retried with backoff (capped at 15 s) while it raises, for at most ``budget_s``;
    the last error is raised after that.  For the few MLflow calls a run cannot skip (closing it)."""
    deadline = time.time() + budget_s
    wait = first_wait_s
    while True:
        try:
            return fn()
        except Exception as e:  # the tracking server is away; decide below
            left = deadline - time.time()
            if left <= 0:
                raise
            log.warning("MLflow: %s failed (%s); retrying for up to %.0f s more", what, type(e).__name__, left)
            time.sleep(min(wait, left))
            wait = min(wait * 2, 15.0)


def close_run(uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, Any] | None = None,
              metrics: dict[str, float] | None = None, step: int | None = None,
              retry_s: float | None = None) -> None:
    """Set the end tags/metrics and the final status; a tracking server that is down at the end of a
    run is waited for (``retry_s``, default $MPLUG2_MLFLOW_CLOSE_RETRY_S = 300 s) before giving up."""
    budget = CLOSE_RETRY_S if retry_s is None else retry_s
    c = client(uri)
    safe_tags = {k: str(v) for k, v in redact(tags or {}).items()}
    if safe_tags:
        from mlflow.entities import RunTag

        retry_until(lambda: c.log_batch(run_id, tags=[RunTag(k, v) for k, v in safe_tags.items()]),
                    "setting end tags", budget)
    if metrics:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        retry_until(lambda: c.log_batch(run_id, metrics=batch), "logging end metrics", budget)
    retry_until(lambda: c.set_terminated(run_id, status=status), f"marking the run {status}", budget)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, redact_text(text), artifact_file)


class MetricLogger:
    """Buffered, retrying metric logging for the training loop (rank 0 only).

    ``log(metrics, step)`` only appends to a buffer; one background thread (the only sender) sends
    it with ``log_batch`` every ``flush_every_s`` seconds, in chunks of ``max_batch`` points.  When
    the server is unreachable (connection errors, 5xx, 429) the points are kept (up to
    ``max_buffer``; past that the oldest are dropped and counted in ``dropped``) and sent when it
    comes back, so training never waits for the tracker.  A chunk the server refuses (a 4xx: an
    invalid key or value) is split in halves until the refused points are alone; those are
    dropped and counted in ``rejected``, so one bad point never blocks the ones after it.
    ``close()`` lets the sender drain the buffer until its deadline and reports what was not
    confirmed delivered: the buffer plus any chunk still in flight.

    The points not yet confirmed (:meth:`pending`) travel with each checkpoint (:func:`write_pending`)
    and are sent again by the resumed rank 0 (:meth:`requeue`), so rank 0 dying with a full buffer
    loses none of the steps before its last checkpoint (the steps after it are trained and logged
    again).  A point re-sent after all is stored once: MLflow's store keeps one copy of identical
    (key, value, timestamp, step) points.
    """

    def __init__(self, uri: str, run_id: str, flush_every_s: float = 5.0, max_buffer: int = 200_000,
                 system_metrics: bool = False, max_batch: int = 1000):
        self.uri, self.run_id = uri, run_id
        self._system = lineage.start_system_metrics(uri, run_id) if system_metrics else None
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self.max_batch = max_batch
        self._buf: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self.dropped = 0          # buffer overflow (oldest first)
        self.rejected = 0         # refused by the server (4xx), after splitting down to single points
        self.failed_flushes = 0   # sends that found the server unreachable
        self.sent = 0
        self._inflight: list = []  # points the sender holds: neither confirmed nor back in the buffer
        self._client = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def pending(self) -> list[dict[str, Any]]:
        """Every point not yet confirmed delivered (in flight, then buffered), oldest first."""
        with self._lock:
            points = list(self._inflight) + list(self._buf)
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in points]

    def requeue(self, points: list[dict[str, Any]]) -> None:
        """Points of an earlier incarnation (:meth:`pending`), sent before anything logged since."""
        from mlflow.entities import Metric

        if not points:
            return
        with self._lock:
            self._buf[:0] = [Metric(p["key"], p["value"], p["timestamp"], p["step"]) for p in points]
        self._wake.set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._buf.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
            overflow = len(self._buf) - self.max_buffer
            if overflow > 0:
                del self._buf[:overflow]
                self.dropped += overflow

    @staticmethod
    def _refused(e: Exception) -> bool:
        """The server answered and refused the request (a 4xx other than 429): sending it again cannot help."""
        from mlflow.exceptions import MlflowException
        if not isinstance(e, MlflowException) or "failed with exception" in str(e):
            return False
        status = e.get_http_status_code()
        return 400 <= status < 500 and status != 429

    def _send(self, chunk: list) -> None:
        """Deliver ``chunk``; refused points are split out and counted; an unreachable server raises."""
        try:
            self._client.log_batch(self.run_id, metrics=chunk)
            self.sent += len(chunk)
        except Exception as e:  # sorted below
            if not self._refused(e):
                raise
            if len(chunk) == 1:
                self.rejected += 1
                log.error("MLflow refused metric %r at step %d (%s): dropped", chunk[0].key, chunk[0].step,
                          str(e)[:200])
                return
            half = len(chunk) // 2
            self._send(chunk[:half])
            self._send(chunk[half:])

    def flush(self) -> bool:
        """Send everything buffered; False when the server could not be reached (points kept).
        Called by the sender thread only (and by tests before it starts)."""
        with self._lock:
            batch, self._buf = self._buf, []
            self._inflight = batch
        if not batch:
            return True
        done = 0
        try:
            if self._client is None:
                self._client = client(self.uri)
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i:i + self.max_batch]
                self._send(chunk)
                done = i + len(chunk)
                with self._lock:
                    self._inflight = batch[done:]
            return True
        except Exception as e:  # keep training; retry later
            with self._lock:
                self._buf[:0] = batch[done:]
                self._inflight = []
            self.failed_flushes += 1
            log.warning("MLflow unreachable (%s); %d metric points buffered", type(e).__name__, len(self._buf))
            return False
        finally:
            with self._lock:
                self._inflight = []

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()  # a wake-up is one flush, not a spin
            if not self._closing.is_set():
                self.flush()
        wait = 0.5  # closing: drain until the buffer is empty or the deadline passes
        while True:
            if self.flush():
                with self._lock:
                    if not self._buf:
                        return
                continue
            left = self._deadline - time.time()
            if left <= 0:
                return
            time.sleep(min(wait, left))
            wait = min(wait * 2, 5.0)

    def close(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Drain for at most ``timeout_s``; returns ``sent``, ``undelivered`` (buffered or still in
        flight at the deadline), ``dropped`` (overflow), ``rejected`` (refused by the server) and
        ``failed_flushes``."""
        if self._system is not None:
            try:
                self._system.finish()
            except Exception as e:  # the run's own metrics matter more
                log.warning("MLflow system metrics did not stop cleanly: %s", type(e).__name__)
        self._deadline = time.time() + timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s + 1.0)
        with self._lock:
            undelivered = len(self._buf) + len(self._inflight)
        return {"sent": self.sent, "undelivered": undelivered, "dropped": self.dropped, "rejected": self.rejected,
                "failed_flushes": self.failed_flushes}


PENDING_FILE = "metrics_pending.json"


def write_pending(directory: str, points: list[dict[str, Any]]) -> None:
    """The logger's undelivered points into a checkpoint folder (rank 0's part of it)."""
    with open(os.path.join(directory, PENDING_FILE), "w") as f:
        json.dump(points, f)


def read_pending(directory: str, limit: int = 200_000) -> list[dict[str, Any]]:
    """The points a checkpoint carries ([] when none).  The file comes from storage: anything that is
    not a list of {key: str, value: number, timestamp: int, step: int} is refused with a warning
    (the run goes on; those points are the only loss), and at most ``limit`` points are taken."""
    path = os.path.join(directory, PENDING_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            raw = json.load(f)
        points = [{"key": p["key"], "value": float(p["value"]), "timestamp": int(p["timestamp"]),
                   "step": int(p["step"])} for p in raw[:limit]]
        if not all(isinstance(p["key"], str) and 0 < len(p["key"]) <= 250 and not math.isinf(p["value"])
                   for p in points):
            raise ValueError("a key that is not a short string, or an infinite value")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("checkpoint's undelivered metric points not read (%s: %s); they are lost",
                    type(e).__name__, str(e)[:200])
        return []
    return points


def log_table(uri: str, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """A list of row dicts as an MLflow table artifact (shown in the UI's artifact and eval views)."""
    columns: dict[str, list] = {}
    for r in rows:
        for k in r:
            columns.setdefault(k, [])
    for r in rows:
        for k, col in columns.items():
            col.append(redact(r.get(k)))
    client(uri).log_table(run_id, data=columns, artifact_file=artifact_file)
