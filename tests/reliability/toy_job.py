"""A training job as its own process with its own local Ray, for the driver-kill test:

    python -m tests.reliability.toy_job STORAGE NAME [--steps N] [--sleep S]
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("storage")
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sleep", type=float, default=0.15)
    args = ap.parse_args(argv)
    import ray

    from orchestrator.trainer.driver import run_training
    from tests.reliability.helpers import REPO, emit, toy_cfg, toy_datasets

    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}})
    try:
        cfg = toy_cfg(args.storage, None, args.name, sleep_s=args.sleep, **{"train.max_steps": args.steps})
        out = run_training(cfg, datasets=toy_datasets())
        emit({"result_step": out.metrics.get("step"), "checkpoint": out.checkpoint_uri})
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
