"""The loop's side of a model with momentum encoders (``MPlug2.momentum``): the EMA runs once per
optimizer step, not once per micro-batch, and the contrastive queue is global
(:class:`MomentumSync`).

ALBEF / mPLUG all-gather the momentum features and clip ids of every rank before enqueueing, so
every rank holds the same queue; a per-rank queue would span ``W`` times more steps of a drifting
encoder.  The model stays single-device: the gather is handed to it here.
"""
from __future__ import annotations

import torch


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every rank -> [W*B, ...], rank 0's rows first, identical on every rank.

    Every rank calls it at the same point with the same B (the loop yields full batches only)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def attach(module: torch.nn.Module, world: int) -> bool:
    """Hand the momentum encoders of ``module`` (if it has any) to the loop: no EMA inside the
    forward, a queue gathered over ``world`` ranks.  True when the loop must call
    ``module.momentum_update()`` after each optimizer step."""
    mom = getattr(module, "momentum", None)
    if mom is None or not hasattr(mom, "update_each_forward") or not hasattr(module, "momentum_update"):
        return False
    mom.update_each_forward = False
    mom.gather = all_gather_rows if world > 1 else None
    return True


class MomentumSync:
    """The momentum encoders of ``module`` (if it has any) driven by the loop: :meth:`after_micro_batch`
    runs the EMA after the optimizer step that closed an accumulation window, before the next forward."""

    def __init__(self, module: torch.nn.Module, world: int) -> None:
        self.module = module
        self.active = attach(module, world)  # False: the model has no momentum encoders

    def after_micro_batch(self, optimizer_stepped: bool) -> None:
        if self.active and optimizer_stepped:
            self.module.momentum_update()
