"""What both the driver and the workers derive from a run config: its tokenizer and the model's
typed config (preset + overrides + the tokenizer's vocabulary and special token ids)."""
from __future__ import annotations

import logging

from model import MPlugConfig
from orchestrator.config import ConfigError, RunSpec
from orchestrator.data.tokenize import default_tokenizer, load_tokenizer
from orchestrator.train.checkpoint import load_weights
from workloads.base import load_workload

log = logging.getLogger(__name__)


def load_run_tokenizer(cfg: RunSpec):
    return load_tokenizer(cfg.data.tokenizer or default_tokenizer(cfg.data.root))


def tokenizer_overrides(tokenizer) -> dict[str, int]:
    """Vocabulary size and the special ids the model must agree on with the data plane."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "mask_token_id": tokenizer.mask_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _uses_frames(cfg: RunSpec) -> bool:
    """Whether the run's workload reads frames (text-only workloads keep the preset's image size)."""
    try:
        return "frames" in load_workload(cfg.workload).COLUMNS
    except Exception:  # an unknown workload is reported where it is loaded
        return True


def model_config_for(cfg: RunSpec, tokenizer=None):
    """The model's typed config: preset < tokenizer ids < ``model.overrides`` from the run config.
    For workloads that read frames the model's ``image_size`` is ``data.image_size`` (a different
    ``model.overrides.image_size`` is a ConfigError)."""
    overrides = tokenizer_overrides(tokenizer) if tokenizer is not None else {}
    overrides.update(cfg.model.overrides)
    # The model's patch grid follows the frames the data plane produces: one place sets the size.
    size = overrides.setdefault("image_size", cfg.data.image_size) if _uses_frames(cfg) else cfg.data.image_size
    if size != cfg.data.image_size:
        raise ConfigError(f"model.overrides.image_size={size} but data.image_size={cfg.data.image_size}: the "
                          "model would get frames of another size; set only data.image_size (the model follows it)")
    if cfg.model.activation_checkpointing:
        overrides["grad_checkpointing"] = True
    try:
        return MPlugConfig.from_preset(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e} (the model's image_size is data.image_size={cfg.data.image_size})") from None


def load_model_for_eval(cfg: RunSpec, checkpoint_uri: str, tokenizer, device, model_config=None):
    """Build the workload's model (its Table 2 modules) and load the checkpoint's weights into it."""

    workload = load_workload(cfg.workload)
    task_cfg = workload.Config.model_validate(cfg.task)
    if model_config is None and workload.USES_MODEL_CONFIG:
        model_config = model_config_for(cfg, tokenizer)
    model = workload.build_model(model_config, task_cfg)
    report = load_weights(model, checkpoint_uri, cfg.train.init_allow_mismatch, tokenizer, cfg.train.init_allow_new_vocab)
    n_own = len(model.state_dict())
    if len(report["missing"]) >= n_own:
        raise ValueError(f"{checkpoint_uri}: none of the model's {n_own} weights are in the checkpoint")
    if report["missing"]:
        log.warning("%d weights not in the checkpoint (left as initialised): %s", len(report["missing"]),
                    ", ".join(report["missing"][:10]))
    return workload, task_cfg, model.to(device).eval()
