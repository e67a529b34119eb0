"""Shared helpers for the fault tests: a toy run config, our own Ray's train workers, MLflow servers."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from orchestrator import storage
from orchestrator.config import load_config
from orchestrator.train import checkpoint
from tests.conftest import wait_http

SLOW_TOY = "tests.reliability.slow_toy"
REPO = Path(__file__).resolve().parents[2]


def emit(obj: dict) -> None:
    """One JSON line on stdout in a single write: Ray forwards its workers' logs to the same stdout
    from another thread, and a ``print`` (text, then newline) can be split by one of their lines."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def last_json(out: str, first_key: str) -> dict:
    """The last JSON object in a job's output that starts with ``{"first_key"``, read up to its own
    end (a forwarded Ray log line may follow it on the same line)."""
    marker = '{"' + first_key + '"'
    found = [line[line.index(marker):] for line in out.splitlines() if marker in line]
    assert found, f"no {marker} line in the output:\n{out[-3000:]}"
    return json.JSONDecoder().raw_decode(found[-1])[0]


def toy_cfg(storage_uri: str, tracking_uri: str | None, name: str, trace: str | None = None, sleep_s: float = 0.0,
            **over):
    base = {"workload": SLOW_TOY, "name": name, "storage": storage_uri, "train.num_workers": 1,
            "train.batch_size_per_worker": 4, "train.max_steps": 24, "train.checkpoint_every": 4,
            "train.log_every": 1, "train.warmup_steps": 2, "train.lr": 0.01, "train.keep_checkpoints": 2,
            "train.max_failures": 4, "task.sleep_s": sleep_s,
            "data.prefetch_batches": 0}  # no prefetch threads: batches reach the loop in dataset order
    if tracking_uri:
        base["tracking.uri"] = tracking_uri
    else:
        base["tracking.enabled"] = False
    if trace:
        base["task.trace_file"] = trace
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def toy_datasets(n: int = 64):
    """One block, so the single worker sees the same order in every epoch and after every restart."""
    import ray

    from tests.reliability.slow_toy import make_rows

    return {"train": ray.data.from_items(make_rows(n), override_num_blocks=1)}


def train_workers(root_pid: int | None = None) -> list[psutil.Process]:
    """RayTrainWorker processes descended from ``root_pid`` (this process): never another run's."""
    out = []
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def checkpoint_steps(run_dir: str) -> list[int]:
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in d.glob("checkpoint_step_*") if p.name.rsplit("_", 1)[1].isdigit())


class MlflowServer:
    """An ``mlflow server`` on a fixed port and store that can be stopped and started again.
    ``template``: an already-migrated empty store to start from (a fresh one runs every migration)."""

    def __init__(self, root: Path, port: int, template: Path | None = None):
        self.root, self.port = Path(root), port
        if template is not None and not (self.root / "mlflow.db").exists():
            shutil.copyfile(template, self.root / "mlflow.db")
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = open(self.root / "server.log", "a")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.uri + "/health", timeout=120, proc=self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 9)  # the server and its gunicorn/uvicorn workers
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        deadline = time.time() + 30
        while time.time() < deadline:  # the port is free again
            try:
                wait_http(self.uri + "/health", timeout=0.5)
                time.sleep(0.2)
            except TimeoutError:
                return


def registered_checkpoints(run_dir: str) -> list[str]:
    """URIs of the checkpoints Ray Train registered for the run (its checkpoint manager's snapshot)."""
    snapshot = storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    names = re.findall(r"checkpoint_step_(\d{8}(?:_redo\d+)?)", snapshot)
    return [storage.join(run_dir, f"checkpoint_step_{s}") for s in sorted(set(names))]


def checkpoint_problems(uri: str) -> list[str]:
    """What is wrong with one checkpoint: a missing marker / progress / model file, or a file that
    does not load (a truncated upload).  Empty when it is complete."""
    problems = []
    with tempfile.TemporaryDirectory() as d:
        storage.download_dir(uri, d)
        root = Path(d)
        for need in (checkpoint.META, "progress.npz"):
            if not (root / need).is_file():
                problems.append(f"{uri}: no {need}")
        if not list(root.glob("ds/*model_states.pt")):
            problems.append(f"{uri}: no DeepSpeed model states")
        for f in root.rglob("*"):
            try:
                if f.suffix == ".pt":
                    torch.load(f, map_location="cpu", weights_only=False)  # our own test run's files
                elif f.suffix == ".npz":
                    with np.load(f, allow_pickle=False) as z:
                        [z[k] for k in z.files]
                elif f.suffix == ".json":
                    json.loads(f.read_text())
            except Exception as e:  # any failure to load is the finding
                problems.append(f"{uri}/{f.relative_to(root)}: does not load: {type(e).__name__}: {e}")
    return problems


def coco_images(root: str, n: int) -> None:
    """``n`` distinct small JPEGs (ids 0..n-1) and their coco_captions annotation under ``root`` (a URI)."""
    from tests.data.conftest import jpeg

    images, anns = [], []
    for i in range(n):
        storage.write_bytes(storage.join(root, "imgs", f"{i}.jpg"), jpeg(h=24, w=24, value=4 * i))
        images.append({"file_name": f"{i}.jpg", "id": i})
        anns.append({"image_id": i, "id": i, "caption": f"image {i}"})
    storage.write_text(storage.join(root, "coco.json"), json.dumps({"images": images, "annotations": anns}))


def split_size(root: str) -> int:
    """Rows of the train split, as the data plane parses them (not taken from the test's own count)."""
    from orchestrator.data.config import SourceConfig
    from orchestrator.data.sources import read_rows

    return len(read_rows(SourceConfig(format="coco_captions", train=["coco.json"], media="imgs"), root, "train"))
