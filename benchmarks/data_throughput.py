"""Decoded clips per second: bare decord loop vs PyTorch DataLoader vs this Ray Data pipeline.

Generates H.264 clips (10 s, 360p, 30 fps, a keyframe every 2 s) and measures, for 4 and 16
frames per clip (``rand`` sampling, random resized crop to 224, flip), the throughput of

  (a) a bare single-process decord loop: the limit per core;
  (b) a PyTorch ``DataLoader`` over decord with 1 and 2 worker processes, as the original code loads;
  (c) this Ray Data pipeline (``build_dataset`` + ``iter_worker_batches``) with 1 and 2 CPUs, which
      also tokenizes the captions and counts bad clips;

  (d) the same pipeline with decode actors (``data.decode_actors``), same clips and CPUs (an actor
      pool lives for one execution, i.e. one epoch: its start-up is paid every pass, while tasks
      reuse Ray's warm worker processes);
  (e) Ray Data (tasks) reading shards written by ``shard --transcode`` (short side 256, a
      keyframe every 8 frames, no B-frames), against the DataLoader reading the original clips; with
      the one-time transcode cost per clip and the epochs after which it has paid for itself;

plus frames decoded per frame returned, counted by the PyAV decoder itself (original clips with
``rand`` and ``keyframe`` sampling, transcoded clips with ``rand``), and the peak memory of a decode
process on an 8K clip (full-size decode vs the header-probed downscaled decode).  Each timed series follows
an untimed warm-up pass; a figure is all clips over all the time of ``--repeats`` passes, and its
steady state is the clips after each pass's first batch over the time after it (a pass's start-up,
paid once per epoch, left out; the start-up's share of the pass is printed too; it means
something only when a pass spans many decode tasks, e.g. ``--clips 128`` at the default 8 clips
per task: with one task per pass every clip arrives with the first batch).  For each Ray run
the CPU seconds of the timed passes are split by process (the driver's iterator, Ray's worker
processes, raylet, GCS, other Ray daemons) and set against the machine's busy and idle time: where
the cores went when Ray Data is slower than the loop.  Every
pipeline draws fresh random frame indices per clip, as training does: which frames are drawn sets
how much must be decoded (~24 frames per frame returned at 4 frames per clip), so a fixed seed in
one pipeline, or the best pass of a few, would favour it by luck of the draw.  The last line of
output is a JSON object with every figure and ratio.

    python benchmarks/data_throughput.py [--clips 32] [--frames 4 16] [--cpus 1 2] [--workdir DIR]

The machine's load average at the start and the end is part of the JSON: on shared cores the
absolute figures move with other work; ratios measured within one run are the comparable part.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
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
    from orchestrator.devtools import hf_assets, synth

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


def _decode_bytes(data: bytes, num_frames: int, rng: np.random.Generator, decoder: str = "decord") -> np.ndarray:
    """The bare loop's work on one clip: open, sample, decode, crop.  ``decord``: ``get_batch``, as
    the original loaders do; ``pyav``: the pipeline's PyAV reader (seek to the keyframe, decode
    forward, convert only the wanted frames)."""
    import io

    import decord

    from orchestrator.data import augment, sampling, video

    if decoder == "pyav":
        vr = video.open_reader("pyav", data)
        idx = sampling.sample_indices("rand", 0, len(vr), num_frames, rng)
        return augment.train_transform(vr.get(idx), SIZE, 0.5, True, rng)
    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    idx = sampling.sample_indices("rand", 0, len(vr), num_frames, rng)
    return augment.train_transform(vr.get_batch(idx).asnumpy(), SIZE, 0.5, True, rng)


def bare_cpu_ms_per_clip(datas: list[bytes], num_frames: int, repeats: int, procs: int, decoder: str = "decord") -> dict:
    """The bare loop's CPU per clip with ``procs`` processes decoding side by side (each its share of
    the clips, one thread each): on ``procs`` busy cores a clip costs what it costs there, which is
    the like-for-like baseline of a Ray run on that many CPUs.  Also the clips per second."""
    import multiprocessing as mp

    parts = [datas[i::procs] for i in range(procs)]
    ctx = mp.get_context("fork")
    with ctx.Pool(procs) as pool:
        t0 = time.perf_counter()
        cpu = sum(c for _, c in pool.starmap(_bare_bytes_loop, [(p, num_frames, repeats, 1, decoder) for p in parts]))
        wall = time.perf_counter() - t0
    n = repeats * len(datas)
    return {"cpu_ms_per_clip": round(cpu / n * 1e3, 2), "clips_per_s": round(n / wall, 2), "procs": procs,
            "decoder": decoder}


def _bare_bytes_loop(datas: list[bytes], num_frames: int, repeats: int, warm: int,
                     decoder: str = "decord") -> tuple[float, float]:
    """(wall s, CPU s) of the bare loop over in-memory clips, one thread, after ``warm`` untimed clips."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng()
    for d in datas[:warm]:
        _decode_bytes(d, num_frames, rng, decoder)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for d in datas:
            _decode_bytes(d, num_frames, rng, decoder)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_bare_bytes(datas: list[bytes], num_frames: int, repeats: int) -> float:
    """The bare loop over in-memory clips (the transcoded ones, as read from their shards): clips/s."""
    return repeats * len(datas) / _bare_bytes_loop(datas, num_frames, repeats, 2)[0]


def transcode_to_shards(workdir: Path, short_side: int, gop: int) -> tuple[str, list[bytes], dict]:
    """``shard --transcode`` of the benchmark clips (4 per shard): (shard folder, clip bytes, report)."""
    import shutil

    from orchestrator.data.config import SourceConfig
    from orchestrator.data.shards import write_shards
    from orchestrator.data.sources import read_rows, wds
    from orchestrator.data.sources.base import ParseReport
    from orchestrator.data.transcode import TranscodeSpec

    out = workdir / f"shards-{short_side}-g{gop}"
    rows = read_rows(SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"]), str(workdir), "train")
    index = json.loads((out / "index.json").read_text()) if (out / "index.json").exists() else {}
    if index.get("samples") == len(rows) and index.get("transcoded") == len(rows):  # made by an earlier run
        report = index
    else:
        shutil.rmtree(out, ignore_errors=True)
        report = write_shards(rows, str(out), max_samples=4,
                              transcode=TranscodeSpec(short_side=short_side, gop=gop)).to_dict()
    datas = [r["media_bytes"] for s in wds.list_shards(str(out))
             for r in wds.read_shard_rows("wds", s, ParseReport(s), with_bytes=True)]
    return str(out), datas, report


def copy_shards(folder: str, copies: int) -> str:
    """A folder holding every shard of ``folder`` ``copies`` times (and an index.json that says so)."""
    import shutil

    out = Path(f"{folder}-x{copies}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    index = json.loads((Path(folder) / "index.json").read_text())
    counts = {}
    for name, n in index["shard_samples"].items():
        for j in range(copies):
            shutil.copyfile(Path(folder) / name, out / f"copy{j}-{name}")
            counts[f"copy{j}-{name}"] = n
    (out / "index.json").write_text(json.dumps({**index, "shard_samples": counts}))
    return str(out)


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
    passes = [_timed_pass(loader) for _ in range(repeats)]
    DL_DETAIL[f"{num_frames}/{workers}"] = _pass_figures(passes)
    return sum(p[0] for p in passes) / sum(p[1] for p in passes)


def _timed_pass(batches) -> tuple[int, float, int, float]:
    """One pass over an iterable of batches: (clips, seconds, clips in the first batch, seconds to it)."""
    t, n, n_first, t_first = time.perf_counter(), 0, 0, 0.0
    for b in batches:
        if not n:
            t_first, n_first = time.perf_counter() - t, len(b["frames"] if isinstance(b, dict) else b)
        n += len(b["frames"] if isinstance(b, dict) else b)
    return n, time.perf_counter() - t, n_first, t_first


def _pass_figures(passes: list[tuple[int, float, int, float]]) -> dict:
    """Whole-pass and steady-state figures of timed passes: steady state is every clip after a pass's
    first batch over the time after it, i.e. without the pass's start-up (paid once per epoch)."""
    n, wall = sum(p[0] for p in passes), sum(p[1] for p in passes)
    n_after, t_after = sum(p[0] - p[2] for p in passes), sum(p[1] - p[3] for p in passes)
    return {"clips_per_s": round(n / wall, 2), "steady_clips_per_s": round(n_after / t_after, 2) if t_after else None,
            "first_batch_s": round(sum(p[3] for p in passes) / len(passes), 3),
            "first_batch_share": round(sum(p[3] for p in passes) / wall, 3)}


RAY_DETAIL: dict = {}  # per Ray run: first batch, steady state, where the CPU went
DL_DETAIL: dict = {}  # per DataLoader run: first batch and steady state


def bench_ray(workdir: Path, num_frames: int, cpus: int, repeats: int, actors: bool = False,
              shards: str | None = None, decode_batch: int = 8, decode_cpus: float = 1.0, decoder: str = "decord",
              batch: int = 4) -> float | None:
    """One Ray per measurement (a fresh process), so the CPU limit is exactly ``cpus``."""
    src = (f"SourceConfig(format='wds', train=[{shards!r}], val=[{shards!r}])" if shards
           else "SourceConfig(format='msrvtt', train=['ann.jsonl'], val=['ann.jsonl'])")
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from data_throughput import _pass_figures, _timed_pass  # the same pass timing as the DataLoader's
import ray
ray.init(num_cpus={cpus}, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.pipeline import build_dataset, iter_worker_batches
src = {src}
cfg = DataConfig(root={str(workdir)!r}, sources=[src], num_frames={num_frames}, image_size={SIZE},
                 decode_cpus={decode_cpus}, decode_batch_size={decode_batch}, max_bad_fraction=0.0, decode_actors={actors},
                 decoder={decoder!r},
                 tokenizer={str(workdir / "tokenizer")!r})
ds = build_dataset(cfg, "train", True, ("frames", "text_ids"), run_name="bench")
import psutil
me = psutil.Process()
def snapshot():
    out = {{}}
    for p in [me] + me.children(recursive=True):
        try:
            with p.oneshot():
                t = p.cpu_times()
                out[p.pid] = (p.name(), t.user + t.system + t.children_user + t.children_system)
        except psutil.Error:
            pass
    return out
def group(pid, name):
    if pid == me.pid:
        return "driver (iterator, collate)"
    if name.startswith("ray::"):
        return "Ray worker processes (read, decode tasks)"
    return name if name in ("raylet", "gcs_server") else "other Ray daemons"
def one_pass():
    return _timed_pass(iter_worker_batches(ds, {batch}, "cpu", 2))
one_pass()
before, machine0 = snapshot(), psutil.cpu_times()
t0 = time.perf_counter(); passes = [one_pass() for _ in range({repeats})]; wall = time.perf_counter() - t0
after, machine1 = snapshot(), psutil.cpu_times()
cpu = {{}}
for pid, (name, used) in after.items():
    g = group(pid, name)
    cpu[g] = cpu.get(g, 0.0) + used - before.get(pid, (name, 0.0))[1]
busy = lambda c: sum(getattr(c, f) for f in ("user", "system", "nice", "irq", "softirq"))
machine = {{"busy_core_s": busy(machine1) - busy(machine0), "idle_core_s": machine1.idle - machine0.idle}}
stats = ds.stats()
keep = [ln.strip() for ln in stats.splitlines() if ln.startswith("Operator") or "Remote wall time" in ln
        or "Remote cpu time" in ln or ln.strip().startswith(("* Total time", "* In ray.wait", "* In batch",
                                                              "* In collate", "* In format", "* In user code"))]
clips = sum(p[0] for p in passes)
print("RESULT", json.dumps({{**_pass_figures(passes), "wall_s": wall, "clips": clips,
                             "per_pass_first_batch_s": [round(p[3], 3) for p in passes],
                             "cpu_core_s": {{k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}},
                             "machine_core_s": {{k: round(v, 2) for k, v in machine.items()}}, "stats": keep}}))
"""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_USAGE_STATS_ENABLED="0")
    for _ in range(3):  # on a crowded machine Ray itself can time out starting; try again
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
        if "timed out during startup" not in out.stderr:
            break
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r.update(cpu_per_clip(r, cpus))
            RAY_DETAIL[f"{num_frames}/{cpus}/{'actors' if actors else 'tasks'}/{'shards' if shards else 'clips'}"
                       f"{'' if decoder == 'decord' else '/' + decoder}"] = {
                k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
            print("\n  ".join(["Ray Data stats (last pass):"] + r["stats"]), flush=True)
            print(f"  CPU seconds over the timed passes ({r['wall_s']:.1f} s wall x {cpus} CPUs), by process: "
                  f"{r['cpu_core_s']}; whole machine: {r['machine_core_s']}", flush=True)
            return r["clips_per_s"]
    if "leave no CPU" in out.stderr + out.stdout:  # a decode-actor pool that cannot fit beside its read
        print(f"  not measured: {(out.stderr + out.stdout).split('ValueError: ')[-1].splitlines()[0][:300]}")
        return None
    raise RuntimeError(f"ray benchmark failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def cpu_per_clip(r: dict, cpus: int) -> dict:
    """From one Ray run's result: CPU ms per clip (its processes together, and by kind), and how
    many decode tasks ran at once (their summed wall time over the decode operator's wall time, Ray
    Data's stats of the last pass)."""
    n = max(1, r["clips"])
    by_kind = {k: round(v / n * 1e3, 2) for k, v in r["cpu_core_s"].items()}
    out = {"cpu_ms_per_clip": round(sum(r["cpu_core_s"].values()) / n * 1e3, 2), "cpu_ms_per_clip_by_process": by_kind,
           "machine_busy_ms_per_clip": round(r["machine_core_s"]["busy_core_s"] / n * 1e3, 2)}
    lines, op = r["stats"], None
    for i, ln in enumerate(lines):
        if ln.startswith("Operator") and ("decode" in ln.lower() or "process_batch" in ln):
            op = i
    if op is not None:
        m = re.search(r"produced in ([0-9.]+)s", lines[op])
        total = next((ln for ln in lines[op + 1:op + 3] if "Remote wall time" in ln), "")
        t = re.search(r"([0-9.]+)(ms|s) total", total)
        if m and t and float(m.group(1)) > 0:
            summed = float(t.group(1)) / (1e3 if t.group(2) == "ms" else 1)
            out["decode_tasks_at_once"] = round(summed / float(m.group(1)), 2)
    return out


def profile_process_batch(workdir: Path, num_frames: int, top: int = 12) -> list[str]:
    """cProfile of the pipeline's batch function (read, decode, sample, augment, tokenize, count) on
    every clip once, in this process (no Ray): where a decode task's time goes."""
    import cProfile
    import io
    import pstats

    from orchestrator.data.config import DataConfig, SourceConfig
    from orchestrator.data.pipeline import process_params
    from orchestrator.data.process import process_batch, to_dataset_row
    from orchestrator.data.sources import read_rows

    src = SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"])
    cfg = DataConfig(root=str(workdir), sources=[src], num_frames=num_frames, image_size=SIZE,
                     tokenizer=str(workdir / "tokenizer"), max_bad_fraction=0.0)
    params = process_params(cfg, True, ("frames", "text_ids"), 0, "profile")
    rows = [to_dataset_row(r) for r in read_rows(src, str(workdir), "train")]
    batches = [{k: np.array([r[k] for r in rows[i:i + 4]], dtype=object) for k in rows[0]}
               for i in range(0, len(rows), 4)]
    process_batch(batches[0], params)  # warm: tokenizer, decoder libraries
    prof = cProfile.Profile()
    prof.enable()
    for b in batches:
        process_batch(b, params)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return [ln.strip() for ln in out.getvalue().splitlines() if ln.strip()][:top + 8]


def decoded_per_returned(datas: list[bytes], num_frames: int, strategy: str = "rand") -> float:
    """Frames the PyAV decoder produced per frame returned (its own count), fresh random draws."""
    from orchestrator.data import sampling, video

    rng = np.random.default_rng()
    decoded = returned = 0
    for d in datas:
        r = video.open_reader("pyav", d)
        idx = sampling.sample_indices(strategy, 0, len(r), num_frames, rng, keyframes=r.key_indices())
        r.get(idx)
        decoded += r.decoded
        returned += num_frames
    return decoded / returned


def peak_memory_8k(workdir: Path, num_frames: int) -> dict:
    """Peak RSS (MB) of one decode process on an 8K H.264 clip (and its high-water mark before
    decoding, after the imports): the full-size decode (short_side 0, as before) vs the
    header-probed, downscaled decode."""
    clip = workdir / "clip_8k.mp4"
    if not clip.exists():
        import av

        with av.open(str(clip), mode="w") as c:
            s = c.add_stream("libx264", rate=30)
            s.width, s.height, s.pix_fmt = 7680, 4320, "yuv420p"
            s.options = {"preset": "ultrafast", "g": "30"}
            for i in range(8):
                fr = av.VideoFrame(7680, 4320, "yuv420p")
                for plane in fr.planes:
                    plane.update(bytes([30 + 25 * i]) * plane.buffer_size)
                for pk in s.encode(fr):
                    c.mux(pk)
            for pk in s.encode():
                c.mux(pk)
    out = {}
    for label, short in (("full_size", 0), ("probed_downscaled", None)):
        code = f"""
import json, resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import numpy as np, decord, av
from orchestrator.data.decode import DecodeSpec, decode_video
from orchestrator.data.video import decode_short_side
data = open({str(clip)!r}, "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
short = {short!r}
short = decode_short_side({SIZE}, 0.5) if short is None else short
d = decode_video(data, "8k", DecodeSpec(num_frames={num_frames}, sampling="rand", short_side=short),
                 np.random.default_rng(0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", json.dumps({{"peak_rss_mb": round(peak / 1024, 1), "rss_before_decode_mb": round(base / 1024, 1),
                             "frames_shape": list(d.frames.shape)}}))
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        out[label] = json.loads(line[0][7:]) if line else {"error": r.stderr[-500:]}
    return out


def transcoded_only(args, workdir: Path, shards: str, datas: list[bytes]) -> int:
    """The Ray path on transcoded shards against the bare loop, CPU per clip at each CPU count, for
    each decoder (``--decoders``): against the bare decord loop (what the original loaders do, the
    baseline) and against the bare loop of the same decoder (the Ray path's own overhead)."""
    res: dict = {"clips": len(datas), "load_avg_start": os.getloadavg()[0], "decode_batch": args.decode_batch,
                 "decode_cpus": args.decode_cpus, "batch": args.batch, "frames": {}}
    for t in args.frames:
        out = res["frames"][str(t)] = {}
        for c in args.cpus:
            bares = {d: bare_cpu_ms_per_clip(datas, t, args.repeats, c, d) for d in dict.fromkeys(["decord", *args.decoders])}
            for dec in args.decoders:
                clips_s = bench_ray(workdir, t, c, args.repeats, shards=shards, decode_batch=args.decode_batch,
                                    decode_cpus=args.decode_cpus, decoder=dec, batch=args.batch)
                ray = RAY_DETAIL[f"{t}/{c}/tasks/shards{'' if dec == 'decord' else '/' + dec}"]
                base, same = bares["decord"], bares[dec]
                row = out.setdefault(str(c), {})[dec] = {
                    "bare_decord": base, "bare_same_decoder": same, "ray_clips_per_s": clips_s,
                    "ray": {k: ray.get(k) for k in ("cpu_ms_per_clip", "cpu_ms_per_clip_by_process",
                                                    "machine_busy_ms_per_clip", "decode_tasks_at_once",
                                                    "steady_clips_per_s", "per_pass_first_batch_s")},
                    "ray_cpu_over_bare": round(ray["cpu_ms_per_clip"] / base["cpu_ms_per_clip"], 3),
                    "ray_cpu_over_bare_same_decoder": round(ray["cpu_ms_per_clip"] / same["cpu_ms_per_clip"], 3),
                    "ray_over_bare_clips_per_s": round(clips_s / base["clips_per_s"], 3)}
                print(f"T={t} {c} CPU(s), data.decoder={dec}: bare decord loop x{c} {base['cpu_ms_per_clip']} ms/clip "
                      f"({base['clips_per_s']} clips/s), bare {dec} loop {same['cpu_ms_per_clip']} ms/clip; Ray path "
                      f"{ray['cpu_ms_per_clip']} ms/clip ({row['ray_cpu_over_bare']}x the bare decord loop, target "
                      f"<= 1.3x; {row['ray_cpu_over_bare_same_decoder']}x the bare {dec} loop) "
                      f"{ray['cpu_ms_per_clip_by_process']}, {clips_s} clips/s, decode tasks at once "
                      f"{ray.get('decode_tasks_at_once')} of {c}, first batch per pass {ray['per_pass_first_batch_s']} s",
                      flush=True)
    res["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per figure (all of them count)")
    ap.add_argument("--workdir", default=None, help="where clips are generated (kept for reuse)")
    ap.add_argument("--short-side", type=int, default=256, help="transcoded shards: short side (default 256)")
    ap.add_argument("--gop", type=int, default=8, help="transcoded shards: keyframe every N frames (default 8)")
    ap.add_argument("--decode-batch", type=int, default=8,
                    help="clips per Ray Data decode task (data.decode_batch_size; default 8, the config's default)")
    ap.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per Ray Data decode task (data.decode_cpus)")
    ap.add_argument("--transcoded-only", action="store_true",
                    help="only the transcoded shards: CPU per clip of the Ray path against the bare loop with as "
                         "many processes as CPUs, decode tasks at once, each pass's first batch")
    ap.add_argument("--decoders", nargs="+", default=["decord", "pyav"], choices=["decord", "pyav"],
                    help="--transcoded-only: the Ray path with each data.decoder (default: both)")
    ap.add_argument("--batch", type=int, default=8,
                    help="--transcoded-only: the iterator's batch size (default 8, the smallest "
                         "train.batch_size_per_worker of the configs)")
    ap.add_argument("--copies", type=int, default=1,
                    help="--transcoded-only: each transcoded shard this many times (a longer pass, as on a corpus, "
                         "without transcoding more clips)")
    ap.add_argument("--skip-8k", action="store_true", help="skip the 8K peak-memory figure")
    ap.add_argument("--only-8k", action="store_true", help="only the 8K peak-memory figure")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or os.path.join(tempfile.gettempdir(), "mplug2-bench-clips"))
    if args.only_8k:
        workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps({"peak_memory_8k_mb": peak_memory_8k(workdir, 4)}))
        return 0
    t0 = time.perf_counter()
    paths = make_clips(workdir, args.clips)
    print(f"{len(paths)} clips ({WIDTH}x{HEIGHT}, {SECONDS:.0f} s, {FPS} fps, keyframe every {GOP // FPS} s) "
          f"ready in {time.perf_counter() - t0:.1f}s under {workdir}", flush=True)
    t1 = time.perf_counter()
    shards, tc_datas, tc_report = transcode_to_shards(workdir, args.short_side, args.gop)
    tc_per_clip = tc_report["transcode_s"] / max(1, tc_report["transcoded"])
    print(f"transcoded {tc_report['transcoded']} clips into {len(tc_report['shards'])} shards in "
          f"{time.perf_counter() - t1:.1f}s ({tc_per_clip:.2f} s/clip on one core)", flush=True)
    if args.transcoded_only:
        if args.copies > 1:
            shards, tc_datas = copy_shards(shards, args.copies), tc_datas * args.copies
        return transcoded_only(args, workdir, shards, tc_datas)
    orig_datas = [Path(p).read_bytes() for p in paths]
    res: dict = {"clips": len(paths), "video": f"{WIDTH}x{HEIGHT} {SECONDS:.0f}s {FPS}fps gop {GOP}",
                 "crop": SIZE, "decode_batch": args.decode_batch,
                 "decode_cpus": args.decode_cpus, "load_avg_start": os.getloadavg()[0],
                 "transcode": {**tc_report["transcode"], "s_per_clip": round(tc_per_clip, 3)},
                 "bare": {}, "bare_transcoded": {}, "dataloader": {}, "ray": {}, "ray_actors": {},
                 "ray_transcoded": {}, "frames_decoded_per_returned": {}, "ratios": {}}
    for t in args.frames:
        k = str(t)
        res["frames_decoded_per_returned"][k] = {
            "original_rand": round(decoded_per_returned(orig_datas, t), 2),
            "original_keyframe": round(decoded_per_returned(orig_datas, t, "keyframe"), 2),
            "transcoded_rand": round(decoded_per_returned(tc_datas, t), 2)}
        print(f"T={t} frames decoded per frame returned (PyAV's count): {res['frames_decoded_per_returned'][k]}",
              flush=True)
        res.setdefault("profile_process_batch", {})[k] = profile_process_batch(workdir, t)
        print("\n  ".join([f"T={t} cProfile of process_batch, by own time:"] + res["profile_process_batch"][k]),
              flush=True)
        res["bare"][k] = round(bench_bare(paths, t, args.repeats), 2)
        print(f"T={t} (a) bare decord loop: {res['bare'][k]} clips/s", flush=True)
        res["bare_transcoded"][k] = round(bench_bare_bytes(tc_datas, t, args.repeats), 2)
        print(f"T={t} (a') bare decord loop, transcoded clips: {res['bare_transcoded'][k]} clips/s", flush=True)
        r = res["ratios"].setdefault(k, {})
        saved = 1 / res["bare"][k] - 1 / res["bare_transcoded"][k]  # core-seconds saved per clip per epoch
        r["transcode_epochs_to_pay_off"] = round(tc_per_clip / saved, 2) if saved > 0 else None
        for c in args.cpus:
            res["dataloader"].setdefault(k, {})[str(c)] = round(bench_dataloader(paths, t, c, args.repeats), 2)
            print(f"T={t} (b) DataLoader {c} workers: {res['dataloader'][k][str(c)]} clips/s "
                  f"({DL_DETAIL[f'{t}/{c}']})", flush=True)
            for name, kw in (("ray", {}), ("ray_actors", {"actors": True}), ("ray_transcoded", {"shards": shards})):
                v = bench_ray(workdir, t, c, args.repeats, decode_batch=args.decode_batch,
                              decode_cpus=args.decode_cpus, **kw)
                res[name].setdefault(k, {})[str(c)] = None if v is None else round(v, 2)
                detail = RAY_DETAIL.get(f"{t}/{c}/{'actors' if 'actors' in kw else 'tasks'}/"
                                        f"{'shards' if 'shards' in kw else 'clips'}", {})
                print(f"T={t} ({name}) {c} CPUs: {res[name][k][str(c)]} clips/s, steady state "
                      f"{detail.get('steady_clips_per_s')} clips/s", flush=True)
            dl = res["dataloader"][k][str(c)]
            for name in ("ray", "ray_actors"):
                if res[name][k][str(c)] is None:
                    continue
                r[f"{name}_per_cpu_over_bare_{c}cpu"] = round(res[name][k][str(c)] / c / res["bare"][k], 3)
                r[f"{name}_over_dataloader_{c}cpu"] = round(res[name][k][str(c)] / dl, 3)
            r[f"ray_transcoded_over_dataloader_original_{c}cpu"] = round(res["ray_transcoded"][k][str(c)] / dl, 3)
            dl_steady = DL_DETAIL[f"{t}/{c}"]["steady_clips_per_s"]  # without each pass's start-up
            for name, kind in (("ray", "clips"), ("ray_transcoded", "shards")):
                steady = RAY_DETAIL.get(f"{t}/{c}/tasks/{kind}", {}).get("steady_clips_per_s")
                if steady and dl_steady:
                    r[f"{name}_steady_over_dataloader_steady_{c}cpu"] = round(steady / dl_steady, 3)
                    if name == "ray":
                        r[f"ray_steady_per_cpu_over_bare_{c}cpu"] = round(steady / c / res["bare"][k], 3)
            r[f"ray_transcoded_per_cpu_over_bare_transcoded_{c}cpu"] = round(
                res["ray_transcoded"][k][str(c)] / c / res["bare_transcoded"][k], 3)
        print(f"T={t} ratios: {r}", flush=True)
    if not args.skip_8k:
        res["peak_memory_8k_mb"] = peak_memory_8k(workdir, 4)
        print(f"8K clip, one decode process: {res['peak_memory_8k_mb']}", flush=True)
    res["ray_first_batch"] = RAY_DETAIL
    res["dataloader_first_batch"] = DL_DETAIL
    res["load_avg_end"] = os.getloadavg()[0]
    res["cpu_count"] = os.cpu_count()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
