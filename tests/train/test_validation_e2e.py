"""Validation during training (issue 14): every ``eval.every_steps`` optimizer steps and at the end,
the dev split is evaluated on the run's two Train workers; the metrics go to MLflow at that step
(``eval/...``) and into ``ray.train.report`` (so into the run's result and Tune), here under
ZeRO-2 (the highest stage the project runs; stage 3 is refused by the config)."""
from pathlib import Path

import pytest

from orchestrator.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "workloads" / "configs"


@pytest.mark.slow
def test_glue_validates_every_n_steps_on_two_zero2_workers(ray_local, synth_data, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.trainer.driver import run_training

    cfg = load_config(CONFIGS / "glue_tiny.yaml", [
        f"data.root={synth_data}", f"storage={tmp_path / 'store'}", f"tracking.uri={mlflow_uri}", "name=val-e2e",
        "train.num_workers=2", "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=1",
        "train.batch_size_per_worker=4", "train.warmup_steps=1", "train.zero_stage=2",
        "eval.every_steps=3", "eval.batch_size=3"])
    out = run_training(cfg)
    assert out.metrics["step"] == 4
    # the last report holds the end-of-training validation (what a sweep trial takes as its dev score)
    assert 0 <= out.metrics["eval/accuracy"] <= 100
    dev_rows = len((Path(synth_data) / "annotations" / "sst2_dev.tsv").read_text().splitlines()) - 1  # - header
    assert out.metrics["eval/items"] == out.metrics["eval/num_samples"] == dev_rows    # the whole dev split
    assert out.metrics["eval/item_coverage"] == 1.0 and out.metrics["eval/bad_items"] == 0
    history = MlflowClient(mlflow_uri).get_metric_history(out.mlflow_run_id, "eval/accuracy")
    assert sorted(m.step for m in history) == [3, 4]                               # every 3 steps + the end
    assert [m.step for m in MlflowClient(mlflow_uri).get_metric_history(out.mlflow_run_id, "loss")] == [1, 2, 3, 4]
