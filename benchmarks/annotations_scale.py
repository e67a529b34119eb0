"""Annotations at corpus scale: driver memory and time to the first batch, old path vs streamed.

Generates a WebVid-format CSV (``videoid,contentUrl,duration,page_dir,name``, default 1M rows) and
measures, each in a fresh process with its own local Ray (``--cpus`` CPUs):

  old   the pre-streaming path: every row parsed in the driver (``read_rows``), shuffled there,
        made dataset rows and handed to ``ray.data.from_items``, then ``randomize_block_order`` and
        the batch function, as ``build_dataset`` did before annotations were streamed;
  new   ``build_dataset`` today: a count pass of Ray tasks (one per file), then the rows parsed and
        streamed by Ray tasks (``orchestrator.data.annotations``).

Both read the training split (shuffled, ids assigned) with the columns ``clip_index, sample_key``,
so no video is decoded: what is measured is the annotation path alone.  Reported per path: the
driver's peak RSS (``ru_maxrss``) and its growth over the RSS after ``ray.init`` (imports and Ray's
own), the time from the start of dataset construction to the first batch, and (``--full``) the
time to iterate every row.  The last line is a JSON object with the ratios old / new.

    python benchmarks/annotations_scale.py [--rows 1000000] [--cpus 2] [--full] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ("clip_index", "sample_key")


def write_webvid_csv(path: Path, rows: int) -> int:
    """A WebVid-10M-like CSV of ``rows`` rows (ISO durations, page dirs, quoted captions with commas)."""
    words = ("a", "man", "walking", "dog", "on", "the", "beach", "at", "sunset", "aerial", "view", "of", "city")
    with open(path, "w") as f:
        f.write("videoid,contentUrl,duration,page_dir,name\n")
        for i in range(rows):
            vid = 1000000 + i
            caption = " ".join(words[(i * k) % len(words)] for k in range(3, 11))
            f.write(f'{vid},https://ak.picdn.net/shutterstock/videos/{vid}/preview/stock-footage-{vid}.mp4,'
                    f'PT00H00M{10 + i % 40:02d}S,{i % 1000:03d}001_{i % 1000:03d}050,"{caption}, {i}"\n')
    return path.stat().st_size


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(mode: str, csv: Path, cpus: int, full: bool) -> dict:
    import random

    import ray

    from orchestrator.data.config import DataConfig, SourceConfig
    from orchestrator.data.pipeline import build_dataset, iter_worker_batches

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    src = SourceConfig(format="webvid_csv", train=[str(csv)], val=[str(csv)], media="videos")
    cfg = DataConfig(root=str(csv.parent), sources=[src])
    # warm the batch path on a tiny file, so both modes pay Ray's worker start-up before the clock
    tiny = csv.parent / "tiny.csv"
    tiny.write_text("".join(csv.open().readline() for _ in range(1)) + "1,u,PT00H00M10S,000,x\n")
    warm = cfg.model_copy(update={"sources": [src.model_copy(update={"train": [str(tiny)]})]})
    list(iter_worker_batches(build_dataset(warm, "train", True, COLUMNS), 8, "cpu", 1))
    base = rss_mb()
    t0 = time.perf_counter()
    if mode == "old":
        ds = old_dataset(cfg, random.Random(0))
    else:
        ds = build_dataset(cfg, "train", True, COLUMNS, seed=0)
    built = time.perf_counter() - t0
    it = iter_worker_batches(ds, 8, "cpu", 1)
    next(it)
    first = time.perf_counter() - t0
    out = {"mode": mode, "build_s": round(built, 2), "first_batch_s": round(first, 2)}
    if full:
        n = 8 + sum(len(b["clip_index"]) for b in it)
        out.update(all_rows_s=round(time.perf_counter() - t0, 2), rows_read=n)
    out.update(driver_peak_rss_mb=round(rss_mb(), 1), driver_rss_growth_mb=round(rss_mb() - base, 1),
               driver_rss_after_init_mb=round(base, 1))
    ray.shutdown()
    return out


def old_dataset(cfg, rng):
    """``build_dataset`` for one parsed source as it was before annotations were streamed."""
    import ray

    from orchestrator.data.pipeline import SAMPLE_KEY, process_params
    from orchestrator.data.process import process_batch, to_dataset_row
    from orchestrator.data.sources import read_rows

    src = cfg.sources[0]
    rows = read_rows(src, cfg.root, "train", cfg.max_bad_fraction, cfg.caps())
    rng.shuffle(rows)
    items = []
    for i, r in enumerate(rows):
        item = to_dataset_row(r)
        item[SAMPLE_KEY] = i
        items.append(item)
    blocks = max(1, min(len(items) // max(1, cfg.decode_batch_size), 200))
    ds = ray.data.from_items(items, override_num_blocks=blocks).randomize_block_order(seed=0)
    params = process_params(cfg, True, COLUMNS, 0, None)
    return ds.map_batches(process_batch, fn_kwargs={"params": params}, batch_size=cfg.decode_batch_size,
                          batch_format="numpy", num_cpus=cfg.decode_cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time iterating every row")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--modes", nargs="+", default=["old", "new"])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="annscale-"))
    csv = workdir / "webvid.csv"
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, csv, args.cpus, args.full)), flush=True)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = write_webvid_csv(csv, args.rows)
    res = {"rows": args.rows, "csv_mb": round(size / 2**20, 1), "cpus": args.cpus, "load_avg_start": os.getloadavg()[0]}
    print(f"wrote {args.rows} rows, {res['csv_mb']} MB in {time.perf_counter() - t0:.1f}s", flush=True)
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--rows", str(args.rows), "--cpus", str(args.cpus),
               "--workdir", str(workdir)] + (["--full"] if args.full else [])
        env = dict(os.environ, RAY_raylet_start_wait_time_s=os.environ.get("RAY_raylet_start_wait_time_s", "180"))
        for _ in range(3):  # on a crowded machine Ray itself can time out starting; try again
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if "timed out during startup" not in proc.stderr:
                break
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:  # (a RESULT line stands even when Ray crashes in its own shutdown afterwards)
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            res[mode] = {"error": f"exit {proc.returncode}"}
            continue
        res[mode] = json.loads(line[0][len("RESULT "):])
        print(f"{mode}: {res[mode]}", flush=True)
    if all("error" not in res.get(m, {"error": 1}) for m in ("old", "new")):
        old, new = res["old"], res["new"]
        res["ratios"] = {"first_batch_old_over_new": round(old["first_batch_s"] / new["first_batch_s"], 2),
                         "driver_rss_growth_old_over_new": round(old["driver_rss_growth_mb"]
                                                                 / max(new["driver_rss_growth_mb"], 1.0), 1),
                         "driver_peak_rss_old_over_new": round(old["driver_peak_rss_mb"] / new["driver_peak_rss_mb"], 2)}
        if "all_rows_s" in old:
            res["ratios"]["all_rows_old_over_new"] = round(old["all_rows_s"] / new["all_rows_s"], 2)
    res["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
