"""MLflow run handling and redaction, against a real SQLite store."""
import os
import subprocess
import sys

import yaml

from orchestrator.tracking import mlflow_run
from orchestrator.tracking.redact import REDACTED, redact, redact_text


def test_redact_masks_secret_keys_values_and_uri_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    cfg = {"data": {"root": "s3://b/p"}, "api_key": "abc123", "note": "key is s3cr3t-value-xyz",
           "tracking": {"uri": "postgresql://user:hunter2@db:5432/mlflow"}, "empty_token": ""}
    out = redact(cfg)
    assert out["api_key"] == REDACTED and out["data"]["root"] == "s3://b/p"
    assert "s3cr3t-value-xyz" not in str(out) and "hunter2" not in str(out)
    assert out["empty_token"] == ""  # nothing to hide
    assert redact_text("x s3cr3t-value-xyz y") == f"x {REDACTED} y"


def test_open_run_logs_params_config_tags_and_reopens_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    cfg = {"train": {"lr": 0.001}, "name": "r1", "password": "pw-should-hide"}
    run_id = mlflow_run.open_run(uri, "exp", "r1", cfg, {"mplug2.git_commit": "abc", "none": None})
    c = mlflow_run.client(uri)
    run = c.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["password"] == REDACTED
    assert run.data.tags["mplug2.git_commit"] == "abc" and "none" not in run.data.tags
    logged = yaml.safe_load((tmp_path / "db" / "mlartifacts" / "exp" / run_id / "artifacts" / "config" /
                             "resolved.yaml").read_text())
    assert logged["train"]["lr"] == 0.001 and logged["password"] == REDACTED
    assert not (tmp_path / "mlruns").exists()  # artifacts beside the database, not in the cwd
    mlflow_run.close_run(uri, run_id, metrics={"x": 1.0})
    again = mlflow_run.open_run(uri, "exp", "r1", cfg, {})
    assert again == run_id and c.get_run(run_id).data.tags["mplug2.resumed"] == "true"


def test_metric_logger_buffers_while_unreachable_then_delivers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = mlflow_run.open_run(uri, "exp", "r", {}, {})
    logger = mlflow_run.MetricLogger(uri, run_id, flush_every_s=3600)
    good = logger._client = mlflow_run.client(uri)

    class Down:
        def log_batch(self, *a, **k):
            raise ConnectionError("tracking server down")

    logger._client = Down()
    for step in range(5):
        logger.log({"loss": float(step)}, step)
    assert logger.flush() is False and logger.failed_flushes == 1
    logger._client = good
    stats = logger.close(timeout_s=10)
    assert stats["undelivered"] == 0 and stats["sent"] == 5
    assert [m.step for m in good.get_metric_history(run_id, "loss")] == [0, 1, 2, 3, 4]


def test_mlflow_telemetry_is_off_in_our_processes_unless_asked_for():
    """MLflow's telemetry thread deletes an environment variable when its config fetch fails (no
    internet): a KeyError in any thread iterating os.environ at that moment. Importing the package
    turns it off before MLflow is imported; a user's explicit setting wins."""
    probe = ("import orchestrator, mlflow, threading\n"
             "from mlflow.telemetry.client import get_telemetry_client\n"
             "print(get_telemetry_client() is None, any(t.name == 'GetTelemetryConfig' for t in threading.enumerate()))")
    # as a user's process: none of the variables by which MLflow itself turns telemetry off in CI or
    # under pytest (mlflow.telemetry.utils._is_ci_env_or_testing)
    ci = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD",
          "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
          "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", *ci)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["True", "False"], out.stdout
    kept = subprocess.run([sys.executable, "-c", "import os, orchestrator; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
                          env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True, text=True, timeout=120)
    assert kept.stdout.split()[-1:] == ["false"], kept.stderr[-3000:]
