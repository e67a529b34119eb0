"""Credentials never reach MLflow or any log (issue 16, item 4): the redactor's patterns one by one,
then a real run whose secrets sit only in config values, URIs and exception messages, searched for
in params, tags, artifacts, the driver's output, and every file of Ray's session logs."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest

from orchestrator.tracking.redact import REDACTED, is_secret_key, redact, redact_text

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"   # AWS secret keys hold '/' and '+'
HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
SIG = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZWFtIn0.c2lnbmF0dXJl"
DB_PW = "Pg-pass_w0rd!x"
SECRETS = (AWS_SECRET, HF, SIG, BEARER, DB_PW)


@pytest.mark.parametrize("text,secret", [
    (f"postgresql://mlflow:{AWS_SECRET}@db.internal:5432/mlflow", AWS_SECRET),
    (f"s3 via https://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@s3.example.com/b", AWS_SECRET),
    (f"https://b.s3.amazonaws.com/k.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIG}&x=1", SIG),
    (f"https://b.s3.amazonaws.com/k.mp4?X-Amz-Security-Token={SIG}", SIG),
    (f"https://acct.blob.core.windows.net/c/v.mp4?sv=2024&sig={SIG}", SIG),
    (f"http://mlflow:5000/api?token={SIG}", SIG),
    (f"Authorization: Bearer {BEARER}", BEARER),
    (f"using token {HF} for the hub", HF),
    (f"host=db.internal port=5432 user=mlflow password={DB_PW} dbname=mlflow", DB_PW),
    (f"{{'db_password': '{DB_PW}'}}", DB_PW),
    (f"MlflowException: API request to http://admin:{AWS_SECRET}@mlflow:5000/api/2.0/runs failed", AWS_SECRET),
    ("aws key id AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
])
def test_secret_shaped_text_is_masked(text, secret):
    out = redact_text(text, [])
    assert secret not in out and REDACTED in out


@pytest.mark.parametrize("text", ["data.tokenizer=s3://bucket/tokenizers/bert", "TOKENIZERS_PARALLELISM=false",
                                  "http://127.0.0.1:5000/#/experiments/1", "s3://bucket/a@b/c.mp4",
                                  "model.overrides.mask_token_id=4", "the token_type_ids are zero"])
def test_harmless_text_is_left_alone(text):
    assert redact_text(text, []) == text


def test_keys_are_secrets_by_their_words_not_substrings():
    for k in ("password", "db_password", "dbPassword", "api_key", "hf_token", "AWS_SECRET_ACCESS_KEY",
              "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "client_secret", "credentials"):
        assert is_secret_key(k), k
    for k in ("data.tokenizer", "tokenizer", "TOKENIZERS_PARALLELISM", "mask_token_id", "token_type_ids",
              "max_text_len", "keep_checkpoints", "PWD"):
        assert not is_secret_key(k), k
    out = redact({"data": {"tokenizer": "s3://b/tok"}, "db_password": DB_PW, "task": {"hf_token": HF}})
    assert out == {"data": {"tokenizer": "s3://b/tok"}, "db_password": REDACTED, "task": {"hf_token": REDACTED}}


def test_environment_flags_are_not_taken_for_secrets(monkeypatch):
    from orchestrator.tracking.redact import secret_values

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-" + SIG[:12])
    vals = secret_values()
    assert "false" not in vals and "tok-" + SIG[:12] in vals
    assert redact_text("TOKENIZERS_PARALLELISM=false") == "TOKENIZERS_PARALLELISM=false"


def test_log_records_and_logged_exceptions_are_redacted(caplog):
    importlib.import_module("orchestrator")  # installs the record factory

    log = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        log.info("connecting to %s", f"postgresql://u:{AWS_SECRET}@db/x")
        try:
            raise RuntimeError(f"request failed: Authorization: Bearer {BEARER}")
        except RuntimeError:
            log.exception("failed")
    assert AWS_SECRET not in caplog.text and BEARER not in caplog.text
    assert "postgresql://u:***@db/x" in caplog.text


def test_init_from_error_does_not_carry_the_tracking_uri_password(monkeypatch):
    from orchestrator.tracking import mlflow_run
    from orchestrator.train.weights import resolve_init_from

    def refuse(uri):
        raise ConnectionError(f"cannot reach {uri}")

    monkeypatch.setattr(mlflow_run, "client", refuse)
    with pytest.raises(ValueError) as e:
        resolve_init_from("mlflow:abc", f"http://admin:{AWS_SECRET}@mlflow:5000")
    assert AWS_SECRET not in str(e.value) and "no such MLflow run" in str(e.value)


@pytest.mark.slow
def test_a_run_leaks_no_secret_anywhere(ray_local, tmp_path, mlflow_uri, capfd):
    """Secrets only in config values (a free-text task option, model overrides), in URIs and in an
    exception a worker logs; none of them may appear in MLflow or in any log file of the session."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.trainer.driver import run_training
    from tests.train.toy_workload import make_rows

    note = (f"data mirror postgresql://mlflow:{AWS_SECRET}@db:5432/mlflow, sample "
            f"https://b.s3.amazonaws.com/v.mp4?X-Amz-Signature={SIG}")
    leak = f"API request to http://admin:{AWS_SECRET}@mlflow:5000 failed; Authorization: Bearer {BEARER}; {HF}"
    cfg = load_config(None, [
        "workload=tests.tracking.leaky_workload", "name=leak-check", f"storage={tmp_path / 'store'}",
        f"tracking.uri={mlflow_uri}", "train.num_workers=2", "train.batch_size_per_worker=4", "train.max_steps=2",
        "train.checkpoint_every=2", "train.warmup_steps=1",
        f"task.note='{note}'", f"task.leak='{leak}'",
        f"model.overrides={{hf_token: {HF}, db: 'host=db password={DB_PW}'}}"])
    out = run_training(cfg, datasets={"train": ray.data.from_items(make_rows(32))})

    c = MlflowClient(mlflow_uri)
    run = c.get_run(out.mlflow_run_id)
    found = {"params": str(run.data.params), "tags": str(run.data.tags)}
    art_root = Path(run.info.artifact_uri.replace("file://", ""))
    for f in art_root.rglob("*"):
        if f.is_file():
            found[f"artifact {f.name}"] = f.read_text(errors="replace")
    assert "***" in found["params"] and "leak-check" in found["tags"]
    captured = capfd.readouterr()
    found["driver stdout/stderr"] = captured.out + captured.err
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [f for f in (session / "logs").rglob("*") if f.is_file()]
    assert logs
    saw_worker_line = False
    for f in logs:
        try:
            text = f.read_text(errors="replace")
        except FileNotFoundError:  # an idle worker's log that Ray removed since the listing: nothing in it to leak
            continue
        found[str(f)] = text
        saw_worker_line |= "worker: building the model" in text
    assert saw_worker_line, "the workers' log lines reach Ray's session logs (else this test proves nothing)"
    for where, text in found.items():
        for s in SECRETS:
            assert s not in text, f"{s[:8]}... leaked into {where}"
