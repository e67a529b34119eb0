"""ZeRO stages: stage 3 is refused with a config error before Ray starts (the model reads some
parameters outside their module's forward, which ZeRO-3 leaves as empty shards; issue 12)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.train.deepspeed_config import build_deepspeed_config, load_user_json

CONFIG = Path(__file__).resolve().parents[2] / "workloads/configs/pretrain_tiny.yaml"


def test_zero3_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["train.zero_stage=3"])
    assert "train.zero_stage" in str(e.value) and "ZeRO stage 3 is refused" in str(e.value)
    for stage in (0, 1, 2):
        cfg = load_config(CONFIG, [f"train.zero_stage={stage}"])
        assert build_deepspeed_config(cfg.train, 2)["zero_optimization"]["stage"] == stage


def test_zero3_through_a_user_deepspeed_json_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    with pytest.raises(ValueError, match="zero_optimization.stage=3"):
        load_user_json(str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert load_user_json(str(path)) == {"zero_optimization": {"stage": 2}}


def test_zero3_cli_exits_2_before_ray_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator", "train", "--config", str(CONFIG), "train.zero_stage=3",
                        f"storage={tmp_path}", f"data.root={tmp_path}/data"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "ZeRO stage 3 is refused" in r.stderr and "train.zero_stage" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout
