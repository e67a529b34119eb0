"""Small heads: contrastive projections + learnable temperature, matching (ITM), MLM, classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPlugConfig
from .layers import ACT


class ContrastiveHeads(nn.Module):
    """Project the [CLS] of each modality to embed_dim; temperature learnable, clamped in place."""

    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.vision_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views at init
        self.temp = nn.Parameter(torch.tensor([float(cfg.temp)]))
        self.temp_min, self.temp_max = cfg.temp_min, cfg.temp_max

    def vision(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(vision_tokens[:, 0]).float(), dim=-1)  # [B, D]

    def text(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_hidden[:, 0]).float(), dim=-1)      # [B, D]

    def temperature(self) -> torch.Tensor:
        """The learnable temperature, clamped in place first (the reference's ``temp.clamp_`` under
        no_grad): the value used is always in range and its gradient never vanishes. A clamp on use
        (``temp.clamp(...)``) would give a zero gradient for good once the parameter left the range."""
        with torch.no_grad():
            self.temp.clamp_(self.temp_min, self.temp_max)
        return self.temp[0]                                            # scalar


class MatchingHead(nn.Module):
    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.text_width, 2)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.proj(fused_cls)                                    # [B, 2]: (no match, match)


class MLMHead(nn.Module):
    """BERT LM-prediction head; output weight tied to the text encoder's word embeddings."""

    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.act = ACT[cfg.text_act]
        self.ln = nn.LayerNorm(cfg.text_width, eps=cfg.text_ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(self.act(self.dense(hidden))), word_weight, self.bias)  # [B, L, V]


class Classifier(nn.Module):
    """Pooler (dense + tanh) then a linear layer to num_labels."""

    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.pool = nn.Linear(cfg.text_width, cfg.text_width)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.text_width, cfg.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.pool(features))))   # [B, num_labels]
