"""Caption generation with and without the decoder's key/value cache (CPU).

    python benchmarks/generation.py [--presets tiny base] [--items 2] [--frames 4] [--base-image-size 112]
                                    [--beams 5] [--max-length 25] [--threads N]

For each preset: a captioning model (random weights, the decoder's word embeddings sharpened so the
beams really diverge), visual tokens of ``--items`` random clips, then beam search (``--beams``,
exactly ``--max-length`` tokens: [SEP] is blocked to the end so both paths do the full work) with
the cache and without it (the whole sequence re-run every step). Checks the token ids are identical
and prints items/s of both (per wall second and per CPU-second of the process, the latter robust to
a shared machine), the speed-up, and a JSON object with every figure on the last line.
The cross states of ``base`` are those of ``--frames`` frames at ``--base-image-size`` px (1 + T*N
tokens); the clip's own vision pass is timed too, for scale.
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


def measure(preset: str, args) -> dict:
    overrides = {"image_size": args.base_image_size} if preset != "tiny" else {}
    cfg = MPlugConfig.from_preset(preset, dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = MPlug2(cfg, "captioning").eval()
    with torch.no_grad():
        model.decoder.embeddings.word.weight.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(args.items, args.frames, 3, cfg.image_size, cfg.image_size, generator=g)
    prompt = torch.randint(5, cfg.vocab_size, (args.items, 8), generator=g)
    prompt[:, 0], prompt[:, -1] = cfg.bos_token_id, cfg.eos_token_id
    with torch.no_grad():
        t0 = time.perf_counter()
        vt = model.universal(vision=model.encode_vision(frames)).vision_tokens   # [B, 1+T*N, C]
        vision_s = time.perf_counter() - t0
    kw = dict(num_beams=args.beams, max_length=args.max_length, min_length=args.max_length - 1)
    out, secs, cpu = {}, {}, {}
    for use_cache in (True, False):
        t0, c0 = time.perf_counter(), time.process_time()
        out[use_cache] = model.generate(vt, None, prompt, use_cache=use_cache, **kw)
        secs[use_cache], cpu[use_cache] = time.perf_counter() - t0, time.process_time() - c0
    identical = torch.equal(out[True].sequences, out[False].sequences)
    return {"cross_tokens": vt.shape[1], "decoder_layers": cfg.decoder_layers, "width": cfg.text_width,
            "tokens": out[True].sequences.shape[1],
            "cached_items_per_s": args.items / secs[True], "uncached_items_per_s": args.items / secs[False],
            "cached_items_per_cpu_s": args.items / cpu[True], "uncached_items_per_cpu_s": args.items / cpu[False],
            "speedup": secs[False] / secs[True], "speedup_cpu": cpu[False] / cpu[True], "identical_ids": identical,
            "vision_pass_s_per_item": vision_s / args.items}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--items", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--base-image-size", type=int, default=112, help="image size of the non-tiny presets")
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--max-length", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"items": args.items, "frames": args.frames, "beams": args.beams, "max_length": args.max_length,
                    "threads": torch.get_num_threads(), "unit": "items/s (caption generation, beam search)"}
    ok = True
    for preset in args.presets:
        r = measure(preset, args)
        result[preset] = r
        ok &= r["identical_ids"]
        print(f"{preset}: {r['cross_tokens']} cross tokens, {r['tokens']} tokens x beam {args.beams}: "
              f"cached {r['cached_items_per_s']:.3f} items/s, uncached {r['uncached_items_per_s']:.3f} items/s, "
              f"speed-up x{r['speedup']:.1f} wall, x{r['speedup_cpu']:.1f} per CPU-second; identical ids: {r['identical_ids']} "
              f"(vision pass {r['vision_pass_s_per_item']:.2f} s/item)", flush=True)
    result["all_identical"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
