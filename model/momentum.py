"""Momentum encoders and feature queues for the contrastive objective (ALBEF-style).

Everything here is non-optimised state, and all of it is held as **fp32 buffers**: the momentum
copies' weights are converted from parameters to buffers (same state-dict names), so

* an optimiser built from the model's parameters (DeepSpeed included) never sees them;
* a mixed-precision engine that casts the model's *parameters* to bf16/fp16 (DeepSpeed's bf16 mode)
  leaves them fp32, and a blanket cast (``model.bfloat16()``, ``model.to(dtype)``) is refused by
  :meth:`Momentum._apply` (device moves still apply).  In bf16 the EMA step ``(1 - m) * (p - p_m)``
  is below the resolution of most weights (a LayerNorm gain near 1.0 would never move), and a
  queue in bf16 would round every stored feature;
* ZeRO-3 does not partition them (it partitions parameters only).

The momentum forward runs at the precision of its inputs (autocast when the online model is in
bf16/fp16), like ALBEF's AMP training.

The EMA (``update``) is meant to run once per optimizer step.  By default ``contrastive_loss``
calls it before each training forward (right when training one micro-batch per step); a loop that
accumulates gradients sets ``update_each_forward = False`` and calls ``MPlug2.momentum_update()``
after each optimizer step.  The queue is filled by ``enqueue``; with several data-parallel workers
the loop passes ``gather`` (this rank's rows -> every rank's rows, in rank order), so every rank
holds the same global queue.  This package never calls torch.distributed itself.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPlugConfig

MOMENTUM_OF = ("vision", "text", "universal_layers", "contrastive")


def _parameters_to_buffers(module: nn.Module) -> None:
    """Re-register every parameter of ``module`` (recursively) as a persistent buffer of the same
    name, detached; a parameter shared by several submodules stays one shared tensor."""
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            del mod._parameters[name]
            if p is None:
                mod.register_buffer(name, None)
                continue
            if id(p) not in memo:
                memo[id(p)] = p.detach().clone().float()
            mod.register_buffer(name, memo[id(p)])


class Momentum(nn.Module):
    def __init__(self, cfg: MPlugConfig, online: dict[str, nn.Module]) -> None:
        super().__init__()
        self.m = cfg.momentum
        self.encoders = nn.ModuleDict({k: copy.deepcopy(v) for k, v in online.items()})
        _parameters_to_buffers(self.encoders)
        d, q = cfg.embed_dim, cfg.queue_size
        self.register_buffer("vision_queue", F.normalize(torch.randn(d, q), dim=0))   # [D, Q]
        self.register_buffer("text_queue", F.normalize(torch.randn(d, q), dim=0))     # [D, Q]
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))  # [1, Q]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # set by a training loop (see the module docstring); not state: never saved
        self.update_each_forward = True
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        """Moves to another device, but never casts: the momentum state stays fp32."""
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype != t.dtype:
                out = t.to(device=out.device)  # from the original: no round trip through bf16
            return out
        return super()._apply(keep_dtype, recurse)

    def _pairs(self, online: dict[str, nn.Module]):
        """(momentum buffer, online parameter) pairs, matched by name."""
        for name, mod in online.items():
            enc = self.encoders[name]
            for pname, po in mod.named_parameters():
                yield enc.get_buffer(pname), po

    def after_step_buffers(self) -> list[torch.Tensor]:
        """The buffers no forward changes: the momentum encoders' weights, once the EMA runs after
        each optimizer step (``update_each_forward`` off); none while it runs in the forward.  The
        queues always change in the forward."""
        return [] if self.update_each_forward else list(self.encoders.buffers())

    @torch.no_grad()
    def copy_from(self, online: dict[str, nn.Module]) -> None:
        for pm, po in self._pairs(online):
            pm.copy_(po.detach())

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module]) -> None:
        """EMA in fp32: p_m = m * p_m + (1 - m) * p."""
        for pm, po in self._pairs(online):
            pm.mul_(self.m).add_(po.detach().to(pm.dtype), alpha=1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, vision_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        # vision_feat / text_feat [B, D] (normalised), idx [B]; with ``gather`` every rank's rows
        # [W*B, ...] in rank order; wraps around the ring buffer
        if self.gather is not None:
            vision_feat, text_feat, idx = self.gather(vision_feat), self.gather(text_feat), self.gather(idx)
        q = self.vision_queue.shape[1]
        if vision_feat.shape[0] > q:  # more rows than the queue holds: the newest q
            vision_feat, text_feat, idx = vision_feat[-q:], text_feat[-q:], idx[-q:]
        b = vision_feat.shape[0]
        pos = (self.queue_ptr + torch.arange(b, device=vision_feat.device)) % q
        self.vision_queue[:, pos] = vision_feat.T.to(self.vision_queue.dtype)
        self.text_queue[:, pos] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[0, pos] = idx.to(self.idx_queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + b) % q))
