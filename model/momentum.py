"""Momentum encoders and feature queues for the contrastive objective (ALBEF-style).

Everything here is non-optimised state: the momentum copies have ``requires_grad=False`` and the
queues are buffers, so an optimiser built from ``requires_grad`` parameters (DeepSpeed included)
leaves them alone. The EMA update is triggered by ``MPlug2.momentum_update()``, which
``objectives.contrastive_loss`` calls in train mode before computing the momentum features.
The queue is per device (this package never calls torch.distributed).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPlugConfig

MOMENTUM_OF = ("vision", "text", "universal_layers", "contrastive")


class Momentum(nn.Module):
    def __init__(self, cfg: MPlugConfig, online: dict[str, nn.Module]) -> None:
        super().__init__()
        self.m = cfg.momentum
        self.encoders = nn.ModuleDict({k: copy.deepcopy(v) for k, v in online.items()})
        for p in self.encoders.parameters():
            p.requires_grad_(False)
        d, q = cfg.embed_dim, cfg.queue_size
        self.register_buffer("vision_queue", F.normalize(torch.randn(d, q), dim=0))   # [D, Q]
        self.register_buffer("text_queue", F.normalize(torch.randn(d, q), dim=0))     # [D, Q]
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))  # [1, Q]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def copy_from(self, online: dict[str, nn.Module]) -> None:
        for name, mod in online.items():
            for pm, po in zip(self.encoders[name].parameters(), mod.parameters()):
                pm.copy_(po.detach())

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module]) -> None:
        """EMA: p_m = m * p_m + (1 - m) * p."""
        for name, mod in online.items():
            for pm, po in zip(self.encoders[name].parameters(), mod.parameters()):
                pm.mul_(self.m).add_(po.detach().to(pm.dtype), alpha=1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, vision_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        # vision_feat / text_feat [B, D] (normalised), idx [B]; wraps around the ring buffer
        q = self.vision_queue.shape[1]
        b = vision_feat.shape[0]
        pos = (self.queue_ptr + torch.arange(b, device=vision_feat.device)) % q
        self.vision_queue[:, pos] = vision_feat.T.to(self.vision_queue.dtype)
        self.text_queue[:, pos] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[0, pos] = idx.to(self.idx_queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + b) % q))
