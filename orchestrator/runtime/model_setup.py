"""The one model-setup path of training and evaluation: from a run config to the workload's model
on a worker, with its tokenizer and batch constants.

The driver derives the model's typed config (:func:`driver_model_config`: preset + overrides + the
tokenizer's vocabulary and special ids) before any worker starts; each worker builds the model from
it (:func:`setup_model`) and loads weights into it (:func:`load_weights_into`: an ``--init-from``
start, or the checkpoint an evaluation evaluates).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from model import MPlugConfig
from orchestrator.config import ConfigError, RunSpec
from orchestrator.data.tokenize import default_tokenizer, load_tokenizer
from orchestrator.train.weights import load_weights
from workloads.base import Workload, load_workload

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


def driver_model_config(cfg: RunSpec, workload: Workload) -> MPlugConfig | None:
    """What the driver hands its workers to build the model from (a config, no weights), or None for
    a workload that builds its own model (``USES_MODEL_CONFIG = False``).  A bad model/data
    combination is a ConfigError here, before Ray starts, not a worker crash."""
    return model_config_for(cfg, load_run_tokenizer(cfg)) if workload.USES_MODEL_CONFIG else None


@dataclass(frozen=True)
class WorkerModel:
    """The workload's model on a worker, with what its batches need."""

    workload: Workload
    task_cfg: BaseModel                    # the run config's task: section, validated by the workload
    module: torch.nn.Module
    tokenizer: Any | None                  # the run's tokenizer; None for a workload that needs none
    constants: dict[str, torch.Tensor]     # the workload's batch constants, on the worker's device
    device: Any = "cpu"                    # the worker's device (the module is moved there by its user)

    def on_device(self, batch: dict, non_blocking: bool = False) -> dict:
        """``batch`` with its tensors on the worker's device and the batch constants added."""
        out = {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
        out.update(self.constants)
        return out


def setup_model(run: RunSpec, model_config: MPlugConfig | None, device, pretrained: bool = False) -> WorkerModel:
    """The workload's model (its paper Table 2 modules) built from ``model_config`` on this worker,
    the run's tokenizer (when the workload uses the run's model config or has batch constants) and
    its batch constants on ``device``.  ``pretrained``: start the encoders from ``model.*_pretrained``
    (a training run; an evaluation loads its checkpoint instead).  The module stays on the CPU."""
    workload = load_workload(run.workload)
    task_cfg = workload.Config.model_validate(run.task)
    start = ({"vision_pretrained": run.model.vision_pretrained, "text_pretrained": run.model.text_pretrained}
             if pretrained else {})
    module = workload.build_model(model_config, task_cfg, **start)
    needs_tokenizer = workload.USES_MODEL_CONFIG or workload.batch_constants is not None
    tokenizer = load_run_tokenizer(run) if needs_tokenizer else None
    constants = ({k: v.to(device) for k, v in workload.batch_constants(tokenizer, task_cfg).items()}
                 if workload.batch_constants is not None else {})
    return WorkerModel(workload, task_cfg, module, tokenizer, constants, device)


def load_weights_into(model: WorkerModel, uri: str, run: RunSpec) -> dict[str, list[str]]:
    """Weights from ``uri`` (an export or a DeepSpeed checkpoint) into the model, as
    ``train.init_allow_mismatch`` / ``train.init_allow_new_vocab`` allow; the vocabulary recorded
    beside an export is checked against the run's tokenizer.  Returns the load report."""
    tokenizer = model.tokenizer if model.workload.USES_MODEL_CONFIG else None
    return load_weights(model.module, uri, run.train.init_allow_mismatch, tokenizer, run.train.init_allow_new_vocab)
