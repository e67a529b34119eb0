"""Shared decoder: causal BERT-style layers that cross-attend to whatever the task gives them
(visual tokens for captioning, fused features for QA), with a teacher-forced LM loss in which
the prompt prefix is not scored."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPlugConfig
from .layers import ACT, build_attn_mask, key_mask_4d, run_layers
from .text import TextEmbeddings, bert_layer

IGNORE = -100


@dataclass
class DecoderCache:
    """Key/value cache for incremental decoding (``SharedDecoder.init_cache`` / ``step``).

    cross_kv: per layer, the cross-attention keys/values of the cross states, computed once per item
    self_kv:  per layer, the self-attention keys/values of every position decoded so far (None before
              the first step)
    """
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]    # [N, H, Nc, D] each
    cross_mask: torch.Tensor | None                      # bool [N, 1, 1, Nc]
    self_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # [N, H, L, D] each

    def select(self, index: torch.Tensor) -> "DecoderCache":
        """Rows ``index`` of everything (repeat for beams, or reorder)."""
        def pick(kv):
            return (kv[0].index_select(0, index), kv[1].index_select(0, index))
        return DecoderCache([pick(kv) for kv in self.cross_kv],
                            None if self.cross_mask is None else self.cross_mask.index_select(0, index),
                            None if self.self_kv is None else [pick(kv) for kv in self.self_kv])

    def reorder_self(self, index: torch.Tensor) -> None:
        """Beam search: rows ``index`` of the self-attention cache (cross keys/values are per item and
        every beam of an item reads the same, so they stay)."""
        if self.self_kv is not None:
            self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]


@dataclass
class DecoderOutput:
    logits: torch.Tensor               # [B, L, V]
    loss: torch.Tensor | None = None   # mean next-token CE over scored positions


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token (left padding safe). [B, L]"""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class SharedDecoder(nn.Module):
    def __init__(self, cfg: MPlugConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.text_width
        self.embeddings = TextEmbeddings(cfg)                          # type 0 added to every token, as BERT
        self.layers = nn.ModuleList(bert_layer(cfg, cross=True) for _ in range(cfg.decoder_layers))
        self.head_dense = nn.Linear(c, c)                              # BERT LM-head transform
        self.head_act = ACT[cfg.text_act]
        self.head_ln = nn.LayerNorm(c, eps=cfg.text_ln_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))     # weight tied to word embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cross_states: torch.Tensor,
                cross_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> DecoderOutput:
        # input_ids [B, L], cross_states [B, Nc, Ct]; labels [B, L] with IGNORE on unscored tokens
        b, n = input_ids.shape
        x = self.embeddings(input_ids, position_ids=positions_from_mask(attention_mask))  # [B, L, Ct]
        self_mask = build_attn_mask(n, attention_mask, causal=True, device=x.device)  # [B, 1, L, L]
        x = run_layers(self.layers, x, self.cfg.grad_checkpointing, mask=self_mask, kv=cross_states,
                       kv_mask=key_mask_4d(cross_mask))
        logits = self.logits(x)                                        # [B, L, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        return DecoderOutput(logits=logits, loss=loss)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, Ct] -> [B, L, V]: the BERT LM head, output weight tied to the word embeddings."""
        h = self.head_ln(self.head_act(self.head_dense(x)))
        return F.linear(h, self.embeddings.word.weight, self.head_bias)

    def init_cache(self, cross_states: torch.Tensor, cross_mask: torch.Tensor | None = None) -> DecoderCache:
        """Cross-attention keys/values of every layer, computed once for the whole generation."""
        return DecoderCache([layer.cross_attn.kv_heads(cross_states) for layer in self.layers],
                            key_mask_4d(cross_mask))

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Logits [B, n, V] of the n new tokens ``input_ids`` [B, n] given the cached earlier ones;
        ``attention_mask`` [B, L+n] covers every position so far. Updates ``cache.self_kv``.
        The same numbers as ``forward`` on the whole sequence (up to float rounding)."""
        n, total = input_ids.shape[1], attention_mask.shape[1]
        if total > self.cfg.max_text_len:
            raise ValueError(f"text has {total} tokens but max_text_len={self.cfg.max_text_len}; "
                             "lower max_length or shorten the prompt")
        pos = positions_from_mask(attention_mask)[:, total - n:]
        x = self.embeddings(input_ids, position_ids=pos)               # [B, n, Ct]
        self_mask = build_attn_mask(n, attention_mask, causal=True, device=x.device)  # [B, 1, n, L+n]
        past = cache.self_kv or [None] * len(self.layers)
        new = []
        for layer, kv, cross in zip(self.layers, past, cache.cross_kv):
            x, kv = layer.step(x, self_mask, kv, cross, cache.cross_mask)
            new.append(kv)
        cache.self_kv = new
        return self.logits(x)


def build_prefix_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, target_ids: torch.Tensor,
                        target_mask: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack each row as [prompt tokens, target tokens, pad...]; labels score only the target.

    prompt_ids [B, P], target_ids [B, La] (both right padded) -> ids, mask, labels [B, P+La].
    The target is expected to end with [SEP] (the tokenizer's), which teaches the decoder to stop.
    """
    ids = torch.cat([prompt_ids, target_ids], dim=1)                   # [B, P+La]
    mask = torch.cat([prompt_mask, target_mask], dim=1).long()
    is_target = torch.cat([torch.zeros_like(prompt_mask), target_mask], dim=1).bool()
    order = torch.argsort(1 - mask, dim=1, stable=True)                # real tokens first, order kept
    ids, mask, is_target = ids.gather(1, order), mask.gather(1, order), is_target.gather(1, order)
    ids = ids.masked_fill(mask == 0, pad_token_id)
    labels = ids.masked_fill(~is_target, IGNORE)
    return ids, mask, labels
