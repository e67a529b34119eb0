"""A sweep whose ASHA cuts on a dev metric (issue 14): the trials validate on their Train workers
every step (``eval.every_steps=1``), the ``eval/...`` reports reach Tune between the training
reports that lack them, and ASHA stops a trial on the dev metric.

Deterministic: the searched key is ``eval.max_samples`` and ASHA cuts on ``eval/items`` (mode max),
so trial 0 (16 dev items) runs first and passes every rung, and trial 1 (4 items) is cut at the
first rung; the sweep's own metric is the GLUE dev accuracy at the end of training."""
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GLUE_TINY = Path(__file__).resolve().parents[2] / "workloads" / "configs" / "glue_tiny.yaml"


def test_asha_stops_a_trial_on_its_dev_metric(ray_local, synth_data, mlflow_uri, tmp_path, write_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep.runner import run_sweep

    overrides = [f"data.root={synth_data}", f"tracking.uri={mlflow_uri}", "train.num_workers=1",
                 "train.max_steps=6", "train.log_every=1", "train.checkpoint_every=6", "train.warmup_steps=1",
                 "train.batch_size_per_worker=4", "eval.every_steps=1", "eval.batch_size=8"]
    path = write_sweep("devcut", base=str(GLUE_TINY), overrides=overrides, storage=str(tmp_path / "store"),
                       search={"eval.max_samples": {"grid": [16, 4]}}, metric="eval/accuracy", mode="max",
                       max_concurrent_trials=1, trial_cpus=0.5,
                       scheduler={"type": "asha", "metric": "eval/items", "mode": "max", "grace_period": 1,
                                  "reduction_factor": 2})
    out = run_sweep(path)
    status = {t.index: t.status for t in out.trials}
    assert status == {0: "completed", 1: "early_stopped"}, out.trials
    c = MlflowClient(mlflow_uri)
    runs = {t.index: t.run_id for t in out.trials}
    items0 = c.get_metric_history(runs[0], "eval/items")
    assert [(m.step, m.value) for m in sorted(items0, key=lambda m: m.step)] == [(s, 16) for s in range(1, 7)]
    assert "eval/accuracy" in c.get_run(runs[0]).data.metrics and out.best.index == 0
    items1 = c.get_metric_history(runs[1], "eval/items")
    assert items1 and max(m.step for m in items1) < 6 and all(m.value == 4 for m in items1)   # cut before the end
