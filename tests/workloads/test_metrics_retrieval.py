"""Retrieval re-ranking and metrics, checked against hand-worked cases and a brute-force reference."""
from __future__ import annotations

import random

import pytest
import torch

from workloads.metrics.retrieval import (
    _topk_stable,
    assemble_scores,
    plan_rerank,
    rerank_topk,
    retrieval_metrics,
    score_all_pairs,
    t2v_ranks,
    v2t_ranks,
)


class RecordingHead:
    """A deterministic stand-in for the matching head: an MLP on the pair's features; records calls."""

    def __init__(self, nt: int, nv: int, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.text = torch.randn(nt, dim, generator=g)
        self.video = torch.randn(nv, dim, generator=g)
        self.w1 = torch.randn(2 * dim, 16, generator=g)
        self.w2 = torch.randn(16, generator=g)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append((t.clone(), v.clone()))
        x = torch.cat([self.text[t], self.video[v]], dim=1)          # [P, 2*dim]
        return torch.tanh(x @ self.w1) @ self.w2                      # [P]

    @property
    def num_pairs(self) -> int:
        return sum(t.numel() for t, _ in self.calls)


# ---------------------------------------------------------------- rerank_topk

@pytest.mark.parametrize("nt,nv", [(7, 5), (5, 7), (6, 6), (1, 1)])
def test_rerank_with_k_equal_n_matches_exhaustive(nt, nv):
    sim = torch.randn(nt, nv, generator=torch.Generator().manual_seed(1))
    head = RecordingHead(nt, nv)
    full = score_all_pairs(nt, nv, head, batch_size=4)
    head.calls.clear()
    t2v, v2t = rerank_topk(sim, k=max(nt, nv), score_pairs=head, batch_size=4)
    torch.testing.assert_close(t2v, full)
    torch.testing.assert_close(v2t, full.T)
    assert head.num_pairs == 2 * nt * nv


def test_rerank_add_sim_with_k_equal_n_matches_exhaustive_plus_sim():
    nt, nv = 4, 6
    sim = torch.randn(nt, nv, generator=torch.Generator().manual_seed(5))
    head = RecordingHead(nt, nv)
    full = score_all_pairs(nt, nv, head)
    t2v, v2t = rerank_topk(sim, k=6, score_pairs=head, add_sim=True)
    torch.testing.assert_close(t2v, full + sim)
    torch.testing.assert_close(v2t, (full + sim).T)


def test_rerank_calls_callback_with_exactly_n_times_k_pairs_in_batches():
    nt, nv, k, bs = 7, 5, 3, 4
    sim = torch.randn(nt, nv, generator=torch.Generator().manual_seed(2))
    head = RecordingHead(nt, nv)
    rerank_topk(sim, k=k, score_pairs=head, batch_size=bs)
    assert head.num_pairs == (nt + nv) * k == 36
    assert all(t.numel() <= bs for t, _ in head.calls)
    assert len(head.calls) == 9                                    # ceil(36 / 4)
    # each text is scored against exactly its top-k clips by sim, each clip against its top-k texts
    pairs = [(int(a), int(b)) for t, v in head.calls for a, b in zip(t, v)]
    t_part, v_part = pairs[:nt * k], pairs[nt * k:]
    for i in range(nt):
        assert {b for a, b in t_part if a == i} == set(sim[i].topk(k).indices.tolist())
    for j in range(nv):
        assert {a for a, b in v_part if b == j} == set(sim[:, j].topk(k).indices.tolist())


def test_rerank_candidates_hold_head_scores_and_the_rest_stay_below_in_sim_order():
    # hand-worked: k=1 -> only clip 0 is re-scored (-5); the others go below -5 keeping sim order
    sim = torch.tensor([[0.9, 0.1, 0.5]])
    t2v, v2t = rerank_topk(sim, k=1, score_pairs=lambda t, v: torch.full(t.shape, -5.0))
    # below = sim - max(sim) + min(candidate scores) - 1 = sim - 0.9 - 6
    torch.testing.assert_close(t2v, torch.tensor([[-5.0, -6.8, -6.4]]))
    # each clip has a single text, which is its only candidate
    torch.testing.assert_close(v2t, torch.tensor([[-5.0], [-5.0], [-5.0]]))


def test_rerank_lets_the_matching_head_reorder_the_candidates():
    sim = torch.tensor([[0.9, 0.8, 0.1]])
    head_scores = {(0, 0): 0.2, (0, 1): 3.0, (0, 2): 100.0}           # clip 2 is not a candidate at k=2
    t2v, _ = rerank_topk(sim, k=2, score_pairs=lambda t, v: torch.tensor(
        [head_scores[(int(a), int(b))] for a, b in zip(t, v)]))
    assert t2v[0].argsort(descending=True).tolist() == [1, 0, 2]
    assert t2v[0, 2] < t2v[0, 0]                                       # the non-candidate stays last


def test_rerank_candidate_choice_on_equal_similarity_is_the_lower_index():
    sim = torch.full((2, 4), 0.5)
    head = RecordingHead(2, 4)
    rerank_topk(sim, k=2, score_pairs=head)
    t, v = head.calls[0]
    assert v[:4].tolist() == [0, 1, 0, 1]                              # texts 0,1 -> clips 0,1
    assert t[4:].tolist() == [0, 1] * 4                                # clips 0..3 -> texts 0,1


def test_plan_scored_in_slices_by_several_workers_assembles_to_the_same_result():
    nt, nv, k, world = 9, 4, 3, 3
    sim = torch.randn(nt, nv, generator=torch.Generator().manual_seed(6))
    head = RecordingHead(nt, nv)
    expect = rerank_topk(sim, k=k, score_pairs=head)
    plan = plan_rerank(sim, k)
    assert plan.num_pairs == nt * 3 + nv * 3
    scores = torch.empty(plan.num_pairs)
    for rank in range(world):                                    # each worker scores every world-th pair
        sl = slice(rank, None, world)
        scores[sl] = head(plan.text_idx[sl], plan.video_idx[sl])
    got = assemble_scores(sim, plan, scores)
    torch.testing.assert_close(got[0], expect[0])
    torch.testing.assert_close(got[1], expect[1])
    with pytest.raises(ValueError, match="one score per planned pair"):
        assemble_scores(sim, plan, scores[:-1])


def test_candidate_choice_equals_a_stable_sort_on_heavily_tied_rows():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 4, (50, 30), generator=g).float()              # many ties at every cut
    for k in (1, 5, 17, 30):
        got = _topk_stable(x, k)
        ref = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(got, ref.sort(dim=1).values)


def test_rerank_k_larger_than_the_set_is_clamped():
    head = RecordingHead(3, 2)
    rerank_topk(torch.randn(3, 2), k=128, score_pairs=head)
    assert head.num_pairs == 3 * 2 + 2 * 3


@pytest.mark.parametrize("bad,msg", [
    (lambda t, v: torch.zeros(t.numel() + 1), "one score per pair"),
    (lambda t, v: torch.full(t.shape, float("nan")), "NaN or infinite"),
])
def test_rerank_rejects_a_bad_callback(bad, msg):
    with pytest.raises(ValueError, match=msg):
        rerank_topk(torch.randn(3, 3), k=2, score_pairs=bad)


def test_rerank_rejects_bad_arguments():
    def ok(t, v):
        return torch.zeros(t.shape)
    with pytest.raises(ValueError, match="k \\(k_test\\) must be >= 1"):
        rerank_topk(torch.randn(3, 3), k=0, score_pairs=ok)
    with pytest.raises(ValueError, match="batch_size"):
        rerank_topk(torch.randn(3, 3), k=1, score_pairs=ok, batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        rerank_topk(torch.zeros(0, 3), k=1, score_pairs=ok)
    with pytest.raises(ValueError, match="NaN or infinite"):
        rerank_topk(torch.tensor([[float("nan")]]), k=1, score_pairs=ok)


# ---------------------------------------------------------------- ranks (hand-worked, ties)

def test_t2v_ranks_are_pessimistic_on_ties():
    scores = torch.tensor([[1.0, 1.0, 0.0],     # own clip 0 ties with clip 1 -> rank 2
                           [0.0, 2.0, 2.0],     # own clip 1 ties with clip 2 -> rank 2
                           [5.0, 1.0, 1.0]])    # own clip 0 is strictly best -> rank 1
    assert t2v_ranks(scores, torch.tensor([0, 1, 0])).tolist() == [2, 2, 1]


def test_v2t_rank_is_the_best_own_text_counted_against_other_clips_texts():
    text_to_clip = torch.tensor([0, 1, 0])       # clip 0 has texts 0 and 2 (MSR-VTT style)
    scores = torch.tensor([[0.1, 0.9, 0.5],      # clip 0: best own 0.5, text 1 (0.9) above -> rank 2
                           [0.3, 0.3, 0.0]])     # clip 1: own 0.3 ties with text 0 -> rank 2 (pessimistic)
    assert v2t_ranks(scores, text_to_clip).tolist() == [2, 2]
    # two own texts tied at the top are both hits: rank 1, not 2
    scores = torch.tensor([[0.7, 0.1, 0.7], [0.0, 1.0, 0.0]])
    assert v2t_ranks(scores, text_to_clip).tolist() == [1, 1]


def _brute_ranks(scores, own):
    """By definition: 1 + number of wrong items scoring >= the best own item (row by row)."""
    out = []
    for row, mine in zip(scores, own):
        best = max(row[c] for c in mine)
        out.append(1 + sum(1 for c, s in enumerate(row) if c not in mine and s >= best))
    return out


def test_ranks_agree_with_a_brute_force_definition_on_tied_random_scores():
    rng = random.Random(0)
    for _ in range(30):
        nv = rng.randint(1, 6)
        nt = rng.randint(nv, 10)
        text_to_clip = list(range(nv)) + [rng.randrange(nv) for _ in range(nt - nv)]
        rng.shuffle(text_to_clip)
        t2v = [[rng.randint(0, 3) for _ in range(nv)] for _ in range(nt)]       # small ints: many ties
        v2t = [[rng.randint(0, 3) for _ in range(nt)] for _ in range(nv)]
        got_t = t2v_ranks(torch.tensor(t2v, dtype=torch.float), torch.tensor(text_to_clip))
        got_v = v2t_ranks(torch.tensor(v2t, dtype=torch.float), torch.tensor(text_to_clip))
        assert got_t.tolist() == _brute_ranks(t2v, [{c} for c in text_to_clip])
        assert got_v.tolist() == _brute_ranks(v2t, [{i for i, c in enumerate(text_to_clip) if c == j}
                                                    for j in range(nv)])


# ---------------------------------------------------------------- retrieval_metrics

def test_retrieval_metrics_hand_worked():
    # every row is [4, 3, 2, 1] and text i belongs to clip i, so the ranks are 1, 2, 3, 4 both ways
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(4, 1)
    m = retrieval_metrics(scores, scores, torch.arange(4))
    for d in ("t2v", "v2t"):
        assert m[f"{d}_r1"] == 25.0 and m[f"{d}_r5"] == 100.0 and m[f"{d}_r10"] == 100.0
        assert m[f"{d}_medr"] == 2.5 and m[f"{d}_meanr"] == 2.5      # even count: mean of 2 and 3
    assert m["r_mean"] == pytest.approx(75.0)


def test_retrieval_metrics_one_element_set():
    m = retrieval_metrics(torch.tensor([[0.3]]), torch.tensor([[0.3]]), torch.tensor([0]))
    assert m == {"t2v_r1": 100.0, "t2v_r5": 100.0, "t2v_r10": 100.0, "t2v_medr": 1.0, "t2v_meanr": 1.0,
                 "v2t_r1": 100.0, "v2t_r5": 100.0, "v2t_r10": 100.0, "v2t_medr": 1.0, "v2t_meanr": 1.0,
                 "r_mean": 100.0}


def test_retrieval_metrics_duplicate_clips_do_not_inflate_recall():
    # two identical clips (duplicate embeddings): every text ties between them -> rank 2, R@1 = 0
    sim = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    m = retrieval_metrics(sim, sim.T, torch.tensor([0, 1]))
    assert m["t2v_r1"] == 0.0 and m["t2v_r5"] == 100.0 and m["t2v_medr"] == 2.0
    assert m["v2t_r1"] == 0.0


def test_rerank_then_metrics_end_to_end_with_a_perfect_head():
    # contrastive sim is noise, but the matching head knows the truth: with k = N everything is
    # found at rank 1; with k = 1 only pairs whose true match the sim already ranks first are.
    nt, nv = 6, 3
    text_to_clip = torch.tensor([0, 1, 2, 0, 1, 2])
    def perfect(t, v):
        return (text_to_clip[t] == v).float()
    sim = torch.randn(nt, nv, generator=torch.Generator().manual_seed(3))
    m = retrieval_metrics(*rerank_topk(sim, k=nt, score_pairs=perfect), text_to_clip)
    assert m["t2v_r1"] == 100.0 and m["v2t_r1"] == 100.0 and m["t2v_meanr"] == 1.0
    m1 = retrieval_metrics(*rerank_topk(sim, k=1, score_pairs=perfect), text_to_clip)
    expect = 100.0 * (sim.argmax(1) == text_to_clip).float().mean().item()
    assert m1["t2v_r1"] == pytest.approx(expect)


def test_retrieval_metrics_rejects_bad_inputs():
    s = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="clip 1 has no text"):
        retrieval_metrics(s, s.T, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="not a clip index"):
        retrieval_metrics(s, s.T, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="v2t_scores must be"):
        retrieval_metrics(s, s, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="one clip index per text"):
        retrieval_metrics(s, s.T, torch.tensor([0, 1]))
