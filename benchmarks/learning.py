"""Does what it trains learn?  Every workload on the synthetic data, through the real stack.

    PYTHONPATH=$PWD python benchmarks/learning.py [--out /tmp/learning] [--seeds 0 1 2] [--only pretrain ...]
    PYTHONPATH=$PWD python benchmarks/learning.py --demo demo_output --only videoqa captioning classification glue

``--demo DIR``: after ``make demo`` (``python -m orchestrator demo --out DIR``), its pre-train and
fine-tuned retrieval are the first two rows (from ``DIR/demo_results.json``, their time the demo's
wall-clock minutes) and the later stages start from its pre-trained model, on its clips, in its stores.

Each stage is a real run, as a user starts it: the shipped tiny config (``workloads/configs/*_tiny.yaml``),
Ray Data decoding the H.264 clips with decord, Ray Train + DeepSpeed on 2 CPU workers, MLflow; the
figure is the run's own validation on the held-out clips at its last step (on the workers).

1. the demo's clips (``orchestrator/commands/demo.py``: 3,072 training clips, 48 held out, every caption once);
2. ``pretrain``: zero-shot text-to-video retrieval of the pre-trained model;
3. ``retrieval``, ``videoqa``, ``captioning``: fine-tuned from that pre-train (``--init-from``);
4. ``classification``: the direction the shape moves, from scratch, with and without the local
   temporal module (``model.overrides.lt_enabled=false``), one run per ``--seeds``;
5. ``glue``: the synthetic SST-2 sentences, from scratch.

Every figure stands beside chance, what a model blind to frame order can reach (it sees colour, shape
and the axis of the motion, from a bag of frames, never the direction) and the ceiling.  CPU-minutes:
the CPU time of this process and every process it started (Ray's included), sampled twice a second,
a lower bound.  Prints the table (markdown) and a JSON object with every figure on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when run as a script

from benchmarks.run_fixed_cost import Sampler
from orchestrator import storage
from orchestrator.commands.demo import SPEC, _configs_dir
from orchestrator.config import load_config
from orchestrator.console import configure_logging
from orchestrator.devtools.synth import COLORS, DIRECTIONS, generate
from orchestrator.trainer.driver import run_training

STAGES = ("pretrain", "retrieval", "videoqa", "captioning", "classification", "glue")


def _val_questions(data: str) -> list[dict]:
    text = storage.read_text(storage.join(data, "annotations", "msrvtt_qa_val.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def qa_levels(data: str) -> tuple[float, float]:
    """(chance, order-blind) accuracy on the val questions: a uniform guess within the question's
    kind of answer (4 colours, 3 shapes, 4 directions); order-blind: every colour and shape right,
    the direction a draw between the two of its axis."""
    qs = _val_questions(data)
    kinds = [("direction" if q["answer"] in DIRECTIONS else "colour" if q["answer"] in COLORS else "shape") for q in qs]
    chance = 100.0 * statistics.mean({"direction": 1 / 4, "colour": 1 / 4, "shape": 1 / 3}[k] for k in kinds)
    blind = 100.0 * statistics.mean(0.5 if k == "direction" else 1.0 for k in kinds)
    return chance, blind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/learning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--demo", default=None, metavar="DIR",
                   help="a finished demo's folder: its pre-train and retrieval runs are reused (not run again)")
    p.add_argument("--set", nargs="*", default=[], metavar="STAGE:KEY=VALUE",
                   help="an extra override for one stage's config, e.g. videoqa:train.max_steps=300")
    args = p.parse_args(argv)
    configure_logging(False)  # as the CLI: our story at INFO, Ray's internals at WARNING
    out = os.path.abspath(args.demo or args.out)
    data = os.path.join(out, "synth")
    demo = json.loads(storage.read_text(os.path.join(out, "demo_results.json"))) if args.demo else None
    meter = Sampler(every=0.5)  # CPU of this process and every process it starts (Ray's included)
    meter.start()
    if not storage.exists(os.path.join(data, "manifest.json")):
        generate(data, n=3120, seed=0, spec=SPEC, val_fraction=48 / 3120, workers=2)
    n_val = json.loads(storage.read_text(os.path.join(data, "manifest.json")))["val"]
    tracking = f"sqlite:///{os.path.join(out, 'mlflow.db')}"
    common = [f"data.root={data}", f"storage={os.path.join(out, 'store')}", f"tracking.uri={tracking}",
              "data.deterministic=true"]
    extra: dict[str, list[str]] = {}
    for item in args.set:
        stage, _, kv = item.partition(":")
        extra.setdefault(stage, []).append(kv)

    def train(stage: str, config: str, name: str, over=(), init_from=None) -> dict:
        cfg = load_config(_configs_dir() / config, common + [f"name={name}", *over, *extra.get(stage, [])])
        stage_meter = Sampler(every=0.5)
        stage_meter.start()
        outcome = run_training(cfg, init_from=init_from)
        wall, cpu = stage_meter.stop()
        figures = {k.removeprefix("eval/"): float(v) for k, v in outcome.metrics.items() if k.startswith("eval/")}
        return {"figures": figures, "steps": cfg.train.max_steps, "cpu_min": sum(cpu.values()) / 60,
                "wall_min": wall / 60, "run": outcome.mlflow_run_id}

    runs: dict[str, dict] = {}
    pre_id = None
    if demo:  # the demo's runs: its figures and its wall-clock minutes (its CPU time was not sampled)
        for stage, key, phase in (("pretrain", "zero_shot", "pretrain"), ("retrieval", "fine_tuned", "finetune")):
            runs[stage] = {"figures": demo[key], "steps": demo[f"{phase}_steps"], "cpu_min": None,
                           "wall_min": demo["minutes"][phase], "run": demo[f"{phase}_run"]}
        pre_id = f"mlflow:{demo['pretrain_run']}"
    elif "pretrain" in args.only or any(s in args.only for s in ("retrieval", "videoqa", "captioning")):
        runs["pretrain"] = train("pretrain", "pretrain_tiny.yaml", "learn-pretrain")
        pre_id = f"mlflow:{runs['pretrain']['run']}"
    for stage in ("retrieval", "videoqa", "captioning"):
        if stage in args.only and stage not in runs:
            runs[stage] = train(stage, f"{stage}_tiny.yaml", f"learn-{stage}", init_from=pre_id)
    if "classification" in args.only:
        for lt in (True, False):
            for seed in args.seeds:
                runs[f"classification/lt={lt}/seed={seed}"] = train(
                    "classification", "classification_tiny.yaml", f"learn-cls-lt{int(lt)}-s{seed}",
                    [f"seed={seed}", f"model.overrides.lt_enabled={str(lt).lower()}"])
    if "glue" in args.only:
        runs["glue"] = train("glue", "glue_tiny.yaml", "learn-glue")

    chance48, qa = 100.0 / n_val, qa_levels(data)
    rows = []  # (stage, metric, chance, order-blind, ceiling, result, steps, cpu-min, wall-min)

    def row(stage, metric, chance, blind, result, steps, cpu, wall):
        rows.append({"stage": stage, "metric": metric, "chance": chance, "order_blind": blind, "ceiling": 100.0,
                     "result": result, "steps": steps, "cpu_min": cpu, "wall_min": wall})

    for stage, label in (("pretrain", "zero-shot text-to-video R@1 (48 clips)"),
                         ("retrieval", "fine-tuned text-to-video R@1 (48 clips)")):
        if stage in runs:
            r = runs[stage]
            row(stage, label, chance48, 50.0, f"{r['figures']['t2v_r1']:.1f}", r["steps"], r["cpu_min"],
                r["wall_min"])
    if "videoqa" in runs:
        r = runs["videoqa"]
        row("videoqa", f"answer accuracy, generated (ranked over the answer list: {r['figures'].get('ranked_accuracy', 0):.1f})",
            qa[0], qa[1], f"{r['figures']['accuracy']:.1f}", r["steps"], r["cpu_min"], r["wall_min"])
    if "captioning" in runs:
        r = runs["captioning"]
        row("captioning", f"caption = a reference (CIDEr {r['figures']['CIDEr']:.2f})", chance48, 50.0,
            f"{r['figures']['exact_match']:.1f}", r["steps"], r["cpu_min"], r["wall_min"])
    for lt in (True, False):
        accs = [runs[k]["figures"]["top1"] for k in runs if k.startswith(f"classification/lt={lt}/")]
        if accs:
            cpu = [runs[k]["cpu_min"] for k in runs if k.startswith(f"classification/lt={lt}/")]
            wall = [runs[k]["wall_min"] for k in runs if k.startswith(f"classification/lt={lt}/")]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row("classification", f"direction accuracy, {'with' if lt else 'without'} LT ({len(accs)} seeds: "
                + ", ".join(f"{a:.1f}" for a in accs) + ")", 25.0, 50.0, f"{statistics.mean(accs):.1f} ± {spread:.1f}",
                runs[next(k for k in runs if k.startswith(f'classification/lt={lt}/'))]["steps"], statistics.mean(cpu),
                statistics.mean(wall))
    if "glue" in runs:
        r = runs["glue"]
        row("glue", "SST-2 (synthetic) accuracy", 50.0, None, f"{r['figures']['accuracy']:.1f}", r["steps"], r["cpu_min"],
            r["wall_min"])

    print("\n| workload | metric (%) | chance | order-blind | ceiling | result | steps | CPU-min | wall-min |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        blind = "—" if r["order_blind"] is None else f"{r['order_blind']:.1f}"
        cpu = "(demo)" if r["cpu_min"] is None else f"{r['cpu_min']:.1f}"
        print(f"| {r['stage']} | {r['metric']} | {r['chance']:.1f} | {blind} | {r['ceiling']:.0f} | {r['result']} | "
              f"{r['steps']} | {cpu} | {r['wall_min']:.1f} |")
    print(json.dumps({"rows": rows, "runs": runs, "cpu_min_total": sum(meter.stop()[1].values()) / 60}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
