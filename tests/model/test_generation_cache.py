"""Generation with the key/value cache gives the very token ids of the uncached path; the GNMT length
penalty and the minimum length rank and stop hypotheses as the reference does (hand-worked below)."""
import math

import pytest
import torch
from torch import nn

from model import MPlug2, generation

from .conftest import batch, tiny


def _model(task, seed=0, **kw):
    torch.manual_seed(seed)
    m = MPlug2(tiny(**kw), task).eval()
    with torch.no_grad():  # a fresh decoder is nearly uniform: sharpen it so beams really diverge
        m.decoder.embeddings.word.weight.mul_(4.0)
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beams", [1, 3, 5])
def test_cached_generation_equals_uncached(seed, beams):
    m = _model("videoqa", seed)
    frames, ids, mask = batch(b=3, t=2, seed=seed)
    with torch.no_grad():
        u = m(frames=frames, text_ids=ids, text_mask=mask)
        f = m.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
        cross = torch.cat([u.vision_tokens, f.hidden], 1)
        cmask = torch.cat([torch.ones(u.vision_tokens.shape[:2], dtype=torch.long), mask], 1)
    prompts = ids[:, :6].clone()
    pmask = mask[:, :6].clone()
    pmask[2, 3:] = 0                                                   # ragged prompts
    for min_length in (0, 2):
        kw = dict(num_beams=beams, max_length=12, min_length=min_length, length_penalty=0.6)
        a = m.generate(cross, cmask, prompts, pmask, use_cache=True, **kw)
        b = m.generate(cross, cmask, prompts, pmask, use_cache=False, **kw)
        assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
        assert torch.allclose(a.scores, b.scores, atol=1e-4)


def test_cached_logits_in_bf16_agree_within_rounding():
    """bf16 (DeepSpeed's bf16 mode casts the module): the cached step and the full forward round
    differently, so ids can differ where two logits tie within one bf16 ulp; the logits agree."""
    m = _model("captioning", 3).to(torch.bfloat16)
    frames, _, _ = batch(b=2, t=2, seed=3)
    with torch.no_grad():
        vt = m.universal(vision=m.encode_vision(frames.bfloat16())).vision_tokens
        ids = torch.tensor([[2, 10, 11, 3, 569, 901, 111, 938, 1319]]).expand(2, -1)
        mask = torch.ones_like(ids)
        full = m.decoder(ids, mask, vt).logits.float()
        cache = m.decoder.init_cache(vt)
        parts = [m.decoder.step(ids[:, :4], mask[:, :4], cache)]
        for i in range(4, 9):
            parts.append(m.decoder.step(ids[:, i:i + 1], mask[:, :i + 1], cache))
        inc = torch.cat(parts, 1).float()
        g = m.generate(vt, None, ids[:, :4], num_beams=3, max_length=6, min_length=4)
    assert (full - inc).abs().max() <= 4 * 2 ** -7 * full.abs().max()     # a few bf16 ulps
    assert g.sequences.shape[1] >= 5 and not (g.sequences[:, :4] == 3).any()  # no [SEP] before 4 tokens


def test_decoder_step_matches_full_forward_logits():
    m = _model("captioning")
    dec = m.decoder
    cross = torch.randn(2, 7, 64)
    ids = torch.tensor([[0, 2, 10, 11, 12, 13], [2, 14, 15, 16, 17, 18]])
    mask = (torch.arange(6) >= torch.tensor([[1], [0]])).long()
    with torch.no_grad():
        full = dec(ids, mask, cross).logits
        cache = dec.init_cache(cross)
        parts = [dec.step(ids[:, :3], mask[:, :3], cache)]
        for i in range(3, 6):
            parts.append(dec.step(ids[:, i:i + 1], mask[:, :i + 1], cache))
    assert (torch.cat(parts, 1) - full)[mask.bool()].abs().max() < 1e-4
    assert cache.self_kv[0][0].shape[2] == 6


class _Table(nn.Module):
    """A stand-in decoder with hand-set next-token probabilities (vocab: pad, [SEP], a, b)."""
    EOS = 1

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids, mask, cross, cross_mask=None):
        step = ids.shape[1] - 1                                        # prompt: one token
        p = torch.tensor(self.table[min(step, len(self.table) - 1)])
        logits = torch.full((ids.shape[0], ids.shape[1], 4), -30.0)
        logits[:, -1] = p.log()
        return type("Out", (), {"logits": logits})()


TABLE = [[1e-9, 0.4, 0.6, 1e-9],      # step 0: [SEP] 0.4, a 0.6
         [1e-9, 0.55, 0.45, 1e-9],    # after a: [SEP] 0.55
         [1e-9, 0.5, 0.5, 1e-9]]


def _beam(**kw):
    return generation.beam_search(_Table(TABLE), torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.long),
                                  torch.zeros(1, 1, 4), None, max_length=5, eos=1, pad=0, num_beams=2,
                                  use_cache=False, **kw)


def test_gnmt_length_penalty_ranks_as_hand_worked():
    assert generation.gnmt_length_penalty(1, 0.6) == 1.0
    assert generation.gnmt_length_penalty(25, 0.6) == pytest.approx(5 ** 0.6)
    # "[SEP]" alone: log .4 / 1 = -0.916;  "a [SEP]": (log .6 + log .55) / (7/6)^.6 = -1.011.
    # GNMT keeps the short one; the old score / len**0.6 (-0.731) preferred the long one.
    g = _beam(length_penalty=0.6)
    assert g.sequences.tolist() == [[1]]
    assert g.scores.item() == pytest.approx(math.log(0.4), abs=1e-5)


def test_min_length_blocks_early_end():
    g = _beam(length_penalty=0.6, min_length=1)
    assert g.sequences.tolist() == [[2, 1]]
    assert g.scores.item() == pytest.approx((math.log(0.6) + math.log(0.55)) / (7 / 6) ** 0.6, abs=1e-5)
    greedy = generation.greedy(_Table(TABLE), torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.long),
                               torch.zeros(1, 1, 4), None, max_length=5, eos=1, pad=0, min_length=2, use_cache=False)
    assert greedy.sequences[0, :2].tolist() == [2, 2] and 1 not in greedy.sequences[0, :2].tolist()
