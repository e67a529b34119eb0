"""Does a fresh demo repeat its figures?  Runs ``python -m orchestrator demo`` ``--runs`` times, each
into a fresh folder, and compares what they printed and logged.

    PYTHONPATH=$PWD python benchmarks/demo_repeat.py [--runs 2] [--out /tmp/demo-repeat] [--same-folder] [demo options]

Each run is the demo exactly as ``make demo`` runs it (its own local Ray, synthetic data, SQLite
MLflow), in a subprocess.  Compared, run by run against the first:

* the final retrieval figures (``demo_results.json``: zero-shot and fine-tuned);
* the pre-train and fine-tune runs' logged ``loss`` histories, step by step: the first step where
  they differ and the largest difference (0 and "none" when the runs are bit-identical);
* what each rank trained on: every run writes the step journal (``MPLUG2_STEP_JOURNAL``: each
  optimizer step's ``sample_key``s per rank, pre-train then fine-tune); the first journal line
  where the runs' rows differ says whether a difference comes from the data or from the compute.
  Row ids are hashes of absolute paths, so this needs ``--same-folder``: every run in ``<out>/demo``
  (moved to ``<out>/run<i>`` when it ends).  Without it each run has its own folder, as two fresh
  clones would: the figures and losses are compared, the rows are not.

Prints one line per run, the comparison, and a JSON object with every figure on the last line,
including the range of each retrieval figure over the runs (what docs/benchmarks.md quotes).
Any extra argument is passed to the demo (e.g. ``--pretrain-steps 40`` for a quick check).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator.train.journal import ENV as STEP_JOURNAL
from orchestrator.train.journal import read as read_journal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _history(db: str, run_id: str, key: str = "loss") -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _journal(folder: str) -> dict[int, list[tuple[int, list[int]]]]:
    """Per rank, the (step, sample keys) of every journal line, in the order they were written."""
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for line in read_journal(folder):
        out.setdefault(int(line["rank"]), []).append((int(line["step"]), list(line["keys"])))
    return out


def _first_row_difference(a: dict, b: dict) -> dict:
    """The first journal line (per rank) where two runs trained on other rows, or None."""
    first = {}
    for rank in sorted(set(a) | set(b)):
        la, lb = a.get(rank, []), b.get(rank, [])
        diff = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
        if diff is None and len(la) != len(lb):
            diff = min(len(la), len(lb))
        first[rank] = None if diff is None else {"line": diff, "step": (la or lb)[min(diff, len(la or lb) - 1)][0]}
    return first


def _compare(a: dict[int, float], b: dict[int, float]) -> dict:
    steps = sorted(set(a) & set(b))
    diffs = [(s, abs(a[s] - b[s])) for s in steps]
    first = next((s for s, d in diffs if d > 0), None)
    return {"steps_compared": len(steps), "first_step_differing": first,
            "max_abs_diff": max((d for _, d in diffs), default=0.0),
            "missing_steps": sorted(set(a) ^ set(b))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", default="/tmp/demo-repeat")
    p.add_argument("--same-folder", action="store_true", help="run every demo in the same folder (rows comparable)")
    args, demo_args = p.parse_known_args()
    results = []
    for i in range(args.runs):
        out = os.path.join(args.out, "demo" if args.same_folder else f"run{i}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(os.path.join(args.out, f"run{i}"), ignore_errors=True)
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": REPO, STEP_JOURNAL: os.path.join(out, "journal")}
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "demo", "--out", out, *demo_args], cwd=REPO,
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"demo run {i} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        res = json.load(open(os.path.join(out, "demo_results.json")))
        db = os.path.join(out, "mlflow.db")
        res["loss"] = {"pretrain": _history(db, res["pretrain_run"]), "finetune": _history(db, res["finetune_run"])}
        res["wall_s"] = wall
        res["journal"] = _journal(os.path.join(out, "journal"))
        if args.same_folder:
            os.rename(out, os.path.join(args.out, f"run{i}"))
        results.append(res)
        print(f"run {i}: {wall:.0f} s; zero-shot t2v R@1/5/10 "
              + "/".join(f"{res['zero_shot'][k]:.1f}" for k in ("t2v_r1", "t2v_r5", "t2v_r10"))
              + "; fine-tuned " + "/".join(f"{res['fine_tuned'][k]:.1f}" for k in ("t2v_r1", "t2v_r5", "t2v_r10")),
              flush=True)
    summary: dict = {"runs": args.runs, "wall_s": [r["wall_s"] for r in results], "compare": [], "range": {}}
    for i, r in enumerate(results[1:], start=1):
        cmp = {stage: _compare(results[0]["loss"][stage], r["loss"][stage]) for stage in ("pretrain", "finetune")}
        cmp["figures_equal"] = all(r[k] == results[0][k] for k in ("zero_shot", "fine_tuned"))
        cmp["rows_first_differ"] = (_first_row_difference(results[0]["journal"], r["journal"]) if args.same_folder
                                    else "not compared (separate folders: row ids differ)")
        summary["compare"].append(cmp)
        print(f"run {i} vs run 0: figures {'identical' if cmp['figures_equal'] else 'DIFFER'}; "
              + "; ".join(f"{stage} loss: first differing step {c['first_step_differing']}, max |diff| "
                          f"{c['max_abs_diff']:.3g} over {c['steps_compared']} steps"
                          for stage, c in cmp.items() if stage in ("pretrain", "finetune"))
              + f"; rows trained, first differing journal line per rank: {cmp['rows_first_differ']}")
    for r in results:
        del r["journal"]  # long; its comparison is kept
    for stage in ("zero_shot", "fine_tuned"):
        for key in results[0][stage]:
            vals = [r[stage][key] for r in results]
            if all(isinstance(v, (int, float)) for v in vals):
                summary["range"][f"{stage}/{key}"] = [min(vals), max(vals)]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
