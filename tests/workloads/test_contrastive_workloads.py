"""Pre-training and retrieval losses: the positives (one clip, or one caption), the collapse
diagnostics they log, and the reference's re-ranking score (tiny model, hand-built batches, no Ray)."""
import pytest
import torch

from model import MPlugConfig
from workloads import common, pretrain, retrieval

DIAGNOSTICS = {"itc_acc_t2v", "itc_acc_v2t", "text_cos", "video_cos", "itm_acc"}


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (b, 8), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[1] = ids[0]                                                    # rows 0 and 1: one caption
    return {"frames": torch.randint(0, 256, (b, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
            "text_ids": ids, "text_mask": torch.ones_like(ids), "clip_index": torch.arange(b) + 100}


def test_caption_ids_are_equal_exactly_for_equal_captions():
    b = _batch()
    ids = common.caption_ids(b["text_ids"], b["text_mask"])
    assert ids[0] == ids[1] and len(set(ids[1:].tolist())) == 3 and (ids >= 0).all()
    mask = b["text_mask"].clone()
    mask[1, -1] = 0                                                    # padding differs: another caption
    assert common.caption_ids(b["text_ids"], mask)[1] != ids[0]
    assert torch.equal(common.positive_ids(b, "clip"), b["clip_index"])
    with pytest.raises(ValueError, match="accepted"):
        common.positive_ids(b, "video")


@pytest.mark.parametrize("wl", [retrieval, pretrain])
def test_losses_log_detached_collapse_diagnostics(wl, monkeypatch):
    cfg = wl.Config(positives="caption")
    assert wl.Config().positives == "clip"                             # the reference's default
    torch.manual_seed(0)
    model = wl.build_model(MPlugConfig.from_preset("tiny"), cfg).train()
    seen = []
    real = common.objectives.contrastive_loss
    monkeypatch.setattr(common.objectives, "contrastive_loss", lambda *a, idx=None, **k: seen.append(idx) or real(
        *a, idx=idx, **k))
    batch = _batch()
    if hasattr(wl, "batch_constants"):
        batch.update(prompt_ids=torch.tensor([[2, 50, 51, 3]]), prompt_mask=torch.ones(1, 4, dtype=torch.long))
    out = wl.loss(model, batch, cfg)
    assert DIAGNOSTICS <= set(out)
    assert all(not out[k].requires_grad and 0.0 <= out[k].item() <= 1.0 + 1e-6 for k in DIAGNOSTICS - {"text_cos",
                                                                                                        "video_cos"})
    assert seen[0][0] == seen[0][1] and seen[0][1] != seen[0][2]       # one caption: one positive id
    assert int((model.momentum.idx_queue == seen[0][0]).sum()) == 2    # and the queue keeps it
    out["loss"].backward()


def test_rerank_score_is_the_match_logit_plus_the_similarity_by_default(monkeypatch):
    assert retrieval.Config().rerank_score == "logit_plus_sim" and pretrain.Config().rerank_score == "logit_plus_sim"
    torch.manual_seed(0)
    model = retrieval.build_model(MPlugConfig.from_preset("tiny"), retrieval.Config()).eval()
    logits = torch.tensor([[0.0, 1.0], [5.0, 2.0], [0.0, 0.5]])      # margins 1, -3, 0.5; match logits 1, 2, 0.5
    monkeypatch.setattr(model, "itm_logits", lambda t, m, v: logits[: t.shape[0]])
    texts = [{"hidden": torch.zeros(4, 64), "mask": torch.ones(4, dtype=torch.long)} for _ in range(3)]
    args = (model, texts, {0: torch.zeros(3, 64)}, [0], torch.arange(3), torch.zeros(3, dtype=torch.long), 4)
    assert common.retrieval_score_pairs(*args).tolist() == [1.0, 2.0, 0.5]
    assert common.retrieval_score_pairs(*args, rerank_score="margin").tolist() == [1.0, -3.0, 0.5]
    assert common.rerank_adds_sim("logit_plus_sim") and not common.rerank_adds_sim("margin")
    assert retrieval.retrieval_options(retrieval.Config())["rerank_score"] == "logit_plus_sim"
