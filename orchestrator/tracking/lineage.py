"""What MLflow users expect to find on a run, in MLflow's own terms.

- Experiments are marked as model-training experiments (``mlflow.experimentKind``), so MLflow 3's
  UI opens them on the runs table rather than the GenAI views.
- The standard source tags: ``mlflow.source.name`` (the entry point as typed, redacted),
  ``mlflow.source.type`` and ``mlflow.source.git.commit``.
- The run's datasets as MLflow dataset inputs (``log_inputs``): one per source and split, with the
  annotation URIs, the split, the row count and a digest of the annotation files' sizes and
  modification times (or ETags), so two runs on the same data show the same digest.
- The exported model as an MLflow LoggedModel of the run: its config, tokenizer and metrics, the
  weights referenced where the export lives (``<run dir>/export``), optionally registered in the
  model registry (``train --register NAME``).
- System metrics (CPU, memory, disk, network, GPU when present) from the training node of rank 0:
  :func:`start_system_metrics`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any

from orchestrator import storage
from orchestrator.tracking.redact import redact, redact_text

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's kind for model training experiments
MODEL_TYPE = "mplug2"


def source_tags(git_commit: str | None, argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's standard source tags; the command line is redacted (it may carry a tracking URI)."""
    args = list(sys.argv if argv is None else argv)
    entry = "python -m orchestrator " + " ".join(args[1:]) if args and args[0].endswith(
        ("orchestrator/__main__.py", "orchestrator", "mplug2")) else " ".join(args)
    tags = {"mlflow.source.name": redact_text(entry.strip())[:5000] or "orchestrator",
            "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS") else "LOCAL"}
    if git_commit:
        tags["mlflow.source.git.commit"] = git_commit
    return tags


def mark_training_experiment(c, experiment_id: str) -> None:
    exp = c.get_experiment(experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        c.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _file_fingerprint(uri: str) -> str:
    """Size and modification time (local) or ETag (S3): cheap, and changes when the file does."""
    try:
        info = storage.stat(uri)
    except Exception as e:  # a digest must not fail the run
        return f"{uri}:unreadable:{type(e).__name__}"
    return f"{uri}:{info.get('size')}:{info.get('etag') or info.get('mtime')}"


def dataset_entries(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``sources``: ``{"format", "split", "files": [uri...], "rows": int | None, "context"}`` per
    source and split -> the MLflow dataset fields (name, digest, source, profile)."""
    out = []
    for s in sources:
        files = [redact_text(f) for f in s["files"]]
        digest = hashlib.sha256("\n".join(sorted(_file_fingerprint(f) for f in s["files"])).encode()).hexdigest()[:16]
        profile = {"split": s["split"], "files": len(files)}
        if s.get("rows") is not None:
            profile["num_rows"] = int(s["rows"])
        out.append({"name": f"{s['format']}:{s['split']}", "digest": digest,
                    "source_type": "s3" if any(storage.is_s3(f) for f in files) else "local",
                    "source": json.dumps({"uris": files}), "profile": json.dumps(profile),
                    "context": s.get("context", "training")})
    return out


def log_datasets(c, run_id: str, sources: list[dict[str, Any]]) -> int:
    """Log every source/split of the run as an MLflow dataset input; returns how many."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entries = dataset_entries(sources)
    inputs = [DatasetInput(Dataset(e["name"], e["digest"], e["source_type"], e["source"], profile=e["profile"]),
                           tags=[InputTag("mlflow.data.context", e["context"])]) for e in entries]
    if inputs:
        c.log_inputs(run_id, datasets=inputs)
    return len(inputs)


def log_exported_model(uri: str, run_id: str, experiment_id: str, export_uri: str, name: str,
                       tokenizer: str | None = None, register: str | None = None) -> str:
    """The export as an MLflow LoggedModel of the run: ``config.json`` and the run's tokenizer as its
    artifacts, the weights' location as a tag (they stay where the export is, not copied into
    MLflow's store); registered as ``register`` when given. Returns the model id. The model's
    metrics are its source run's (linked by ``source_run_id``): logging them again would add
    duplicate points to the run's metric history."""
    import tempfile

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    model = c.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
                                  tags=redact({"mplug2.export_uri": export_uri,
                                               "mplug2.weights": storage.join(export_uri, "model.safetensors")}))
    with tempfile.TemporaryDirectory() as d:
        storage.write_bytes(os.path.join(d, "config.json"), storage.read_bytes(storage.join(export_uri, "config.json")))
        if tokenizer and (storage.has_scheme(tokenizer) or os.path.isdir(tokenizer)):
            storage.download_dir(tokenizer, os.path.join(d, "tokenizer"))
        c.log_model_artifacts(model.model_id, d)
    c.finalize_logged_model(model.model_id, "READY")
    if register:
        if not c.search_registered_models(f"name = '{register}'"):
            c.create_registered_model(register)
        # the model's own artifact location: a models:/ URI would be resolved against the
        # process-global tracking URI, not this client's
        c.create_model_version(register, source=model.artifact_location, run_id=run_id, model_id=model.model_id)
    return model.model_id


def start_system_metrics(uri: str, run_id: str, node_id: str | None = None):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU when NVML is present) on
    this node, logging into ``run_id`` as ``system/*`` and continuing the step count of a resumed
    run. Returns the monitor (``.finish()`` stops it) or None when it cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, node_id=node_id,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # metrics about the machine never stop training
        log.warning("MLflow system metrics not started: %s", type(e).__name__)
        return None


def record_datasets(uri: str, run_id: str, sources: list[dict[str, Any]]) -> None:
    """:func:`log_datasets`, never failing the run (lineage is worth a warning, not a lost job)."""
    from mlflow.tracking import MlflowClient

    try:
        log_datasets(MlflowClient(uri), run_id, sources)
    except Exception as e:
        log.warning("MLflow: could not record the run's datasets: %s", redact_text(str(e)))


def record_model(uri: str, run_id: str, export_uri: str, name: str, tokenizer: str | None,
                 register: str | None = None) -> str | None:
    """:func:`log_exported_model` for a finished run; a failure is a warning, except that asking
    to register a model that could not be logged is an error the user must see."""
    from mlflow.tracking import MlflowClient

    try:
        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        return log_exported_model(uri, run_id, experiment_id, export_uri, name, tokenizer=tokenizer,
                                  register=register)
    except Exception as e:
        if register:
            raise RuntimeError(f"could not log and register the exported model as {register!r}: "
                               f"{redact_text(str(e))}") from None
        log.warning("MLflow: could not log the exported model: %s", redact_text(str(e)))
        return None
