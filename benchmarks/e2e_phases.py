"""Where the time of one tiny end-to-end training run goes (what the slow tests pay per run).

    PYTHONPATH=$PWD python benchmarks/e2e_phases.py [--workers 2] [--steps 1 6] [--num-cpus 8] [--repeat 2]

On a local Ray (started here, like the tests' session fixture ``ray_local``), in this order:

1. ``ray.init`` (paid once per test session).
2. An empty ``TorchTrainer`` (``--workers`` workers, a function that returns): Ray Train's own
   fixed cost per run (controller, worker processes, gloo group, teardown).
3. The same trainer whose function imports what the train loop imports in each worker (torch,
   deepspeed, transformers, the project's loop and model): that minus (2) is the imports' cost.
4. ``run_training`` of the tests' toy workload (``tests.train.toy_workload``, ZeRO-2, SQLite
   MLflow, local checkpoints) for each ``--steps``: the difference per step is the training cost;
   the rest is DeepSpeed set-up, data pipeline start, checkpoint, export and MLflow.

Phases 2-4 run ``--repeat`` times in turn (the first round also pays cold caches: the first imports
from disk, DeepSpeed's CPU op load, the first MLflow store); the figures are the last round's, with
the first round's beside them.  Prints one line per phase and a JSON object with every figure on
the last line.  Timings are load-bound: run it with ``uptime`` beside it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.config import load_config
from orchestrator.trainer.driver import run_training
from tests.train.toy_workload import make_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_IMPORTS = ("torch", "deepspeed", "transformers", "model", "orchestrator.trainer.loop")


def _empty(_config) -> None:
    return None


def _imports(_config) -> None:
    for name in WORKER_IMPORTS:
        importlib.import_module(name)


def _trainer(fn, workers: int) -> float:
    t0 = time.perf_counter()
    TorchTrainer(fn, scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="phases-"))).fit()
    return time.perf_counter() - t0


def _train(steps: int, workers: int, root: str, tag: str) -> float:
    over = {"workload": "tests.train.toy_workload", "name": f"phases-{tag}-{steps}", "storage": f"{root}/store",
            "tracking.uri": f"sqlite:///{root}/mlflow.db", "train.num_workers": workers,
            "train.batch_size_per_worker": 4, "train.max_steps": steps, "train.checkpoint_every": steps,
            "train.log_every": 1, "train.warmup_steps": 1, "train.zero_stage": 2}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    t0 = time.perf_counter()
    run_training(cfg, datasets={"train": ray.data.from_items(make_rows(64))})
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 6])
    p.add_argument("--num-cpus", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    for k, v in (("DS_ACCELERATOR", "cpu"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}})
    out["ray_init_s"] = time.perf_counter() - t0
    root = tempfile.mkdtemp(prefix="phases-")
    rounds: list[dict[str, float]] = []
    for r in range(args.repeat):
        one = {"empty_trainer_s": _trainer(_empty, args.workers), "import_trainer_s": _trainer(_imports, args.workers)}
        for steps in args.steps:
            one[f"train_{steps}_steps_s"] = _train(steps, args.workers, root, f"r{r}")
        one["worker_imports_s"] = one["import_trainer_s"] - one["empty_trainer_s"]
        if len(args.steps) >= 2:
            lo, hi = min(args.steps), max(args.steps)
            one["per_step_s"] = (one[f"train_{hi}_steps_s"] - one[f"train_{lo}_steps_s"]) / (hi - lo)
            one["fixed_per_run_s"] = one[f"train_{lo}_steps_s"] - lo * one["per_step_s"]
        rounds.append(one)
    t0 = time.perf_counter()
    ray.shutdown()
    out["ray_shutdown_s"] = time.perf_counter() - t0
    out.update(rounds[-1])
    for k, v in out.items():
        first = f"   (first round {rounds[0][k]:6.1f} s)" if k in rounds[0] and len(rounds) > 1 else ""
        print(f"{k:<22}{v:8.1f} s{first}")
    out["first_round"] = rounds[0]
    out["loadavg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
