"""Video-text (and image-text: T = 1) retrieval: fine-tune with contrastive + matching; evaluate
with contrastive top-k_test candidates re-scored by the matching head (R@1/5/10 both ways,
median and mean rank)."""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from model import objectives
from workloads import common

TASK = "retrieval"
COLUMNS = ("frames", "text_ids", "text_mask", "clip_index")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    itc_weight: float = Field(1.0, ge=0)
    itm_weight: float = Field(1.0, ge=0)
    k_test: int = Field(128, ge=1, description="candidates per query re-scored by the matching head")
    rerank: bool = True
    rerank_score: Literal["logit_plus_sim", "margin"] = Field(
        "logit_plus_sim", description="a re-ranked candidate's score: the matching head's match logit plus the "
        "contrastive similarity (the reference, mPLUG's retrieval_vid_mplug.py), or the head's margin alone")
    positives: Literal["clip", "caption"] = Field(
        "clip", description="contrastive / matching positives: rows of one clip (the reference), or rows whose "
        "caption text is the same (datasets where many clips share a caption, as the synthetic one)")


def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    return common.build(TASK, model_cfg, vision_pretrained, text_pretrained)


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    pixels = common.pixels_of(model, batch)
    ids, mask, idx = batch["text_ids"], batch["text_mask"], common.positive_ids(batch, task_cfg.positives)
    u = model(frames=pixels, text_ids=ids, text_mask=mask)
    alpha = objectives.distill_alpha(model.config.alpha, batch.get("epoch_progress"))  # ramps over epoch 1
    itc = objectives.contrastive_loss(model, u, pixels, ids, mask, idx=idx, alpha=alpha)
    itm = objectives.matching_outputs(model, u, itc.sim_i2t, itc.sim_t2i, idx=idx)
    return {"loss": task_cfg.itc_weight * itc.loss + task_cfg.itm_weight * itm.loss, "itc": itc.loss, "itm": itm.loss,
            **common.diagnostics(itc, itm, idx)}


# Evaluated as retrieval: orchestrator.evaluation.shard shards embedding and re-scoring over workers.
EVAL_KIND = "retrieval"


def retrieval_options(task_cfg: Config) -> dict:
    return {"k_test": task_cfg.k_test, "rerank": task_cfg.rerank, "rerank_score": task_cfg.rerank_score}


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> dict[str, float]:
    return common.retrieval_eval(model, batches, k_test=task_cfg.k_test, rerank=task_cfg.rerank,
                                 rerank_score=task_cfg.rerank_score)
