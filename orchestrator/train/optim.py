"""AdamW as the paper's Appendix B (weight decay 0.02, betas 0.9/0.98), warm-up then cosine decay,
and an optional lower learning rate for the vision encoder.

Weight decay: biases and 1-D parameters (LayerNorm gains, the vision class embedding, the
temperature) are exempt; every matrix is decayed, embeddings, position embeddings and the universal
layers' latent queries included, as the reference's ``create_optimizer`` (timm's ``add_weight_decay``:
``len(shape) == 1 or name.endswith(".bias")``; the reference model names no other exemption).

Schedule (``lr_factor``): a linear warm-up from ``warmup_start_lr`` (absolute; 0 by default) to each
group's lr, then a cosine down to ``min_lr`` (absolute, the same floor for every group, as the
reference's timm scheduler) or, when unset, to ``min_lr_ratio`` of each group's lr."""
from __future__ import annotations

import math

import torch

from orchestrator.train.config import TrainConfig

VISION_PREFIXES = ("vision", "visual")


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Whether weight decay applies: not to biases and 1-D parameters (the reference's rule)."""
    return p.ndim >= 2 and not name.endswith("bias")


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """Four groups: {vision, rest} x {decay, no decay}; empty groups dropped."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_vision = train.vision_lr is not None and name.split(".")[0].startswith(VISION_PREFIXES)
        no_decay = not decays(name, p)
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


def lr_factor(step: int, train: TrainConfig, base_lr: float | None = None) -> float:
    """The lr at ``step`` over ``base_lr`` (a group's lr; ``train.lr`` by default): a linear warm-up
    from ``warmup_start_lr`` that reaches ``base_lr`` at step ``warmup_steps``, then a cosine down to
    the floor (``min_lr``, else ``min_lr_ratio * base_lr``) at ``max_steps``."""
    base = train.lr if base_lr is None else base_lr
    if train.warmup_steps and step < train.warmup_steps:
        start = train.warmup_start_lr / base
        return start + (1 - start) * (step + 1) / train.warmup_steps
    floor = train.min_lr / base if train.min_lr is not None else train.min_lr_ratio
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    groups = param_groups(model, train)
    opt = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s, lr=g["lr"]: lr_factor(s, train, lr) for g in groups])  # one schedule per group's lr
    return opt, sched
