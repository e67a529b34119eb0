"""A real single-node Ray cluster for tests: ``ray start --head --block`` in its own process group,
its own temp dir and its own ports, so it never meets the in-process ``ray_local`` fixture or any
other Ray on the machine; jobs go in through the ``ray job submit`` CLI, as a user would send them.

    with LocalRayHead(num_cpus=8) as head:
        result = head.submit(["python", "-m", "orchestrator", "synth", ...], working_dir=ROOT)
        assert result.status == "SUCCEEDED", result.logs

Stopping never runs ``ray stop`` (that would stop every Ray of this user on the machine): it
signals the ``ray start --block`` process, which takes its node down, then ends what is left of
the process group it started, and any process still naming this head's temp dir, by pid.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, wait_http

BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class JobResult:
    submission_id: str
    status: str
    logs: str


class LocalRayHead:
    def __init__(self, num_cpus: int = 8, resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()):
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.extra_args = list(extra_args)
        # A short path: Ray's unix sockets live under it and must stay below ~100 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Ray 2.60 enables token authentication: this head gets its own token, handed to the CLI
        # through RAY_AUTH_TOKEN and to the Python client as a bearer header.
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.env = self._environment({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **(env or {})})
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._nodes: list[subprocess.Popen] = []
        self._node_cpus: list[int] = []

    @staticmethod
    def _environment(extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        # Job entrypoints say `python ...`: make that the interpreter the tests run under.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.update(extra)
        return env

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout: float = 120.0) -> "LocalRayHead":
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", *self.extra_args]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        self._log = open(self.temp_dir / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_http(self.dashboard_url + "/api/version", timeout=timeout, proc=self.proc)
            self._wait_jobs_api(timeout)
        except Exception:
            tail = self.start_log()[-4000:]
            self.stop()
            raise RuntimeError(f"ray start --head did not come up:\n{tail}") from None
        return self

    def add_node(self, num_cpus: int, timeout: float = 120.0) -> int:
        """Another node of this cluster (``ray start --address --block``, its own process group and
        ports), waited for until the cluster counts its CPUs; returns its index (for :meth:`kill_node`)."""
        cmd = [str(BIN / "ray"), "start", f"--address={self.gcs_address}", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
               # its own temp dir (under the head's): sharing one would let this node's runtime-env
               # agent unpack a job's working_dir over the very directory the driver runs in
               f"--temp-dir={self.temp_dir / f'n{len(self._nodes)}'}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        log = open(self.temp_dir / f"ray-node-{len(self._nodes)}.log", "w")
        self._nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        self._node_cpus.append(num_cpus)
        want = self.num_cpus + sum(self._node_cpus)
        deadline = time.time() + timeout
        while True:
            try:
                status = subprocess.run([str(BIN / "ray"), "status", f"--address={self.gcs_address}"], env=self.env,
                                        capture_output=True, text=True, timeout=60).stdout
            except subprocess.TimeoutExpired:  # a loaded machine: ask again until the deadline
                status = ""
            if f"/{float(want)} CPU" in status:
                return len(self._nodes) - 1
            if time.time() > deadline or self._nodes[-1].poll() is not None:
                raise RuntimeError(f"node {len(self._nodes) - 1} did not join with {num_cpus} CPUs:\n{status[-2000:]}\n"
                                   + (self.temp_dir / f"ray-node-{len(self._nodes) - 1}.log").read_text()[-2000:])
            time.sleep(2)

    def node_temp_dir(self, index: int) -> Path:
        return self.temp_dir / f"n{index}"

    def node_pids(self, index: int) -> list[int]:
        """The node's processes: its ``ray start`` and everything under it (raylet, agents, workers)."""
        import psutil

        for _ in range(5):  # a child that exits mid-walk fails the walk: walk again
            try:
                root = psutil.Process(self._nodes[index].pid)
                return [root.pid] + [p.pid for p in root.children(recursive=True)]
            except psutil.NoSuchProcess as e:
                if e.pid == self._nodes[index].pid:
                    return []  # the node itself is gone
            except psutil.Error:
                pass
        return []

    def kill_node(self, index: int) -> list[int]:
        """The node lost for real: SIGKILL its raylet and every process of it (its process group and
        any process naming its temp dir: workers, agents), as when a machine goes away.  Returns the pids."""
        node = self._nodes[index]
        pids = sorted(set(self.node_pids(index)) | set(self._stray_pids(self.node_temp_dir(index))))
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()
        return pids

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def _wait_jobs_api(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                self.client().list_jobs()
                return
            except Exception:  # the job agent comes up a little after the dashboard
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def start_log(self) -> str:
        p = self.temp_dir / "ray-start.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def monitor_log(self) -> str:
        """The autoscaler's log (``monitor.log`` of the head's session), for failure messages."""
        logs = sorted(self.temp_dir.glob("session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def cli(self, *args: str, timeout: float = 120.0, cwd: str | os.PathLike | None = None) -> str:
        """Run a ``ray`` CLI command against this head; returns its output, raises on failure."""
        env = dict(self.env, RAY_ADDRESS=self.dashboard_url)
        r = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r.stdout + r.stderr

    def submit(self, entrypoint: list[str], working_dir: str | os.PathLike, runtime_env: dict | None = None,
               timeout: float = 300.0) -> JobResult:
        """``ray job submit --working-dir <dir> --runtime-env <file> -- <entrypoint>``, then wait for
        a terminal status; a job still running at ``timeout`` is stopped and reported as such."""
        sid = f"test-{uuid.uuid4().hex[:10]}"
        args = ["job", "submit", "--address", self.dashboard_url, "--submission-id", sid, "--no-wait",
                "--working-dir", str(working_dir)]
        if runtime_env is not None:
            env_file = self.temp_dir / f"{sid}-runtime_env.json"
            env_file.write_text(json.dumps(runtime_env))
            args += ["--runtime-env", str(env_file)]
        self.cli(*args, "--", *entrypoint, cwd=working_dir)
        return self.wait(sid, timeout)

    def wait(self, submission_id: str, timeout: float) -> JobResult:
        client = self.client()
        deadline = time.time() + timeout
        status = str(client.get_job_status(submission_id).value)
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(1)
            status = str(client.get_job_status(submission_id).value)
        if status not in TERMINAL:
            client.stop_job(submission_id)
            status = f"TIMEOUT after {timeout:.0f}s (was {status})"
        return JobResult(submission_id, status, client.get_job_logs(submission_id))

    def stop(self) -> None:
        for node in self._nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            node.wait()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` takes its node down on SIGTERM
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this head's Popen created
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        for pid in self._stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _stray_pids(self, temp_dir: Path | None = None) -> list[int]:
        """Processes of this head that left its process group (they name its temp dir)."""
        needle = str(temp_dir or self.temp_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
