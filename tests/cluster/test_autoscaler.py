"""The autoscaler adds a worker for a job that needs one, on Ray's fake multi-node provider: a
head that schedules nothing (as in cluster/aws.yaml), a CPU worker type and a GPU worker type
(logical GPUs), both starting at zero nodes. A job whose task needs a GPU must make the
autoscaler launch a node of the GPU type, and the task must run there.

The wheel does not ship the provider's defaults file (fake_multi_node/example.yaml) that
``provider: {type: fake_multinode}`` loads, so the provider class is named through Ray's
``external`` provider type; ``ray.cluster_utils.AutoscalingCluster`` is not used because it runs
``ray stop --force`` (every Ray of this user on the machine)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cluster.ray_head import LocalRayHead

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = pytest.mark.slow


def fake_cluster_config(gcs_address: str) -> dict:
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    gpu_types = [k for k, v in aws["available_node_types"].items() if v["resources"].get("GPU")]
    cpu_types = [k for k, v in aws["available_node_types"].items()
                 if v["resources"].get("CPU") and not v["resources"].get("GPU")]
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for k in cpu_types[:1]:
        types[k] = {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}
    for k in gpu_types[:1]:
        types[k] = {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {
        "cluster_name": "fake-mplug2",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def test_autoscaler_adds_a_gpu_worker_for_a_job_that_needs_one(tmp_path):
    head = LocalRayHead(num_cpus=0, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config = fake_cluster_config(head.gcs_address)
    gpu_type = next(k for k, v in config["available_node_types"].items() if v["resources"].get("GPU"))
    path = tmp_path / "autoscaling.json"
    path.write_text(json.dumps(config))
    head.extra_args.append(f"--autoscaling-config={path}")
    with head:
        result = head.submit(["python", "probe.py"], working_dir=HERE / "autoscale_job", timeout=240)
        assert result.status == "SUCCEEDED", result.logs[-4000:] + head.monitor_log()[-4000:]
        line = next(ln for ln in result.logs.splitlines() if ln.startswith("AUTOSCALE_PROBE "))
        probe = json.loads(line.removeprefix("AUTOSCALE_PROBE "))
        assert len(probe["before"]) == 1, "the cluster must start with the head alone"
        assert probe["task_node"] not in probe["before"], "the task ran on the head"
        assert probe["nodes"][probe["task_node"]].get("GPU") == 1, "the task did not run on a GPU node"
        status = head.cli("status", "--address", head.gcs_address)
        assert gpu_type in status, status
