"""Typed configuration of the Ray Train + DeepSpeed loop."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ZERO3_REFUSED = ("ZeRO stage 3 is refused until it trains, checkpoints and exports correctly: the model reads "
                 "some parameters outside their own module's forward (tied MLM head, temperature, position "
                 "embeddings), which ZeRO-3 leaves as empty shards; use zero_stage 0, 1 or 2")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Scaling
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs for decoding: fractional is fine")
    gpus_per_worker: float = Field(1.0, gt=0)
    # Schedule
    batch_size_per_worker: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    steps_per_epoch: int | None = Field(None, ge=1, description="optimizer steps of one epoch (train rows / global "
                                        "batch); the loop passes step / steps_per_epoch to the workload as "
                                        "epoch_progress (the distillation-weight ramp); none: not passed")
    lr: float = Field(1e-4, gt=0)
    vision_lr: float | None = Field(None, gt=0, description="optional lower LR for the vision encoder")
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(5000, ge=0)
    warmup_start_lr: float = Field(0.0, ge=0, description="lr at the first warm-up step (absolute; the reference's "
                                   "caption and QA fine-tunes: 1e-6), rising linearly to each group's lr")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    min_lr: float | None = Field(None, ge=0, description="the cosine's floor, absolute and the same for every "
                                 "parameter group (the reference's caption and QA fine-tunes: 1e-6); "
                                 "None: min_lr_ratio of each group's lr")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    # DeepSpeed
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON whose keys override the generated ones")
    # Checkpoints and fault tolerance
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="async: a save copies the state in memory and returns; a background thread per "
        "worker writes and uploads it, and the completion marker follows once every worker's upload is done "
        "(at most one in flight; the next save waits for it). sync: the step waits for the upload and the marker")
    max_failures: int = Field(3, ge=0)
    log_every: int = Field(10, ge=1)
    # --init-from strictness (a tensor whose shape differs from the model's is an error otherwise)
    init_allow_mismatch: list[str] = Field(default_factory=list, description="globs of state-dict keys that may "
                                           "differ in shape from the --init-from checkpoint: they start fresh "
                                           "(e.g. ['text.embeddings.word.*', 'mlm.*'] for a new vocabulary)")
    init_allow_new_vocab: bool = Field(False, description="fine-tune on another vocabulary than the checkpoint's")
    preemption_check_every: int = Field(5, ge=1, description="optimizer steps between asking Ray whether a node "
                                        "is being preempted (a barrier across workers); a notice triggers a checkpoint")

    @field_validator("zero_stage")
    @classmethod
    def _no_zero3(cls, v: int) -> int:
        if v == 3:
            raise ValueError(ZERO3_REFUSED)
        return v

    @field_validator("init_allow_mismatch")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not p.strip() or p.strip() in ("*", "**")]
        if bad:
            raise ValueError(f"{bad}: each entry is a glob of state-dict keys (e.g. 'classifier.*'); an empty or "
                             "match-everything pattern would turn the check off entirely")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(f"precision={self.precision} needs use_gpu=true; CPU training runs fp32 (precision: auto)")
        if self.betas[0] >= 1 or self.betas[1] >= 1 or min(self.betas) < 0:
            raise ValueError(f"betas {self.betas} must lie in [0, 1)")
        return self
