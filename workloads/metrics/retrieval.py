"""Retrieval evaluation: top-k re-ranking with the matching head, then recall / rank metrics.

The workload gathers clip and text embeddings (from all workers) into one contrastive similarity
matrix ``sim [Nt, Nv]``.  Scoring every pair with the matching head costs ``Nt * Nv`` fused
forward passes; :func:`rerank_topk` scores only each text's ``k`` most similar clips and each
clip's ``k`` most similar texts, ``(Nt + Nv) * k`` pairs, and ranks the rest below them in
contrastive order.  :func:`retrieval_metrics` turns the two score matrices into R@1/5/10 in both
directions, median and mean rank.

Conventions (tested in ``tests/workloads/test_metrics_retrieval.py``):

* Candidate choice: the ``k`` largest similarities of a row; equal similarities at the cut go to
  the lower index, so the choice is deterministic.
* Ties in the final scores are **pessimistic**: an item's rank is 1 + the number of *wrong* items
  scoring higher than or equal to it.  Ties never inflate recall.
* Several texts may belong to one clip (``text_to_clip[i]`` is the clip of text ``i``).  A
  text->video hit is that clip; a video->text hit is any of the clip's texts, so a clip's rank is
  the rank of its best-scored text, counted against the other clips' texts only.
* Recalls are percentages (0-100); ranks are 1-based.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ScorePairs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_pairs(text_idx [P], video_idx [P]) -> scores [P]``: the matching head's score (higher
is a better match) for each (text, video) pair; indices are int64 on ``sim``'s device."""

RECALL_KS = (1, 5, 10)


def _check_sim(sim: torch.Tensor) -> None:
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty [num_texts, num_videos] matrix, got shape {tuple(sim.shape)}")
    if not torch.isfinite(sim).all():
        raise ValueError("sim contains NaN or infinite values; check the embeddings fed to the similarity")


def _score_in_batches(score_pairs: ScorePairs, text_idx: torch.Tensor, video_idx: torch.Tensor,
                      batch_size: int, device: torch.device) -> torch.Tensor:
    """Call ``score_pairs`` on ``batch_size`` pairs at a time; returns float32 scores ``[P]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    with torch.no_grad():
        for s in range(0, text_idx.numel(), batch_size):
            t, v = text_idx[s:s + batch_size], video_idx[s:s + batch_size]
            scores = torch.as_tensor(score_pairs(t, v))
            if scores.shape != t.shape:
                raise ValueError(f"score_pairs returned shape {tuple(scores.shape)} for {t.numel()} pairs; "
                                 f"it must return one score per pair, shape ({t.numel()},)")
            out.append(scores.detach().to(device=device, dtype=torch.float32))
    scores = torch.cat(out) if out else torch.zeros(0, device=device)
    if not torch.isfinite(scores).all():
        raise ValueError("score_pairs returned a NaN or infinite score; the matching head must give finite scores")
    return scores


def _topk_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices ``[R, k]`` of each row's ``k`` largest entries of ``x [R, C]``; among equal
    values at the cut the lower index wins.  Indices come in ascending order, not score order.
    (A full stable sort does the same at ~15x the cost of ``topk`` for 1000 x 1000.)"""
    kth = torch.topk(x, k, dim=1).values[:, -1:]                           # [R, 1] the k-th largest value
    above = x > kth                                                        # [R, C] surely in
    at = x == kth                                                          # [R, C] in while room is left
    room = k - above.sum(dim=1, keepdim=True)                              # [R, 1] >= 1
    keep = above | (at & (at.cumsum(dim=1) <= room))                       # [R, C], exactly k per row
    return keep.nonzero()[:, 1].view(x.shape[0], k)                        # row-major -> ascending columns


def _fill_rows(sim_rows: torch.Tensor, cand: torch.Tensor, cand_scores: torch.Tensor) -> torch.Tensor:
    """Rows of ``sim_rows [R, C]`` with the candidates ``cand [R, k]`` set to ``cand_scores [R, k]``
    and every other entry placed strictly below the row's lowest candidate score, in ``sim`` order."""
    row_min = cand_scores.min(dim=1, keepdim=True).values                 # [R, 1]
    row_max_sim = sim_rows.max(dim=1, keepdim=True).values                # [R, 1]
    below = sim_rows.float() - row_max_sim.float() + row_min - 1.0        # [R, C], every entry <= row_min - 1
    return below.scatter(1, cand, cand_scores)


@dataclass(frozen=True)
class RerankPlan:
    """The (text, video) pairs to re-score: first each text's candidates, then each clip's.

    ``text_idx`` and ``video_idx`` are ``[Nt*kt + Nv*kv]`` int64; ``t2v_cand [Nt, kt]`` and
    ``v2t_cand [Nv, kv]`` hold the candidate indices per row.  The plan depends only on ``sim``
    and ``k``, so workers holding the same gathered ``sim`` can each score a slice of the pairs
    and the gathered scores can be assembled in one place.
    """

    text_idx: torch.Tensor
    video_idx: torch.Tensor
    t2v_cand: torch.Tensor
    v2t_cand: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.text_idx.numel()


def plan_rerank(sim: torch.Tensor, k: int) -> RerankPlan:
    """Each text's ``min(k, Nv)`` most similar clips and each clip's ``min(k, Nt)`` most similar
    texts (equal similarities at the cut go to the lower index)."""
    _check_sim(sim)
    if k < 1:
        raise ValueError(f"k (k_test) must be >= 1, got {k}")
    nt, nv = sim.shape
    kt, kv = min(k, nv), min(k, nt)
    def arange(n):
        return torch.arange(n, device=sim.device)
    t2v_cand = _topk_stable(sim, kt)                                                    # [Nt, kt]
    v2t_cand = _topk_stable(sim.T, kv)                                                  # [Nv, kv]
    text_idx = torch.cat([arange(nt).repeat_interleave(kt), v2t_cand.reshape(-1)])     # [Nt*kt + Nv*kv]
    video_idx = torch.cat([t2v_cand.reshape(-1), arange(nv).repeat_interleave(kv)])    # [Nt*kt + Nv*kv]
    return RerankPlan(text_idx, video_idx, t2v_cand, v2t_cand)


def assemble_scores(sim: torch.Tensor, plan: RerankPlan, pair_scores: torch.Tensor,
                    add_sim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t2v_scores [Nt, Nv], v2t_scores [Nv, Nt])`` from the matching scores of ``plan``'s pairs
    (``pair_scores [num_pairs]``, in plan order); see :func:`rerank_topk`."""
    pair_scores = torch.as_tensor(pair_scores).to(device=sim.device, dtype=torch.float32)
    if pair_scores.shape != (plan.num_pairs,):
        raise ValueError(f"pair_scores must hold one score per planned pair, shape ({plan.num_pairs},), "
                         f"got {tuple(pair_scores.shape)}")
    if not torch.isfinite(pair_scores).all():
        raise ValueError("a matching score is NaN or infinite; the matching head must give finite scores")
    (nt, kt), (nv, kv) = plan.t2v_cand.shape, plan.v2t_cand.shape
    t2v_scores, v2t_scores = pair_scores[:nt * kt].view(nt, kt), pair_scores[nt * kt:].view(nv, kv)
    if add_sim:
        t2v_scores = t2v_scores + sim.gather(1, plan.t2v_cand).float()
        v2t_scores = v2t_scores + sim.T.gather(1, plan.v2t_cand).float()
    return _fill_rows(sim, plan.t2v_cand, t2v_scores), _fill_rows(sim.T, plan.v2t_cand, v2t_scores)


def rerank_topk(sim: torch.Tensor, k: int, score_pairs: ScorePairs, batch_size: int = 256,
                add_sim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score each text's top-``k`` clips and each clip's top-``k`` texts with ``score_pairs``.

    sim: ``[Nt, Nv]`` contrastive similarity (text x video).  ``k`` is clamped to the number of
    candidates available (``min(k, Nv)`` per text, ``min(k, Nt)`` per clip), so the callback sees
    exactly ``Nt * min(k, Nv) + Nv * min(k, Nt)`` pairs, in batches of at most ``batch_size``.

    Returns ``(t2v_scores [Nt, Nv], v2t_scores [Nv, Nt])``, float32 on ``sim``'s device: each
    candidate holds its matching score; the others hold values below every candidate of their row,
    ordered as in ``sim``.  With ``k >= max(Nt, Nv)`` the result is exhaustive matching scoring.
    ``add_sim=True`` ranks candidates by matching score + similarity, as the public
    ALBEF/BLIP/mPLUG evaluation code does (``score_matrix[i, topk_idx] = score + topk_sim``).
    To spread the scoring over workers use :func:`plan_rerank` and :func:`assemble_scores`.
    """
    plan = plan_rerank(sim, k)
    scores = _score_in_batches(score_pairs, plan.text_idx, plan.video_idx, batch_size, sim.device)
    return assemble_scores(sim, plan, scores, add_sim=add_sim)


def score_all_pairs(num_texts: int, num_videos: int, score_pairs: ScorePairs, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Exhaustive matching scores ``[Nt, Nv]`` (every pair through ``score_pairs``): the
    reference :func:`rerank_topk` is checked against, and the cost it avoids."""
    device = torch.device(device)
    text_idx = torch.arange(num_texts, device=device).repeat_interleave(num_videos)   # [Nt*Nv]
    video_idx = torch.arange(num_videos, device=device).repeat(num_texts)             # [Nt*Nv]
    scores = _score_in_batches(score_pairs, text_idx, video_idx, batch_size, device)
    return scores.view(num_texts, num_videos)


def t2v_ranks(t2v_scores: torch.Tensor, text_to_clip: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of each text's own clip in its row: ``[Nt]`` int64."""
    gt = t2v_scores.gather(1, text_to_clip[:, None])                       # [Nt, 1]
    return (t2v_scores >= gt).sum(dim=1)                                   # counts the clip itself


def v2t_ranks(v2t_scores: torch.Tensor, text_to_clip: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of each clip's best-scored own text: ``[Nv]`` int64."""
    nv = v2t_scores.shape[0]
    own = text_to_clip[None, :] == torch.arange(nv, device=v2t_scores.device)[:, None]   # [Nv, Nt]
    best = v2t_scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # [Nv, 1]
    return 1 + ((v2t_scores >= best) & ~own).sum(dim=1)


def _summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * (r <= k).double().mean().item() for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.median(r.cpu().numpy()))   # even count: mean of the two middle ranks
    out[f"{prefix}_meanr"] = r.mean().item()
    return out


def retrieval_metrics(t2v_scores: torch.Tensor, v2t_scores: torch.Tensor,
                      text_to_clip: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank in both directions, and ``r_mean`` (the mean of
    the six recalls).  ``t2v_scores [Nt, Nv]``, ``v2t_scores [Nv, Nt]``, ``text_to_clip [Nt]``
    (the clip of each text; every clip must have at least one text).  Higher score = better."""
    text_to_clip = torch.as_tensor(text_to_clip, device=t2v_scores.device).long()
    nt, nv = t2v_scores.shape
    if v2t_scores.shape != (nv, nt):
        raise ValueError(f"v2t_scores must be [num_videos, num_texts] = {(nv, nt)}, got {tuple(v2t_scores.shape)}")
    if text_to_clip.shape != (nt,):
        raise ValueError(f"text_to_clip must have one clip index per text, shape ({nt},), got {tuple(text_to_clip.shape)}")
    if nt == 0 or nv == 0:
        raise ValueError("retrieval_metrics needs at least one text and one clip")
    bad = (text_to_clip < 0) | (text_to_clip >= nv)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"text_to_clip[{i}] = {int(text_to_clip[i])} is not a clip index in [0, {nv})")
    has_text = torch.bincount(text_to_clip, minlength=nv) > 0
    if not has_text.all():
        j = int((~has_text).nonzero()[0])
        raise ValueError(f"clip {j} has no text (of {int((~has_text).sum())} such clips); video->text recall "
                         "is undefined for it: drop clips without captions before evaluation")
    if torch.isnan(t2v_scores).any() or torch.isnan(v2t_scores).any():
        raise ValueError("retrieval scores contain NaN")
    out = {**_summary(t2v_ranks(t2v_scores, text_to_clip), "t2v"),
           **_summary(v2t_ranks(v2t_scores, text_to_clip), "v2t")}
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in RECALL_KS) / (2 * len(RECALL_KS))
    return out
