import pytest
import torch

from model import MPlug2, build_prefix_inputs
from model import objectives as O

from .conftest import batch, tiny


def _train(model, step_loss, steps=15, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = step_loss(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mask_tokens_rate_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (64, 40), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    masked, labels = O.mask_tokens(ids, mask, 4, 2000, (0, 2, 3), 0.15, g)
    rate = (labels != -100).float().mean().item()
    assert 0.11 < rate < 0.19
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    scored = labels != -100
    assert ((masked == 4) & scored).sum() > 0.7 * scored.sum()
    assert torch.equal(labels[scored], ids[scored])


def test_mlm_loss_falls():
    torch.manual_seed(0)
    m = MPlug2(tiny(), "pretrain")
    frames, ids, mask = batch(b=4)

    def step(i):
        g = torch.Generator().manual_seed(0)  # same masks every step: overfit
        vt = m(frames=frames).vision_tokens
        return O.mlm_loss(m, ids, mask, vision_tokens=vt, generator=g)

    losses = _train(m, step, steps=30, lr=5e-3)
    assert losses[-1] < 0.6 * losses[0], losses


def test_contrastive_loss_falls_updates_momentum_and_queue():
    """The queue fills with momentum copies of the same 4 items (idx marks them positive), so the
    training loss has a floor ~ln(#copies) that grows: compare the loss at one fixed queue state."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").train()
    frames, ids, mask = batch(b=4)
    before = m.momentum.encoders["vision"].blocks[0].fc1.weight.clone()
    idx = torch.arange(4)
    queue0 = {k: v.clone() for k, v in m.momentum.named_buffers()}

    def fixed_queue_loss():
        now = {k: v.clone() for k, v in m.momentum.named_buffers()}
        m.momentum.load_state_dict({**m.momentum.state_dict(), **queue0})
        m.eval()
        with torch.no_grad():
            loss = O.contrastive_loss(m, m(frames=frames, text_ids=ids, text_mask=mask), frames, ids, mask,
                                      idx=idx).loss.item()
        m.train()
        m.momentum.load_state_dict({**m.momentum.state_dict(), **now})
        return loss

    def step(i):
        u = m(frames=frames, text_ids=ids, text_mask=mask)
        return O.contrastive_loss(m, u, frames, ids, mask, idx=idx).loss

    start = fixed_queue_loss()
    _train(m, step, steps=30, lr=1e-3)
    end = fixed_queue_loss()
    assert end < 0.7 * start, (start, end)
    assert int(m.momentum.queue_ptr) == (30 * 4) % 256
    assert (m.momentum.idx_queue[0, :4] == idx).all()
    after = m.momentum.encoders["vision"].blocks[0].fc1.weight
    assert not torch.equal(before, after) and not after.requires_grad
    online = m.vision.blocks[0].fc1.weight
    assert (after - online).abs().max() > 0  # EMA, not a copy
    with torch.no_grad():
        m.contrastive.temp.fill_(10.0)
    assert m.temperature().item() == pytest.approx(m.config.temp_max)


def test_matching_loss_falls_with_hard_negatives():
    """ITM trained with ITC (as in pre-training: hard negatives come from the contrastive similarity)
    must get clearly below 0.636, the entropy of its 1:2 label prior, i.e. tell pairs apart. (From
    scratch the reference universal layers break the symmetry after ~100 steps here, the old random
    projection after ~50: 150 steps.)"""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").train()
    frames, ids, mask = batch(b=4)
    itm = []

    def step(i):
        u = m(frames=frames, text_ids=ids, text_mask=mask)
        c = O.contrastive_loss(m, u, frames, ids, mask, idx=torch.arange(4))
        loss = O.matching_loss(m, u, c.sim_i2t, c.sim_t2i, generator=torch.Generator().manual_seed(i))
        itm.append(loss.item())
        return loss + c.loss

    _train(m, step, steps=150, lr=1e-3)
    assert sum(itm[-3:]) / 3 < 0.5, itm
    u = m(frames=frames[:1], text_ids=ids[:1], text_mask=mask[:1])
    with pytest.raises(ValueError, match="at least one negative"):
        O.matching_loss(m, u, torch.zeros(1, 1), torch.zeros(1, 1))


def test_hard_negatives_follow_similarity():
    sim = torch.tensor([[0.0, 50.0, -50.0], [50.0, 0.0, -50.0], [-50.0, 50.0, 0.0]])
    pos = torch.eye(3, dtype=torch.bool)
    picks = O._sample_negatives(sim, pos, torch.Generator().manual_seed(0))
    assert picks.tolist() == [1, 0, 1]


def test_lm_loss_falls_and_prompt_is_not_scored():
    torch.manual_seed(0)
    m = MPlug2(tiny(), "captioning")
    frames, ids, mask = batch(b=2)
    prompt = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    pmask = (prompt != 0).long()
    target = torch.tensor([[2, 20, 21, 22, 3], [2, 23, 24, 3, 0]])
    tmask = (target != 0).long()

    def step(i):
        return O.lm_loss(m, m.universal(vision=m.encode_vision(frames)).vision_tokens, None, prompt, pmask,
                         target, tmask)

    losses = _train(m, step, steps=25, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    seq, smask, labels = build_prefix_inputs(prompt, pmask, target[:, 1:], tmask[:, 1:], 0)
    assert seq[1].tolist() == [2, 13, 3, 23, 24, 3, 0, 0, 0]
    assert labels[1].tolist() == [-100, -100, -100, 23, 24, 3, -100, -100, -100]


def test_instructions():
    assert O.instruction_for("captioning", "video") == "what does the video describe?"
    assert O.instruction_for("captioning", "image") == "what does the image describe?"
    assert O.instruction_for("videoqa", "video", question="what moves?") == "what moves?"
    with pytest.raises(ValueError, match="no instruction for task='glue'"):
        O.instruction_for("glue", "text")


def test_fresh_model_is_bert_initialised():
    """From scratch, token losses start near ln(V) (not at huge logits), and zero-init outputs stay zero."""
    import math

    import torch

    from model import MPlug2, MPlugConfig
    from model import objectives as obj

    torch.manual_seed(0)
    m = MPlug2(MPlugConfig.from_preset("tiny", vocab_size=200), "pretrain")
    ids = torch.randint(5, 200, (32, 12))  # ~58 masked tokens: 4 rows (~7) left the mean to sampling luck
    loss = obj.mlm_loss(m, ids, torch.ones_like(ids))
    assert abs(float(loss) - math.log(200)) < 1.0
    zero = [n for n, mod in m.named_modules() if getattr(mod, "keep_zero_init", False)]
    assert zero and all(float(m.state_dict()[f"{n}.weight"].abs().sum()) == 0 for n in zero)  # momentum: buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_is_clamped_in_place_and_keeps_its_gradient(dtype):
    """Reference: ``temp.clamp_(0.001, 0.5)`` under no_grad. A clamp on use gave a zero gradient for
    good once the parameter had left the range; clamped in place it is back in range and still learns."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").to(dtype).train()
    frames, ids, mask = batch(b=3, t=2)
    frames = frames.to(dtype)
    with torch.no_grad():
        m.contrastive.temp.fill_(0.9)                                  # e.g. pushed out by an optimizer step
    u = m(frames=frames, text_ids=ids, text_mask=mask)
    out = O.contrastive_loss(m, u, frames, ids, mask)
    out.loss.backward()
    assert m.contrastive.temp.item() == pytest.approx(0.5)
    assert m.contrastive.temp.grad is not None and m.contrastive.temp.grad.abs().item() > 0


def test_distillation_alpha_ramps_over_the_first_epoch(monkeypatch):
    assert O.distill_alpha(0.4, 0.0) == 0.0
    assert O.distill_alpha(0.4, 0.5) == pytest.approx(0.2)
    assert O.distill_alpha(0.4, 2.5) == 0.4
    assert O.distill_alpha(0.4, None) == 0.4
    # the workloads read the loop's epoch progress (step / train.steps_per_epoch) from the batch
    from workloads import pretrain, retrieval
    seen = []
    real = O.contrastive_loss

    def spy(*a, alpha=None, **kw):
        seen.append(alpha)
        return real(*a, alpha=alpha, **kw)

    monkeypatch.setattr(O, "contrastive_loss", spy)
    frames = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
    _, ids, mask = batch(b=3)
    for wl in (retrieval, pretrain):
        torch.manual_seed(0)
        m = wl.build_model(tiny(), wl.Config()).eval()
        for progress in (0.0, 0.5, None):
            b = {"frames": frames, "text_ids": ids, "text_mask": mask}
            if progress is not None:
                b["epoch_progress"] = progress
            with torch.no_grad():
                wl.loss(m, b, wl.Config())
    assert seen == [0.0, pytest.approx(0.2), 0.4] * 2


def test_hard_negatives_come_from_online_vs_momentum_similarities():
    """ALBEF / mPLUG draw the matching loss's hard negatives from ``sim_i2t[:, :bs]``: the online
    features against the momentum ones (before, online against online)."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").eval()
    frames, ids, mask = batch(b=3)
    with torch.no_grad():
        m.momentum.encoders["contrastive"].text_proj.weight.mul_(-1.0)   # momentum != online
        m.momentum.encoders["contrastive"].vision_proj.weight.mul_(0.5)
        u = m(frames=frames, text_ids=ids, text_mask=mask)
        out = O.contrastive_loss(m, u, frames, ids, mask)
        vm, tm = m.momentum_embeds(frames, ids, mask)
    temp = m.temperature().item()
    assert torch.allclose(out.sim_i2t, out.vision_embed @ tm.T / temp, atol=1e-5)
    assert torch.allclose(out.sim_t2i, out.text_embed @ vm.T / temp, atol=1e-5)
    assert not torch.allclose(out.sim_i2t, out.vision_embed @ out.text_embed.T / temp, atol=1e-3)


def _itc_out(v, t):
    v, t = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    return O.ContrastiveOutput(loss=torch.zeros(()), sim_i2t=v @ t.T, sim_t2i=t @ v.T, vision_embed=v, text_embed=t)


def test_contrastive_diagnostics_show_alignment_and_collapse():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 16, generator=g)
    d = O.contrastive_diagnostics(_itc_out(v, v + 0.01 * torch.randn(6, 16, generator=g)))
    assert d["itc_acc_t2v"] == d["itc_acc_v2t"] == 1.0                 # aligned: each finds its own
    assert abs(d["text_cos"].item()) < 0.6 and abs(d["video_cos"].item()) < 0.6
    collapsed = O.contrastive_diagnostics(_itc_out(v, v[:1].expand(6, -1) + 1e-4 * torch.randn(6, 16, generator=g)))
    assert collapsed["text_cos"].item() > 0.999 and collapsed["video_cos"].item() < 0.6
    assert collapsed["itc_acc_v2t"] < 0.5                              # every video picks about the same text
    # rows sharing an id (e.g. one caption) are positives: picking the other one counts as right
    same = O.contrastive_diagnostics(_itc_out(v[[0, 0, 1]], v[[0, 0, 1]]), idx=torch.tensor([7, 7, 8]))
    assert same["itc_acc_t2v"] == same["itc_acc_v2t"] == 1.0
    assert all(not x.requires_grad for x in d.values())
    assert O.contrastive_diagnostics(_itc_out(v[:1], v[:1])) == {}


def test_matching_outputs_report_the_heads_accuracy():
    class Stub:  # a head that always says "no match": right on the 2B negatives, wrong on the B positives
        def itm_logits(self, text, mask, vision):
            return torch.tensor([[3.0, -3.0]]).expand(text.shape[0], -1).requires_grad_()

    u = O.UniversalOutput(vision_tokens=torch.zeros(4, 5, 8), text_hidden=torch.zeros(4, 3, 8),
                          text_mask=torch.ones(4, 3, dtype=torch.long))
    out = O.matching_outputs(Stub(), u, torch.zeros(4, 4), torch.zeros(4, 4))
    assert out.accuracy.item() == pytest.approx(2 / 3) and not out.accuracy.requires_grad
    assert out.loss.item() == pytest.approx(O.matching_loss(Stub(), u, torch.zeros(4, 4), torch.zeros(4, 4)).item())
