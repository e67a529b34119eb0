"""Nothing foreign reaches MLflow or the console (issue 31, class 2): the redactor covers the common
secret shapes, each with its own case and random instances; keys are matched by name as well as by
value; the ``config`` verb and ``--print-config`` print through it; copying a folder to MLflow or
storage takes its regular files only (a symlink that leads out of it is never followed)."""
from __future__ import annotations

import json
import os
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import storage
from orchestrator.tracking.redact import REDACTED, is_secret_key, redact, redact_text

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example, 40 characters
GH = {"ghp": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "gho": "gho_" + "Z" * 18 + "9" * 18,
      "pat": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV"}
AZURE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE/Wm/Rr500P\n"
       "-----END RSA PRIVATE KEY-----")
PEM_BODY = "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi"


@pytest.mark.parametrize("text,secret", [
    (f"aws configure set aws_secret_access_key_value {AWS_SECRET}", AWS_SECRET),  # bare, no secret-named key
    (f"credentials were {AWS_SECRET} then", AWS_SECRET),
    (f"cloning with {GH['ghp']}", GH["ghp"]),
    (f"GITHUB_TOKEN {GH['gho']} set", GH["gho"]),
    (f"token is {GH['pat']}", GH["pat"]),
    (f"key file:\n{PEM}\n", PEM_BODY),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\n(truncated)", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"),
    (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURE_KEY};EndpointSuffix=core.windows.net",
     AZURE_KEY),
    (f"the storage key {AZURE_KEY} was used", AZURE_KEY),
    ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=s3cr3tValue123=",
     "s3cr3tValue123="),
    ("db_pass=hunter2hunter2 host=db", "hunter2hunter2"),
    ("pwd: hunter2hunter2", "hunter2hunter2"),
    ('{"DB_PASS": "hunter2hunter2"}', "hunter2hunter2"),
    ("postgresql://mlflow:p@ss@w0rd@db.internal:5432/mlflow", "p@ss@w0rd"),
    ("postgresql://mlflow:p@ss@w0rd@db.internal:5432/mlflow", "ss@w0rd"),  # the tail after the first '@'
])
def test_each_secret_shape_is_masked(text, secret):
    out = redact_text(text, [])
    assert secret not in out and REDACTED in out, out


def test_a_password_with_at_signs_keeps_the_host():
    assert redact_text("postgresql://mlflow:p@ss@w0rd@db.internal:5432/mlflow", []) == \
        "postgresql://mlflow:***@db.internal:5432/mlflow"


@pytest.mark.parametrize("text", [
    "git commit 3f786850e387550fdab836ed7e6dc881de23001b",     # 40 lower-case hex: not a key
    "run 0123456789abcdef0123456789abcdef", "s3://bucket/webvid/00000000/000000001.mp4",
    "data.tokenizer=s3://bucket/tokenizers/bert", "the bypass valve is open", "second pass: 3 batches",
    "PWD=/home/user/project",
])
def test_harmless_text_is_left_alone(text):
    if text.startswith("PWD="):  # the shell's working directory, by name: not masked as a key either
        assert not is_secret_key("PWD") and not is_secret_key("OLDPWD")
        return
    assert redact_text(text, []) == text


def test_keys_named_like_secrets_are_masked_whatever_their_value():
    for k in ("db_pass", "DB_PASS", "pwd", "db_pwd", "mysql.pass", "azure_account_key", "AccountKey",
              "connection_string", "sas"):
        assert is_secret_key(k), k
    for k in ("passes", "compass", "bypass", "pin_memory", "num_passes", "PWD", "OLDPWD"):
        assert not is_secret_key(k), k  # 'pass' only as a word of its own
    out = redact({"task": {"db_pass": "x", "pwd": "plain"}, "data": {"root": "s3://b/r"}})
    assert out == {"task": {"db_pass": REDACTED, "pwd": REDACTED}, "data": {"root": "s3://b/r"}}


_B64 = string.ascii_letters + string.digits + "/+"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "@/+=:!$%^&*()[]{}-_.,~", min_size=4, max_size=30)
       .filter(lambda p: "@" in p or ":" in p or len(p) > 8), st.sampled_from(["postgresql", "https", "mysql+pymysql"]))
def test_uri_passwords_of_any_shape_are_masked_whole(password, scheme):
    text = f"connecting to {scheme}://user:{password}@db.internal:5432/x now"
    out = redact_text(text, [])
    assert f":{password}@" not in out and "db.internal:5432/x now" in out, out
    assert not any(part in out for part in password.split("@") if len(part) >= 6), out


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]), st.text(alphabet=string.ascii_letters + string.digits,
                                                                          min_size=36, max_size=40))
def test_github_tokens_of_any_body_are_masked(prefix, body):
    assert prefix + body not in redact_text(f"x {prefix}{body} y", [])


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=_B64, min_size=40, max_size=40).filter(
    lambda k: any(c.islower() for c in k) and any(c.isupper() for c in k) and any(c.isdigit() for c in k)
    and len(set(k)) >= 16))
def test_bare_aws_secret_keys_are_masked(key):
    assert key not in redact_text(f"secret {key} end", [])


def test_the_config_verb_prints_no_secret(capsys):
    from orchestrator.cli import main

    assert main(["config", "tracking.uri=http://admin:p@ss@w0rd@mlflow:5000",
                 f"data.tokenizer={GH['ghp']}", f"storage=s3://b/x?X-Amz-Security-Token={AWS_SECRET}"]) == 0
    out = capsys.readouterr().out
    for secret in ("p@ss@w0rd", "ss@w0rd", GH["ghp"], AWS_SECRET):
        assert secret not in out
    assert "http://admin:***@mlflow:5000" in out


@pytest.mark.parametrize("verb", ["train", "evaluate"])
def test_print_config_prints_no_secret(capsys, verb):
    from orchestrator.cli import main

    extra = ["--checkpoint", "unused"] if verb == "evaluate" else []
    assert main([verb, "--config", "workloads/configs/retrieval_tiny.yaml", "--print-config", *extra,
                 "tracking.uri=http://u:pw-with-@-in-it@host:5000"]) == 0
    out = capsys.readouterr().out
    assert "pw-with-" not in out and "-in-it" not in out and "http://u:***@host:5000" in out


def _tokenizer_with_a_foreign_link(tmp_path):
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("FOREIGN CONTENT")
    tok = tmp_path / "tok"
    (tok / "sub").mkdir(parents=True)
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (tok / "sub" / "inner.json").write_text("{}")
    os.symlink(secret, tok / "special_tokens_map.json")        # leads out of the folder: never copied
    os.symlink(secret.parent, tok / "linked_dir")               # a folder outside, linked in
    os.symlink(tok / "vocab.txt", tok / "vocab_alias.txt")      # stays inside: copied as a file
    os.mkfifo(tok / "pipe")                                      # not a regular file
    return tok


def test_copying_a_folder_takes_only_its_regular_files(tmp_path, caplog):
    tok = _tokenizer_with_a_foreign_link(tmp_path)
    assert {rel for _, rel in storage.regular_files(tok)} == {"vocab.txt", "sub/inner.json", "vocab_alias.txt"}
    got = tmp_path / "copy"
    assert storage.download_dir(str(tok), got) == 3
    up = tmp_path / "up"
    assert storage.upload_dir(tok, str(up)) == 3
    for folder in (got, up):
        texts = [p.read_text() for p in folder.rglob("*") if p.is_file()]
        assert all("FOREIGN" not in t for t in texts) and not (folder / "special_tokens_map.json").exists()
    assert "outside" in caplog.text


def test_a_symlinked_tokenizer_file_never_reaches_the_mlflow_model(tmp_path, mlflow_uri):
    import mlflow

    from orchestrator.tracking import lineage, mlflow_run

    tok = _tokenizer_with_a_foreign_link(tmp_path)
    run_id = mlflow_run.open_run(mlflow_uri, "exp", "r", {}, {})
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"preset": "tiny"}))
    model_id = lineage.record_model(mlflow_uri, run_id, str(export), "r", str(tok))
    model = mlflow_run.client(mlflow_uri).get_logged_model(model_id)
    path = mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(tmp_path / "art"))
    files = {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f)).read()
             for r, _, fs in os.walk(path) for f in fs}
    assert "tokenizer/vocab.txt" in files and "tokenizer/special_tokens_map.json" not in files
    assert not any("FOREIGN" in text for text in files.values())
