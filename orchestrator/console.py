"""What a person sees on the console: our own story at INFO, Ray's internals only with ``--verbose``,
one progress line per logged training step, a summary at the end.

- :func:`configure_logging` sets the driver's logging (``--verbose``: everything at DEBUG/INFO).
- :func:`ray_init_options` is what :func:`orchestrator.ray_env.ensure_ray` passes to ``ray.init``: a
  worker setup hook (:func:`quiet_ray_internals`) that puts Ray's loggers at WARNING in every Ray
  process of the job and the few that repeat harmless warnings many times per run at ERROR, and
  Ray Data's own logging configuration with its console at WARNING (``ray_data_logging.yaml``),
  MLflow's logging level at WARNING (``MLFLOW_LOGGING_LEVEL``), and the loggers Ray names by file
  path (Ray Train's per-report "Reporting training result" lines) at WARNING;
  :func:`train_logging_config` is Ray Train's ``LoggingConfig`` at WARNING.  Warnings that matter (bad clips, resumes, worker
  failures and retries) are WARNING or above in our loggers and Ray Train's, and always shown.
- :class:`Progress` prints ``step 40/200  loss 5.123 (itc 1.90 ...)  35.2 samples/s  data wait
  12%  ETA 2m10s`` in the driver for every metrics report of the run, fed by a Ray Train
  callback on the controller through a Ray queue (no worker output parsing), and warns once per
  modality when the contrastive embeddings have collapsed (:class:`CollapseWatch`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("orchestrator")

VERBOSE_ENV = "MPLUG2_VERBOSE"
# Ray loggers that repeat a harmless warning many times per run on a local Ray without a dashboard
# (the placement-group cleaner polls the state API every second and warns on each miss).
NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                     # "Progress bars disabled ..." once in every process that runs a dataset
                     "ray.data._internal.progress")
# Ray modules that log under their file path (``logging.getLogger(__file__)``), outside the "ray"
# logger tree, so neither the "ray" level nor Ray Train's ``LoggingConfig`` reaches them: Ray Train's
# worker context logs "Reporting training result ..." at INFO for every report of every worker, and
# the worker's root logger (set to INFO by Ray Train) prints it.  Relative to the ray package.
RAY_FILE_LOGGERS = (("train", "v2", "_internal", "execution", "context.py"),
                    ("train", "collective", "collectives.py"))
LOSS_ORDER = ("loss", "itc", "itm", "mlm", "lm")
# Mean pairwise cosine of a batch's contrastive embeddings (the ``text_cos`` / ``video_cos`` that
# model.objectives.contrastive_diagnostics logs) above which, after the warm-up, they count as collapsed:
# every text (video) maps to about the same point and nothing can be retrieved.  The tiny model starts
# at 0.94-0.98 and, learning, falls to 0.0-0.5 within a few hundred steps on the synthetic data.
COLLAPSE_COS = 0.9
COLLAPSE_KEYS = {"text_cos": "text", "video_cos": "video"}
# Ray Data's own logging configuration: its default with the console at WARNING.
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
MLFLOW_LOGGING_ENV = "MLFLOW_LOGGING_LEVEL"
RAY_DATA_LOGGING_QUIET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_logging(is_verbose: bool) -> None:
    """Driver logging; ``is_verbose`` is exported so Ray processes of this run follow it."""
    if is_verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.DEBUG if is_verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if is_verbose
                        else "%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)  # an imported library may have configured the root logger already
    if not is_verbose:
        os.environ.setdefault(RAY_DATA_LOGGING_ENV, RAY_DATA_LOGGING_QUIET)
    for name in ("ray", "mlflow", "alembic", "urllib3", "botocore", "filelock", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.DEBUG if is_verbose else logging.WARNING)
    for name in NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if is_verbose else logging.ERROR)


def ray_file_logger_names() -> list[str]:
    """The names of :data:`RAY_FILE_LOGGERS` in the installed ray (found without importing Ray Train)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return []
    root = os.path.dirname(os.path.abspath(spec.origin))
    return [os.path.join(root, *parts) for parts in RAY_FILE_LOGGERS]


def quiet_ray_internals() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker and actor process of the job.

    Levels are set on the loggers themselves, so Ray Train's later ``dictConfig`` of the worker
    (root logger at INFO, ``disable_existing_loggers=False``) keeps them."""
    if not verbose():
        logging.getLogger("ray").setLevel(logging.WARNING)
        for name in NOISY_RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for name in ray_file_logger_names():
            logging.getLogger(name).setLevel(logging.WARNING)


def ray_init_options() -> dict[str, Any]:

    env = {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "")}
    if not verbose():
        env[RAY_DATA_LOGGING_ENV] = RAY_DATA_LOGGING_QUIET
        # MLflow sets its own logger's level when it is imported (INFO unless this says otherwise):
        # rank 0's "Started monitoring system metrics" and friends
        env[MLFLOW_LOGGING_ENV] = "WARNING"
    # (not ray.LoggingConfig: it also sets the driver's root logger, which would hide our own story)
    return {"logging_level": logging.INFO if verbose() else logging.WARNING,  # the driver's "ray" logger
            "runtime_env": {"worker_process_setup_hook": "orchestrator.console.quiet_ray_internals", "env_vars": env}}


def train_logging_config():
    """Ray Train's own console level (its controller and workers): WARNING unless verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_progress(metrics: dict[str, Any], max_steps: int, eta_s: float | None) -> str:
    """One line: step/max, the losses (total first), samples/s, data wait, ETA."""
    step = int(metrics.get("step", 0))
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}"]
    losses = [k for k in LOSS_ORDER if k in metrics] + sorted(
        k for k in metrics if k not in LOSS_ORDER and (k.endswith("loss") or k.startswith("loss_")))
    if losses:
        total = f"loss {metrics[losses[0]]:.4f}" if losses[0] == "loss" else ""
        rest = " ".join(f"{k} {metrics[k]:.3f}" for k in losses if k != "loss")
        parts.append(f"{total} ({rest})" if total and rest else total or rest)
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    if "data_wait_frac" in metrics:
        parts.append(f"data wait {100 * metrics['data_wait_frac']:.0f}%")
    evals = [f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("eval/") and isinstance(v, float)]
    if evals:
        parts.append(" ".join(evals))
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class CollapseWatch:
    """Warns once per modality when a report past the warm-up has its mean pairwise embedding
    cosine (``text_cos`` / ``video_cos``) above ``threshold``; returns the warnings it gives."""

    def __init__(self, warmup_steps: int, threshold: float = COLLAPSE_COS, warn=log.warning) -> None:
        self.warmup_steps, self.threshold, self.warn = warmup_steps, threshold, warn
        self.warned: set[str] = set()

    def check(self, metrics: dict[str, Any], run_name: str = "") -> list[str]:
        step = int(metrics.get("step", 0))
        if step <= self.warmup_steps:
            return []
        given = []
        for key, what in COLLAPSE_KEYS.items():
            value = metrics.get(key)
            if what in self.warned or not isinstance(value, (int, float)) or value <= self.threshold:
                continue
            self.warned.add(what)
            msg = (f"{run_name + ': ' if run_name else ''}the {what} embeddings have collapsed at step {step}: mean "
                   f"cosine between the batch's {what}s {value:.3f} > {self.threshold} after the warm-up "
                   f"({self.warmup_steps} steps), so retrieval cannot tell them apart; check train.lr and "
                   "train.warmup_steps, the positives (task.positives) and the data (shown once)")
            self.warn(msg)
            given.append(msg)
        return given


class Progress:
    """Driver side: a thread that prints each report the controller callback forwards, and the
    collapse warnings of :class:`CollapseWatch`."""

    def __init__(self, run_name: str, max_steps: int, printer=print, warmup_steps: int = 0, warn=log.warning):
        from ray.util.queue import Queue

        self.run_name, self.max_steps, self.printer = run_name, max_steps, printer
        self.collapse = CollapseWatch(warmup_steps, warn=warn)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.last: dict[str, Any] = {}
        self._first: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.started = time.time()

    def callback(self):
        return _ProgressCallback(self.queue)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        try:
            self.queue.shutdown()
        except Exception:  # Ray may already be going down
            pass

    def eta(self, step: int) -> float | None:
        now = time.time()
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if step <= s0:
            return None
        return (now - t0) / (step - s0) * max(0, self.max_steps - step)

    def show(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        self.last = metrics
        self.printer(f"{self.run_name}: {format_progress(metrics, self.max_steps, self.eta(step))}")
        self.collapse.check(metrics, self.run_name)

    def _drain(self) -> None:
        while True:
            try:
                self.show(self.queue.get_nowait())
            except Exception:  # Empty, or the queue is gone
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.show(self.queue.get(timeout=1))
            except Exception:  # Empty (timeout): look at the stop flag again
                continue


def _progress_callback_cls():
    from ray.train import UserCallback

    class ProgressCallback(UserCallback):
        """Controller side: forward rank 0's metrics of every report to the driver's queue."""

        def __init__(self, queue) -> None:
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0]:
                try:
                    self.queue.put_nowait({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))})
                except Exception:  # a full or closed queue never stops training
                    pass

    return ProgressCallback


def _ProgressCallback(queue):  # built lazily so importing this module never imports Ray
    return _progress_callback_cls()(queue)


def summary(run_name: str, metrics: dict[str, Any], max_steps: int, elapsed_s: float, checkpoint: str | None,
            export: str | None, mlflow_run_id: str | None) -> str:
    lines = [f"{run_name}: finished step {int(metrics.get('step', 0))}/{max_steps} in {format_duration(elapsed_s)}"]
    losses = {k: v for k, v in metrics.items() if k in LOSS_ORDER}
    if losses:
        lines.append("  last losses: " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    for label, value in (("checkpoint", checkpoint), ("export", export), ("MLflow run", mlflow_run_id)):
        if value:
            lines.append(f"  {label}: {value}")
    return "\n".join(lines)
