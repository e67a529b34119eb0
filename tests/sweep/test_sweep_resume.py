"""An interrupted sweep (SIGINT, as Ctrl+C) resumes where it stopped: the finished trial is not run
again, the unfinished one is, and only then is the best written."""
import os
import signal
import threading
import time

import pytest

from tests.sweep.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, synth_data, mlflow_uri, tmp_path,
                                                                      write_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep

    path = write_sweep("resume2", overrides=tiny_run_overrides(synth_data, mlflow_uri, max_steps=3),
                       storage=str(tmp_path / "store"), search={"train.lr": {"grid": [1e-4, 2e-4]}},
                       metric="eval/t2v_r1", mode="max", max_concurrent_trials=1, trial_cpus=0.5)
    c = MlflowClient(mlflow_uri)
    sent = []

    def run_of(name):
        exp = c.get_experiment_by_name("mplug2-retrieval")
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mplug2.run_name` = '{name}'") if exp else []
        return runs[0] if runs else None

    def interrupt_once_the_second_trial_started():
        """Trials run one at a time: t001's run exists => Tune has finished t000."""
        deadline = time.time() + 600
        while time.time() < deadline:
            if run_of("resume2-t001") is not None:
                assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "Tune's handler missing"
                os.kill(os.getpid(), signal.SIGINT)
                sent.append(time.time())
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_once_the_second_trial_started, daemon=True)
    watcher.start()
    first = run_sweep(path)
    watcher.join(timeout=5)
    assert sent and first.interrupted and first.best_config_uri is None
    done = {t.run_name: t.status for t in first.trials}
    assert done.get("resume2-t000") == "completed"
    assert c.get_run(first.parent_run_id).data.tags["mplug2.sweep_status"] == "interrupted"
    t0 = run_of("resume2-t000")
    loss_before = [m.step for m in c.get_metric_history(t0.info.run_id, "loss")]
    assert len(c.get_metric_history(t0.info.run_id, "eval/t2v_r1")) == 1

    second = run_sweep(path)
    assert second.resumed and not second.interrupted and second.parent_run_id == first.parent_run_id
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
