"""Shared fixtures: real local services, started and stopped by the tests, on 127.0.0.1 only.

- ``s3_server``: a moto S3 server (HTTP, its own process) reached through ``AWS_ENDPOINT_URL``.
- ``ray_local``: a local Ray with more logical CPUs than cores, so Train workers never starve the
  Ray Data decode tasks on a 2-core machine.  Started after ``s3_server`` so workers inherit the
  endpoint and credentials from the environment, as they would on a cluster.
- ``mlflow_uri`` (a test's own SQLite store: a copy of ``mlflow_db_template``, migrated once per
  session) and ``mlflow_server`` (a real ``mlflow server`` process, one per session).
- ``tiny_hf``: a tokenizer and tiny BERT / CLIP-vision checkpoints built with ``save_pretrained``.
- ``synth_data``: a small synthetic dataset of real H.264 clips.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path

import pytest

from orchestrator.ray_env import train_env_defaults

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Ray Train settings the product runs with (every Ray these tests start inherits them, and a
# TorchTrainer built without ``ensure_ray`` passes them to its controller too).
os.environ.update(train_env_defaults())
# Ray Train's preemption watcher is one more actor process per run (benchmarks/run_fixed_cost.py:
# ~1.3 CPU-s of each run's ~29); only the tests about preemption turn it back on
# (tests/reliability/test_node_loss.py: a real node drained with reason PREEMPTION).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

RAY_NUM_CPUS = 8  # logical CPUs for the local Ray (the machine has 2 cores)
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception as e:
            last = e
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer in {timeout}s: {last}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on loopback; sets the standard AWS environment for the whole session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", proc=proc)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield types.SimpleNamespace(endpoint=endpoint, port=port, proc=proc, env=env)
    finally:
        _stop(proc)
        log.close()
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket: returns its ``s3://name`` URI."""
    from orchestrator import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: v for k, v in s3_server.env.items()}
                              | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}})
    yield ray
    ray.shutdown()


def _prefix(module) -> str:
    """What the actor names of ``module`` (quality, progress) start with."""
    return module.actor_name("x")[:-1]


def _run_state_actors() -> set[str]:
    """The names of the run-state actors (bad-clip trackers, progress registries) alive in this
    process's Ray, if it has one."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return set()
    from orchestrator.data import progress, quality

    prefixes = (_prefix(quality), _prefix(progress))
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == quality.NAMESPACE and a["name"].startswith(prefixes)}


@pytest.fixture(scope="module", autouse=True)
def _end_test_run_state():
    """Run-state actors a test module created without ``run_training`` (which ends its own): a test
    that builds a dataset or a tracker by hand leaves one idle actor process per run name in the
    session's Ray, and the suite's later tests share the cores with them.  Ended when the module is
    done (a module's tests may share a dataset and so its tracker)."""
    before = _run_state_actors()
    yield
    from orchestrator.data import progress, quality

    for name in _run_state_actors() - before:
        for module in (quality, progress):
            if name.startswith(_prefix(module)):
                module.release(name[len(_prefix(module)):])


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema migrated, built once per session (a fresh
    store runs every migration: seconds each time)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_db_template):
    """A test's own empty MLflow store (a copy of the session's migrated template)."""
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_db_template):
    """A real ``mlflow server`` on loopback with a SQLite backend and a local artifact store."""
    root = tmp_path_factory.mktemp("mlflow_server")
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")  # migrated once per session
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", timeout=120, proc=proc)
        yield types.SimpleNamespace(uri=uri, port=port, proc=proc, root=root)
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Tokenizer + tiny BertModel + tiny CLIPVisionModel, saved as hub-style directories."""
    from orchestrator.devtools import hf_assets, synth

    root = tmp_path_factory.mktemp("hf")
    tok_dir = hf_assets.build_wordpiece_tokenizer(synth.all_texts(synth.make_clips(16, 0)), root / "tokenizer")
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tok_dir))
    bert = hf_assets.build_tiny_bert(root / "bert", vocab_size=vocab_size)
    clip = hf_assets.build_tiny_clip_vision(root / "clip")
    return types.SimpleNamespace(root=Path(root), tokenizer=tok_dir, bert=bert, clip=clip, vocab_size=vocab_size)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """24 short real H.264 clips with every annotation format, in a local folder."""
    from orchestrator.devtools.synth import ClipSpec, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(str(out), n=24, seed=0, spec=ClipSpec(width=96, height=64, fps=8, seconds=2.0, gop=8), log=lambda *_: None)
    return str(out)
