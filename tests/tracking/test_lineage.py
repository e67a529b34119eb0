"""MLflow as its users expect (against a real SQLite store): training experiments, the standard
source tags, dataset inputs, the exported model as a LoggedModel (and in the registry), system
metrics from the training node."""
from __future__ import annotations

import json
import os
import time

import mlflow

from orchestrator.data.catalog import describe_sources
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.tracking import lineage, mlflow_run
from orchestrator.tracking.redact import REDACTED


def test_experiments_are_training_experiments_new_or_existing(tmp_path, mlflow_uri):
    uri = mlflow_uri
    c = mlflow_run.client(uri)
    new = mlflow_run.get_or_create_experiment(c, "fresh", uri)
    assert c.get_experiment(new).tags[lineage.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = c.create_experiment("made-elsewhere")  # e.g. by an earlier version, or by hand
    assert lineage.EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    assert mlflow_run.get_or_create_experiment(c, "made-elsewhere", uri) == old
    assert c.get_experiment(old).tags[lineage.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_source_tags_are_mlflows_own_and_redacted(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/x/orchestrator/__main__.py", "train", "--config", "c.yaml",
                                     "tracking.uri=postgresql://u:hunter2@db/m"])
    run_id = mlflow_run.open_run(mlflow_uri, "exp", "r", {}, {"mplug2.git_commit": "abc123"})
    tags = mlflow_run.client(mlflow_uri).get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == "abc123"
    assert tags["mlflow.source.type"] == "LOCAL"
    name = tags["mlflow.source.name"]
    assert name.startswith("python -m orchestrator train --config c.yaml") and "hunter2" not in name
    assert REDACTED in name


def test_datasets_are_logged_as_inputs_with_rows_and_a_content_digest(tmp_path, mlflow_uri, synth_data):
    uri = mlflow_uri
    run_id = mlflow_run.open_run(uri, "exp", "r", {}, {})
    data = DataConfig(root=synth_data, sources=[
        SourceConfig(format="msrvtt", train=["annotations/msrvtt_train.jsonl"], val=["annotations/msrvtt_val.jsonl"]),
        SourceConfig(format="youku_pretrain", train=["annotations/youku_pretrain_train.csv"], val=[])])
    sources = describe_sources(data, ("train", "val"), rows={("msrvtt", "train"): 19})
    assert [(s["format"], s["split"]) for s in sources] == [("msrvtt", "train"), ("youku_pretrain", "train"),
                                                            ("msrvtt", "val")]
    lineage.record_datasets(uri, run_id, sources)
    inputs = mlflow_run.client(uri).get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"msrvtt:train", "youku_pretrain:train", "msrvtt:val"}
    train = by_name["msrvtt:train"]
    assert json.loads(train.dataset.profile) == {"split": "train", "files": 1, "num_rows": 19}
    assert json.loads(train.dataset.source)["uris"][0].endswith("annotations/msrvtt_train.jsonl")
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in by_name["msrvtt:val"].tags}["mlflow.data.context"] == "evaluation"
    # the digest follows the files: same files, same digest; a changed file, a new digest
    again = lineage.dataset_entries(sources)
    assert again[0]["digest"] == train.dataset.digest
    ann = f"{synth_data}/annotations/msrvtt_train.jsonl"
    original = open(ann).read()
    try:
        time.sleep(0.01)
        open(ann, "a").write("\n")
        assert lineage.dataset_entries(sources)[0]["digest"] != train.dataset.digest
    finally:
        open(ann, "w").write(original)


def test_exported_model_is_a_logged_model_with_config_tokenizer_metrics_and_registry(tmp_path, mlflow_uri, tiny_hf):
    uri = mlflow_uri
    run_id = mlflow_run.open_run(uri, "exp", "pt", {}, {})
    export = tmp_path / "store" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"preset": "tiny"}))
    (export / "model.safetensors").write_bytes(b"weights-stay-here")
    mlflow_run.close_run(uri, run_id, metrics={"loss": 1.5}, step=10)
    model_id = lineage.record_model(uri, run_id, str(export), "pt", str(tiny_hf.tokenizer), register="mplug2-tiny")
    c = mlflow_run.client(uri)
    model = c.get_logged_model(model_id)
    assert str(model.status) in ("READY", "LoggedModelStatus.READY") and model.source_run_id == run_id
    assert model.tags["mplug2.export_uri"] == str(export)
    path = mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(tmp_path / "art"))
    got = {os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs}
    assert "config.json" in got and any(g.startswith("tokenizer/") for g in got)
    assert "model.safetensors" not in got  # the weights are referenced where the export is, not copied
    # the run's metric history is untouched (no second point at step 0 for the model)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(10, 1.5)]
    versions = c.search_model_versions("name = 'mplug2-tiny'")
    assert len(versions) == 1 and versions[0].run_id == run_id


def test_metric_logger_logs_system_metrics_of_the_node(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = mlflow_uri
    run_id = mlflow_run.open_run(uri, "exp", "r", {}, {})
    logger = mlflow_run.MetricLogger(uri, run_id, flush_every_s=3600, system_metrics=True)
    deadline = time.time() + 30
    keys = set()
    while time.time() < deadline and not any(k.startswith("system/cpu") for k in keys):
        time.sleep(0.5)
        keys = set(mlflow_run.client(uri).get_run(run_id).data.metrics)
    logger.close(timeout_s=10)
    assert any(k.startswith("system/cpu") for k in keys), keys
    assert any(k.startswith("system/system_memory") for k in keys), keys


def test_the_data_plane_counts_the_rows_it_parsed_per_source(ray_local, synth_data):
    """What the driver passes to the dataset inputs: rows parsed per (source, split), before
    weights; a sharded source's count is unknown until read (left out)."""
    from orchestrator.data.pipeline import build_dataset

    data = DataConfig(root=synth_data, sources=[
        SourceConfig(format="msrvtt", train=["annotations/msrvtt_train.jsonl"], val=["annotations/msrvtt_val.jsonl"],
                     weight=2.0)])
    counts = {}
    build_dataset(data, "train", training=True, columns=("text_ids",), seed=0, row_counts=counts)
    lines = [ln for ln in open(f"{synth_data}/annotations/msrvtt_train.jsonl") if ln.strip()]
    assert counts == {("msrvtt", "train"): len(lines)}
