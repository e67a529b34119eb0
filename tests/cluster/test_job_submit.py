"""``ray job submit --working-dir .`` against a real head started with ``ray start --head``: the
path a user takes on a cluster, with this checkout uploaded as the job's working directory and
the runtime environment from ``cluster/runtime_env.yaml``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.cluster.ray_head import LocalRayHead

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def runtime_env() -> dict:
    """cluster/runtime_env.yaml as a job gets it here. Its `pip` pins are what this venv already
    holds (test_runtime_env checks that), so the test skips building a per-job virtualenv."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip")
    env.pop("working_dir")  # given on the command line, as the README does
    return env


@pytest.fixture(scope="module")
def ray_head():
    with LocalRayHead(num_cpus=8) as head:
        yield head


def test_head_runs_the_job_cli_and_uploads_the_checkout(ray_head, tmp_path):
    out = tmp_path / "synth"
    result = ray_head.submit(
        ["python", "-m", "orchestrator", "synth", "--out", str(out), "--n", "4", "--seconds", "1",
         "--width", "64", "--height", "48", "--no-tokenizer"],
        working_dir=ROOT, runtime_env=runtime_env(), timeout=240)
    assert result.status == "SUCCEEDED", result.logs[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(list((out / "videos").glob("*.mp4"))) == 4
    assert (out / "annotations" / "msrvtt_train.jsonl").exists() and manifest
    # What the README tells users to run to find and follow a job.
    listed = ray_head.cli("job", "list", "--address", ray_head.dashboard_url)
    assert result.submission_id in listed
    logs = ray_head.cli("job", "logs", "--address", ray_head.dashboard_url, result.submission_id)
    assert logs.strip() == result.logs.strip() or result.logs.strip() in logs


def test_a_failing_job_is_reported_failed_with_its_error(ray_head):
    result = ray_head.submit(["python", "-m", "orchestrator", "synth", "--out", "/tmp/never", "--n", "2"],
                             working_dir=ROOT, runtime_env=runtime_env(), timeout=120)
    assert result.status == "FAILED"
    assert "--n must be at least 4" in result.logs


@pytest.mark.skipif(not (ROOT / "orchestrator" / "commands" / "train.py").exists()
                    or not (ROOT / "workloads" / "configs" / "pretrain_tiny.yaml").exists(),
                    reason="needs `python -m orchestrator train` and workloads/configs/pretrain_tiny.yaml")
def test_tiny_pretrain_submitted_as_a_job_is_tracked_in_mlflow(ray_head, synth_data, tmp_path, mlflow_db_template):
    from mlflow.tracking import MlflowClient

    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")  # migrated once per session
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "cluster-job-pretrain"
    result = ray_head.submit(
        ["python", "-m", "orchestrator", "train", "--config", "workloads/configs/pretrain_tiny.yaml",
         f"data.root={synth_data}", f"storage={tmp_path / 'store'}", f"tracking.uri={tracking}",
         f"name={name}", "train.max_steps=4", "train.num_workers=1", "train.checkpoint_every=2",
         "train.log_every=1", "eval.max_samples=8"],
        working_dir=ROOT, runtime_env=runtime_env(), timeout=540)
    assert result.status == "SUCCEEDED", result.logs[-6000:]
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("mplug2-pretrain")
    assert exp is not None, "the pre-train experiment was not created"
    runs = client.search_runs([exp.experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished, [(r.info.run_name, r.info.status) for r in runs]
    run = next((r for r in finished if r.info.run_name == name), finished[0])
    steps = {k: v for k, v in run.data.params.items() if k.endswith("max_steps")}
    assert "4" in steps.values(), f"resolved config not logged as params: {sorted(run.data.params)[:20]}"
    assert run.data.metrics, "no metrics were logged"
