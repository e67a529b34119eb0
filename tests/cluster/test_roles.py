"""Endpoints and roles least-privilege (issue 31, class 3), checked on every manifest form the
folder holds (each RayCluster spec: a RayCluster's, a RayJob's rayClusterSpec, a RayService's
rayClusterConfig; ``aws.yaml``; the MLflow host script): the MLflow server's credentials and role
are out of reach of job drivers, decode nodes get only what decoding needs, nothing listens on
0.0.0.0 without the token and network policy stated beside it."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws"
MLFLOW_CLIENT_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SERVER_SECRETS = ("mplug2/mlflow-db", "mplug2/mlflow-auth")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of every Ray cluster any KubeRay manifest here would create."""
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            kind, spec = doc.get("kind"), doc.get("spec") or {}
            found = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                     "RayService": spec.get("rayClusterConfig")}.get(kind)
            if found:
                out.append((f"{path.name}:{kind}", found))
    return out


SPECS = ray_cluster_specs()


def test_every_manifest_form_is_found():
    assert {w.split(":")[1] for w, _ in SPECS} >= {"RayCluster", "RayJob"}, SPECS


def _is_gpu(group: dict) -> bool:
    return "nvidia.com/gpu" in group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})


def _env_names(pod_spec: dict) -> set[str]:
    return {e["name"] for c in pod_spec["containers"] for e in (c.get("env") or [])}


@pytest.mark.parametrize("where,spec", SPECS, ids=[w for w, _ in SPECS])
def test_token_auth_and_a_fenced_dashboard_in_every_cluster(where, spec):
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token authentication is off"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head Service must stay in-cluster"
    host = head["rayStartParams"].get("dashboard-host", "127.0.0.1")
    if host not in ("127.0.0.1", "localhost"):
        policies = {d["metadata"]["name"]: d for d in _docs(KUBERAY / "networkpolicy.yaml")}
        dash = policies["ray-dashboard-from-operator"]["spec"]
        assert dash["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"
        assert [p["port"] for r in dash["ingress"] for p in r["ports"]] == [8265]
        assert all("namespaceSelector" in f for r in dash["ingress"] for f in r["from"])


@pytest.mark.parametrize("where,spec", SPECS, ids=[w for w, _ in SPECS])
def test_decode_pods_get_only_what_decoding_needs(where, spec):
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, f"{where}/{g['groupName']}: a worker needs no k8s API"
        if _is_gpu(g):
            assert pod["serviceAccountName"] == "mplug2-ray-train"
            continue
        assert pod["serviceAccountName"] == "mplug2-ray-decode", (where, g["groupName"])
        leaked = _env_names(pod) & set(MLFLOW_CLIENT_VARS)
        assert not leaked, f"{where}/{g['groupName']}: decode pods get the MLflow login {leaked}"


def _fence_stated_beside(lines: list[str], i: int) -> bool:
    """The lines around a 0.0.0.0 (the 4 above and the line itself) name the auth and the NetworkPolicy."""
    near = " ".join(lines[max(0, i - 4):i + 1]).lower()
    return ("networkpolicy" in near or "network policy" in near) and any(
        w in near for w in ("token", "basic-auth", "login"))


def test_no_0000_anywhere_without_its_fence_stated_beside_it():
    hits = 0
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".sh", ".json", "")):
        if path.name == "Dockerfile" or path.suffix == ".png":
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "0.0.0.0" not in line or line.lstrip().startswith("#") or "0.0.0.0/0" in line:
                continue
            hits += 1
            assert path.parent == KUBERAY, f"{path}:{i + 1}: listens on every interface: {line.strip()}"
            assert _fence_stated_beside(lines, i), f"{path}:{i + 1}: 0.0.0.0 without token/login + NetworkPolicy beside it"
    assert hits == 2  # the RayJob's dashboard and the MLflow pod, both fenced


# --- AWS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _all_commands(aws) -> str:
    cmds = aws["setup_commands"] + aws["head_setup_commands"] + aws["worker_setup_commands"] \
        + aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    for t in aws["available_node_types"].values():
        cmds += t.get("worker_setup_commands", []) + t.get("initialization_commands", [])
    return "\n".join(cmds)


def _statements(name: str) -> list[dict]:
    return json.loads((AWS / "iam" / name).read_text())["Statement"]


def _grants(name: str, action: str) -> list[str]:
    out = []
    for st in _statements(name):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if st["Effect"] == "Allow" and action in actions:
            out += st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
    return out


def test_no_ray_node_runs_or_can_become_the_mlflow_server(aws):
    assert "mlflow server" not in _all_commands(aws), "the MLflow server runs on a Ray node"
    for policy in ("head-policy.json", "decode-policy.json", "trainer-policy.json"):
        assert not _grants(policy, "sts:AssumeRole"), f"{policy}: may assume a role (the MLflow server's)"
        secrets = " ".join(_grants(policy, "secretsmanager:GetSecretValue"))
        assert not any(s in secrets for s in SERVER_SECRETS), f"{policy}: reads the MLflow server's secrets"
    host = _grants("mlflow-host-policy.json", "secretsmanager:GetSecretValue")
    assert all(any(s in r for s in SERVER_SECRETS) for r in host) and len(host) == 2
    assert _grants("mlflow-host-policy.json", "sts:AssumeRole") == ["arn:aws:iam::111122223333:role/mplug2-mlflow"]
    uri = "MLFLOW_TRACKING_URI=http://mlflow.mplug2.internal:5000"
    assert all(uri in c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if "ray start" in c)


def test_decode_nodes_hold_only_the_ray_token(aws):
    decode = aws["available_node_types"]["cpu_decode"]
    assert decode["node_config"]["IamInstanceProfile"]["Name"] == "mplug2-ray-decode"
    assert not any("mlflow" in c for c in decode.get("worker_setup_commands", []))
    assert _grants("decode-policy.json", "secretsmanager:GetSecretValue") == \
        ["arn:aws:secretsmanager:*:111122223333:secret:mplug2/ray-auth-token-*"]
    start = "\n".join(aws["worker_start_ray_commands"])
    assert "mlflow-client-env" not in start, "every worker (decode too) would fetch the MLflow login"
    assert "if [ -f ~/.mlflow/client.env ]" in start
    for name in ("gpu_spot", "gpu_ondemand"):  # rank 0 logs metrics: the GPU nodes get the jobs' login
        assert any("mlflow-client-env" in c for c in aws["available_node_types"][name]["worker_setup_commands"])


def test_the_mlflow_host_security_group_is_not_open_to_the_world():
    sg = json.loads((AWS / "mlflow-security-group.json").read_text())
    for rule in sg["IpPermissions"]:
        for r in rule.get("IpRanges", []):
            assert r["CidrIp"] not in ("0.0.0.0/0", "::/0"), rule
    ports = {(r["FromPort"], r["ToPort"]) for r in sg["IpPermissions"]}
    assert ports == {(5000, 5000), (22, 22)}


def _server_script() -> str:
    """The script the MLflow container's shell runs (the last ``bash -c '...'`` of mlflow_server.sh)."""
    text = (AWS / "mlflow_server.sh").read_text()
    return re.findall(r"bash -c '(.*?)'", text, flags=re.S)[-1]


def test_the_mlflow_host_script_keeps_secrets_off_every_argv(tmp_path):
    """Run the server's own shell script with a stand-in ``mlflow``: its argv holds no secret, its
    environment has the database URI, it listens on the private address, with a login."""
    text = (AWS / "mlflow_server.sh").read_text()
    assert "--backend-store-uri" not in text and "0.0.0.0" not in text
    assert "node_secrets.py print" not in text and "get_secret_value" not in text
    assert "-e AWS_PROFILE=mplug2-mlflow" in text
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    db = "postgresql://mlflow:S3cr3t-pw@db.internal:5432/mlflow"
    (secrets / "server.env").write_text(f"MLFLOW_BACKEND_STORE_URI='{db}'\nMLFLOW_AUTH_ADMIN_PASSWORD='adm1n-pw'\n")
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/argv"\nenv > "$OUT/env"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    script = _server_script().replace("/secrets/", f"{secrets}/")
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "OUT": str(tmp_path)}
    subprocess.run(["bash", "-c", script, "10.0.3.7"], check=True, env=env, timeout=30)
    argv = (tmp_path / "argv").read_text()
    assert "S3cr3t-pw" not in argv and "adm1n-pw" not in argv
    assert "--app-name\nbasic-auth" in argv and "--host\n10.0.3.7" in argv
    assert f"MLFLOW_BACKEND_STORE_URI={db}" in (tmp_path / "env").read_text()
