"""The local Ray the CLI starts listens on loopback only (issue 31, class 3): its GCS, raylet,
agents and workers accepted TCP at the machine's network address before; ``MPLUG2_RAY_HOST``
chooses another address."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import ray_env

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: starts Ray through ensure_ray() as the CLI does, then lists every TCP
# port in LISTEN state owned by this process or any process under it (GCS, raylet, agents, workers).
PROBE = r"""
import json, os, sys, time
import psutil
from orchestrator.ray_env import ensure_ray
ensure_ray()
import ray
@ray.remote(num_cpus=0)
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])  # worker processes exist and serve
time.sleep(1)
me = psutil.Process()
tree = {p.pid: p for p in [me, *me.children(recursive=True)]}
out = []
for c in psutil.net_connections(kind="inet"):
    if c.pid in tree and c.status == psutil.CONN_LISTEN:
        try:
            name = tree[c.pid].name()
        except psutil.Error:
            name = "?"
        out.append([name, c.laddr.ip, c.laddr.port])
print("LISTEN " + json.dumps({"listen": out, "node_ip": ray.util.get_node_ip_address()}))
ray.shutdown()
"""


@pytest.mark.parametrize("value,expected", [(None, "127.0.0.1"), ("auto", None), ("", None), ("10.1.2.3", "10.1.2.3")])
def test_the_host_setting(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(ray_env.RAY_HOST_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_env.RAY_HOST_ENV, value)
    assert ray_env.local_ray_host() == expected


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.slow  # starts a Ray of its own (about 15 s)
def test_no_process_of_the_local_ray_listens_beyond_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ray_env.RAY_HOST_ENV)}
    env.update(PYTHONPATH=str(REPO), MPLUG2_LOCAL_NUM_CPUS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTEN ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(line[len("LISTEN "):])
    names = {name for name, _, _ in found["listen"]}
    assert {"gcs_server", "raylet"} <= names, found  # the servers were seen
    exposed = [entry for entry in found["listen"] if not _loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert found["node_ip"] == "127.0.0.1"
