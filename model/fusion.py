"""Fusion module: ALBEF-style layers (text self-attention, cross-attention to the visual tokens,
FFN), 3 in base and 6 in large. The fused text sequence feeds the matching head and the QA decoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MPlugConfig
from .layers import key_mask_4d, run_layers
from .text import bert_layer


@dataclass
class FusionOutput:
    hidden: torch.Tensor          # [B, L, Ct] vision-aware text sequence
    attention_mask: torch.Tensor  # [B, L]

    @property
    def cls(self) -> torch.Tensor:
        return self.hidden[:, 0]  # [B, Ct]


class Fusion(nn.Module):
    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(bert_layer(cfg, cross=True) for _ in range(cfg.fusion_layers))

    def forward(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, vision_tokens: torch.Tensor,
                vision_mask: torch.Tensor | None = None) -> FusionOutput:
        # text_hidden [B, L, Ct], vision_tokens [B, Nv, Ct]
        x = run_layers(self.layers, text_hidden, self.cfg.grad_checkpointing, mask=key_mask_4d(text_mask),
                       kv=vision_tokens, kv_mask=key_mask_4d(vision_mask))
        return FusionOutput(hidden=x, attention_mask=text_mask)
