"""glue workload on a tiny model with hand-built batches (no Ray)."""
import pytest
import torch

from model import MPlugConfig
from orchestrator.runtime.model_setup import tokenizer_overrides
from workloads import glue


@pytest.fixture(scope="module")
def tok(tiny_hf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_hf.tokenizer)


def _batch(tok, labels=(0, 1, 1, 0)):
    e = tok(["the film is dull", "a lovely story", "the movie is superb", "a boring script"],
            ["it was awful", "what a charming film", "a brilliant picture", "this story feels tedious"],
            padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {"text_ids": e["input_ids"], "text_mask": e["attention_mask"], "text_type_ids": e["token_type_ids"],
            "label": torch.tensor(labels)}


def test_loss_falls_then_evaluate_mrpc_reports_accuracy_and_f1(tok):
    task = glue.Config(glue_task="mrpc")
    torch.manual_seed(0)
    model = glue.build_model(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok)), task)
    assert "vision" not in model.modules_built
    batch = _batch(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = glue.loss(model.train(), batch, task)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses

    unlabelled = _batch(tok, labels=(-1, -1, 1, -1))                   # a test-style row mix: -1 is skipped
    metrics, rows = glue.evaluate(model, [batch, unlabelled], task, tokenizer=tok)
    assert set(metrics) == {"accuracy", "f1", "num_samples"} and metrics["num_samples"] == 5
    with torch.no_grad():
        pred = glue.logits_of(model.eval(), batch).argmax(1).tolist()
    names = glue.LABEL_NAMES["mrpc"]
    assert [r["prediction"] for r in rows[:4]] == [names[p] for p in pred]
    assert rows[0]["text"] == "the film is dull ||| it was awful" and rows[4]["text"].startswith("the movie")
    assert metrics["accuracy"] == 100.0 * sum(r["correct"] for r in rows) / 5


def test_eval_name_prefixes_metrics_and_num_labels_is_checked(tok):
    over = tokenizer_overrides(tok)
    with pytest.raises(ValueError, match="num_labels=3"):
        glue.build_model(MPlugConfig.from_preset("tiny", num_labels=2, **over), glue.Config(glue_task="mnli"))
    task = glue.Config(glue_task="mnli", eval_name="mnli_mm")
    model = glue.build_model(MPlugConfig.from_preset("tiny", num_labels=3, **over), task)
    metrics, rows = glue.evaluate(model, [_batch(tok, labels=(0, 1, 2, 2))], task, tokenizer=tok)
    assert set(metrics) == {"mnli_mm_accuracy", "num_samples"}
    assert {r["label"] for r in rows} == {"entailment", "neutral", "contradiction"}
    with pytest.raises(ValueError, match="no labelled rows"):
        glue.evaluate(model, [_batch(tok, labels=(-1, -1, -1, -1))], task, tokenizer=tok)
