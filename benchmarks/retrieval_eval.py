"""Retrieval evaluation cost: top-k re-ranking vs exhaustive matching-head scoring.

Random clip/text embeddings and a stand-in matching head whose cost per pair is fixed (a small
MLP on the concatenated pair features).  For each N the script times ``rerank_topk`` +
``retrieval_metrics`` with a fixed ``k_test`` (``2 N k`` pairs) and the exhaustive ``N x N``
scoring + metrics, and prints a table; the last line is one JSON object.

    .venv/bin/python benchmarks/retrieval_eval.py [--sizes 250,500,1000] [--k-test 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workloads.metrics.retrieval import rerank_topk, retrieval_metrics, score_all_pairs


class PairMLP:
    """Stand-in matching head: score(t, v) = MLP([text_feat[t], video_feat[v]]), fixed cost per pair."""

    def __init__(self, text_feat: torch.Tensor, video_feat: torch.Tensor, hidden: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        dim = text_feat.shape[1]
        self.text_feat, self.video_feat = text_feat, video_feat
        self.w1 = torch.randn(2 * dim, hidden, generator=g) / (2 * dim) ** 0.5
        self.w2 = torch.randn(hidden, generator=g) / hidden ** 0.5
        self.pairs, self.seconds = 0, 0.0

    def __call__(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.pairs += t.numel()
        x = torch.cat([self.text_feat[t], self.video_feat[v]], dim=1)      # [P, 2*dim]
        # the dot product keeps true pairs on top, so the recalls are not noise
        out = torch.relu(x @ self.w1) @ self.w2 * 0.1 + (self.text_feat[t] * self.video_feat[v]).sum(1)  # [P]
        self.seconds += time.perf_counter() - t0
        return out

    def reset(self) -> None:
        self.pairs, self.seconds = 0, 0.0


def measure(n: int, k_test: int, dim: int, hidden: int, batch_size: int, exhaustive: bool, seed: int,
            repeats: int) -> dict:
    g = torch.Generator().manual_seed(seed + n)
    video = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)            # [N, D]
    text = torch.nn.functional.normalize(video + 0.5 * torch.randn(n, dim, generator=g), dim=1)  # [N, D]
    text_to_clip = torch.arange(n)                                   # one caption per clip (MSR-VTT 1k-A)
    head = PairMLP(text, video, hidden, seed)

    def rerank() -> dict:
        sim = text @ video.T                                         # [N, N] contrastive similarity
        return retrieval_metrics(*rerank_topk(sim, k_test, head, batch_size=batch_size), text_to_clip)

    def full() -> dict:
        scores = score_all_pairs(n, n, head, batch_size=batch_size)  # [N, N]
        return retrieval_metrics(scores, scores.T, text_to_clip)

    rerank_s, head_s, metrics = best_of(repeats, rerank, head)
    row = {"n": n, "k_test": k_test, "pairs": head.pairs, "pairs_over_n2": head.pairs / n ** 2,
           "rerank_s": rerank_s, "rerank_head_s": head_s, "rerank_ms_per_clip": 1e3 * rerank_s / n,
           "t2v_r1": metrics["t2v_r1"], "v2t_r1": metrics["v2t_r1"]}
    if exhaustive:
        full_s, full_head_s, full_metrics = best_of(repeats, full, head)
        row.update(exhaustive_s=full_s, exhaustive_head_s=full_head_s, exhaustive_pairs=head.pairs,
                   exhaustive_t2v_r1=full_metrics["t2v_r1"], speedup=full_s / rerank_s)
    return row


def best_of(repeats: int, fn, head: PairMLP) -> tuple[float, float, dict]:
    """(fastest wall seconds, head seconds in that run, result) over ``repeats`` runs of ``fn``."""
    best = None
    for _ in range(repeats):
        head.reset()
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, head.seconds, result)
    return best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="250,500,1000", help="comma-separated numbers of clips N")
    p.add_argument("--k-test", type=int, default=16, help="candidates re-scored per query (paper: 128)")
    p.add_argument("--dim", type=int, default=64, help="feature width of the stand-in head")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of the stand-in head")
    p.add_argument("--batch-size", type=int, default=2048, help="pairs per matching-head call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings comparable)")
    p.add_argument("--no-exhaustive", action="store_true", help="skip the N x N comparison")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest is kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error(f"--sizes needs at least one N >= 1, got {args.sizes!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.k_test, args.dim, args.hidden, args.batch_size, not args.no_exhaustive, args.seed,
                 max(1, args.repeats))
            for n in args.sizes]
    print(f"{'N':>6} {'pairs':>9} {'pairs/N^2':>9} {'rerank s':>9} {'(head s)':>9} {'ms/clip':>8} "
          f"{'exhaust s':>10} {'(head s)':>9} {'ms/clip':>8} {'speedup':>8}")
    for r in rows:
        ex = (f"{r['exhaustive_s']:10.3f} {r['exhaustive_head_s']:9.3f} {1e3 * r['exhaustive_s'] / r['n']:8.3f} "
              f"{r['speedup']:8.1f}" if "exhaustive_s" in r else f"{'-':>10} {'-':>9} {'-':>8} {'-':>8}")
        print(f"{r['n']:>6} {r['pairs']:>9} {r['pairs_over_n2']:9.4f} {r['rerank_s']:9.3f} {r['rerank_head_s']:9.3f} "
              f"{r['rerank_ms_per_clip']:8.3f} {ex}")
    first, last = rows[0], rows[-1]
    summary = {"benchmark": "retrieval_eval", "k_test": args.k_test, "threads": args.threads, "rows": rows,
               "n_growth": last["n"] / first["n"], "rerank_time_growth": last["rerank_s"] / first["rerank_s"],
               "rerank_head_time_growth": last["rerank_head_s"] / first["rerank_head_s"]}
    if "exhaustive_s" in last:
        summary["exhaustive_time_growth"] = last["exhaustive_s"] / first["exhaustive_s"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
