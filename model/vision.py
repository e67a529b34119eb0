"""Dual-vision encoder (paper eq. 1-5): a CLIP ViT whose self-attention and FFN are shared by
images and videos, plus a local temporal (LT) module before the attention and before the FFN of
each block that only videos (T > 1) go through.

Parameter names mirror nothing in Hugging Face on purpose; ``model.hf_loading`` maps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MPlugConfig
from .layers import ACT, Attention


@dataclass
class VisionOutput:
    frame_hidden: torch.Tensor   # [B, T, 1+N, Cv] last block output per frame (= HF last_hidden_state)
    tokens: torch.Tensor         # [B, 1+T*N, Cv] post-LN: mean frame [CLS], then every patch token
    num_frames: int

    @property
    def pooled(self) -> torch.Tensor:
        return self.tokens[:, 0]  # [B, Cv] (= HF pooler_output for a single image)


class LocalTemporal(nn.Module):
    """LN -> linear C->C/2 -> grouped temporal conv (kernel k over T) -> GELU -> linear C/2->C (zero init).

    The linear layers are the paper's 1x1x1 convolutions; the temporal conv mixes the same spatial
    location across frames, one group of C/(2G) channels per group (G = channels: depthwise).
    """

    def __init__(self, width: int, groups: int | None, kernel: int, eps: float) -> None:
        super().__init__()
        mid = width // 2
        self.ln = nn.LayerNorm(width, eps=eps)
        self.down = nn.Linear(width, mid)
        self.conv = nn.Conv1d(mid, mid, kernel, padding=kernel // 2, groups=groups or mid)
        self.up = nn.Linear(mid, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.up.keep_zero_init = True      # a fresh LT is the identity: MPlug2.init_weights keeps it

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        bt, n, _ = x.shape                                             # x [B*T, N, C] patch tokens
        b = bt // t
        h = self.down(self.ln(x))                                      # [B*T, N, C/2]
        h = h.view(b, t, n, -1).permute(0, 2, 3, 1).reshape(b * n, -1, t)  # [B*N, C/2, T]
        h = F.gelu(self.conv(h))                                       # [B*N, C/2, T]
        h = h.view(b, n, -1, t).permute(0, 3, 1, 2).reshape(bt, n, -1)  # [B*T, N, C/2]
        return self.up(h)                                              # [B*T, N, C]


class VisionBlock(nn.Module):
    """CLIP pre-LN block with LT residuals on the patch tokens (not [CLS]) for videos."""

    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        c = cfg.vision_width
        self.ln1 = nn.LayerNorm(c, eps=cfg.vision_ln_eps)
        self.attn = Attention(c, cfg.vision_heads, impl=cfg.attn_impl)
        self.ln2 = nn.LayerNorm(c, eps=cfg.vision_ln_eps)
        self.fc1 = nn.Linear(c, cfg.vision_intermediate)
        self.fc2 = nn.Linear(cfg.vision_intermediate, c)
        self.act = ACT[cfg.vision_act]
        self.lt_attn = self.lt_ffn = None
        if cfg.lt_enabled:
            self.lt_attn = LocalTemporal(c, cfg.lt_groups, cfg.lt_kernel, cfg.vision_ln_eps)
            self.lt_ffn = LocalTemporal(c, cfg.lt_groups, cfg.lt_kernel, cfg.vision_ln_eps)

    @staticmethod
    def _lt(lt: LocalTemporal | None, x: torch.Tensor, t: int) -> torch.Tensor:
        if lt is None or t == 1:                                       # images bypass LT entirely
            return x
        return torch.cat([x[:, :1], x[:, 1:] + lt(x[:, 1:], t)], dim=1)  # [B*T, 1+N, C]

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        x = self._lt(self.lt_attn, x, t)                               # eq. 1
        x = x + self.attn(self.ln1(x))                                 # eq. 2 (spatial, per frame)
        x = self._lt(self.lt_ffn, x, t)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))          # eq. 3


class DualVisionEncoder(nn.Module):
    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.vision_width
        self.patch_embed = nn.Conv2d(3, c, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c) * c ** -0.5)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, c)
        self.pre_ln = nn.LayerNorm(c, eps=cfg.vision_ln_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_layers))
        self.post_ln = nn.LayerNorm(c, eps=cfg.vision_ln_eps)

    def forward(self, frames: torch.Tensor) -> VisionOutput:
        if frames.dim() == 4:
            frames = frames.unsqueeze(1)                               # [B, 3, H, W] -> [B, 1, 3, H, W]
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W] or [B, 3, H, W], got {tuple(frames.shape)}")
        b, t, _, h, w = frames.shape
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"frames are {h}x{w} px but the model expects image_size={self.cfg.image_size}; "
                             "resize frames in the data plane or set model.image_size")
        x = frames.reshape(b * t, 3, h, w).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)             # [B*T, N, C]
        cls = self.class_embedding.to(x.dtype).expand(b * t, 1, -1)    # [B*T, 1, C]
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B*T, 1+N, C]
        x = self.pre_ln(x)
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, t, use_reentrant=False)
            else:
                x = blk(x, t)
        frame_hidden = x.view(b, t, x.shape[1], -1)                    # [B, T, 1+N, C]
        cls = frame_hidden[:, :, 0].mean(1, keepdim=True)              # [B, 1, C]
        patches = frame_hidden[:, :, 1:].reshape(b, -1, x.shape[-1])   # [B, T*N, C]
        tokens = self.post_ln(torch.cat([cls, patches], dim=1))        # [B, 1+T*N, C]
        return VisionOutput(frame_hidden=frame_hidden, tokens=tokens, num_frames=t)
