"""Universal layers (paper eq. 6-10): the last S text layers, shared between modalities.

Text path:   W^i = FFN(SA(W^{i-1}))                          -- exactly the BERT layer
Vision path: V^i = FFN(CA(SA(V^{i-1}), V^N))                 -- same SA and FFN weights, plus a
             visual-only cross-attention from the k queries to the original visual tokens V^N.
Then a final cross-attention combines universal and original representations (zero-initialised
output, so a fresh model keeps the original features):
    visual: V_out = V^N + CA(V^N -> V^S)     (original visual tokens read the universal queries)
    text:   W_out = W^S + CA(W^S -> W^M)     (universal text reads the original text features)
Visual tokens are projected from the vision width to the text width where the two meet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MPlugConfig
from .layers import Attention, key_mask_4d
from .text import TextOutput, bert_layer
from .vision import VisionOutput


@dataclass
class UniversalOutput:
    vision_tokens: torch.Tensor | None = None   # [B, 1+T*N, Ct] combined visual representation
    vision_queries: torch.Tensor | None = None  # [B, k, Ct] V^S
    text_hidden: torch.Tensor | None = None     # [B, L, Ct] combined text representation
    text_mask: torch.Tensor | None = None       # [B, L]

    @property
    def vision_mask(self) -> torch.Tensor:
        v = self.vision_tokens
        return torch.ones(v.shape[:2], dtype=torch.long, device=v.device)


class UniversalLayer(nn.Module):
    def __init__(self, cfg: MPlugConfig, with_vision: bool) -> None:
        super().__init__()
        self.shared = bert_layer(cfg)                                  # SA + FFN, shared
        self.vision_cross = Attention(cfg.text_width, cfg.text_heads, impl=cfg.attn_impl) if with_vision else None
        self.vision_cross_ln = nn.LayerNorm(cfg.text_width, eps=cfg.text_ln_eps) if with_vision else None
        self.drop = nn.Dropout(cfg.dropout)

    def text(self, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.shared(w, mask=mask)                               # eq. 7, 10

    def vision(self, q: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        q = self.shared.self_block(q, None)                            # eq. 6
        q = self.vision_cross_ln(q + self.drop(self.vision_cross(q, visual)))  # eq. 8
        return self.shared.ffn_block(q)                                # eq. 9


class Universal(nn.Module):
    def __init__(self, cfg: MPlugConfig, with_vision: bool = True) -> None:
        super().__init__()
        self.cfg, self.with_vision = cfg, with_vision
        ct = cfg.text_width
        self.layers = nn.ModuleList(UniversalLayer(cfg, with_vision) for _ in range(cfg.universal_layers))
        self.text_combine = Attention(ct, cfg.text_heads, impl=cfg.attn_impl, zero_init_out=True)
        if with_vision:
            self.vision_proj = nn.Linear(cfg.vision_width, ct)
            self.queries = nn.Parameter(torch.randn(cfg.num_queries, ct) * 0.02)
            self.vision_combine = Attention(ct, cfg.text_heads, impl=cfg.attn_impl, zero_init_out=True)

    def forward_text(self, text: TextOutput) -> tuple[torch.Tensor, torch.Tensor]:
        mask = key_mask_4d(text.attention_mask)
        w = text.hidden                                                # W^M [B, L, Ct]
        for layer in self.layers:
            w = self._ckpt(layer.text, w, mask)
        out = w + self.text_combine(w, text.hidden, mask=mask)         # [B, L, Ct]
        return out, w

    def forward_vision(self, vision: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.with_vision:
            raise ValueError("this model's universal layers were built without the vision path "
                             "(task without vision); build the model for a task that uses vision")
        v = self.vision_proj(vision.tokens)                            # V^N [B, 1+T*N, Ct]
        q = self.queries.to(v.dtype).expand(v.shape[0], -1, -1)        # [B, k, Ct]
        for layer in self.layers:
            q = self._ckpt(layer.vision, q, v)
        out = v + self.vision_combine(v, q)                            # [B, 1+T*N, Ct]
        return out, q

    def _ckpt(self, fn, *args):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, vision: VisionOutput | None = None, text: TextOutput | None = None) -> UniversalOutput:
        out = UniversalOutput()
        if vision is not None:
            out.vision_tokens, out.vision_queries = self.forward_vision(vision)
        if text is not None:
            out.text_hidden, _ = self.forward_text(text)
            out.text_mask = text.attention_mask
        return out
