"""Text side: BERT embeddings, the text encoder (the BERT layers below the universal layers),
and the word embeddings the MLM head is tied to."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MPlugConfig
from .layers import PostLNLayer, key_mask_4d, run_layers


@dataclass
class TextOutput:
    hidden: torch.Tensor          # [B, L, Ct] output of the text encoder (W^M, before universal layers)
    attention_mask: torch.Tensor  # [B, L] 1 = real token


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: MPlugConfig, type_vocab: bool = True) -> None:
        super().__init__()
        c = cfg.text_width
        self.word = nn.Embedding(cfg.vocab_size, c, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_text_len, c)
        self.token_type = nn.Embedding(cfg.type_vocab_size, c) if type_vocab else None
        self.ln = nn.LayerNorm(c, eps=cfg.text_ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.max_len = cfg.max_text_len

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, n = input_ids.shape
        if n > self.max_len:
            raise ValueError(f"text has {n} tokens but max_text_len={self.max_len}; truncate in the tokenizer")
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        x = self.word(input_ids) + self.position(position_ids)         # [B, L, C]
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        return self.drop(self.ln(x))


def bert_layer(cfg: MPlugConfig, cross: bool = False) -> PostLNLayer:
    return PostLNLayer(cfg.text_width, cfg.text_heads, cfg.text_intermediate, cfg.text_act,
                       cfg.text_ln_eps, cfg.attn_impl, cfg.dropout, cross=cross)


class TextEncoder(nn.Module):
    """Embeddings + the first M = text_layers - universal_layers BERT layers."""

    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(bert_layer(cfg) for _ in range(cfg.text_encoder_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> TextOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)                 # [B, L, C]
        x = run_layers(self.layers, x, self.cfg.grad_checkpointing, mask=key_mask_4d(attention_mask))
        return TextOutput(hidden=x, attention_mask=attention_mask)
