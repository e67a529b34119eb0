"""What one small training run costs before it trains: CPU seconds by kind of process, per run.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/run_fixed_cost.py [--runs 3] [--workers 2] [--variants ...]

On one local Ray (started here like the tests' ``ray_local``: 8 logical CPUs), runs the tests' toy
workload (``tests.train.toy_workload``: 2 steps, ZeRO-2, a SQLite MLflow store, local
checkpoints) ``--runs`` times per variant, the variants in turn (A B A B ...), and samples every
process of this Ray each 0.2 s (psutil: user + system CPU, whole process trees) while each run
lasts.  A variant is a set of environment settings applied to the driver for its runs (Ray Train
passes the ``RAY_TRAIN_*`` ones to its controller and workers):

- ``default``: the product's settings;
- ``no_preemption_watcher``: ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` (one actor per run fewer);
- ``no_state_reconciliation``: ``RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION=0``.

Prints, per variant, the median over its runs of the wall time and of the CPU seconds by kind
(``ray::TrainController``, ``ray::RayTrainWorker``, ...), and a JSON object on the last line.
Processes that start and end between two samples are missed: the figures are lower bounds.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {
    "default": {},
    "no_preemption_watcher": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    "no_state_reconciliation": {"RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"},
}


def kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    m = re.search(r"ray::([A-Za-z_][A-Za-z0-9_]*)", text)
    if m:
        return "ray::" + m.group(1)
    for daemon in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env_agent", "default_worker.py"):
        if daemon in text:
            return daemon
    return (cmdline[0].rsplit("/", 1)[-1] if cmdline else "?")[:40]


class Sampler:
    """CPU seconds of this process and its descendants, by kind, between start() and stop()."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.me = psutil.Process()

    def _procs(self):
        yield self.me
        yield from self.me.children(recursive=True)

    def start(self) -> None:
        self.base: dict[tuple[int, float], float] = {}
        for p in self._procs():
            try:
                t = p.cpu_times()
                self.base[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        self.cpu: dict[tuple[int, float], float] = {}
        self.kinds: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()
        self._t.start()

    def _loop(self) -> None:
        while True:
            for p in self._procs():
                try:
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    self.cpu[key] = t.user + t.system - self.base.get(key, 0.0)
                    k = "driver (this process)" if p.pid == self.me.pid else kind(p.cmdline())
                    if key not in self.kinds or k not in ("ray::IDLE", "default_worker.py"):
                        self.kinds[key] = k
                except psutil.Error:
                    pass
            if self._stop.wait(self.every):
                return

    def stop(self) -> tuple[float, dict[str, float]]:
        self._stop.set()
        self._t.join()
        wall = time.perf_counter() - self._t0
        by: dict[str, float] = collections.defaultdict(float)
        for key, s in self.cpu.items():
            if s > 0.01:
                by[self.kinds[key]] += s
        return wall, dict(by)


def one_run(i: int, workers: int, root: str, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    import ray

    from orchestrator.config import load_config
    from orchestrator.trainer.driver import run_training
    from tests.train.toy_workload import make_rows

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_config(None, [
            "workload=tests.train.toy_workload", f"name=cost-{i}", f"storage={root}/store",
            f"tracking.uri=sqlite:///{root}/mlflow.db", f"train.num_workers={workers}",
            "train.batch_size_per_worker=4", "train.max_steps=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.warmup_steps=1", "train.zero_stage=2"])
        sampler = Sampler()
        sampler.start()
        out = run_training(cfg, datasets={"train": ray.data.from_items(make_rows(32))})
        wall, by = sampler.stop()
        assert out.metrics["step"] == 2, out.metrics
        return wall, by
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (after one warm-up run)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from orchestrator.ray_env import train_env_defaults

    os.environ.update(train_env_defaults())
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}})
    results: dict[str, list[tuple[float, dict[str, float]]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as root:
        one_run(0, args.workers, root, {})  # warm-up: caches, DeepSpeed's op, the MLflow store
        n = 1
        for _ in range(args.runs):
            for v in args.variants:
                results[v].append(one_run(n, args.workers, root, VARIANTS[v]))
                n += 1
    summary = {}
    for v, rows in results.items():
        kinds = sorted({k for _, by in rows for k in by})
        med = {k: statistics.median(by.get(k, 0.0) for _, by in rows) for k in kinds}
        total = statistics.median(sum(by.values()) for _, by in rows)
        wall = statistics.median(w for w, _ in rows)
        summary[v] = {"wall_s": round(wall, 1), "cpu_s": round(total, 1),
                      "by_kind": {k: round(s, 2) for k, s in sorted(med.items(), key=lambda kv: -kv[1])}}
        print(f"\n{v}: wall {wall:.1f} s, {total:.1f} CPU-s per run (median of {len(rows)})")
        for k, s in sorted(med.items(), key=lambda kv: -kv[1]):
            if s >= 0.1:
                print(f"  {s:7.2f} CPU-s  {k}")
    ray.shutdown()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
