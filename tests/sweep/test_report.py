"""The sweep parent's comparison plots, without Ray: a parent run and three trial runs in a SQLite
MLflow store (one completed best, one completed, one early-stopped), summarised by
:func:`log_parent_summary`; the plots hold one line per trial they compare."""
from __future__ import annotations

import mlflow
from mlflow.entities import Metric

from orchestrator.sweep.report import (
    TrialRecord,
    log_parent_summary,
    pick_best,
    plot_learning_curves,
    plot_parallel_coordinates,
)

PLOTS = {"metric_vs_params.png", "parallel_coordinates.png", "learning_curves.png"}


def _trials(c, exp_id: str, parent_id: str) -> list[TrialRecord]:
    specs = [("s-t000", "completed", {"train.lr": 1e-4, "model.preset": "tiny"}, 0.40, 4),
             ("s-t001", "completed", {"train.lr": 1e-3, "model.preset": "small"}, 0.55, 4),
             ("s-t002", "early_stopped", {"train.lr": 1e-2, "model.preset": "tiny"}, None, 2)]
    trials = []
    for i, (name, status, params, metric, last) in enumerate(specs):
        run = c.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_id})
        c.log_batch(run.info.run_id, metrics=[Metric("loss", 5.0 - 0.5 * s - i, 0, s) for s in range(1, last + 1)])
        trials.append(TrialRecord(i, f"id{i}", name, status, params, metric, last, run.info.run_id))
    return trials


def test_parent_run_holds_the_trials_comparison_plots(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment("sweep", artifact_location=str(tmp_path / "artifacts"))
    parent = c.create_run(exp_id, run_name="s")
    trials = _trials(c, exp_id, parent.info.run_id)
    best = pick_best(trials, "max")
    assert best.run_name == "s-t001"
    log_parent_summary(uri, parent.info.run_id, trials, best, "eval/t2v_r1", "name: s-best\n")
    assert PLOTS | {"trials.json", "best.yaml"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    for name in PLOTS:
        png = c.download_artifacts(parent.info.run_id, name, str(tmp_path / "dl"))
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_parallel_coordinates_has_a_line_per_completed_trial_through_every_axis():
    trials = [TrialRecord(0, "a", "s-t000", "completed", {"train.lr": 1e-4, "model.preset": "tiny"}, 0.4, 4),
              TrialRecord(1, "b", "s-t001", "completed", {"train.lr": 1e-2, "model.preset": "small"}, 0.6, 4),
              TrialRecord(2, "c", "s-t002", "early_stopped", {"train.lr": 1e-3, "model.preset": "tiny"}, None, 2)]
    fig = plot_parallel_coordinates(trials, "eval/acc")
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3]  # lr, preset, metric
    assert len(lines) == 2
    low, high = (list(ln.get_ydata()) for ln in lines)
    assert low == [0.0, 1.0, 0.0] and high == [1.0, 0.0, 1.0]  # log lr, categories sorted, metric scaled
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["train.lr", "model.preset", "eval/acc"]
    assert plot_parallel_coordinates(trials[2:], "eval/acc") is None  # nothing completed: no plot


def test_learning_curves_show_where_each_trial_stopped():
    trials = [TrialRecord(0, "a", "s-t000", "completed", {"train.lr": 1e-4}, 0.4, 4),
              TrialRecord(1, "b", "s-t001", "early_stopped", {"train.lr": 1e-2}, None, 2)]
    curves = {"s-t000": [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)], "s-t001": [(1, 5.5), (2, 5.4)]}
    fig = plot_learning_curves(trials, curves, trials[0])
    lines = fig.axes[0].get_lines()
    assert [max(ln.get_xdata()) for ln in lines] == [4, 2]
    assert lines[0].get_linewidth() > lines[1].get_linewidth() and lines[1].get_linestyle() == "--"
    assert "best" in lines[0].get_label() and "early_stopped" in lines[1].get_label()
