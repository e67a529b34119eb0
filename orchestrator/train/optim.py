"""AdamW as the paper's Appendix B (weight decay 0.02, betas 0.9/0.98), warm-up then cosine decay,
and an optional lower learning rate for the vision encoder."""
from __future__ import annotations

import math

import torch

from orchestrator.train.config import TrainConfig

NO_DECAY_HINTS = ("bias", "norm", "ln_", "layernorm", "embeddings.position", "pos_embed", "cls_token",
                  "temp", "query_tokens")
VISION_PREFIXES = ("vision", "visual")


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """Four groups: {vision, rest} x {decay, no decay}; empty groups dropped."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_vision = train.vision_lr is not None and name.split(".")[0].startswith(VISION_PREFIXES)
        no_decay = p.ndim < 2 or any(h in name.lower() for h in NO_DECAY_HINTS)
        groups.setdefault((is_vision, no_decay), []).append(p)
    out = []
    for (is_vision, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": train.vision_lr if is_vision else train.lr,
            "weight_decay": 0.0 if no_decay else train.weight_decay,
            "name": f"{'vision' if is_vision else 'main'}{'_no_decay' if no_decay else ''}",
        })
    return out


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio`` at ``max_steps``."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    opt = torch.optim.AdamW(param_groups(model, train), lr=train.lr, betas=tuple(train.betas),
                            weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, train))
    return opt, sched
