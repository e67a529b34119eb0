"""What Ray Train's controller poll interval costs a training run that reports every step.

    PYTHONPATH=$PWD python benchmarks/report_poll.py [--polls 2.0 0.25] [--steps 2 12] [--workers 2]

Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` and takes one
result per poll; ``ray.train.report`` waits in a one-slot queue until the previous result is taken.
For each poll value (the first is the baseline: Ray's default, 2.0 s), this runs the tests' toy
workload (``tests.train.toy_workload``, ``train.log_every=1``, one checkpoint at the end) for each
``--steps`` on one local Ray and derives the time per step and the fixed cost per run from the
difference.  TorchTrainer passes the variable from the driver's environment to its controller, so
one Ray serves every value.  Prints one line per value with its ratio to the baseline, then a JSON
object with every figure.  Timings are load-bound: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import ray
from e2e_phases import REPO, _train

from orchestrator.ray_env import TRAIN_POLL_ENV


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--polls", type=float, nargs="+", default=[2.0, 0.25])
    p.add_argument("--steps", type=int, nargs=2, default=[2, 12])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=8)
    args = p.parse_args()
    for k, v in (("DS_ACCELERATOR", "cpu"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}})
    root = tempfile.mkdtemp(prefix="report-poll-")
    lo, hi = args.steps
    rows = []
    for poll in args.polls:
        os.environ[TRAIN_POLL_ENV] = str(poll)
        t_lo = _train(lo, args.workers, root, f"p{poll}")
        t_hi = _train(hi, args.workers, root, f"p{poll}")
        per_step = (t_hi - t_lo) / (hi - lo)
        rows.append({"poll_s": poll, f"run_{lo}_steps_s": t_lo, f"run_{hi}_steps_s": t_hi, "per_step_s": per_step,
                     "fixed_per_run_s": t_lo - lo * per_step})
    ray.shutdown()
    base = rows[0]
    for r in rows:
        r["run_ratio_vs_baseline"] = r[f"run_{hi}_steps_s"] / base[f"run_{hi}_steps_s"]
        r["per_step_ratio_vs_baseline"] = r["per_step_s"] / base["per_step_s"]
        print(f"poll {r['poll_s']:5.2f} s: {hi}-step run {r[f'run_{hi}_steps_s']:6.1f} s "
              f"({r['run_ratio_vs_baseline']:.2f}x the {base['poll_s']} s poll's), per step {r['per_step_s']:5.2f} s "
              f"({r['per_step_ratio_vs_baseline']:.2f}x), fixed per run {r['fixed_per_run_s']:5.1f} s")
    print(json.dumps({"workers": args.workers, "rows": rows, "loadavg_1m_end": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
