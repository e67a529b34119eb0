"""A tiny retrieval sweep on the synthetic data: 1 worker, a few steps, 2 frames of 32 px."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RETRIEVAL_TINY = REPO / "workloads" / "configs" / "retrieval_tiny.yaml"


def tiny_run_overrides(data_root: str, mlflow_uri: str, max_steps: int = 4) -> list[str]:
    return [f"data.root={data_root}", f"tracking.uri={mlflow_uri}", "train.num_workers=1",
            "train.cpus_per_worker=0.5", f"train.max_steps={max_steps}", "train.log_every=1",
            f"train.checkpoint_every={max_steps}", "train.warmup_steps=2", "train.batch_size_per_worker=4",
            "data.image_size=32", "data.num_frames=2", "data.decode_cpus=0.25", "eval.max_samples=8",
            "eval.batch_size=8", "task.k_test=4"]


@pytest.fixture
def write_sweep(tmp_path):
    def write(name: str, **spec) -> Path:
        path = tmp_path / f"sweep_{name.replace('/', '_')}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": str(RETRIEVAL_TINY), **spec}, sort_keys=False))
        return path
    return write
