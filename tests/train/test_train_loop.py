"""The shared Ray Train + DeepSpeed loop, end to end on a local Ray, with checkpoints in the S3
server and a real MLflow store, driven by a small workload (the mPLUG-2 workloads have their own)."""
import pytest

from orchestrator import storage
from orchestrator.config import load_config

pytestmark = pytest.mark.slow

TOY = "tests.train.toy_workload"


def _cfg(storage_uri, mlflow_uri, name, **over):
    base = {
        "workload": TOY, "name": name, "storage": storage_uri, "tracking.uri": mlflow_uri,
        "train.num_workers": 2, "train.batch_size_per_worker": 4, "train.max_steps": 6,
        "train.checkpoint_every": 3, "train.log_every": 2, "train.warmup_steps": 2, "train.lr": 0.01,
        "train.keep_checkpoints": 2,
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _datasets(n=64):
    import ray

    from tests.train.toy_workload import make_rows

    return {"train": ray.data.from_items(make_rows(n))}


def _runs(mlflow_uri, experiment):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_server, mlflow_db_template, tmp_path_factory):
    """Two ZeRO-2 workers, 6 steps, checkpoints in the S3 server, a real MLflow store; then the same
    name run again.  The S3 test and the init-from test (which starts a child from this run) read it."""
    import shutil
    import uuid

    from orchestrator.trainer.driver import run_training

    bucket = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket.removeprefix("s3://"))
    tmp = tmp_path_factory.mktemp("s3_run")
    shutil.copyfile(mlflow_db_template, tmp / "mlflow.db")
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = _cfg(bucket + "/ckpt", mlflow_uri, "toy-run", **{"train.zero_stage": 2})
    out = run_training(cfg, datasets=_datasets())
    c, runs = _runs(mlflow_uri, cfg.experiment_name())
    loss_steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")]
    again = run_training(cfg, datasets=_datasets())
    return {"cfg": cfg, "out": out, "again": again, "mlflow_uri": mlflow_uri, "loss_steps_before_rerun": loss_steps,
            "tmp": tmp}


def test_train_checkpoints_to_s3_and_tracks_in_mlflow(s3_run):
    cfg, out, mlflow_uri = s3_run["cfg"], s3_run["out"], s3_run["mlflow_uri"]
    assert out.metrics["step"] == 6
    # checkpoints: the last 2 kept, in the bucket, each complete with every rank's shard
    files = list(storage.list_files(out.run_dir))
    ckpt_dirs = sorted({f.split("/checkpoint_step_")[1].split("/")[0] for f in files if "/checkpoint_step_" in f})
    assert ckpt_dirs == ["00000003", "00000006"]
    assert any(f.endswith("checkpoint_step_00000006/mplug2_checkpoint.json") for f in files)
    shard_files = [f for f in files if "checkpoint_step_00000006/ds/" in f and "optim_states" in f]
    assert len(shard_files) == 2, files  # one ZeRO optimizer shard per rank
    # exports are versioned per step behind a pointer (issue 17, item 4): the run's export URI names the latest
    from orchestrator.train.manifest import resolve_export

    assert out.export_uri and storage.exists(resolve_export(out.export_uri) + "/model.safetensors")
    assert resolve_export(out.export_uri).endswith("/export/step_00000006")
    # MLflow: one finished run with params, per-step metrics, config artifact and URIs
    c, runs = _runs(mlflow_uri, cfg.experiment_name())
    runs = [r for r in runs if r.data.tags.get("mlflow.runName") == "toy-run"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6" and run.data.params["workload"] == TOY
    assert s3_run["loss_steps_before_rerun"] == [2, 3, 4, 6]  # every log_every steps and at each checkpoint
    assert {"lr", "samples_per_s", "data_wait_frac", "acc"} <= set(run.data.metrics)
    assert run.data.tags["mplug2.checkpoint_uri"].startswith("s3://")
    assert run.data.tags["mplug2.export_uri"] == out.export_uri
    assert run.data.tags["mplug2.git_commit"]
    arts = [a.path for a in c.list_artifacts(run.info.run_id, "config")]
    assert arts == ["config/resolved.yaml"]
    # the secret in the environment never reaches params or tags
    secret = "testing-secret-never-logged"
    assert all(secret not in str(v) for v in list(run.data.params.values()) + list(run.data.tags.values()))

    # Rerunning the finished name retrains nothing: same run, no new checkpoint, no new metric points.
    out2 = s3_run["again"]
    assert out2.metrics.get("step", 6) == 6
    assert out2.mlflow_run_id == run.info.run_id
    assert c.get_run(run.info.run_id).data.tags.get("mplug2.resumed") == "true"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [2, 3, 4, 6]


def test_resume_continues_step_and_schedule(ray_local, tmp_path, mlflow_uri):
    """Stop after 4 of 8 steps (max_steps=4), then rerun the same name with max_steps=8: it goes on
    to step 8 and the LR schedule continues (no second warm-up).  Issue 17, item 4, in the same two
    runs: the realistic partial checkpoint (marker present, a shard truncated) is skipped with a
    warning and the previous complete one used; a finished name rerun with another config says so."""
    from orchestrator.train.manifest import FinishedWithOtherConfig
    from orchestrator.trainer.driver import run_training

    cfg = _cfg(str(tmp_path / "store"), mlflow_uri, "toy-resume",
               **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.num_workers": 1})
    run_training(cfg, datasets=_datasets())
    run_dir = storage.join(cfg.storage, cfg.experiment_name(), "toy-resume")
    shard = next(u for u in storage.list_files(storage.join(run_dir, "checkpoint_step_00000004"))
                 if u.endswith("model_states.pt"))
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])
    # ... and the steps redone past the fall back (3-4) are reported under new names: Ray's registry
    # (restored from its snapshot: 2 and 4) deletes old checkpoints by path, and a second report of
    # checkpoint_step_00000004 would have it delete that path twice, at step 8 (Path not found)
    cfg8 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 8})})
    out = run_training(cfg8, datasets=_datasets())
    assert out.metrics["step"] == 8 and out.checkpoint_uri.endswith("checkpoint_step_00000008_redo1")
    c, runs = _runs(mlflow_uri, cfg.experiment_name())
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(set(steps)) == [2, 4, 6, 8] and steps.count(4) == 2  # step 4 trained (and logged) again
    # the LR schedule goes on from the resumed step (no second warm-up): lr = lr_factor(step) x train.lr
    from orchestrator.train.optim import lr_factor

    lrs = {m.step: m.value for m in c.get_metric_history(runs[0].info.run_id, "lr")}
    for step in (6, 8):
        assert lrs[step] == pytest.approx(cfg8.train.lr * lr_factor(step, cfg8.train)), (step, lrs)
    resumed = [int(m.value) for m in c.get_metric_history(runs[0].info.run_id, "resumed_from_step")]
    assert resumed == [2], resumed
    assert run_training(cfg8, datasets=_datasets()).metrics["step"] == 8  # same config: the old result
    other = cfg8.model_copy(update={"train": cfg8.train.model_copy(update={"lr": 0.02})})
    with pytest.raises(FinishedWithOtherConfig, match="train.lr"):
        run_training(other, datasets=_datasets())


def test_init_from_zero_checkpoint_export_and_mlflow_lineage(s3_run):
    """A downstream start loads the same weights from the exported model and straight from the ZeRO
    checkpoint (two ranks' shards, in S3), and ``mlflow:<run_id>`` resolves to that run's export and
    records it as the parent."""
    import torch

    from orchestrator.train.weights import load_weights, resolve_init_from, state_dict_from
    from orchestrator.trainer.driver import run_training
    from tests.train.toy_workload import Config, build_model

    cfg, parent, mlflow_uri = s3_run["cfg"], s3_run["out"], s3_run["mlflow_uri"]
    from_export = state_dict_from(parent.export_uri)
    from_zero = state_dict_from(parent.checkpoint_uri)
    assert set(from_export) == set(from_zero)
    for k in from_export:
        torch.testing.assert_close(from_export[k].float(), from_zero[k].float())

    uri, run_id = resolve_init_from(f"mlflow:{parent.mlflow_run_id}", mlflow_uri)
    assert (uri, run_id) == (parent.export_uri, parent.mlflow_run_id)
    fresh = build_model(None, Config())
    assert load_weights(fresh, uri) == {"missing": [], "unexpected": [], "shape_mismatch": []}
    torch.testing.assert_close(fresh.state_dict()["head.weight"], from_export["head.weight"])
    with pytest.raises(ValueError, match="no such MLflow run"):
        resolve_init_from("mlflow:0123456789abcdef", mlflow_uri)

    child_cfg = cfg.model_copy(update={"name": "toy-child", "storage": str(s3_run["tmp"] / "store"),
                                       "train": cfg.train.model_copy(update={"max_steps": 2, "checkpoint_every": 2})})
    child = run_training(child_cfg, init_from=f"mlflow:{parent.mlflow_run_id}", datasets=_datasets())
    c, _ = _runs(mlflow_uri, cfg.experiment_name())
    tags = c.get_run(child.mlflow_run_id).data.tags
    assert tags["mplug2.init_from_run"] == parent.mlflow_run_id and tags["mplug2.init_from"] == parent.export_uri
