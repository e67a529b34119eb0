"""Pre-training (paper Sec. 3.3): MLM + vision-language contrastive + matching + instruction LM.

Video-text batches get all four losses; a text-only batch (no ``frames``) gets MLM alone.  Each
loss is returned under its own name, weighted into ``loss``.
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from model import objectives
from workloads import common

TASK = "pretrain"
COLUMNS = ("frames", "text_ids", "text_mask", "clip_index")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlm_weight: float = Field(1.0, ge=0)
    itc_weight: float = Field(1.0, ge=0)
    itm_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(1.0, ge=0)
    modality: Literal["auto", "video", "image"] = Field(
        "auto", description="instruction of the LM loss: auto = from the batch (T = 1: image), or forced")
    k_test: int = Field(16, ge=1, description="evaluation: candidates re-ranked by the matching head")
    rerank_score: Literal["logit_plus_sim", "margin"] = Field(
        "logit_plus_sim", description="evaluation: a re-ranked candidate's score, as the retrieval workload's")
    positives: Literal["clip", "caption"] = Field(
        "clip", description="contrastive / matching positives: rows of one clip (the reference), or rows whose "
        "caption text is the same (datasets where many clips share a caption, as the synthetic one)")


def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    return common.build(TASK, model_cfg, vision_pretrained, text_pretrained)


def batch_constants(tokenizer, task_cfg: Config) -> dict[str, torch.Tensor]:
    """The instruction prompts of the LM loss, tokenised once per worker: [1, Lp] (video, and image
    for T = 1 batches)."""
    return common.instruction_constants(tokenizer, TASK, task_cfg.modality)


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    ids, mask = batch["text_ids"], batch["text_mask"]
    if "frames" not in batch:  # text-only source
        mlm = objectives.mlm_loss(model, ids, mask)
        return {"loss": task_cfg.mlm_weight * mlm, "mlm": mlm}
    pixels = common.pixels_of(model, batch)                           # [B, T, 3, H, W]
    idx = common.positive_ids(batch, task_cfg.positives)
    u = model(frames=pixels, text_ids=ids, text_mask=mask)
    alpha = objectives.distill_alpha(model.config.alpha, batch.get("epoch_progress"))  # ramps over epoch 1
    itc = objectives.contrastive_loss(model, u, pixels, ids, mask, idx=idx, alpha=alpha)
    itm = objectives.matching_outputs(model, u, itc.sim_i2t, itc.sim_t2i, idx=idx)
    mlm = objectives.mlm_loss(model, ids, mask, vision_tokens=u.vision_tokens)
    b = ids.shape[0]
    if "prompt_ids" in batch:
        prompt_ids, prompt_mask = common.expand_prompt(batch, b)          # image instruction when T = 1
    else:
        prompt_ids, prompt_mask = ids[:, :1], mask[:, :1]
    lm = objectives.lm_loss(model, u.vision_tokens, None, prompt_ids, prompt_mask, ids, mask)
    total = (task_cfg.itc_weight * itc.loss + task_cfg.itm_weight * itm.loss + task_cfg.mlm_weight * mlm
             + task_cfg.lm_weight * lm)
    return {"loss": total, "itc": itc.loss, "itm": itm.loss, "mlm": mlm, "lm": lm, **common.diagnostics(itc, itm, idx)}


EVAL_KIND = "retrieval"  # zero-shot retrieval, sharded like the retrieval workload's


def retrieval_options(task_cfg: Config) -> dict:
    return {"k_test": task_cfg.k_test, "rerank": True, "rerank_score": task_cfg.rerank_score}


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> dict[str, float]:
    """Zero-shot text-video retrieval on the validation split (paper Appendix A.2)."""
    return common.retrieval_eval(model, batches, k_test=task_cfg.k_test, rerank_score=task_cfg.rerank_score)
