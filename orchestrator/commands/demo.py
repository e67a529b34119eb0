"""The end-to-end demo on embedded defaults: local Ray, ./demo_output as the object store, a local
SQLite MLflow store.  Synthesize clips that need temporal order, pre-train the tiny mPLUG-2 with 2
DeepSpeed workers, evaluate it zero-shot, fine-tune text-to-video retrieval from it, evaluate
again, and print the metrics against chance and the order-blind level, with the command that opens
the MLflow UI.

Both evaluations are the runs' own validation on the held-out clips at their last step (on the
Ray Train workers, as the ``evaluate`` verb runs it: contrastive top-k re-scored by the matching
head), so no extra Ray Train run is started for them."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import workloads
from orchestrator import storage
from orchestrator.config import load_config
from orchestrator.devtools.synth import ClipSpec, generate
from orchestrator.trainer.driver import run_training

# 160x120 clips, 3 s at 8 fps; the shape is a third to a half of the frame's height, so that at the
# tiny model's 32 px it is 10-16 px tall and its outline (square, circle, triangle) survives.
SPEC = ClipSpec(width=160, height=120, fps=8, seconds=3.0, gop=16, shape_min=1 / 3, shape_max=1 / 2)
ROWS = [("t2v_r1", "r1"), ("t2v_r5", "r5"), ("t2v_r10", "r10"), ("t2v_medr", "medr"), ("v2t_r1", "r1")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_output", help="local folder for data, checkpoints and MLflow")
    p.add_argument("--n", type=int, default=3120, help="synthetic clips, --val of them held out")
    p.add_argument("--val", type=int, default=48, help="held-out clips (48: every caption once)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: pretrain_tiny.yaml's train.max_steps")
    p.add_argument("--finetune-steps", type=int, default=None, help="default: retrieval_tiny.yaml's train.max_steps")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tag", default="demo", help="prefix of the run names (rerunning a tag resumes it)")


def _configs_dir() -> Path:
    return Path(workloads.__file__).resolve().parent / "configs"


def levels(n_val: int) -> dict[str, dict[str, float]]:
    """What chance and a model blind to frame order reach on ``n_val`` clips whose captions are all
    different and come in groups of four that differ in the direction alone (the ceiling: 100%).
    Order-blind: a bag of frames shows the colour, the shape and the axis of the motion, so the
    clip's caption ties with the one of the opposite direction (rank 1 or 2)."""
    chance = {"r1": 100.0 / n_val, "r5": 500.0 / n_val, "r10": 1000.0 / n_val, "medr": (n_val + 1) / 2}
    blind = {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.5}
    return {"chance": {k: min(v, 100.0) for k, v in chance.items()}, "order_blind": blind}


def _retrieval_metrics(outcome) -> dict[str, float]:
    """The run's last validation (``eval/<metric>``) as ``<metric>``."""
    found = {k.removeprefix("eval/"): float(v) for k, v in outcome.metrics.items() if k.startswith("eval/")}
    if "t2v_r1" not in found:
        raise RuntimeError(f"run {outcome.run_name} reported no validation figures (eval/t2v_r1): is the val split "
                           "there?")
    return found


def run(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    data = os.path.join(out, "synth")
    t0 = time.time()
    tracking = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    if storage.exists(os.path.join(data, "manifest.json")):
        print(f"demo: dataset already at {data}")
    else:
        generate(data, n=args.n, seed=0, spec=SPEC, val_fraction=args.val / args.n, workers=2)
    t_data = time.time()
    # data.deterministic: each worker gets the same clips in the same order every run, so (with the
    # seeded init, crops, shuffle and a tokenizer built from the texts alone) a fresh demo repeats its figures
    common = [f"data.root={data}", f"storage={os.path.join(out, 'store')}", f"tracking.uri={tracking}",
              f"train.num_workers={args.workers}", "data.deterministic=true"]

    print("demo: pre-training the tiny mPLUG-2 (MLM + contrastive + matching + instruction LM), then its zero-shot "
          "text-to-video retrieval on the held-out clips ...")
    pre_over = common + [f"name={args.tag}-pretrain"]
    if args.pretrain_steps is not None:
        pre_over.append(f"train.max_steps={args.pretrain_steps}")
    pre = run_training(load_config(_configs_dir() / "pretrain_tiny.yaml", pre_over))
    zero = _retrieval_metrics(pre)
    t_pre = time.time()

    print("demo: fine-tuning retrieval from the pre-trained model, then its retrieval on the held-out clips ...")
    ret_over = common + [f"name={args.tag}-retrieval"]
    if args.finetune_steps is not None:
        ret_over.append(f"train.max_steps={args.finetune_steps}")
    ft = run_training(load_config(_configs_dir() / "retrieval_tiny.yaml", ret_over), init_from=f"mlflow:{pre.mlflow_run_id}")
    fine = _retrieval_metrics(ft)
    t_ft = time.time()
    minutes = {"data": (t_data - t0) / 60, "pretrain": (t_pre - t_data) / 60, "finetune": (t_ft - t_pre) / 60,
               "total": (t_ft - t0) / 60}

    n_val = json.loads(storage.read_text(os.path.join(data, "manifest.json")))["val"]
    lv = levels(n_val)
    print(f"\nText-video retrieval on {n_val} held-out clips (each caption unique; R@k in %, MedR in ranks)")
    print(f"{'metric':<10}{'chance':>9}{'order-blind':>13}{'zero-shot':>11}{'fine-tuned':>12}")
    for key, c in ROWS:
        print(f"{key:<10}{lv['chance'][c]:>9.1f}{lv['order_blind'][c]:>13.1f}{zero[key]:>11.1f}{fine[key]:>12.1f}")
    print("(order-blind: what a model that sees colour and shape but not the frames' order reaches; ceiling 100)")
    print(f"\ndemo: {minutes['total']:.1f} min (clips {minutes['data']:.1f}, pre-train {minutes['pretrain']:.1f}, "
          f"fine-tune {minutes['finetune']:.1f}; each training run's own validation included)")
    print(f"pre-train run:  {pre.mlflow_run_id}  ({pre.run_dir})")
    print(f"fine-tune run:  {ft.mlflow_run_id}  ({ft.run_dir})")
    print(f"MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000   # then open http://127.0.0.1:5000")
    summary = {"chance": lv["chance"], "order_blind": lv["order_blind"], "zero_shot": zero, "fine_tuned": fine,
               "pretrain_run": pre.mlflow_run_id, "finetune_run": ft.mlflow_run_id,
               "pretrain_steps": pre.metrics.get("step"), "finetune_steps": ft.metrics.get("step"), "minutes": minutes}
    storage.write_text(os.path.join(out, "demo_results.json"), json.dumps(summary, indent=2))
    return 0
