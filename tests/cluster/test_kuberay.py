"""The KubeRay manifests parse and carry what the operator requires (ray.io/v1 RayCluster and
RayJob: headGroupSpec with rayStartParams + template, worker groups with groupName, min/max
replicas, a pod template with containers), and agree with the rest of the project."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"


def load_docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    return docs


def one(name: str, kind: str) -> dict:
    found = [d for d in load_docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def check_pod_template(template: dict, where: str) -> list[dict]:
    assert isinstance(template, dict) and isinstance(template.get("spec"), dict), f"{where}: template.spec"
    containers = template["spec"].get("containers")
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers must be a non-empty list"
    for c in containers:
        assert isinstance(c.get("name"), str) and c["name"], f"{where}: every container needs a name"
        assert isinstance(c.get("image"), str) and c["image"], f"{where}: every container needs an image"
        for kind in ("requests", "limits"):
            for key, value in c.get("resources", {}).get(kind, {}).items():
                assert isinstance(value, str), f"{where}: resources.{kind}.{key}={value!r} must be a quantity string"
    return containers


def check_cluster_spec(spec: dict, where: str) -> None:
    """The fields the RayCluster CRD requires, with their types, plus this project's rules."""
    assert spec.get("rayVersion") == ray.__version__, f"{where}: rayVersion must be the installed Ray {ray.__version__}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: the autoscaler must be on"
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), \
        f"{where}: rayStartParams values must be strings"
    assert params.get("num-cpus") == "0" and params.get("num-gpus") == "0", f"{where}: the head schedules no work"
    check_pod_template(head["template"], f"{where}.headGroupSpec")
    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: groupName must be unique: {names}"
    gpu_groups, cpu_groups = [], []
    for g in groups:
        gw = f"{where}.workerGroupSpecs[{g['groupName']}]"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"]), f"{gw}: groupName must be a DNS label"
        for key in ("minReplicas", "maxReplicas", "replicas"):
            assert isinstance(g[key], int) and g[key] >= 0, f"{gw}: {key} must be an integer >= 0"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{gw}: need min <= replicas <= max"
        assert isinstance(g["rayStartParams"], dict), f"{gw}: rayStartParams must be a map"
        containers = check_pod_template(g["template"], gw)
        limits = containers[0].get("resources", {}).get("limits", {})
        (gpu_groups if "nvidia.com/gpu" in limits else cpu_groups).append(g["groupName"])
    assert gpu_groups and cpu_groups, f"{where}: need a CPU group for decoding and a GPU group for training"


def test_raycluster_has_what_the_operator_requires():
    rc = one("raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    check_cluster_spec(rc["spec"], "RayCluster")
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert any(g["maxReplicas"] > g["minReplicas"] for g in rc["spec"]["workerGroupSpecs"]), "nothing can scale"


def test_rayjob_runs_a_pretrain_on_its_own_cluster():
    job = one("rayjob-pretrain.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    # One cluster source only: the operator rejects rayClusterSpec together with clusterSelector.
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML document inside a string
    assert isinstance(runtime_env, dict)
    for value in runtime_env.get("env_vars", {}).values():
        assert isinstance(value, str), "runtime_env env_vars values must be strings"


def test_rayjob_entrypoint_is_a_valid_pretrain_command():
    argv = shlex.split(one("rayjob-pretrain.yaml", "RayJob")["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "orchestrator", "train"], argv
    rest = argv[4:]
    config = rest[rest.index("--config") + 1]
    assert re.fullmatch(r"workloads/configs/pretrain_\w+\.yaml", config), config
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    assert "train.use_gpu=true" in overrides
    # The overrides go through the project's own validation (against the named config once it exists).
    path = ROOT / config
    cfg = load_config(path if path.exists() else None, overrides)
    assert cfg.train.use_gpu and cfg.storage.startswith("s3://") and cfg.data.root.startswith("s3://")
    if path.exists():
        assert cfg.workload == "pretrain"


def test_all_images_are_the_pinned_project_image_and_dockerfile_matches():
    version = project_version()
    images = set()
    for name in ("raycluster.yaml", "rayjob-pretrain.yaml", "mlflow.yaml"):
        images |= set(re.findall(r"image:\s*(\S+)", (KUBERAY / name).read_text()))
    assert images == {f"mplug2-ray:{version}-gpu"}, images
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    import sys
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert f"RAY_IMAGE=rayproject/ray:{ray.__version__}-{py}-gpu" in dockerfile
    assert f"ARG VERSION={version}" in dockerfile
    assert dockerfile.index("-r /tmp/requirements/torch-cuda.lock") < dockerfile.index("-r /tmp/requirements/main.lock")


def test_every_pod_reaches_the_team_mlflow_server():
    svc = one("mlflow.yaml", "Service")
    dep = one("mlflow.yaml", "Deployment")
    uri = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob-pretrain.yaml", "RayJob")):
        for c in re.findall(r"MLFLOW_TRACKING_URI, value: \"([^\"]+)\"", (KUBERAY / name).read_text()):
            assert c == uri, f"{name}: {c} != {uri}"
        assert uri in (KUBERAY / name).read_text(), f"{name} ({kind}) does not set MLFLOW_TRACKING_URI={uri}"
    args = " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--artifacts-destination s3://" in args, "artifacts belong in object storage"
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    db = next(e for e in env if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert "secretKeyRef" in db["valueFrom"], "the database URI (with its password) must come from a Secret"
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local" in args  # --allowed-hosts


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-pretrain.yaml", "mlflow.yaml", "serviceaccount.yaml",
                                  "networkpolicy.yaml"])
def test_no_credentials_in_manifests(name):
    text = (KUBERAY / name).read_text().lower()
    for needle in ("aws_secret_access_key", "aws_access_key_id", "akia", "password:"):
        assert needle not in text, f"{name} contains {needle}"
    for doc in load_docs(name):
        assert doc.get("kind") != "Secret", f"{name}: Secrets are created out of band, not committed"


# --- security settings (issue 16, items 6-8) ----------------------------------------------------

def test_token_auth_and_no_public_dashboard():
    rc = one("raycluster.yaml", "RayCluster")
    job = one("rayjob-pretrain.yaml", "RayJob")
    for where, spec in (("RayCluster", rc["spec"]), ("RayJob", job["spec"]["rayClusterSpec"])):
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token authentication is off"
    # the long-lived cluster: dashboard on the head pod's loopback, reached by kubectl port-forward
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert rc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    # a RayJob's operator and submitter reach the Jobs API through the head Service: allowed only with
    # token auth (above) and a NetworkPolicy that admits only the operator and Ray pods to 8265
    if job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0":
        policies = {d["metadata"]["name"]: d for d in load_docs("networkpolicy.yaml")}
        dash = policies["ray-dashboard-from-operator"]
        assert [p["port"] for r in dash["spec"]["ingress"] for p in r["ports"]] == [8265]
        assert all("namespaceSelector" in f for r in dash["spec"]["ingress"] for f in r["from"])


def test_network_policies_fence_the_gcs_and_mlflow():
    docs = load_docs("networkpolicy.yaml")
    assert all(d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "mplug2" for d in docs)
    by_name = {d["metadata"]["name"]: d for d in docs}
    deny = by_name["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    ray_only = by_name["ray-pods-only"]["spec"]
    sel = ray_only["podSelector"]["matchLabels"]
    assert [f["podSelector"]["matchLabels"] for r in ray_only["ingress"] for f in r["from"]] == [sel], \
        "only Ray pods reach Ray pods (GCS, raylets, object managers)"
    mlflow = by_name["mlflow-from-ray-and-team"]["spec"]
    assert mlflow["podSelector"]["matchLabels"] == one("mlflow.yaml", "Deployment")["spec"]["selector"]["matchLabels"]
    sources = [f for r in mlflow["ingress"] for f in r["from"]]
    assert {"podSelector", "ipBlock"} >= {k for f in sources for k in f}
    assert all(f["ipBlock"]["cidr"] != "0.0.0.0/0" for f in sources if "ipBlock" in f)


def test_mlflow_requires_a_login_and_its_secrets_stay_out_of_argv():
    dep = one("mlflow.yaml", "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = " ".join(c["args"])
    assert "--app-name basic-auth" in args
    assert "--backend-store-uri" not in args and "$" not in args, "no secret is expanded into the server's argv"
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    vol = next(v for v in pod["volumes"] if v["name"] == "auth-config")
    assert vol["secret"]["secretName"] == "mplug2-mlflow-auth"
    assert pod["serviceAccountName"] == "mplug2-mlflow", "MLflow runs as its own identity"
    for name in ("raycluster.yaml", "rayjob-pretrain.yaml"):
        text = (KUBERAY / name).read_text()
        assert "MLFLOW_TRACKING_PASSWORD" in text and "mplug2-mlflow-client" in text, f"{name}: jobs have no login"


def test_each_role_has_its_own_service_account():
    accounts = {d["metadata"]["name"]: d for d in load_docs("serviceaccount.yaml")}
    assert set(accounts) == {"mplug2-ray-head", "mplug2-ray-decode", "mplug2-ray-train", "mplug2-mlflow"}
    roles = {n: a["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for n, a in accounts.items()}
    assert len(set(roles.values())) == 4, "one IAM role per identity"
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob-pretrain.yaml", "RayJob")):
        doc = one(name, kind)
        spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "mplug2-ray-head"
        for g in spec["workerGroupSpecs"]:
            sa = g["template"]["spec"]["serviceAccountName"]
            gpu = "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
            assert sa == ("mplug2-ray-train" if gpu else "mplug2-ray-decode"), (name, g["groupName"], sa)
