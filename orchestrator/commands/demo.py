"""The end-to-end demo on embedded defaults: local Ray, ./demo_output as the object store, a local
SQLite MLflow store.  Synthesize clips that need temporal order, pre-train the tiny mPLUG-2 with 2
DeepSpeed workers, evaluate it zero-shot, fine-tune text-to-video retrieval from it, evaluate
again, and print the metrics against chance with the command that opens the MLflow UI."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import workloads
from orchestrator import storage
from orchestrator.config import load_config
from orchestrator.devtools.synth import ClipSpec, generate
from orchestrator.evaluation.driver import run_evaluation
from orchestrator.trainer.driver import run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_output", help="local folder for data, checkpoints and MLflow")
    p.add_argument("--n", type=int, default=240, help="synthetic clips (the last 20%% are the val split)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tag", default="demo", help="prefix of the run names (rerunning a tag resumes it)")


def _configs_dir() -> Path:
    return Path(workloads.__file__).resolve().parent / "configs"


def run(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    data = os.path.join(out, "synth")
    tracking = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    if storage.exists(os.path.join(data, "manifest.json")):
        print(f"demo: dataset already at {data}")
    else:
        generate(data, n=args.n, seed=0, spec=ClipSpec(width=160, height=120, fps=8, seconds=3.0, gop=16))
    # data.deterministic: each worker gets the same clips in the same order every run, so (with the
    # seeded init, crops, shuffle and a tokenizer built from the texts alone) a fresh demo repeats its figures
    common = [f"data.root={data}", f"storage={os.path.join(out, 'store')}", f"tracking.uri={tracking}",
              f"train.num_workers={args.workers}", "data.deterministic=true"]

    print("demo: pre-training the tiny mPLUG-2 (MLM + contrastive + matching + instruction LM) ...")
    pre_cfg = load_config(_configs_dir() / "pretrain_tiny.yaml",
                          common + [f"name={args.tag}-pretrain", f"train.max_steps={args.pretrain_steps}"])
    pre = run_training(pre_cfg)

    ret_over = common + [f"name={args.tag}-retrieval", f"train.max_steps={args.finetune_steps}"]
    ret_cfg = load_config(_configs_dir() / "retrieval_tiny.yaml", ret_over)
    print("demo: zero-shot text-to-video retrieval of the pre-trained model ...")
    zero = run_evaluation(ret_cfg, f"mlflow:{pre.mlflow_run_id}")
    print("demo: fine-tuning retrieval from the pre-trained model ...")
    ft = run_training(ret_cfg, init_from=f"mlflow:{pre.mlflow_run_id}")
    fine = run_evaluation(ret_cfg, f"mlflow:{ft.mlflow_run_id}")

    n_val = json.loads(storage.read_text(os.path.join(data, "manifest.json")))["val"]
    chance = {"r1": 100.0 / n_val, "r5": 500.0 / n_val, "r10": 1000.0 / n_val, "medr": (n_val + 1) / 2}
    rows = [("t2v_r1", "r1"), ("t2v_r5", "r5"), ("t2v_r10", "r10"), ("t2v_medr", "medr"), ("v2t_r1", "r1")]
    print(f"\nText-video retrieval on {n_val} held-out clips (each caption unique; R@k in %, MedR in ranks)")
    print(f"{'metric':<10}{'chance':>10}{'zero-shot':>12}{'fine-tuned':>12}")
    for key, c in rows:
        print(f"{key:<10}{min(chance[c], 100.0):>10.1f}{zero.metrics[key]:>12.1f}{fine.metrics[key]:>12.1f}")
    print(f"\npre-train run:  {pre.mlflow_run_id}  ({pre.run_dir})")
    print(f"fine-tune run:  {ft.mlflow_run_id}  ({ft.run_dir})")
    print(f"MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000   # then open http://127.0.0.1:5000")
    summary = {"chance": chance, "zero_shot": zero.metrics, "fine_tuned": fine.metrics,
               "pretrain_run": pre.mlflow_run_id, "finetune_run": ft.mlflow_run_id}
    storage.write_text(os.path.join(out, "demo_results.json"), json.dumps(summary, indent=2))
    return 0
