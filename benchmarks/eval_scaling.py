"""Evaluation on 1 vs 2 Ray Train workers: the same checkpoint and data, wall time, items/s, and
whether the metrics are identical.

Builds the synthetic dataset (real H.264 clips) and a tiny model checkpoint per workload (random
weights, exported in the model's save format), starts a local Ray, then for each workload
(retrieval: embedding + k_test matching re-scores; captioning: beam search) runs
``orchestrator.evaluation.driver.run_evaluation`` (the ``evaluate`` verb, an evaluation-only TorchTrainer)
with ``train.num_workers`` = 1 and 2.  ``wall_s`` is the whole verb (Train worker start, model
load, decode, model compute, gather); items/s = evaluated rows / wall_s.  CPU here; on a machine
with GPUs pass ``--gpu`` (``train.use_gpu=true``).  The last line is one JSON object.

    .venv/bin/python benchmarks/eval_scaling.py [--clips 40] [--workloads retrieval,captioning] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(cfg, out: str) -> str:
    import torch

    from model.io import save_pretrained
    from orchestrator.runtime.model_setup import load_run_tokenizer, model_config_for
    from workloads import get_workload

    wl = get_workload(cfg.workload)
    torch.manual_seed(0)
    model = wl.build_model(model_config_for(cfg, load_run_tokenizer(cfg)), wl.Config.model_validate(cfg.task))
    save_pretrained(model, out)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=40, help="synthetic clips (20%% of them are the val split)")
    p.add_argument("--workloads", default="retrieval,captioning")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)

    import ray

    from orchestrator.config import load_config
    from orchestrator.devtools.synth import ClipSpec, generate
    from orchestrator.evaluation.driver import run_evaluation

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="eval_scaling_"))
    data = work / "data"
    if not (data / "annotations").exists():
        generate(str(data), n=args.clips, seed=0, spec=ClipSpec(width=96, height=64, fps=8, seconds=2.0, gop=8),
                 log=lambda *_: None)
    if not ray.is_initialized():
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}})
    workers = [int(w) for w in args.workers.split(",")]
    rows, identical = [], {}
    for name in args.workloads.split(","):
        over = [f"data.root={data}", f"storage={work / 'store'}", "tracking.enabled=false",
                f"data.image_size={args.image_size}", f"data.num_frames={args.frames}", "eval.batch_size=4",
                f"train.cpus_per_worker={args.cpus_per_worker}", f"train.use_gpu={'true' if args.gpu else 'false'}"]
        if name == "captioning":
            over += ["task.with_meteor=false", "task.num_beams=2", "task.max_length=8"]
        cfg = load_config(ROOT / "workloads" / "configs" / f"{name}_tiny.yaml", over)
        ckpt = make_checkpoint(cfg, str(work / f"ckpt-{name}"))
        by_w = {}
        for w in workers:
            wcfg = load_config(ROOT / "workloads" / "configs" / f"{name}_tiny.yaml", over + [f"train.num_workers={w}"])
            t0 = time.perf_counter()
            out = run_evaluation(wcfg, ckpt, track=False)
            wall = time.perf_counter() - t0
            items = out.metrics.get("items", 0.0)
            by_w[w] = out.metrics
            rows.append({"workload": name, "workers": w, "wall_s": round(wall, 2), "items": int(items),
                         "items_per_s": round(items / wall, 3)})
            print(f"{name:12s} workers={w} wall={wall:7.2f}s items={int(items)} items/s={items / wall:.3f}",
                  flush=True)
        base = by_w[workers[0]]
        identical[name] = all(by_w[w] == base for w in workers)
        for r in rows:
            if r["workload"] == name:
                r["speedup_vs_1"] = round(next(x["wall_s"] for x in rows if x["workload"] == name
                                               and x["workers"] == workers[0]) / r["wall_s"], 3)
        print(f"{name:12s} metrics identical across {workers} workers: {identical[name]}  {base}", flush=True)
    summary = {"benchmark": "eval_scaling", "device": "gpu" if args.gpu else "cpu", "cpu_count": os.cpu_count(),
               "clips": args.clips, "rows": rows, "metrics_identical": identical}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
