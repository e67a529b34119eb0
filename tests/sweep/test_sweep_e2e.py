"""A tiny retrieval sweep run from the CLI on a local Ray: every trial a Ray Train run, one MLflow
parent run with a nested child per trial, the best marked, best.yaml loadable by `train`; and
ASHA cutting a trial on a dev metric (issue 14): the trials validate on their Train workers every
step (``eval.every_steps=1``), the ``eval/...`` reports reach Tune between the training reports
that lack them, and ASHA stops a trial on the dev metric.

One sweep carries both (it was two sweeps of 4 and 2 trials).  Deterministic: the searched key is
``eval.max_samples`` and ASHA cuts on ``eval/items`` (mode max), so trial 0 (4 dev items) runs
first and passes every rung, and trial 1 (2 items) is cut at the first rung; the sweep's own
metric is the dev text-to-video R@1 at the end of training."""
import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from tests.sweep.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow
STEPS = 4


def _children(c, parent):
    exp = parent.info.experiment_id
    return {r.data.tags["mlflow.runName"]: r for r in
            c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}


@pytest.fixture(scope="module")
def sweep(ray_local, synth_data, mlflow_db_template, tmp_path_factory):
    """The sweep, run once from the CLI; every test reads what it left (MLflow, the sweep folder)."""
    import shutil

    from orchestrator.cli import main
    from orchestrator.commands import sweep as sweep_cmd

    tmp = tmp_path_factory.mktemp("sweep_e2e")
    shutil.copyfile(mlflow_db_template, tmp / "mlflow.db")
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    import yaml

    from tests.sweep.conftest import RETRIEVAL_TINY

    spec = {"name": "tiny2", "base": str(RETRIEVAL_TINY),
            "overrides": tiny_run_overrides(synth_data, mlflow_uri, max_steps=STEPS) + ["eval.every_steps=1"],
            "storage": str(tmp / "store"), "search": {"eval.max_samples": {"grid": [4, 2]}},
            "metric": "eval/t2v_r1", "mode": "max", "max_concurrent_trials": 1, "trial_cpus": 0.5,
            "scheduler": {"type": "asha", "metric": "eval/items", "mode": "max", "grace_period": 1,
                          "reduction_factor": 2}}
    path = tmp / "sweep_tiny2.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert sweep_cmd  # the verb is picked up by the CLI
    rc = main(["sweep", "--config", str(path)])
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("mplug2-retrieval")
    parent = c.search_runs([exp.experiment_id], filter_string="tags.`mplug2.kind` = 'sweep'")[0]
    return {"rc": rc, "client": c, "parent": parent, "kids": _children(c, parent), "tmp": tmp}


def test_the_cli_sweep_has_a_parent_run_with_one_child_per_trial(sweep):
    parent, kids = sweep["parent"], sweep["kids"]
    assert sweep["rc"] == 0
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "tiny2"
    assert parent.data.params["search.eval.max_samples"].startswith("grid")
    assert sorted(kids) == [f"tiny2-t{i:03d}" for i in range(2)]
    for name, run in kids.items():
        assert "loss" in run.data.metrics and "lr" in run.data.metrics, name   # full training metrics
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_asha_stops_a_trial_on_its_dev_metric(sweep):
    c, kids = sweep["client"], sweep["kids"]
    status = {n: r.data.tags["mplug2.trial_status"] for n, r in kids.items()}
    assert status == {"tiny2-t000": "completed", "tiny2-t001": "early_stopped"}, status
    done, cut = kids["tiny2-t000"], kids["tiny2-t001"]
    # the dev metric reached Tune at every step (validation on the workers), between the training reports
    items0 = c.get_metric_history(done.info.run_id, "eval/items")
    assert [(m.step, m.value) for m in sorted(items0, key=lambda m: m.step)] == [(s, 4) for s in range(1, STEPS + 1)]
    assert done.info.status == "FINISHED" and "eval/t2v_r1" in done.data.metrics
    assert max(m.step for m in c.get_metric_history(done.info.run_id, "loss")) == STEPS
    items1 = c.get_metric_history(cut.info.run_id, "eval/items")
    assert items1 and max(m.step for m in items1) < STEPS and all(m.value == 2 for m in items1)   # cut before the end
    assert cut.info.status == "KILLED"
    assert max(m.step for m in c.get_metric_history(cut.info.run_id, "loss")) < STEPS   # stopped before the end
    # no end-of-training dev score for the cut trial: its validations stop with it
    assert max(m.step for m in c.get_metric_history(cut.info.run_id, "eval/t2v_r1")) < STEPS


def test_the_best_trial_is_marked_and_its_config_trains(sweep):
    c, parent, kids, tmp = sweep["client"], sweep["parent"], sweep["kids"], sweep["tmp"]
    status = {n: r.data.tags["mplug2.trial_status"] for n, r in kids.items()}
    best = [n for n, r in kids.items() if r.data.tags.get("mplug2.best_trial") == "true"]
    assert best == ["tiny2-t000"] and status[best[0]] == "completed"
    assert parent.data.tags["mplug2.best_trial"] == best[0]
    assert parent.data.metrics["best/eval/t2v_r1"] == kids[best[0]].data.metrics["eval/t2v_r1"]
    assert int(parent.data.tags["mplug2.best.eval.max_samples"]) == int(kids[best[0]].data.params["eval.max_samples"])
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "metric_vs_params.png", "parallel_coordinates.png", "learning_curves.png", "best.yaml"} <= arts
    table = json.loads(Path(c.download_artifacts(parent.info.run_id, "trials.json", str(tmp))).read_text())
    assert len(table["data"]) == 2

    best_yaml = tmp / "store" / "sweeps" / "tiny2" / "best.yaml"
    cfg = load_config(best_yaml)                                      # what `train --config` loads
    assert cfg.eval.max_samples == int(parent.data.tags["mplug2.best.eval.max_samples"]) and cfg.name == "tiny2-best"
    assert cfg.train.max_steps == STEPS and cfg.data.num_frames == 2
