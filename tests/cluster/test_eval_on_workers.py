"""Issue 14, items 3 and 4: on a cluster whose head has no CPUs for work (``ray start --head
--num-cpus 0``, as ``cluster/aws.yaml`` ships it) and a second node, an ``evaluate`` job sent with
``ray job submit`` succeeds, no model forward runs in the job's driver process (every
``torch.nn.Module`` call there is counted), and a val clip that cannot be decoded is counted and
shows in the metrics: they cover 7 of the split's 8 items and the MLflow run says so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.cluster.ray_head import LocalRayHead

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _runtime_env() -> dict:
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip")
    env.pop("working_dir")
    return env


def _checkpoint(cfg, out: Path) -> str:
    import torch

    from model.io import save_pretrained
    from orchestrator.runtime.model_setup import load_run_tokenizer, model_config_for
    from workloads import get_workload

    wl = get_workload(cfg.workload)
    torch.manual_seed(0)
    save_pretrained(wl.build_model(model_config_for(cfg, load_run_tokenizer(cfg)), wl.Config.model_validate(cfg.task)),
                    str(out))
    return str(out)


def test_evaluate_job_runs_its_model_on_the_workers_not_the_cpu_less_head(synth_data, tmp_path, mlflow_db_template):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    val = [json.loads(line) for line in (data / "annotations" / "msrvtt_val.jsonl").read_text().splitlines() if line]
    (data / "videos" / val[0]["video"]).write_bytes(b"not a video at all" * 64)     # one bad val clip
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")  # migrated once per session
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={data}", f"storage={tmp_path / 'store'}", f"tracking.uri={tracking}", "name=cpu-less-head",
                 "train.num_workers=2", "train.cpus_per_worker=1", "data.image_size=32", "data.num_frames=2",
                 "data.max_bad_fraction=0.5", "eval.batch_size=3"]
    cfg = load_config(ROOT / "workloads" / "configs" / "retrieval_tiny.yaml", overrides)
    ckpt = _checkpoint(cfg, tmp_path / "ckpt")

    with LocalRayHead(num_cpus=0) as head:
        head.add_node(num_cpus=6)
        result = head.submit(["python", "-m", "tests.cluster.eval_job.driver_probe", "--checkpoint", ckpt,
                              "--config", "workloads/configs/retrieval_tiny.yaml", *overrides],
                             working_dir=ROOT, runtime_env=_runtime_env(), timeout=540)
    assert result.status == "SUCCEEDED", result.logs[-6000:]
    line = next(x for x in result.logs.splitlines() if x.startswith("EVAL_DRIVER_PROBE "))
    probe = json.loads(line.split(" ", 1)[1])
    assert probe["rc"] == 0 and probe["driver_forwards"] == 0, probe

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(cfg.experiment_name())
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mplug2.kind") == "evaluation"]
    m = run.data.metrics
    assert m["eval/items"] == len(val) - 1 and m["eval/bad_items"] == 1, m
    assert m["eval/item_coverage"] == pytest.approx((len(val) - 1) / len(val))
    assert m["eval/num_texts"] == len(val) - 1 and 0 <= m["eval/t2v_r1"] <= 100
    assert "1 bad items skipped" in run.data.tags["mplug2.eval.partial"]
    assert run.data.tags["mplug2.eval.num_workers"] == "2"
