"""The paper's Table 15 claim in miniature: the local temporal (LT) module lets the model use frame order.

    python benchmarks/ablation_lt.py [--seeds 0 1 2] [--steps 300] [--batch-size 16] [--frames 4]
                                     [--train-clips 384] [--val-repeats 2] [--lr 5e-4] [--threads 1]

Data: the synthetic clips of ``orchestrator.devtools.synth`` (a coloured shape moving left / right / up / down
over noise), rendered in memory at 32 x 32 px, ``--frames`` frames at the segment centres. "left" is
the time-reverse of "right" (likewise up/down): without frame order a clip shows at most the axis of
its motion, never the direction. Captions: "a <colour> <shape> moves <direction>", word-level ids.

For every seed the same tiny retrieval model (paper Table 2: vision + text + universal + contrastive)
is trained from scratch with the contrastive objective (momentum encoder, queue, clips sharing a
caption are positives) twice, with and without the LT module (``lt_enabled``), on the same clips in
the same order, for the same steps. Batches draw clips uniformly (``--batching random``, default) or
hold whole (colour, shape) groups with their four directions (``grouped``: every direction sibling
is an in-batch negative). Evaluation: each validation clip retrieves among the four
captions that share its colour and shape (they differ only in the direction): accuracy (chance 25%,
50% when only the axis is seen), and the axis accuracy (horizontal vs vertical). Prints one line
per run, mean and spread per variant, and a JSON object with every figure on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when run as a script

from model import MPlug2, MPlugConfig
from model import objectives as O
from model.preprocess import normalize_frames
from orchestrator.devtools.synth import COLORS, DIRECTIONS, SHAPES, ClipMeta, ClipSpec, render_frames

SPEC = ClipSpec(width=32, height=32, fps=8, seconds=4.0)
WORDS = ["a", "moves", *COLORS, *SHAPES, *DIRECTIONS]
CAPTIONS = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]   # 48
CLS, SEP, FIRST_WORD = 2, 3, 10


def caption_ids(c: str, s: str, d: str) -> list[int]:
    return [CLS] + [FIRST_WORD + WORDS.index(w) for w in ("a", c, s, "moves", d)] + [SEP]


def render(n: int, seed: int, frames: int, combos: list[tuple[str, str, str]] | None = None):
    """uint8 [n, T, 32, 32, 3] clips and their caption index [n]."""
    rng = random.Random(seed)
    total = int(round(SPEC.fps * SPEC.seconds))
    pick = [int((i + 0.5) * total / frames) for i in range(frames)]            # segment centres
    clips, caps = [], []
    for i in range(n):
        c, s, d = combos[i % len(combos)] if combos else (rng.choice(list(COLORS)), rng.choice(SHAPES),
                                                           DIRECTIONS[i % 4])
        clips.append(render_frames(ClipMeta(f"c{i}", "", c, s, d, 0.0), SPEC, rng)[pick])
        caps.append(CAPTIONS.index((c, s, d)))
    return torch.from_numpy(np.stack(clips)), torch.tensor(caps)


def train_and_eval(lt: bool, seed: int, train, val, args) -> dict:
    cfg = MPlugConfig.from_preset("tiny", lt_enabled=lt, queue_size=64)
    torch.manual_seed(seed)
    model = MPlug2(cfg, "retrieval").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.02)
    text = torch.tensor([caption_ids(*c) for c in CAPTIONS])                   # [48, 7]
    mask = torch.ones_like(text)
    frames_all, caps_all = train
    g = torch.Generator().manual_seed(seed)
    t0 = time.process_time()
    by_caption = [torch.nonzero(caps_all == c).flatten() for c in range(len(CAPTIONS))]
    for step in range(args.steps):
        if args.batching == "grouped":  # batch_size / 4 (colour, shape) groups x their 4 directions
            groups = torch.randperm(len(CAPTIONS) // 4, generator=g)[:args.batch_size // 4]
            rows = torch.stack([pool[torch.randint(len(pool), (1,), generator=g)[0]]
                                for grp in groups.tolist() for pool in by_caption[4 * grp:4 * grp + 4]])
        else:
            rows = torch.randint(len(caps_all), (args.batch_size,), generator=g)
        frames = normalize_frames(frames_all[rows])
        cap = caps_all[rows]
        u = model(frames=frames, text_ids=text[cap], text_mask=mask[cap])
        loss = O.contrastive_loss(model, u, frames, text[cap], mask[cap], idx=cap,
                                  alpha=O.distill_alpha(cfg.alpha, step * args.batch_size / len(caps_all))).loss  # ramp: 1 epoch
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_cpu_s = time.process_time() - t0
    model.eval()
    frames_v, caps_v = val
    with torch.no_grad():
        t_emb = model.text_embed(model(text_ids=text, text_mask=mask).text_hidden)          # [48, D]
        v_emb = torch.cat([model.vision_embed(model(frames=normalize_frames(frames_v[i:i + 32])).vision_tokens)
                           for i in range(0, len(caps_v), 32)])                            # [N, D]
    correct = axis = 0
    for v, ci in zip(v_emb, caps_v.tolist()):
        c, s, d = CAPTIONS[ci]
        cands = [CAPTIONS.index((c, s, dd)) for dd in DIRECTIONS]
        pred = DIRECTIONS[int((t_emb[cands] @ v).argmax())]
        correct += pred == d
        axis += (pred in ("left", "right")) == (d in ("left", "right"))
    n = len(caps_v)
    return {"accuracy": 100.0 * correct / n, "axis_accuracy": 100.0 * axis / n, "final_loss": float(loss.detach()),
            "train_cpu_s": train_cpu_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--train-clips", type=int, default=384)
    p.add_argument("--val-repeats", type=int, default=2, help="validation clips = 48 captions x this")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batching", choices=("grouped", "random"), default="random",
                   help="grouped: each batch holds whole (colour, shape) groups with all 4 directions, so the "
                        "contrastive negatives include the direction siblings; random: clips drawn uniformly")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = render(args.train_clips, 1000, args.frames, combos=CAPTIONS)          # every caption train_clips/48 times
    val = render(48 * args.val_repeats, 2000, args.frames, combos=CAPTIONS)
    result: dict = {"steps": args.steps, "batch_size": args.batch_size, "batching": args.batching, "lr": args.lr, "frames": args.frames, "seeds": args.seeds,
                    "train_clips": args.train_clips, "val_clips": len(val[1]), "chance": 25.0,
                    "axis_only_ceiling": 50.0, "unit": "% of val clips whose direction is retrieved among 4 captions"}
    for lt in (True, False):
        name = "with_lt" if lt else "without_lt"
        runs = []
        for seed in args.seeds:
            r = train_and_eval(lt, seed, train, val, args)
            runs.append(r)
            print(f"{name} seed {seed}: direction {r['accuracy']:.1f}% axis {r['axis_accuracy']:.1f}% "
                  f"(loss {r['final_loss']:.3f}, {r['train_cpu_s']:.0f} CPU-s)", flush=True)
        acc = [r["accuracy"] for r in runs]
        result[name] = {"runs": runs, "mean": statistics.mean(acc),
                        "stdev": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                        "axis_mean": statistics.mean(r["axis_accuracy"] for r in runs)}
        print(f"{name}: direction accuracy {result[name]['mean']:.1f} +- {result[name]['stdev']:.1f}% "
              f"over seeds {args.seeds}", flush=True)
    result["lt_minus_no_lt"] = result["with_lt"]["mean"] - result["without_lt"]["mean"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
