"""Universal layers (paper eq. 6-10): the last S text layers, shared between modalities.

Text path:   W^i = FFN(SA(W^{i-1}))                -- exactly the BERT layers M+1..M+S
Vision path, as the reference code (X-PLUG/mPLUG-2, ``BertLayer`` in ``v_module`` mode) runs it:
    layers 1..S-1 (the k learnable latent queries Q^0):
        Q^i = FFN(CA_i(SA(Q^{i-1}), V))           -- shared SA and FFN, a visual-only cross-attention
    layer S (roles swapped: the visual tokens are the queries):
        O   = FFN(CA_S(SA(V), Q^{S-1}))            -- shared SA and FFN, cross-attention to the latents
    V_out = Dropout(LN(V + O))                     -- the "combine" step, a fresh LayerNorm
Every sub-block is post-LN with a residual, as in BERT. With S = 1 the single layer is both: the
visual tokens cross-attend to the raw latents. ``V`` is the dual-vision encoder's output, projected
(linear + LayerNorm) to the text width only when the two widths differ (no projection at 768/768 base
and 1024/1024 large; the reference's ``visn_fc`` is the same).
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
    vision_tokens: torch.Tensor | None = None   # [B, 1+T*N, Ct] LN(V + universal output)
    vision_queries: torch.Tensor | None = None  # [B, k, Ct] the latents after layer S-1 (what layer S reads)
    text_hidden: torch.Tensor | None = None     # [B, L, Ct] W^{M+S}: the BERT output
    text_mask: torch.Tensor | None = None       # [B, L]

    @property
    def vision_mask(self) -> torch.Tensor:
        v = self.vision_tokens
        return torch.ones(v.shape[:2], dtype=torch.long, device=v.device)


class UniversalLayer(nn.Module):
    def __init__(self, cfg: MPlugConfig, with_vision: bool) -> None:
        super().__init__()
        self.shared = bert_layer(cfg)                                  # SA + FFN, shared by both paths
        self.vision_cross = Attention(cfg.text_width, cfg.text_heads, impl=cfg.attn_impl) if with_vision else None
        self.vision_cross_ln = nn.LayerNorm(cfg.text_width, eps=cfg.text_ln_eps) if with_vision else None
        self.drop = nn.Dropout(cfg.dropout)

    def text(self, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.shared(w, mask=mask)                               # eq. 7, 10

    def vision(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x [B, Lx, Ct] queries (latents, or the visual tokens in the last layer) read ``other``."""
        x = self.shared.self_block(x, None)                            # eq. 6
        x = self.vision_cross_ln(x + self.drop(self.vision_cross(x, other)))  # eq. 8
        return self.shared.ffn_block(x)                                # eq. 9


class Universal(nn.Module):
    def __init__(self, cfg: MPlugConfig, with_vision: bool = True) -> None:
        super().__init__()
        self.cfg, self.with_vision = cfg, with_vision
        ct = cfg.text_width
        self.layers = nn.ModuleList(UniversalLayer(cfg, with_vision) for _ in range(cfg.universal_layers))
        self.vision_proj = None
        if with_vision:
            if cfg.vision_width != ct:                                 # reference: visn_fc + LayerNorm
                self.vision_proj = nn.Sequential(nn.Linear(cfg.vision_width, ct), nn.LayerNorm(ct, eps=cfg.text_ln_eps),
                                                 nn.Dropout(cfg.dropout))
            # N(0, 1) as the reference's torch.randn latents: the scale of post-LN hidden states
            self.queries = nn.Parameter(torch.randn(cfg.num_queries, ct))
            self.vision_ln = nn.LayerNorm(ct, eps=cfg.text_ln_eps)     # V_out = LN(V + O)
            self.vision_drop = nn.Dropout(cfg.dropout)

    def forward_text(self, text: TextOutput) -> torch.Tensor:
        mask = key_mask_4d(text.attention_mask)
        w = text.hidden                                                # W^M [B, L, Ct]
        for layer in self.layers:
            w = self._ckpt(layer.text, w, mask)
        return w                                                       # [B, L, Ct]

    def forward_vision(self, vision: VisionOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.with_vision:
            raise ValueError("this model's universal layers were built without the vision path "
                             "(task without vision); build the model for a task that uses vision")
        v = vision.tokens if self.vision_proj is None else self.vision_proj(vision.tokens)  # V [B, 1+T*N, Ct]
        if not self.layers:
            return self.vision_ln(v), None
        q = self.queries.to(v.dtype).expand(v.shape[0], -1, -1)        # Q^0 [B, k, Ct]
        for layer in self.layers[:-1]:
            q = self._ckpt(layer.vision, q, v)                         # latents read the visual tokens
        out = self._ckpt(self.layers[-1].vision, v, q)                 # role swap: visual tokens read the latents
        return self.vision_drop(self.vision_ln(v + out)), q            # [B, 1+T*N, Ct]

    def _ckpt(self, fn, *args):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, vision: VisionOutput | None = None, text: TextOutput | None = None) -> UniversalOutput:
        out = UniversalOutput()
        if vision is not None:
            out.vision_tokens, out.vision_queries = self.forward_vision(vision)
        if text is not None:
            out.text_hidden = self.forward_text(text)
            out.text_mask = text.attention_mask
        return out
