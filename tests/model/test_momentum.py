"""Momentum encoders under the casts a mixed-precision engine applies, and the queue's gather hook."""
import pytest
import torch

from model import MPlug2
from model import objectives as O

from .conftest import batch, tiny


def _deepspeed_param_cast(model):
    """DeepSpeed 0.19's bf16 mode: every parameter's data cast in place, buffers left alone."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)


def _blanket_cast(model):
    """Older DeepSpeed (``module.bfloat16()``) and a user's ``model.to(bf16)``: parameters and buffers."""
    model.bfloat16()


@pytest.mark.parametrize("cast", [_deepspeed_param_cast, _blanket_cast])
def test_momentum_ema_moves_by_the_fp32_amount_after_a_bf16_cast(cast):
    """The online weights drift by ~5% from the momentum copies (as after some optimizer steps);
    one EMA must move each copy by (1 - m) * (online - copy), which in bf16 is mostly below the
    weight's resolution (a LayerNorm gain near 1.0 would not move at all)."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "pretrain").train()
    cast(m)
    assert m.vision.blocks[0].fc1.weight.dtype == torch.bfloat16  # the online model is bf16
    online = dict(m.named_parameters())
    with torch.no_grad():
        for name, p in online.items():
            if name.startswith(("vision.", "text.", "universal_layers.", "contrastive.")):
                p.mul_(1.05)                     # the optimizer moved the online weights
    mom = dict(m.momentum.encoders.named_buffers())
    pairs = {k: (mom[k], online[k]) for k in mom if k in online}
    assert len(pairs) > 100
    before = {k: pm.detach().clone().double() for k, (pm, _) in pairs.items()}
    m.momentum_update()
    mm = m.config.momentum
    ln = "vision.blocks.0.ln1.weight"                                  # a LayerNorm gain at 1.0
    for k, (pm, po) in pairs.items():
        assert pm.dtype == torch.float32, k
        want = (1 - mm) * (po.detach().double() - before[k])          # the fp32 EMA step
        moved = pm.detach().double() - before[k]
        torch.testing.assert_close(moved, want, rtol=1e-2, atol=1e-7, msg=k)
    assert (pairs[ln][0].double() - before[ln]).abs().max() > 1e-4  # a gain at 1.0 moved (by ~2.5e-4)
    # the queue kept fp32 too, and the momentum forward runs with a bf16 online model
    assert m.momentum.vision_queue.dtype == torch.float32
    frames, ids, mask = batch(b=4)
    frames = frames.bfloat16()
    u = m(frames=frames, text_ids=ids, text_mask=mask)
    out = O.contrastive_loss(m, u, frames, ids, mask, idx=torch.arange(4))
    assert torch.isfinite(out.loss)


def test_momentum_copies_are_buffers_with_the_online_names_and_a_blanket_cast_keeps_them_fp32():
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval")
    assert list(m.momentum.parameters()) == []  # never handed to an optimizer, never partitioned
    names = {k for k, _ in m.named_parameters() if k.split(".")[0] in ("vision", "text", "universal_layers",
                                                                        "contrastive")}
    assert {"momentum.encoders." + k for k in names} <= set(m.state_dict())
    m.to(torch.float16)
    assert {t.dtype for t in m.momentum.buffers() if t.is_floating_point()} == {torch.float32}
    assert m.param_counts()["momentum"] == sum(m.param_counts()[k] for k in ("vision", "text", "universal_layers",
                                                                             "contrastive"))


def test_loop_owned_ema_and_gathered_enqueue():
    """With ``update_each_forward`` off the objective leaves the EMA to the caller; with ``gather``
    the queue takes every rank's rows (here a fake 2-rank gather)."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").train()
    m.momentum.update_each_forward = False
    m.momentum.gather = lambda t: torch.cat([t, t + (100 if t.dtype == torch.long else 0)])
    before = m.momentum.encoders["vision"].blocks[0].fc1.weight.clone()
    frames, ids, mask = batch(b=4)
    with torch.no_grad():
        m.vision.blocks[0].fc1.weight.add_(1.0)
    u = m(frames=frames, text_ids=ids, text_mask=mask)
    O.contrastive_loss(m, u, frames, ids, mask, idx=torch.arange(4))
    assert torch.equal(m.momentum.encoders["vision"].blocks[0].fc1.weight, before)
    assert int(m.momentum.queue_ptr) == 8
    assert m.momentum.idx_queue[0, :8].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]


@pytest.mark.parametrize("loop_owned", [True, False])
def test_after_step_buffers_are_the_ones_a_training_forward_leaves_alone(loop_owned):
    """An async checkpoint copies ``after_step_buffers()`` while the next forward runs (the optimizer
    step, after which the loop's EMA runs, waits for the copy): no training forward may change one.
    With the EMA in the forward (``update_each_forward``, the default) there are none."""
    torch.manual_seed(0)
    m = MPlug2(tiny(), "retrieval").train()
    m.momentum.update_each_forward = not loop_owned
    later = {id(b) for b in m.after_step_buffers()}
    assert len(later) == (len(list(m.momentum.encoders.buffers())) if loop_owned else 0)
    before = {name: b.clone() for name, b in m.named_buffers()}
    with torch.no_grad():
        m.vision.blocks[0].fc1.weight.add_(1.0)  # online and momentum weights differ: an EMA would move these
    frames, ids, mask = batch(b=4)
    u = m(frames=frames, text_ids=ids, text_mask=mask)
    O.contrastive_loss(m, u, frames, ids, mask, idx=torch.arange(4))
    changed = {name for name, b in m.named_buffers() if not torch.equal(b, before[name])}
    assert "momentum.vision_queue" in changed                       # the queue changes in every forward
    assert not {name for name, b in m.named_buffers() if id(b) in later} & changed
    assert loop_owned or any(name.startswith("momentum.encoders.") for name in changed)
