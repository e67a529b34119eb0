"""The end of a sweep, readable in the MLflow UI: each trial's run tagged with how it ended, the
best trial marked, and on the parent run the best params and metric, a table of all trials
(``trials.json``), one plot per searched parameter of the metric against it, and ``best.yaml``."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from orchestrator.sweep.trial import STATUS_TAG
from orchestrator.tracking.mlflow_run import client, log_table, log_text

log = logging.getLogger(__name__)

BEST_TAG = "mplug2.best_trial"


@dataclasses.dataclass
class TrialRecord:
    index: int
    trial_id: str
    run_name: str
    status: str                      # completed | early_stopped | failed
    params: dict[str, Any]
    metric: float | None             # the sweep metric (completed trials only)
    step: int | None                 # the last step the trial reported
    run_id: str | None = None        # its MLflow child run
    error: str | None = None

    def row(self, metric_name: str) -> dict[str, Any]:
        return {"trial": self.run_name, "status": self.status, **self.params, metric_name: self.metric,
                "step": self.step, "mlflow_run_id": self.run_id, "error": self.error}


def pick_best(trials: list[TrialRecord], mode: str) -> TrialRecord | None:
    done = [t for t in trials if t.status == "completed" and t.metric is not None and not math.isnan(t.metric)]
    if not done:
        return None
    key = (lambda t: t.metric) if mode == "max" else (lambda t: -t.metric)
    return max(done, key=key)  # ties: the first in trial order


def tag_trial_runs(uri: str, trials: list[TrialRecord], best: TrialRecord | None) -> None:
    """How each trial ended, on its child run.  Early-stopped and failed trials' runs end KILLED /
    FAILED (Tune ends their actors, so their training never closed the run)."""
    c = client(uri)
    end_status = {"early_stopped": "KILLED", "failed": "FAILED"}
    for t in trials:
        if t.run_id is None:
            continue
        c.set_tag(t.run_id, STATUS_TAG, t.status)
        c.set_tag(t.run_id, BEST_TAG, "true" if best is not None and t.trial_id == best.trial_id else "false")
        if t.status in end_status and c.get_run(t.run_id).info.status == "RUNNING":
            c.set_terminated(t.run_id, status=end_status[t.status])


TUNE_KEYS = {"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "time_since_restore",
             "iterations_since_restore", "pid", "done", "step", "epoch"}


def backfill_training_metrics(uri: str, run_id: str, history: list[dict[str, Any]]) -> int:
    """A trial Tune stops ends its workers before their metric buffer reaches MLflow; the points
    Tune received (every training report) are logged to the trial's run for the steps it lacks."""
    from mlflow.entities import Metric

    c = client(uri)
    have = {m.step for m in c.get_metric_history(run_id, "loss")}
    points = []
    for row in history:
        step = row.get("step")
        if step is None or (isinstance(step, float) and math.isnan(step)) or int(step) in have:
            continue
        ts = int(float(row.get("timestamp") or 0) * 1000)
        points += [Metric(k, float(v), ts, int(step)) for k, v in row.items()
                   if k not in TUNE_KEYS and ("/" not in k or k.startswith("eval/")) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not math.isnan(float(v))]
    for i in range(0, len(points), 1000):
        c.log_batch(run_id, metrics=points[i:i + 1000])
    return len(points)


def log_parent_summary(uri: str, parent_run_id: str, trials: list[TrialRecord], best: TrialRecord | None,
                       metric: str, best_yaml: str | None) -> None:
    c = client(uri)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    for status, n in counts.items():
        c.set_tag(parent_run_id, f"mplug2.trials_{status}", str(n))
    log_table(uri, parent_run_id, [t.row(metric) for t in trials], "trials.json")
    if best is not None:
        c.set_tag(parent_run_id, BEST_TAG, best.run_name)
        c.set_tag(parent_run_id, "mplug2.best_run_id", best.run_id or "")
        for k, v in best.params.items():
            c.set_tag(parent_run_id, f"mplug2.best.{k}", str(v))
        c.log_metric(parent_run_id, f"best/{metric}", float(best.metric))
        _log_best_params(c, parent_run_id, best.params)
    if best_yaml is not None:
        log_text(uri, parent_run_id, best_yaml, "best.yaml")
    figure = plot_metric_vs_params(trials, metric)
    if figure is not None:
        c.log_figure(parent_run_id, figure, "metric_vs_params.png")
        import matplotlib.pyplot as plt

        plt.close(figure)


def _log_best_params(c, run_id: str, params: dict[str, Any]) -> None:
    """``best.<key>`` params.  MLflow params are write-once: a sweep finalised again with the same
    best keeps them; with a different best (more trials were added) the tags above carry it."""
    existing = c.get_run(run_id).data.params
    for k, v in params.items():
        name = f"best.{k}"
        if name not in existing:
            c.log_param(run_id, name, str(v))


def plot_metric_vs_params(trials: list[TrialRecord], metric: str):
    """One panel per searched parameter: the sweep metric of each completed trial against its value
    (log x for positive numbers spanning a decade or more; categories otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.status == "completed" and t.metric is not None]
    if not done:
        return None
    keys = list(done[0].params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [t.params.get(key) for t in done]
        ys = [t.metric for t in done]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} of {len(done)} completed trials")
    fig.tight_layout()
    return fig
