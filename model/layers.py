"""Building blocks shared by every module: attention (SDPA or the plain path), activations,
BERT-style post-LN layers with optional cross-attention, and activation checkpointing."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def build_attn_mask(q_len: int, key_mask: torch.Tensor | None, causal: bool,
                    device: torch.device) -> torch.Tensor | None:
    """Boolean mask, True = may attend: [B, 1, Lq, Lk] (or [Lq, Lk] for causal only; None if none).

    Causal self-attention always keeps the diagonal so that left-padded rows never see an empty
    row (which would give NaN); real tokens are unaffected since they always see themselves.
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :]                      # [B, 1, 1, Lk]
    if causal:
        k_len = key_mask.shape[1] if key_mask is not None else q_len
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = tri if mask is None else (mask & tri)                  # [B, 1, Lq, Lk]
        if key_mask is not None and q_len == k_len:
            mask = mask | torch.eye(q_len, dtype=torch.bool, device=device)
    return mask


class Attention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``kv`` (self-attention if None)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, impl: str = "sdpa",
                 dropout: float = 0.0, zero_init_out: bool = False) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.impl, self.dropout = heads, impl, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        if zero_init_out:
            nn.init.zeros_(self.o.weight)
            nn.init.zeros_(self.o.bias)
            self.o.keep_zero_init = True   # MPlug2.init_weights leaves it at zero

    def kv_heads(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``kv`` [B, Lk, Ckv], split into heads: two [B, H, Lk, D]."""
        b, lk, _ = kv.shape
        k = self.k(kv).view(b, lk, self.heads, -1).transpose(1, 2)    # [B, H, Lk, D]
        v = self.v(kv).view(b, lk, self.heads, -1).transpose(1, 2)    # [B, H, Lk, D]
        return k, v

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv_heads: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x [B, Lq, C], kv [B, Lk, Ckv], mask bool [B|1, 1, Lq|1, Lk] (True = attend);
        # kv_heads: precomputed (cached) keys/values [B, H, Lk, D], used instead of projecting kv
        b, lq, c = x.shape
        q = self.q(x).view(b, lq, self.heads, -1).transpose(1, 2)     # [B, H, Lq, D]
        k, v = kv_heads if kv_heads is not None else self.kv_heads(x if kv is None else kv)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = F.dropout(scores.softmax(-1), p).to(v.dtype)
            out = probs @ v                                           # [B, H, Lq, D]
        return self.o(out.transpose(1, 2).reshape(b, lq, c))          # [B, Lq, C]


class PostLNLayer(nn.Module):
    """A BERT layer (post-LN): self-attention, optional cross-attention, FFN; each + residual + LN."""

    def __init__(self, dim: int, heads: int, intermediate: int, act: str, eps: float, impl: str,
                 dropout: float = 0.0, cross: bool = False, kv_dim: int | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, impl=impl)
        self.self_ln = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, heads, kv_dim=kv_dim, impl=impl) if cross else None
        self.cross_ln = nn.LayerNorm(dim, eps=eps) if cross else None
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)
        self.ffn_ln = nn.LayerNorm(dim, eps=eps)
        self.act = ACT[act]
        self.drop = nn.Dropout(dropout)

    def self_block(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.self_ln(x + self.drop(self.self_attn(x, mask=mask)))

    def cross_block(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        assert self.cross_attn is not None and self.cross_ln is not None
        return self.cross_ln(x + self.drop(self.cross_attn(x, kv, mask=kv_mask)))

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_ln(x + self.drop(self.fc2(self.act(self.fc1(x)))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: torch.Tensor | None = None,
                kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_block(x, mask)
        if kv is not None:
            x = self.cross_block(x, kv, kv_mask)
        return self.ffn_block(x)

    def step(self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
             cross_kv: tuple[torch.Tensor, torch.Tensor] | None, cross_mask: torch.Tensor | None,
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Incremental decoding: ``x`` [B, n, C] are the new positions, ``past`` the cached self-attention
        keys/values [B, H, L, D] of the earlier ones, ``cross_kv`` the cross-attention keys/values
        computed once. ``mask`` [B, 1, n, L+n]. Returns (output [B, n, C], keys/values [B, H, L+n, D])."""
        k, v = self.self_attn.kv_heads(x)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        x = self.self_ln(x + self.drop(self.self_attn(x, mask=mask, kv_heads=(k, v))))
        if cross_kv is not None:
            assert self.cross_attn is not None and self.cross_ln is not None
            x = self.cross_ln(x + self.drop(self.cross_attn(x, mask=cross_mask, kv_heads=cross_kv)))
        return self.ffn_block(x), (k, v)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool, **kwargs) -> torch.Tensor:
    """Apply ``layers`` in order, with activation checkpointing when asked and training."""
    for layer in layers:
        if use_checkpoint and torch.is_grad_enabled() and layer.training:
            x = checkpoint(layer, x, use_reentrant=False, **kwargs)
        else:
            x = layer(x, **kwargs)
    return x


def key_mask_4d(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, Lk] 1/0 -> bool [B, 1, 1, Lk] (True = attend)."""
    return None if key_mask is None else key_mask.bool()[:, None, None, :]
