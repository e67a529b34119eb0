"""classification workload on a tiny model with hand-built batches (no Ray)."""
import pytest
import torch

from model import MPlugConfig
from workloads import classification

NAMES = ["down", "left", "right", "up"]


def _cfg(n=4):
    return MPlugConfig.from_preset("tiny", num_labels=n)


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"frames": torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
            "text_ids": torch.randint(5, 2000, (4, 8), generator=g), "text_mask": torch.ones(4, 8, dtype=torch.long),
            "label": torch.tensor([1, 3, 1, 0])}


@pytest.mark.parametrize("use_title", [True, False])
def test_loss_falls_then_evaluate_reports_topk(use_title):
    task = classification.Config(use_title=use_title, label_names=NAMES, topk=[1, 2])
    torch.manual_seed(0)
    model, batch = classification.build_model(_cfg(), task), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = classification.loss(model.train(), batch, task)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses

    metrics, rows = classification.evaluate(model, [batch], task)
    assert set(metrics) == {"top1", "top2", "num_samples"} and metrics["num_samples"] == 4
    with torch.no_grad():
        pred = classification.logits_of(model.eval(), batch, task).argmax(1)
    assert metrics["top1"] == 100.0 * (pred == batch["label"]).float().mean().item()
    assert [r["label"] for r in rows] == ["left", "up", "left", "down"]
    assert [r["prediction"] for r in rows] == [NAMES[i] for i in pred.tolist()]
    assert all(r["top2"][0] == r["prediction"] and len(r["top2"]) == 2 for r in rows)


def test_label_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_labels to 4"):
        classification.build_model(_cfg(3), classification.Config(label_names=NAMES))
    model = classification.build_model(_cfg(2), classification.Config())
    with pytest.raises(ValueError, match="model.overrides.num_labels"):
        classification.loss(model, _batch(), classification.Config())
