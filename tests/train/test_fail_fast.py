"""Issue 12: a run whose config can never work fails once, clearly, before or instead of
``max_failures`` restarts; relative paths and the image size are settled in the driver."""
from __future__ import annotations

import os

import pytest

from orchestrator.config import ConfigError, load_config


def test_worker_setup_error_is_not_retried(ray_local, tmp_path):
    import ray

    from orchestrator.trainer.driver import run_training
    from tests.reliability.trace_clips import read
    from tests.train.toy_workload import make_rows

    trace = tmp_path / "setup.jsonl"
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "workload": "tests.reliability.trace_clips", "name": "broken", "storage": str(tmp_path / "s"),
        "tracking.enabled": False, "train.num_workers": 1, "train.max_failures": 3,
        "task.fail_setup": True, "task.trace_file": str(trace)}.items()])
    rows = [{"frames": r["frames"], "clip_index": i} for i, r in enumerate(make_rows(8))]
    with pytest.raises(ConfigError, match="init weights not found: /nowhere/weights.safetensors") as e:
        run_training(cfg, datasets={"train": ray.data.from_items(rows)})
    assert "restart would fail the same way" in str(e.value)
    assert len(read(trace)) == 1  # one attempt, not 1 + max_failures


def test_relative_paths_are_made_absolute_in_the_driver(tmp_path, monkeypatch):
    from orchestrator.trainer.driver import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    cfg = load_config(None, ["data.root=./demo_output/synth", "data.tokenizer=tok", "storage=./store",
                             "model.text_pretrained=bert-base-uncased"])
    out = absolute_paths(cfg)
    assert out.data.root == os.path.join(str(tmp_path), "demo_output/synth")
    assert out.data.tokenizer == str(tmp_path / "tok") and out.storage == str(tmp_path / "store")
    assert out.model.text_pretrained == "bert-base-uncased"  # not a local path: a hub name
    s3 = load_config(None, ["data.root=s3://bucket/x"])
    assert absolute_paths(s3).data.root == "s3://bucket/x"


def test_model_image_size_follows_the_data():
    from orchestrator.runtime.model_setup import model_config_for

    cfg = load_config(None, ["model.preset=tiny", "data.image_size=64"])
    assert model_config_for(cfg).image_size == 64
    bad = load_config(None, ["model.preset=tiny", "data.image_size=64", "model.overrides={image_size: 32}"])
    with pytest.raises(ConfigError, match="data.image_size=64"):
        model_config_for(bad)
    odd = load_config(None, ["model.preset=tiny", "data.image_size=36"])
    with pytest.raises(ConfigError, match="patch_size"):
        model_config_for(odd)
