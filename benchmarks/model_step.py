"""Forward+backward throughput of the model on CPU: SDPA vs the plain attention path.

    python benchmarks/model_step.py [--presets tiny base] [--batch-size 2] [--frames 4]
                                    [--image-size 224] [--steps 2] [--warmup 1] [--threads N]

One step = the pre-training objective on a synthetic batch (contrastive with momentum encoder
and queue + matching with hard negatives + MLM + instruction LM), backward included. Prints one
line per preset (samples per wall second and per CPU second of the process, the
latter robust to a shared machine), then a JSON object with every figure on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when run as a script

from model import MPlug2, MPlugConfig
from model import objectives as O


def make_batch(cfg: MPlugConfig, b: int, t: int, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = cfg.bos_token_id, cfg.eos_token_id
    return frames, ids, torch.ones_like(ids)


def pretrain_step(model: MPlug2, frames, ids, mask) -> torch.Tensor:
    u = model(frames=frames, text_ids=ids, text_mask=mask)
    c = O.contrastive_loss(model, u, frames, ids, mask)
    itm = O.matching_loss(model, u, c.sim_i2t, c.sim_t2i)
    mlm = O.mlm_loss(model, ids, mask, vision_tokens=u.vision_tokens)
    lm = O.lm_loss(model, u.vision_tokens, None, ids[:, :8], mask[:, :8], ids[:, 8:], mask[:, 8:])
    return c.loss + itm + mlm + lm


def measure(preset: str, attn: str, args) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = MPlugConfig.from_preset(preset, attn_impl=attn, image_size=args.image_size, queue_size=1024)
    model = MPlug2(cfg, "pretrain").train()
    frames, ids, mask = make_batch(cfg, args.batch_size, args.frames)
    for _ in range(args.warmup):
        pretrain_step(model, frames, ids, mask).backward()
        model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        pretrain_step(model, frames, ids, mask).backward()
        model.zero_grad(set_to_none=True)
    n = args.steps * args.batch_size
    # samples per wall second, and per CPU second of this process (robust to a shared machine)
    return {"wall": n / (time.perf_counter() - t0), "cpu": n / (time.process_time() - c0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"batch_size": args.batch_size, "frames": args.frames, "image_size": args.image_size,
                    "threads": torch.get_num_threads(), "unit": "samples/s wall and per CPU-second (forward+backward, pretrain objective)"}
    for preset in args.presets:
        m = {attn: measure(preset, attn, args) for attn in ("sdpa", "plain")}
        row = {"sdpa": m["sdpa"]["wall"], "plain": m["plain"]["wall"],
               "sdpa_per_cpu_s": m["sdpa"]["cpu"], "plain_per_cpu_s": m["plain"]["cpu"]}
        row["sdpa_over_plain"] = row["sdpa"] / row["plain"]
        row["sdpa_over_plain_cpu"] = row["sdpa_per_cpu_s"] / row["plain_per_cpu_s"]
        result[preset] = row
        print(f"{preset}: samples/s sdpa {row['sdpa']:.3f} plain {row['plain']:.3f} (x{row['sdpa_over_plain']:.2f}); "
              f"samples/CPU-s sdpa {row['sdpa_per_cpu_s']:.3f} plain {row['plain_per_cpu_s']:.3f} "
              f"(x{row['sdpa_over_plain_cpu']:.2f})", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
