"""The DeepSpeed config generated from the run config (a user JSON may override any key)."""
from __future__ import annotations

import json
from typing import Any

from orchestrator import storage
from orchestrator.train.config import ZERO3_REFUSED, TrainConfig


def resolve_precision(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    return "bf16" if train.use_gpu else "fp32"


def deep_update(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(train: TrainConfig, world_size: int, user_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """ZeRO stage, precision (bf16 on GPU, fp32 on CPU), accumulation and clipping from ``train``.

    The optimizer and LR schedule are built by the loop (AdamW with per-module learning rates,
    warm-up + cosine) and handed to DeepSpeed, so the generated config names none.
    """
    precision = resolve_precision(train)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size_per_worker,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.batch_size_per_worker * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # every save uses the one tag checkpoint.TAG: DeepSpeed's check that the ranks agree on it
        # (two all-reduces per save, on the step path) can never fail
        "checkpoint": {"tag_validation": "Ignore"},
    }
    if train.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    if user_json:
        cfg = deep_update(cfg, user_json)
        # keep the batch arithmetic consistent with what the user pinned
        mb, ga = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
        cfg["train_batch_size"] = mb * ga * world_size
    return cfg


def load_user_json(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None

    try:
        data = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"train.deepspeed_config={path!r}: cannot read a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config={path!r}: the top level must be a JSON object")
    stage = data.get("zero_optimization", {}).get("stage") if isinstance(data.get("zero_optimization"), dict) else None
    if stage == 3:
        raise ValueError(f"train.deepspeed_config={path!r} sets zero_optimization.stage=3: {ZERO3_REFUSED}")
    return data
