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


# --- security settings (issue 16, items 6-8) ----------------------------------------------------

AWS_DIR = ROOT / "cluster" / "aws"


def _commands(cfg) -> str:
    return "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])


def test_dashboard_listens_on_loopback_only(cfg):
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in _commands(cfg), "nothing listens on every interface"


def test_ray_token_auth_on_every_node(cfg):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = "\n".join(cfg[key])
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, f"{key}: ray start without token authentication"
        assert "node_secrets.py ray-token ~/.ray/auth_token" in cmds, f"{key}: the node gets no token"
        assert cmds.index("ray-token") < cmds.index("ray start"), key


def test_mlflow_requires_a_login_and_gets_no_secret_on_its_command_line(cfg):
    # the server runs on its own instance (aws/mlflow_server.sh), not on the head (issue 31): a job on
    # the head could read its database URI and admin password and assume its role
    server = (AWS_DIR / "mlflow_server.sh").read_text()
    assert "--app-name basic-auth" in server
    assert "--backend-store-uri" not in server and "MLFLOW_DB" not in server, "the database URI would be in argv"
    assert ". /secrets/server.env" in server and "MLFLOW_AUTH_CONFIG_PATH=" in server
    assert "--host 0.0.0.0" not in server
    assert "AWS_PROFILE=mplug2-mlflow" in server, "MLflow runs as its own identity"
    assert "mlflow server" not in "\n".join(cfg["head_start_ray_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert ". ~/.mlflow/client.env" in start, f"{key}: jobs would have no MLflow login"
    assert "mlflow-client-env" in "\n".join(cfg["head_start_ray_commands"])


def test_no_secret_value_is_expanded_into_any_argv(cfg):
    """A secret may reach a process only through a 0600 file or its environment: no $(...) that
    prints a secret into a command line, no secret-bearing variable expanded into arguments."""
    for cmd in cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["head_start_ray_commands"] \
            + cfg["worker_start_ray_commands"]:
        assert "get_secret_value" not in cmd and "secretsmanager" not in cmd, cmd
        assert "node_secrets.py print" not in cmd, cmd
        for var in re.findall(r"\$\{?([A-Z_]+)", cmd):
            assert var in ("RAY_HEAD_IP", "HEAD_IP"), f"${var} expanded into a command line: {cmd}"


def test_private_subnets_one_explicit_security_group_and_own_profiles(cfg):
    assert cfg["provider"]["use_internal_ips"] is True
    profiles = {}
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc.get("SecurityGroupIds"), f"{name}: without SecurityGroupIds Ray creates a group open to SSH from 0.0.0.0/0"
        assert nc.get("SubnetIds"), f"{name}: no private subnets"
        profiles[name] = nc["IamInstanceProfile"]["Name"]
    assert profiles["head"] == "mplug2-ray-head"
    assert profiles["cpu_decode"] == "mplug2-ray-decode"
    assert profiles["gpu_spot"] == profiles["gpu_ondemand"] == "mplug2-ray-trainer"
    sg = json.loads((AWS_DIR / "security-group.json").read_text())
    assert {g for t in cfg["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]} == \
        {sg["IpPermissions"][0]["UserIdGroupPairs"][0]["GroupId"]}
    for rule in sg["IpPermissions"]:
        for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", []):
            assert r.get("CidrIp", r.get("CidrIpv6")) not in ("0.0.0.0/0", "::/0"), rule


def _statements(name):
    return json.loads((AWS_DIR / "iam" / name).read_text())["Statement"]


def _allowed(name, action_prefix):
    out = []
    for st in _statements(name):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] == "Allow" and any(a.startswith(action_prefix) or a == "*" for a in actions):
            out += [(a, r) for a in actions for r in resources]
    return out


def test_least_privilege_policies():
    for name in ("head-policy.json", "decode-policy.json", "trainer-policy.json", "mlflow-policy.json"):
        for st in _statements(name):
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), f"{name}: wildcard action"
    decode = _allowed("decode-policy.json", "s3:")
    assert {a for a, _ in decode} <= {"s3:GetObject", "s3:ListBucket"}, "decode nodes only read"
    assert all("mplug2-data" in r for _, r in decode)
    trainer_writes = [r for a, r in _allowed("trainer-policy.json", "s3:") if a in ("s3:PutObject", "s3:DeleteObject")]
    assert trainer_writes and all(r.startswith("arn:aws:s3:::mplug2-checkpoints/") for r in trainer_writes)
    mlflow = _allowed("mlflow-policy.json", "")
    assert mlflow and all("mplug2-mlflow-artifacts" in r for _, r in mlflow), "MLflow: the artifact bucket only"
    head = _statements("head-policy.json")
    pass_role = [st for st in head if st["Action"] == "iam:PassRole"]
    assert pass_role and all("mplug2-ray-" in r for r in pass_role[0]["Resource"])
    terminate = [st for st in head if "ec2:TerminateInstances" in st["Action"]]
    assert terminate and terminate[0]["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == "mplug2"


def test_node_secrets_writes_private_files(tmp_path):
    import importlib.util
    import stat
    import subprocess

    spec = importlib.util.spec_from_file_location("node_secrets", AWS_DIR / "node_secrets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "d" / "client.env"
    value = "p'w $(touch x) /+="
    mod.write_private(str(path), mod.env_file({"MLFLOW_TRACKING_PASSWORD": value}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = subprocess.run(["bash", "-c", f"set -a; . {path}; set +a; printf %s \"$MLFLOW_TRACKING_PASSWORD\""],
                         capture_output=True, text=True, cwd=tmp_path).stdout
    assert out == value and not (tmp_path / "x").exists()
