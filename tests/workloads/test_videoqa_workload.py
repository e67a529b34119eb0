"""videoqa workload on a tiny model with hand-built batches (no Ray)."""
import pytest
import torch

from model import MPlugConfig, objectives
from orchestrator.runtime.model_setup import tokenizer_overrides
from workloads import common, videoqa

QUESTIONS = ["what color is the circle?", "which way does the red square move?", "what shape moves up?",
             "what color is the square?"]
ANSWERS = ["red", "left", "circle", "blue"]


@pytest.fixture(scope="module")
def tok(tiny_hf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_hf.tokenizer)


def _enc(tok, texts, n):
    e = tok(texts, padding="max_length", truncation=True, max_length=n, return_tensors="pt")
    return e["input_ids"], e["attention_mask"]


def _batch(tok):
    torch.manual_seed(0)
    q, qm = _enc(tok, QUESTIONS, 16)
    a, am = _enc(tok, ANSWERS, 6)
    frames = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    return {"frames": frames, "text_ids": q, "text_mask": qm, "answer_ids": a, "answer_mask": am}


def _model(tok, task_cfg):
    torch.manual_seed(0)
    return videoqa.build_model(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok)), task_cfg)


@pytest.mark.slow  # ~10-30 s of CPU: trains a few steps, then beam search
def test_loss_falls_then_evaluate_reports_accuracy_and_ranking(tok):
    cfg = videoqa.Config(num_beams=2, max_length=4, answer_list=["red", "left", "circle", "blue", "up"])
    model, batch = _model(tok, cfg), _batch(tok)
    assert set(videoqa.COLUMNS) <= set(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = videoqa.loss(model.train(), batch, cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "lm"} and losses[-1] < 0.6 * losses[0], losses

    metrics, rows = videoqa.evaluate(model, [batch], cfg, tokenizer=tok)
    assert set(metrics) == {"accuracy", "ranked_accuracy", "num_questions"} and metrics["num_questions"] == 4
    assert [r["question"] for r in rows] == QUESTIONS and [r["answer"] for r in rows] == ANSWERS
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert all(r["ranked_prediction"] in cfg.answer_list for r in rows)
    # the metrics are those of the table it returns
    assert metrics["accuracy"] == 100.0 * sum(r["correct"] for r in rows) / 4
    assert metrics["ranked_accuracy"] == 100.0 * sum(r["ranked_prediction"] == r["answer"] for r in rows) / 4


def test_candidate_scores_are_the_lm_loss_of_each_answer(tok):
    """The closed-set score of an answer = - (LM loss x its scored tokens), as training computes it."""
    cfg = videoqa.Config()
    model, batch = _model(tok, cfg).eval(), _batch(tok)
    with torch.no_grad():
        states, states_mask = videoqa.cross_states(model, batch)
        cand_ids, cand_mask = _enc(tok, ["red", "a blue square"], 6)
        scores = videoqa.rank_scores(model, states, states_mask, batch["text_ids"], batch["text_mask"], cand_ids, cand_mask, chunk=1)
        assert scores.shape == (4, 2)
        for i in range(4):
            for j in range(2):
                lm = objectives.lm_loss(model, states[i:i + 1], states_mask[i:i + 1], batch["text_ids"][i:i + 1],
                                        batch["text_mask"][i:i + 1], cand_ids[j:j + 1], cand_mask[j:j + 1])
                n_scored = int(cand_mask[j].sum()) - 1                       # the leading [CLS] is dropped
                assert scores[i, j].item() == pytest.approx(-lm.item() * n_scored, rel=1e-4, abs=1e-4)


def test_decoder_reads_visual_tokens_then_fused_question(tok, monkeypatch):
    """Reference: the answer decoder cross-attends to cat([visual tokens, fused question], 1)."""
    cfg = videoqa.Config()
    model, batch = _model(tok, cfg).eval(), _batch(tok)
    seen = {}
    decode = model.decode

    def spy(ids, mask, cross, cross_mask=None, labels=None):
        seen["cross"], seen["mask"] = cross, cross_mask
        return decode(ids, mask, cross, cross_mask, labels)

    monkeypatch.setattr(model, "decode", spy)
    with torch.no_grad():
        videoqa.loss(model, batch, cfg)
        pixels = common.pixels_of(model, batch)
        u = model(frames=pixels, text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        f = model.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
    nv = u.vision_tokens.shape[1]
    assert seen["cross"].shape[1] == nv + batch["text_ids"].shape[1]
    assert torch.equal(seen["cross"][:, :nv], u.vision_tokens) and torch.equal(seen["cross"][:, nv:], f.hidden)
    assert bool(seen["mask"][:, :nv].all()) and torch.equal(seen["mask"][:, nv:], batch["text_mask"])


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        videoqa.Config(answer_list=[])
    with pytest.raises(ValueError, match="does not exist"):
        videoqa.Config(answer_list=str(tmp_path / "missing.json"))
    f = tmp_path / "answers.json"
    f.write_text('["yes", "no"]')
    assert videoqa.Config(answer_list=str(f)).answer_list == ["yes", "no"]
    with pytest.raises(ValueError, match="extra"):
        videoqa.Config(beams=3)
    with pytest.raises(ValueError, match="tokenizer"):
        common.need_tokenizer(None, "videoqa")
