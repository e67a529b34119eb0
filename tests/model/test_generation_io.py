import json

import pytest
import torch

from model import MPlug2
from model import objectives as O

from .conftest import batch, tiny


@pytest.fixture(scope="module")
def trained_captioner():
    """A captioning model overfit on two (clip, caption) pairs."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = MPlug2(tiny(), "captioning")
        frames = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        prompt = torch.tensor([[2, 10, 11, 3], [2, 10, 11, 3]])
        target = torch.tensor([[20, 21, 22, 3], [23, 24, 3, 0]])
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        for _ in range(40):
            vt = m.universal(vision=m.encode_vision(frames)).vision_tokens
            loss = O.lm_loss(m, vt, None, prompt, torch.ones_like(prompt), target, (target != 0).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(n)
    return m.eval(), frames, prompt


def test_greedy_and_beam_reproduce_the_overfit_captions(trained_captioner):
    m, frames, prompt = trained_captioner
    vt = m.universal(vision=m.encode_vision(frames)).vision_tokens
    for beams in (1, 3):
        g = m.generate(vt, prompt_ids=prompt, num_beams=beams, max_length=10)
        assert g.sequences[0, :4].tolist() == [20, 21, 22, 3], (beams, g.sequences)
        assert g.sequences[1, :3].tolist() == [23, 24, 3], (beams, g.sequences)
        assert g.sequences.shape[1] <= 10 and g.scores.shape == (2,)


def test_batched_generation_with_ragged_prompts_matches_one_by_one(trained_captioner):
    m, frames, _ = trained_captioner
    vt = m.universal(vision=m.encode_vision(frames)).vision_tokens
    prompts = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    pmask = (prompts != 0).long()
    for beams in (1, 2):
        both = m.generate(vt, prompt_ids=prompts, prompt_mask=pmask, num_beams=beams, max_length=6)
        for i in range(2):
            one = m.generate(vt[i:i + 1], prompt_ids=prompts[i:i + 1, :int(pmask[i].sum())], num_beams=beams,
                             max_length=6)
            n = one.sequences.shape[1]
            assert both.sequences[i, :n].tolist() == one.sequences[0].tolist()
            assert (both.sequences[i, n:] == 0).all()


def test_generation_respects_max_length_and_vocab():
    m = MPlug2(tiny(), "videoqa").eval()
    frames, ids, mask = batch(b=3)
    u = m(frames=frames, text_ids=ids, text_mask=mask)
    f = m.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
    for beams, length_penalty in ((1, 1.0), (4, 0.6), (4, 2.0)):
        g = m.generate(f.hidden, f.attention_mask, num_beams=beams, max_length=5, length_penalty=length_penalty)
        assert g.sequences.shape[0] == 3 and 1 <= g.sequences.shape[1] <= 5
        assert ((g.sequences >= 0) & (g.sequences < m.config.vocab_size)).all()
        for row in g.sequences.tolist():  # nothing but padding after [SEP]
            if 3 in row:
                assert all(t == 0 for t in row[row.index(3) + 1:])
    with pytest.raises(ValueError, match="num_beams=0"):
        m.generate(f.hidden, num_beams=0)


def test_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    m = MPlug2(tiny(vocab_size=500), "pretrain").eval()
    with torch.no_grad():
        m.momentum.queue_ptr.fill_(7)
    frames, ids, mask = batch(b=2, vocab=500)
    m.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["task"] == "pretrain" and meta["config"]["vocab_size"] == 500
    back = MPlug2.from_pretrained(str(tmp_path)).eval()
    assert back.task == "pretrain" and not back.load_report.missing and not back.load_report.unexpected
    assert int(back.momentum.queue_ptr) == 7
    with torch.no_grad():
        for model in (m, back):
            u = model(frames=frames, text_ids=ids, text_mask=mask)
            f = model.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
            model._out = (u.vision_tokens, u.text_hidden, model.decode(ids, mask, f.hidden, labels=ids).logits)
    for a, b in zip(m._out, back._out):
        assert torch.equal(a, b)


def test_load_for_another_task_lists_extras(tmp_path):
    MPlug2(tiny(), "pretrain").save_pretrained(str(tmp_path))
    glue = MPlug2.from_pretrained(str(tmp_path), task="glue", num_labels=3)
    assert glue.vision is None and glue.classify(torch.zeros(1, 64)).shape == (1, 3)
    rep = glue.load_report
    assert any(k.startswith("vision.") for k in rep.unexpected)
    assert all(k.startswith("classifier.") for k in rep.missing)
    assert "text.embeddings.word.weight" in rep.loaded
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MPlug2.from_pretrained(str(tmp_path / "nope"))
