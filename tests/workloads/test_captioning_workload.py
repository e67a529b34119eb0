"""captioning workload on a tiny model with hand-built batches (no Ray)."""
import pytest
import torch

from model import MPlugConfig
from orchestrator.runtime.model_setup import tokenizer_overrides
from workloads import captioning

CAPTIONS = ["a red circle moves left", "a blue square moves up", "the circle goes left", "a green triangle moves down"]


@pytest.fixture(scope="module")
def tok(tiny_hf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_hf.tokenizer)


def _batch(tok, cfg):
    torch.manual_seed(0)
    e = tok(CAPTIONS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    frames = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    frames[2] = frames[0]                                          # rows 0 and 2: one clip, two references
    b = {"frames": frames, "answer_ids": e["input_ids"], "answer_mask": e["attention_mask"],
         "clip_index": torch.tensor([7, 3, 7, 5])}
    b.update(captioning.batch_constants(tok, cfg))
    return b


def test_prompt_is_the_instruction(tok):
    c = captioning.batch_constants(tok, captioning.Config(modality="image"))
    assert c["prompt_ids"].shape[0] == 1
    assert tok.decode(c["prompt_ids"][0], skip_special_tokens=True) == "what does the image describe?"


@pytest.mark.parametrize("workload", ["captioning", "pretrain"])
def test_image_batches_get_the_image_instruction(tok, workload, monkeypatch):
    """T = 1 (images, as the data plane batches them) -> "what does the image describe?"; T > 1 -> video."""
    from model import objectives
    from workloads import get_workload
    wl = get_workload(workload)
    cfg = wl.Config()
    torch.manual_seed(0)
    model = wl.build_model(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok)), cfg).eval()
    seen = []
    real = objectives.lm_loss

    def spy(model, cross, cross_mask, prompt_ids, *a, **kw):
        seen.append(tok.decode(prompt_ids[0], skip_special_tokens=True))
        return real(model, cross, cross_mask, prompt_ids, *a, **kw)

    monkeypatch.setattr(objectives, "lm_loss", spy)
    e = tok(CAPTIONS[:2], padding="max_length", max_length=10, return_tensors="pt")
    for t in (1, 2):
        b = {"frames": torch.randint(0, 256, (2, t, 32, 32, 3), dtype=torch.uint8), "answer_ids": e["input_ids"],
             "answer_mask": e["attention_mask"], "text_ids": e["input_ids"], "text_mask": e["attention_mask"],
             "clip_index": torch.tensor([0, 1])}
        b.update(wl.batch_constants(tok, cfg))
        with torch.no_grad():
            wl.loss(model, b, cfg)
    assert seen == ["what does the image describe?", "what does the video describe?"]


@pytest.mark.slow  # ~10-30 s of CPU: trains a few steps, then beam search
def test_loss_falls_then_evaluate_scores_each_clip_once(tok):
    cfg = captioning.Config(num_beams=2, max_length=8, with_meteor=False)
    torch.manual_seed(0)
    model = captioning.build_model(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok)), cfg)
    batch = _batch(tok, cfg)
    assert set(captioning.COLUMNS) <= set(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = captioning.loss(model.train(), batch, cfg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses

    metrics, rows = captioning.evaluate(model, [batch], cfg, tokenizer=tok)
    assert set(metrics) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", "num_clips", "exact_match"}
    assert metrics["num_clips"] == 3 and all(0 <= metrics[k] <= 1 for k in ("BLEU_1", "BLEU_4", "ROUGE_L"))
    by_clip = {r["clip_index"]: r for r in rows}
    assert sorted(by_clip) == [3, 5, 7]
    assert by_clip[7]["references"] == [CAPTIONS[0], CAPTIONS[2]] and by_clip[3]["references"] == [CAPTIONS[1]]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_missing_prompt_says_how_to_fix(tok):
    cfg = captioning.Config()
    model = captioning.build_model(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok)), cfg)
    batch = {k: v for k, v in _batch(tok, cfg).items() if not k.startswith("prompt")}
    with pytest.raises(KeyError, match="batch_constants"):
        captioning.loss(model, batch, cfg)
