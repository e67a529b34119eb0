"""A 4-trial tiny retrieval sweep on a local Ray: every trial a Ray Train run, ASHA stopping some,
one MLflow parent run with 4 nested children, the best marked, best.yaml loadable by `train`."""
import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from tests.sweep.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow


def _children(c, parent):
    exp = parent.info.experiment_id
    return {r.data.tags["mlflow.runName"]: r for r in
            c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}


def test_tiny_sweep_parent_children_best_and_early_stop(ray_local, synth_data, mlflow_uri, tmp_path, write_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main
    from orchestrator.commands import sweep as sweep_cmd

    # ASHA cuts on the learning rate the loop reports: deterministic (the lowest-lr trial 0 always
    # passes; trial 3, the highest, starts after a lower one was recorded at the first rung and is cut).
    path = write_sweep("tiny4", overrides=tiny_run_overrides(synth_data, mlflow_uri), storage=str(tmp_path / "store"),
                       search={"train.lr": {"grid": [1e-4, 2e-4, 4e-4, 8e-4]}}, metric="eval/t2v_r1", mode="max",
                       max_concurrent_trials=2, scheduler={"type": "asha", "metric": "lr", "mode": "min",
                                                           "grace_period": 1, "reduction_factor": 2},
                       trial_cpus=0.5)
    assert sweep_cmd  # the verb is picked up by the CLI
    assert main(["sweep", "--config", str(path)]) == 0

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("mplug2-retrieval")
    parent = c.search_runs([exp.experiment_id], filter_string="tags.`mplug2.kind` = 'sweep'")[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "tiny4"
    assert parent.data.params["search.train.lr"].startswith("grid")
    kids = _children(c, parent)
    assert sorted(kids) == [f"tiny4-t{i:03d}" for i in range(4)]
    for name, run in kids.items():
        assert "loss" in run.data.metrics and "lr" in run.data.metrics, name   # full training metrics
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    status = {n: r.data.tags["mplug2.trial_status"] for n, r in kids.items()}
    assert status["tiny4-t000"] == "completed" and status["tiny4-t003"] == "early_stopped", status
    for n, r in kids.items():
        if status[n] == "completed":
            assert "eval/t2v_r1" in r.data.metrics and r.info.status == "FINISHED"
            assert max(m.step for m in c.get_metric_history(r.info.run_id, "loss")) == 4
        else:
            assert "eval/t2v_r1" not in r.data.metrics and r.info.status == "KILLED"
            assert max(m.step for m in c.get_metric_history(r.info.run_id, "loss")) < 4   # stopped before the end
    best = [n for n, r in kids.items() if r.data.tags.get("mplug2.best_trial") == "true"]
    assert len(best) == 1 and status[best[0]] == "completed"
    assert parent.data.tags["mplug2.best_trial"] == best[0]
    assert parent.data.metrics["best/eval/t2v_r1"] == kids[best[0]].data.metrics["eval/t2v_r1"]
    assert float(parent.data.tags["mplug2.best.train.lr"]) == float(kids[best[0]].data.params["train.lr"])
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "metric_vs_params.png", "best.yaml"} <= arts
    table = json.loads(Path(c.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 4

    best_yaml = tmp_path / "store" / "sweeps" / "tiny4" / "best.yaml"
    cfg = load_config(best_yaml)                                      # what `train --config` loads
    assert cfg.train.lr == float(parent.data.tags["mplug2.best.train.lr"]) and cfg.name == "tiny4-best"
    assert cfg.train.max_steps == 4 and cfg.data.num_frames == 2
