"""Video (and image: T = 1) captioning (paper Table 2: vision + universal + shared decoder).

The decoder cross-attends to the universal visual tokens, prompted with the instruction "what does
the video describe?" (Appendix B.2.3; "... image ..." for image batches, T = 1); fine-tuned with
cross-entropy on the caption.  Evaluation generates one caption per clip (beam 5, at most 25 tokens,
at least 4 before [SEP], GNMT length penalty alpha 0.6, as the reference) and scores it
against every reference caption of that clip: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap);
Chinese captions (Youku-mPLUG) character by character.

References: rows of the validation split that share ``clip_index`` are one clip; their captions
(``answer_ids``, decoded) are its references (MSR-VTT and COCO list one row per caption).
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from model import objectives
from workloads import common
from workloads.metrics.captioning import caption_metrics, exact_match_rate

TASK = "captioning"
COLUMNS = ("frames", "answer_ids", "answer_mask", "clip_index")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Literal["auto", "video", "image"] = Field(
        "auto", description="instruction prompt: auto = from the batch (T = 1: image), or forced")
    num_beams: int = Field(5, ge=1)
    max_length: int = Field(25, ge=1, description="generated tokens at most, [SEP] included")
    min_length: int = Field(4, ge=0, description="tokens before [SEP] may end a caption (reference: 4)")
    length_penalty: float = Field(0.6, description="GNMT alpha: beams ranked by score / ((5 + len) / 6) ** alpha")
    chinese: bool = Field(False, description="score character by character (Youku-mPLUG captions)")
    with_meteor: bool = Field(True, description="METEOR needs Java; false skips it")


def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    return common.build(TASK, model_cfg, vision_pretrained, text_pretrained)


def batch_constants(tokenizer, task_cfg: Config) -> dict[str, torch.Tensor]:
    """The instruction prompts, tokenised once per worker: [1, Lp] (video, and image for T = 1 batches)."""
    return common.instruction_constants(tokenizer, TASK, task_cfg.modality)


def visual_tokens(model, batch: dict) -> torch.Tensor:
    """Universal visual tokens [B, 1+T*N, Ct]: the decoder's cross states."""
    return model(frames=common.pixels_of(model, batch)).vision_tokens


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    v = visual_tokens(model, batch)
    prompt_ids, prompt_mask = common.expand_prompt(batch, v.shape[0])
    lm = objectives.lm_loss(model, v, None, prompt_ids, prompt_mask, batch["answer_ids"], batch["answer_mask"])
    return {"loss": lm, "lm": lm}


@torch.no_grad()
def predict(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> list[dict]:
    """One record per row: ``{"item", "clip", "reference", "prediction"}``; the caption is generated
    once per clip of these batches (``prediction`` is None on the clip's other rows)."""
    tok = common.need_tokenizer(tokenizer, "captioning")
    model.eval()
    done: set[int] = set()
    records: list[dict] = []
    seen = 0
    for batch in batches:
        refs = common.decode_texts(tok, batch["answer_ids"])
        n = len(refs)
        clips = batch["clip_index"].tolist() if "clip_index" in batch else list(range(seen, seen + n))
        items = common.item_ids(batch, seen, n)
        seen += n
        new = [i for i, c in enumerate(clips) if c not in done and clips.index(c) == i]
        generated: dict[int, str] = {}
        if new:
            v = visual_tokens(model, {"frames": batch["frames"][new]})       # [n_new, Nv, Ct]
            prompt_ids, prompt_mask = common.expand_prompt(batch, len(new))
            g = model.generate(v, None, prompt_ids, prompt_mask, num_beams=task_cfg.num_beams,
                               max_length=task_cfg.max_length, length_penalty=task_cfg.length_penalty,
                               min_length=min(task_cfg.min_length, task_cfg.max_length - 1))
            generated = dict(zip(new, common.decode_texts(tok, g.sequences)))
            done.update(clips[i] for i in new)
        for i, (c, r) in enumerate(zip(clips, refs)):
            records.append({"item": items[i], "clip": c, "reference": r, "prediction": generated.get(i)})
    return records


def metrics_from(records: list[dict], task_cfg: Config, tokenizer=None):
    """Caption metrics over the clips of ``records`` (all workers' records, in one order), and
    ``exact_match``: the % of clips whose caption equals one of their references, as tokenised for scoring;
    predictions: clip_index, prediction, references."""
    predictions: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    for r in common.sort_records(records):
        if r["prediction"] is not None:
            predictions.setdefault(r["clip"], r["prediction"])
        if r["reference"]:
            references.setdefault(r["clip"], []).append(r["reference"])
    scored = sorted(c for c in predictions if references.get(c))
    if not scored:
        raise ValueError("captioning evaluation got no clip with a reference caption: the validation split is "
                         "empty, every clip was bad, or every caption is empty")
    metrics = caption_metrics({c: predictions[c] for c in scored}, {c: references[c] for c in scored},
                              chinese=task_cfg.chinese, with_meteor=task_cfg.with_meteor)
    metrics["num_clips"] = float(len(scored))
    metrics["exact_match"] = exact_match_rate({c: predictions[c] for c in scored}, {c: references[c] for c in scored},
                                              chinese=task_cfg.chinese)
    rows = [{"clip_index": c, "prediction": predictions[c], "references": references[c]} for c in scored]
    return metrics, rows


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None):
    """Caption metrics over the clips of ``batches``; predictions: clip_index, prediction, references."""
    return metrics_from(predict(model, batches, task_cfg, tokenizer), task_cfg, tokenizer)
