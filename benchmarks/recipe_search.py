"""Search the tiny recipe quickly: the real model and workload losses, in one process, on in-memory clips.

    PYTHONPATH=$PWD python benchmarks/recipe_search.py --workload retrieval --steps 1800 --seeds 0 1 2 \
        [--clips 3072] [--lr 1e-3] [--warmup 50] [--alpha 0] [--batching grouped] [--queue 256] ...

Not the real stack (no H.264, no Ray, no DeepSpeed): ``benchmarks/learning.py`` is.  What is real:
the clips are ``orchestrator.devtools.synth.render_frames`` at the demo's geometry, resized with the
data plane's own transforms (``orchestrator.data.augment``), frames picked by the data plane's
sampling functions; the model is ``workloads.<name>.build_model`` on the tiny preset with the
synthetic tokenizer, the loss is ``workloads.<name>.loss``, the optimizer and schedule are
``orchestrator.train.optim``, the gradient is clipped as the train loop's DeepSpeed config does.

Data: ``--clips`` training clips (balanced over the 48 captions) and ``--val-clips`` held-out clips
(every caption in turn), rendered once and cached under ``--cache``.  Batches: ``random`` rows, or
``grouped``: whole (colour, shape) groups, the four directions of a group side by side (the data
plane's ``data.group_key``/``data.group_size``).  Frames: ``rand`` sampling drawn once per clip
(``--fixed-frames``, as ``data.cache`` does) or afresh every step.

Every ``--eval-every`` steps (and at the end) on the held-out clips: 48-way text-to-video R@1 by
contrastive similarity, the share of clips whose best caption has the right colour / shape /
direction, and the mean cosine between captions that differ only in the direction word (near 1:
the text side cannot tell directions apart).  Prints one line per evaluation, a summary per seed,
mean and spread, and a JSON object with every figure on the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when run as a script

from model import MPlugConfig
from orchestrator.config import load_config
from orchestrator.data import augment
from orchestrator.data.pipeline import process_params
from orchestrator.data.process import EMPTY_ROW, process_batch, to_dataset_row
from orchestrator.data.sampling import sample_indices
from orchestrator.data.sources import read_rows
from orchestrator.data.tokenize import encode, load_tokenizer
from orchestrator.devtools.hf_assets import build_wordpiece_tokenizer
from orchestrator.devtools.synth import COLORS, DIRECTIONS, SHAPES, ClipMeta, ClipSpec, all_texts, render_frames
from orchestrator.runtime.model_setup import tokenizer_overrides
from orchestrator.train.config import TrainConfig
from orchestrator.train.optim import build_optimizer
from workloads import get_workload
from workloads.common import pixels_of

CAPTIONS = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]   # 48, groups of 4 directions


def caption(c: str, s: str, d: str) -> str:
    return ClipMeta("", "", c, s, d, 0.0).caption


def _cache_path(args, n: int, seed: int) -> str:
    key = json.dumps([n, seed, args.width, args.height, args.seconds, args.fps, args.shape_min, args.shape_max,
                      args.image_size, args.transform], sort_keys=True)
    return os.path.join(args.cache, hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")


def render_set(args, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, F, S, S, 3] (every frame of each clip, transformed) and caption ids [n]; clip i shows
    caption i % 48 (balanced)."""
    path = _cache_path(args, n, seed)
    if os.path.exists(path):
        z = np.load(path)
        return z["frames"], z["caps"]
    spec = ClipSpec(width=args.width, height=args.height, fps=args.fps, seconds=args.seconds,
                    shape_min=args.shape_min, shape_max=args.shape_max)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    frames, caps = [], []
    for i in range(n):
        ci = order[i] % len(CAPTIONS)
        raw = render_frames(ClipMeta(f"c{i}", "", *CAPTIONS[ci], 0.0), spec, random.Random(seed * 1_000_003 + i))
        if args.transform == "crop":
            out = augment.eval_transform(raw, args.image_size, "center_crop")
        else:
            out = augment.resize_frames(raw, args.image_size)
        frames.append(out)
        caps.append(ci)
    frames_a, caps_a = np.stack(frames), np.asarray(caps)
    os.makedirs(args.cache, exist_ok=True)
    np.savez(path, frames=frames_a, caps=caps_a)
    return frames_a, caps_a


def plane_set(args, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The clips of a synthetic dataset written by ``orchestrator synth`` (``--data-root``) through the
    data plane's own batch function, as the run config decodes them (``--config``): uint8
    [n, T, S, S, 3] (training: one draw per clip, as ``data.cache`` keeps it) and caption ids [n]."""
    cfg = load_config(args.config, [f"data.root={args.data_root}", f"data.image_size={args.image_size}"])
    training = split == "train"
    params = dataclasses.replace(process_params(cfg.data, training, ("frames",), cfg.seed, None),
                                 epoch=0 if training else None)
    rows = [to_dataset_row(r) for src in cfg.data.sources for r in read_rows(src, cfg.data.root, split, 1.0)]
    frames, caps = [], []
    for s in range(0, len(rows), 64):
        part = rows[s:s + 64]
        out = process_batch({k: np.array([r[k] for r in part], dtype=object) for k in EMPTY_ROW}, params)
        frames.append(out["frames"])
        words = [r["text"].split() for r in part]               # "a <colour> <shape> moves <direction>"
        caps += [CAPTIONS.index((w[1], w[2], w[4])) for w in words]
    return np.concatenate(frames), np.asarray(caps)


def pick_frames(clips: np.ndarray, rows: np.ndarray, strategy: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    total = clips.shape[1]
    out = np.stack([clips[r, sample_indices(strategy, 0, total, n, rng)] for r in rows])
    return torch.from_numpy(out)                                      # uint8 [B, T, S, S, 3]


class Sampler:
    """Rows of each batch: uniformly at random, or whole (colour, shape) groups (4 directions)."""

    def __init__(self, caps: np.ndarray, batching: str, batch: int, seed: int) -> None:
        self.caps, self.batching, self.batch = caps, batching, batch
        self.rng = np.random.default_rng(seed)
        self.by_cap = [np.flatnonzero(caps == c) for c in range(len(CAPTIONS))]

    def __call__(self) -> np.ndarray:
        if self.batching == "random":
            return self.rng.choice(len(self.caps), self.batch, replace=False)
        groups = self.rng.choice(len(CAPTIONS) // 4, self.batch // 4, replace=False)
        return np.asarray([self.rng.choice(self.by_cap[4 * g + d]) for g in groups for d in range(4)])


@torch.no_grad()
def evaluate(model, wl, val_frames: np.ndarray, val_caps: np.ndarray, text_ids, text_mask, frames_n: int) -> dict:
    model.eval()
    rng = np.random.default_rng(0)
    t = model.text_embed(model(text_ids=text_ids, text_mask=text_mask).text_hidden)        # [48, D]
    vs = []
    for s in range(0, len(val_caps), 64):
        px = pick_frames(val_frames, np.arange(s, min(s + 64, len(val_caps))), "middle", frames_n, rng)
        vs.append(model.vision_embed(model(frames=pixels_of(model, {"frames": px})).vision_tokens))
    v = torch.cat(vs)                                                                        # [N, D]
    sim = v @ t.T                                                                            # [N, 48]
    best = sim.argmax(1).tolist()
    truth = val_caps.tolist()
    n = len(truth)
    acc = {k: 100.0 * sum(CAPTIONS[b][j] == CAPTIONS[y][j] for b, y in zip(best, truth)) / n
           for j, k in enumerate(("colour", "shape", "direction"))}
    r1 = 100.0 * sum(b == y for b, y in zip(best, truth)) / n
    sib = [float(t[4 * g + a] @ t[4 * g + b]) for g in range(12) for a in range(4) for b in range(a + 1, 4)]
    model.train()
    return {"r1": r1, **acc, "sibling_cos": statistics.mean(sib)}


def _split(batch: dict, n: int) -> list[dict]:
    """The batch as ``n`` consecutive micro-batches (grouped rows stay together); constants shared."""
    b = len(batch["frames"])
    return [{k: v[i * b // n:(i + 1) * b // n] if torch.is_tensor(v) and len(v) == b and not k.endswith("prompt_ids")
             and not k.endswith("prompt_mask") else v for k, v in batch.items()} for i in range(n)]


def run_seed(args, seed: int, train, val, tok) -> dict:
    wl = get_workload(args.workload)
    task_cfg = wl.Config.model_validate(dict(args.task))
    overrides = {**tokenizer_overrides(tok), "image_size": args.image_size, "queue_size": args.queue,
                 "alpha": args.alpha, "temp": args.temp, "lt_enabled": not args.no_lt, "momentum": args.momentum}
    overrides.update(json.loads(args.model_overrides))
    cfg = MPlugConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = wl.build_model(cfg, task_cfg).train()
    tcfg = TrainConfig(lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps, weight_decay=args.wd,
                       betas=tuple(args.betas), min_lr_ratio=args.min_lr_ratio)
    opt, sched = build_optimizer(model, tcfg)
    constants = wl.batch_constants(tok, task_cfg) if hasattr(wl, "batch_constants") else {}
    texts = [caption(*c) for c in CAPTIONS]
    enc = encode(tok, texts, args.max_text_len)
    text_ids, text_mask = torch.from_numpy(enc["ids"]), torch.from_numpy(enc["mask"])
    tr_frames, tr_caps = train
    ema_per_step = args.workers > 1 and getattr(model, "momentum", None) is not None
    if ema_per_step:  # as the train loop: the EMA once per optimizer step
        model.momentum.update_each_forward = False
    sampler = Sampler(tr_caps, args.batching, args.batch_size, seed)
    frng = np.random.default_rng(seed + 7)
    fixed = None
    if args.fixed_frames:  # one draw per clip, as data.cache gives
        fixed = np.stack([sample_indices("rand", 0, tr_frames.shape[1], args.frames, frng) for _ in range(len(tr_caps))])
    history = []
    t0 = time.process_time()
    for step in range(args.steps):
        rows = sampler()
        if fixed is not None:
            frames = torch.from_numpy(np.stack([tr_frames[r, fixed[r]] for r in rows]))
        else:
            frames = pick_frames(tr_frames, rows, "rand", args.frames, frng)
        if args.reverse_frames:
            frames = frames.flip(1)
        cap = torch.from_numpy(tr_caps[rows])
        batch = {"frames": frames, "text_ids": text_ids[cap], "text_mask": text_mask[cap],
                 "clip_index": torch.from_numpy(rows.astype(np.int64)), **constants}
        if args.workload == "classification":
            batch["label"] = torch.tensor([DIRECTIONS.index(CAPTIONS[c][2]) for c in cap.tolist()])
        if args.alpha_ramp_steps:
            batch["epoch_progress"] = step / args.alpha_ramp_steps
        opt.zero_grad(set_to_none=True)
        for part in _split(batch, args.workers):  # one micro-batch per emulated worker, gradients averaged
            losses = wl.loss(model, part, task_cfg)
            (losses["loss"] / args.workers).backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        if ema_per_step:
            model.momentum_update()
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            ev = evaluate(model, wl, *val, text_ids, text_mask, args.frames) if "contrastive" in model.modules_built else {}
            ev.update({k: float(v.detach()) for k, v in losses.items()})
            ev["step"] = step + 1
            ev["cpu_s"] = time.process_time() - t0
            history.append(ev)
            print(f"  seed {seed} step {step + 1}: " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in ev.items()), flush=True)
    return {"seed": seed, "final": history[-1], "history": history}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="retrieval")
    p.add_argument("--task", type=json.loads, default={}, help="JSON: the workload's task config")
    p.add_argument("--model-overrides", default="{}", help="JSON: more MPlugConfig overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="emulated data-parallel workers: the batch is split "
                   "into this many micro-batches (in-batch negatives per worker, as on the real stack)")
    p.add_argument("--batching", choices=("random", "grouped"), default="grouped")
    p.add_argument("--clips", type=int, default=3072)
    p.add_argument("--val-clips", type=int, default=192)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--fixed-frames", action="store_true", help="one frame draw per clip (data.cache)")
    p.add_argument("--reverse-frames", action="store_true", help="fault: train on time-reversed clips")
    p.add_argument("--data-root", default=None, help="train on a synthetic dataset's H.264 clips through the data "
                   "plane (decoded once per clip, as data.cache) instead of rendered frames")
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "workloads", "configs", "pretrain_tiny.yaml"),
                   help="with --data-root: the run config whose data section decodes the clips")
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--shape-min", type=float, default=1 / 6, help="shape side, fraction of the frame height")
    p.add_argument("--shape-max", type=float, default=1 / 4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--transform", choices=("resize", "crop"), default="resize")
    p.add_argument("--max-text-len", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--wd", type=float, default=0.02)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.98])
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--alpha-ramp-steps", type=int, default=0)
    p.add_argument("--temp", type=float, default=0.07)
    p.add_argument("--queue", type=int, default=256)
    p.add_argument("--momentum", type=float, default=0.995)
    p.add_argument("--no-lt", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "recipe_search_cache"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(build_wordpiece_tokenizer(all_texts([]), d))
        t0 = time.time()
        if args.data_root:
            train, val = plane_set(args, "train"), plane_set(args, "val")
        else:
            train = render_set(args, args.clips, 1000)
            val = render_set(args, args.val_clips, 2000)
        print(f"clips ready in {time.time() - t0:.0f}s: train {train[0].shape}, val {val[0].shape}", flush=True)
        runs = [run_seed(args, s, train, val, tok) for s in args.seeds]
    keys = [k for k in runs[0]["final"] if isinstance(runs[0]["final"][k], float)]
    summary = {k: {"mean": statistics.mean(r["final"][k] for r in runs),
                   "stdev": statistics.stdev(r["final"][k] for r in runs) if len(runs) > 1 else 0.0} for k in keys}
    print("summary: " + "  ".join(f"{k} {v['mean']:.2f}+-{v['stdev']:.2f}" for k, v in summary.items()), flush=True)
    print(json.dumps({"args": vars(args), "summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
