"""Decoded clips per second: bare decord loop vs PyTorch DataLoader vs this Ray Data pipeline.

Generates H.264 clips (10 s, 360p, 30 fps, a keyframe every 2 s) and measures, for 4 and 16
frames per clip (``rand`` sampling, random resized crop to 224, flip), the throughput of

  (a) a bare single-process decord loop: the limit per core;
  (b) a PyTorch ``DataLoader`` over decord with 1 and 2 worker processes, as the original code loads;
  (c) this Ray Data pipeline (``build_dataset`` + ``iter_worker_batches``) with 1 and 2 CPUs, which
      also tokenizes the captions and counts bad clips;

plus frames decoded per frame returned (from the clips' keyframe index).  Each timed series follows
an untimed warm-up pass; a figure is all clips over all the time of ``--repeats`` passes.  Every
pipeline draws fresh random frame indices per clip, as training does: which frames are drawn sets
how much must be decoded (~24 frames per frame returned at 4 frames per clip), so a fixed seed in
one pipeline, or the best pass of a few, would favour it by luck of the draw.  The last line of
output is a JSON object with every figure and ratio.

    python benchmarks/data_throughput.py [--clips 32] [--frames 4 16] [--cpus 1 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 224
WIDTH, HEIGHT, FPS, SECONDS, GOP = 640, 360, 30, 10.0, 60


def make_clips(workdir: Path, n: int) -> list[str]:
    """n distinct 10 s 360p H.264 clips (synthetic moving shapes over noise) + annotations + tokenizer."""
    from orchestrator import hf_assets, synth

    videos = workdir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    spec = synth.ClipSpec(width=WIDTH, height=HEIGHT, fps=FPS, seconds=SECONDS, gop=GOP)
    metas = synth.make_clips(n, seed=1)
    paths = []
    for i, m in enumerate(metas):
        p = videos / m.file
        if not p.exists():
            frames = synth.render_frames(m, spec, random.Random(i))
            p.write_bytes(synth.encode_h264(frames, FPS, GOP))
        paths.append(str(p))
    (workdir / "ann.jsonl").write_text("".join(json.dumps({"video": m.file, "caption": m.caption}) + "\n"
                                              for m in metas))
    if not (workdir / "tokenizer" / "vocab.txt").exists():
        hf_assets.build_wordpiece_tokenizer(synth.all_texts(metas), workdir / "tokenizer")
    return paths


def _decode_one(path: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """What the original loaders do per clip: open with decord, get_batch the sampled frames, crop."""
    import decord

    from orchestrator.data import augment, sampling

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    idx = sampling.sample_indices("rand", 0, len(vr), num_frames, rng)
    frames = vr.get_batch(idx).asnumpy()  # [T, H, W, 3]
    return augment.train_transform(frames, SIZE, 0.5, True, rng)


def bench_bare(paths: list[str], num_frames: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(1)  # one core: the resize must not borrow a second one
    rng = np.random.default_rng()
    for p in paths[:2]:
        _decode_one(p, num_frames, rng)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            _decode_one(p, num_frames, rng)
    return repeats * len(paths) / (time.perf_counter() - t0)


class _ClipDataset:
    def __init__(self, paths: list[str], num_frames: int):
        self.paths, self.num_frames = paths, num_frames

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        frames = _decode_one(self.paths[i], self.num_frames, np.random.default_rng())
        return torch.from_numpy(frames)


def bench_dataloader(paths: list[str], num_frames: int, workers: int, repeats: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(_ClipDataset(paths, num_frames), batch_size=4, num_workers=workers,
                        persistent_workers=True, prefetch_factor=2)
    for _ in loader:  # warm-up pass (starts the workers)
        pass
    t0 = time.perf_counter()
    n = sum(sum(len(b) for b in loader) for _ in range(repeats))
    return n / (time.perf_counter() - t0)


def bench_ray(workdir: Path, num_frames: int, cpus: int, repeats: int) -> float:
    """One Ray per measurement (a fresh process), so the CPU limit is exactly ``cpus``."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import ray
ray.init(num_cpus={cpus}, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.pipeline import build_dataset, iter_worker_batches
src = SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"])
cfg = DataConfig(root={str(workdir)!r}, sources=[src], num_frames={num_frames}, image_size={SIZE},
                 decode_cpus=1, decode_batch_size=4, max_bad_fraction=0.0)
ds = build_dataset(cfg, "train", True, ("frames", "text_ids"), run_name="bench")
def one_pass():
    return sum(len(b["frames"]) for b in iter_worker_batches(ds, 4, "cpu", 2))
one_pass()
t0 = time.perf_counter(); n = sum(one_pass() for _ in range({repeats}))
print("RESULT", json.dumps({{"clips_per_s": n / (time.perf_counter() - t0)}}))
"""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["clips_per_s"]
    raise RuntimeError(f"ray benchmark failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def decoded_per_returned(paths: list[str], num_frames: int) -> float:
    import decord

    from orchestrator.data import sampling

    rng = np.random.default_rng(0)
    decoded = returned = 0
    for p in paths:
        vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1)
        idx = sampling.sample_indices("rand", 0, len(vr), num_frames, rng)
        decoded += sampling.frames_decoded(idx, list(vr.get_key_indices()))
        returned += num_frames
    return decoded / returned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per figure (all of them count)")
    ap.add_argument("--workdir", default=None, help="where clips are generated (kept for reuse)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or os.path.join(tempfile.gettempdir(), "mplug2-bench-clips"))
    t0 = time.perf_counter()
    paths = make_clips(workdir, args.clips)
    print(f"{len(paths)} clips ({WIDTH}x{HEIGHT}, {SECONDS:.0f} s, {FPS} fps, keyframe every {GOP // FPS} s) "
          f"ready in {time.perf_counter() - t0:.1f}s under {workdir}", flush=True)
    res: dict = {"clips": len(paths), "video": f"{WIDTH}x{HEIGHT} {SECONDS:.0f}s {FPS}fps gop {GOP}",
                 "crop": SIZE, "bare": {}, "dataloader": {}, "ray": {}, "frames_decoded_per_returned": {},
                 "ratios": {}}
    for t in args.frames:
        k = str(t)
        res["frames_decoded_per_returned"][k] = round(decoded_per_returned(paths, t), 2)
        res["bare"][k] = round(bench_bare(paths, t, args.repeats), 2)
        print(f"T={t} (a) bare decord loop: {res['bare'][k]} clips/s", flush=True)
        for c in args.cpus:
            res["dataloader"].setdefault(k, {})[str(c)] = round(bench_dataloader(paths, t, c, args.repeats), 2)
            print(f"T={t} (b) DataLoader {c} workers: {res['dataloader'][k][str(c)]} clips/s", flush=True)
            res["ray"].setdefault(k, {})[str(c)] = round(bench_ray(workdir, t, c, args.repeats), 2)
            print(f"T={t} (c) Ray Data {c} CPUs: {res['ray'][k][str(c)]} clips/s", flush=True)
            r = res["ratios"].setdefault(k, {})
            r[f"ray_per_cpu_over_bare_{c}cpu"] = round(res["ray"][k][str(c)] / c / res["bare"][k], 3)
            r[f"ray_over_dataloader_{c}cpu"] = round(res["ray"][k][str(c)] / res["dataloader"][k][str(c)], 3)
    res["cpu_count"] = os.cpu_count()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
