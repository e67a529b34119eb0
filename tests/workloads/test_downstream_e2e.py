"""Issue 6's acceptance: each downstream workload fine-tunes its tiny config on the synthetic data
on a local Ray (one DeepSpeed worker, a few steps), then ``run_evaluation`` of the MLflow run logs
its metrics and a predictions table to a new MLflow run."""
import json
from pathlib import Path

import pytest

from orchestrator.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "workloads" / "configs"

# task -> (metric keys with their ranges, prediction columns)
EXPECTED = {
    "videoqa": ({"accuracy": (0, 100), "ranked_accuracy": (0, 100), "num_questions": (1, 8)},
                {"question", "answer", "prediction", "correct", "ranked_prediction"}),
    "captioning": ({"BLEU_1": (0, 1), "BLEU_4": (0, 1), "METEOR": (0, 1), "ROUGE_L": (0, 1), "CIDEr": (0, 10),
                    "num_clips": (1, 8)}, {"clip_index", "prediction", "references"}),
    "classification": ({"top1": (0, 100), "top5": (100, 100), "num_samples": (1, 8)},  # 4 classes: top-5 = all
                       {"label", "prediction", "correct", "top4"}),
    "glue": ({"accuracy": (0, 100), "num_samples": (8, 8)}, {"label", "prediction", "correct", "text"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_tiny_finetune_then_evaluate(task, ray_local, synth_data, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.evaluation.driver import run_evaluation
    from orchestrator.trainer.driver import run_training

    overrides = [f"data.root={synth_data}", f"storage={tmp_path / 'store'}", f"tracking.uri={mlflow_uri}",
                 f"name=e2e-{task}", "train.num_workers=1", "train.max_steps=3", "train.checkpoint_every=3",
                 "train.batch_size_per_worker=4", "train.warmup_steps=1", "train.log_every=1",
                 "eval.max_samples=8", "eval.batch_size=4"]
    if task != "glue":
        overrides += ["data.image_size=32", "data.num_frames=2"]
    cfg = load_config(CONFIGS / f"{task}_tiny.yaml", overrides)

    trained = run_training(cfg)
    assert trained.metrics["step"] == 3
    client = MlflowClient(mlflow_uri)
    assert client.get_run(trained.mlflow_run_id).info.status == "FINISHED"

    out = run_evaluation(cfg, f"mlflow:{trained.mlflow_run_id}")
    import ray  # the run's and the evaluation's named actors (bad-clip counts, progress) ended with them
    assert not [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"e2e-{task}" in a["name"]]
    ranges, columns = EXPECTED[task]
    for key, (lo, hi) in ranges.items():
        assert lo <= out.metrics[key] <= hi, (key, out.metrics)
    assert out.predictions and columns <= set(out.predictions[0]), out.predictions[:1]
    assert all(isinstance(r["prediction"], (str, int)) for r in out.predictions)

    run = client.get_run(out.mlflow_run_id)
    assert run.data.tags["mplug2.source_run"] == trained.mlflow_run_id
    for key in ranges:
        assert run.data.metrics[f"eval/{key}"] == pytest.approx(out.metrics[key])
    assert "predictions.json" in [a.path for a in client.list_artifacts(out.mlflow_run_id)]
    table = json.loads(Path(client.download_artifacts(out.mlflow_run_id, "predictions.json", str(tmp_path))).read_text())
    assert columns <= set(table["columns"]) and len(table["data"]) == len(out.predictions)
