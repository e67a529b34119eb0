"""An interrupted sweep (its driver killed) resumes where it stopped: the finished trial is not run
again, the unfinished one is, and only then is the best written."""
import os
import subprocess
import sys
import time

import pytest

from tests.sweep.conftest import REPO, tiny_run_overrides

pytestmark = pytest.mark.slow


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, synth_data, mlflow_uri, tmp_path,
                                                                      write_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep

    path = write_sweep("resume2", overrides=tiny_run_overrides(synth_data, mlflow_uri, max_steps=3),
                       storage=str(tmp_path / "store"), search={"train.lr": {"grid": [1e-4, 2e-4]}},
                       metric="eval/t2v_r1", mode="max", max_concurrent_trials=1, trial_cpus=0.5)
    c = MlflowClient(mlflow_uri)

    def run_of(name):
        exp = c.get_experiment_by_name("mplug2-retrieval")
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mplug2.run_name` = '{name}'") if exp else []
        return runs[0] if runs else None

    # The sweep's driver, killed (SIGKILL: no chance to clean up) while its second trial trains.
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while run_of("resume2-t001") is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)            # trials run one at a time: t001's run exists => t000 finished
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(12)                 # Tune saves its experiment state every few seconds
    finally:
        proc.kill()
        proc.wait()
    t0 = run_of("resume2-t000")
    assert t0.data.tags["mplug2.trial_status"] == "completed"
    loss_before = [m.step for m in c.get_metric_history(t0.info.run_id, "loss")]
    assert len(c.get_metric_history(t0.info.run_id, "eval/t2v_r1")) == 1
    parent_id = t0.data.tags["mlflow.parentRunId"]

    second = run_sweep(path)
    assert second.resumed and not second.interrupted and second.parent_run_id == parent_id
    assert [(t.run_name, t.status) for t in second.trials] == [("resume2-t000", "completed"),
                                                               ("resume2-t001", "completed")]
    # the finished trial was not run again: one evaluation, the same training points
    assert len(c.get_metric_history(t0.info.run_id, "eval/t2v_r1")) == 1
    assert [m.step for m in c.get_metric_history(t0.info.run_id, "loss")] == loss_before
    t1 = run_of("resume2-t001")
    assert len(c.get_metric_history(t1.info.run_id, "eval/t2v_r1")) == 1
    assert second.best_config_uri and os.path.exists(second.best_config_uri)
    parent = c.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mplug2.trials_completed"] == "2"
