"""``cluster/aws.yaml`` against the autoscaler schema shipped inside the installed Ray, and the
scheduling rules the project relies on (head runs no training, decode on CPUs, train on GPUs)."""
from __future__ import annotations

import copy
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
AWS_YAML = ROOT / "cluster" / "aws.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_validates_against_rays_schema(cfg, schema):
    jsonschema.validate(cfg, schema)


def test_validates_through_ray_up_preparation(cfg):
    # The same two steps `ray up` runs before it talks to AWS: merge the provider defaults, validate.
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == set(cfg["available_node_types"])


def test_schema_rejects_a_broken_copy(cfg, schema):
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_spot"]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    bad["idle_timeout_mins"] = 5  # a typo of idle_timeout_minutes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_images_match_installed_ray_and_python(cfg):
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    images = [cfg["docker"]["image"], cfg["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in cfg["available_node_types"].values() if "docker" in t]
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-(?P<py>py\d+)-(?P<plat>cpu|gpu|cu\d+)", image)
        assert m, f"{image} is not a rayproject/ray:<ray>-<py>-<platform> tag (ray-ml is no longer published)"
        assert m["ray"] == ray.__version__, f"{image}: installed Ray is {ray.__version__}"
        assert m["py"] == py, f"{image}: installed Python is {py}"
    assert cfg["docker"]["image"].endswith("-gpu"), "GPU workers need the CUDA image"


def test_head_schedules_no_training(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start and "--head" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_worker_types_declare_cpu_for_decode_and_gpu_for_train(cfg):
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    cpu_only = [k for k, v in workers.items() if v["resources"].get("CPU", 0) > 0 and not v["resources"].get("GPU")]
    gpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0]
    assert cpu_only, "a CPU-only worker type is needed for decoding"
    assert len(gpu) >= 1, "GPU worker types are needed for training"
    for k in gpu:  # training workers also need a few CPUs each beside their GPU
        assert workers[k]["resources"]["CPU"] >= 4 * workers[k]["resources"]["GPU"], k
    total_min = 0
    for k, v in workers.items():
        assert 0 <= v["min_workers"] <= v["max_workers"] <= cfg["max_workers"], k
        total_min += v["min_workers"]
    assert total_min <= cfg["max_workers"]
    spot = [k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert set(cpu_only) <= set(spot), "decode nodes are stateless: run them on spot"
    assert any(k not in spot for k in gpu), "keep an on-demand GPU type for long pre-trains"
    assert cfg["idle_timeout_minutes"] > 0


def test_setup_installs_this_project_at_its_pinned_version(cfg):
    setup = "\n".join(cfg["setup_commands"])
    version = project_version()
    assert f"mplug2_ray-{version}-py3-none-any.whl" in setup
    assert "--require-hashes -r /home/ray/requirements/torch-cuda.lock" in setup
    assert setup.index("torch-cuda.lock") < setup.index("main.lock") < setup.index("mplug2_ray-"), \
        "torch, then the locked dependencies, then the project"
    assert "./dist" in cfg["file_mounts"].values() and "./requirements" in cfg["file_mounts"].values()


def test_no_credentials_in_the_cluster_file():
    text = AWS_YAML.read_text()
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret", "password", "AKIA"):
        assert needle.lower() not in text.lower(), needle
