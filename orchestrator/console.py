"""What a person sees on the console: our own story at INFO, Ray's internals only with ``--verbose``,
one progress line per logged training step, a summary at the end.

- :func:`configure_logging` sets the driver's logging (``--verbose``: everything at DEBUG/INFO).
- :func:`ray_init_options` is what :func:`orchestrator.ray_env.ensure_ray` passes to ``ray.init``: a
  worker setup hook (:func:`quiet_ray_internals`) that puts Ray's loggers at WARNING in every Ray
  process of the job and the few that repeat harmless warnings many times per run at ERROR, and
  Ray Data's own logging configuration with its console at WARNING (``ray_data_logging.yaml``);
  :func:`train_logging_config` is Ray Train's ``LoggingConfig`` at WARNING.  Warnings that matter (bad clips, resumes, worker
  failures and retries) are WARNING or above in our loggers and Ray Train's, and always shown.
- :class:`Progress` prints ``step 40/200  loss 5.123 (itc 1.90 ...)  35.2 samples/s  data wait
  12%  ETA 2m10s`` in the driver for every metrics report of the run, fed by a Ray Train
  callback on the controller through a Ray queue (no worker output parsing).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("orchestrator")

VERBOSE_ENV = "MPLUG2_VERBOSE"
# Ray loggers that repeat a harmless warning many times per run on a local Ray without a dashboard
# (the placement-group cleaner polls the state API every second and warns on each miss).
NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
LOSS_ORDER = ("loss", "itc", "itm", "mlm", "lm")
# Ray Data's own logging configuration: its default with the console at WARNING.
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
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


def quiet_ray_internals() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker and actor process of the job."""
    if not verbose():
        logging.getLogger("ray").setLevel(logging.WARNING)
        for name in NOISY_RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def ray_init_options() -> dict[str, Any]:

    env = {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "")}
    if not verbose():
        env[RAY_DATA_LOGGING_ENV] = RAY_DATA_LOGGING_QUIET
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


class Progress:
    """Driver side: a thread that prints each report the controller callback forwards."""

    def __init__(self, run_name: str, max_steps: int, printer=print):
        from ray.util.queue import Queue

        self.run_name, self.max_steps, self.printer = run_name, max_steps, printer
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
