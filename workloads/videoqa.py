"""Video (and image: T = 1) question answering (paper Table 2: vision + text + universal + fusion +
shared decoder).

The question goes through the text encoder and universal layers, is fused with the visual tokens,
and the shared decoder writes the answer cross-attending to the visual tokens followed by the fused
question (the reference's ``cat([visual, question], 1)``), with the question itself as its prompt (``objectives.instruction_for("videoqa", ..., question)``).  Training is the
instruction LM loss on the answer.  Evaluation is open-ended: beam search, exact-match accuracy
after answer normalisation; with ``answer_list`` every candidate answer is also scored by the
decoder's log-likelihood and the best one is the closed-set prediction (``ranked_accuracy``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model import objectives
from workloads import common
from workloads.metrics.qa import exact_match_accuracy, normalize_answer, rank_answers

TASK = "videoqa"
COLUMNS = ("frames", "text_ids", "text_mask", "answer_ids", "answer_mask")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_beams: int = Field(5, ge=1, description="beam width of answer generation (1 = greedy; reference: 5)")
    max_length: int = Field(10, ge=1, description="generated answer tokens at most, [SEP] included")
    min_length: int = Field(1, ge=0, description="tokens before [SEP] may end an answer (reference: 1)")
    length_penalty: float = Field(0.6, description="GNMT alpha: beams ranked by score / ((5 + len) / 6) ** alpha")
    # Closed-set evaluation: the candidate answers (a list, or a local JSON file holding one).
    answer_list: list[str] | str | None = None
    rank_batch: int = Field(128, ge=1, description="candidate answers scored per decoder call")

    @field_validator("answer_list")
    @classmethod
    def _load_list(cls, v):
        if isinstance(v, str):
            path = Path(v)
            if not path.is_file():
                raise ValueError(f"answer_list file {v!r} does not exist; give a list of answers or a local JSON "
                                 "file holding one")
            try:
                v = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"answer_list file {v!r} is not JSON: {e.msg} (line {e.lineno})") from None
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(a, str) and a.strip() for a in v)):
            raise ValueError("answer_list must be a non-empty list of non-empty strings")
        return v


def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    return common.build(TASK, model_cfg, vision_pretrained, text_pretrained)


def fused(model, batch: dict):
    """Question encoded, passed through the universal layers and fused with the video: (FusionOutput
    (hidden [B, L, Ct], attention_mask [B, L]), universal visual tokens [B, Nv, Ct])."""
    u = model(frames=common.frames_of(model, batch), text_ids=batch["text_ids"], text_mask=batch["text_mask"])
    return model.fuse(u.text_hidden, u.text_mask, u.vision_tokens), u.vision_tokens


def cross_states(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer decoder's cross states: the visual tokens followed by the fused question, as the
    reference decodes from ``cat([visual, question], 1)``: ([B, Nv+L, Ct], mask [B, Nv+L])."""
    f, vision = fused(model, batch)
    mask = torch.cat([torch.ones(vision.shape[:2], dtype=f.attention_mask.dtype, device=vision.device),
                      f.attention_mask], 1)
    return torch.cat([vision, f.hidden], 1), mask


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    states, mask = cross_states(model, batch)
    lm = objectives.lm_loss(model, states, mask, batch["text_ids"], batch["text_mask"],
                            batch["answer_ids"], batch["answer_mask"])
    return {"loss": lm, "lm": lm}


@torch.no_grad()
def rank_scores(model, states: torch.Tensor, states_mask: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor,
                cand_mask: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Log-likelihood of every candidate answer for every question: [N, A] fp32."""
    n, a = prompt_ids.shape[0], cand_ids.shape[0]
    out = torch.empty(n, a)
    for i in range(n):
        for s in range(0, a, chunk):
            c_ids, c_mask = cand_ids[s:s + chunk], cand_mask[s:s + chunk]   # [c, La]
            k = c_ids.shape[0]
            out[i, s:s + k] = common.sequence_logprob(
                model, states[i:i + 1].expand(k, -1, -1), states_mask[i:i + 1].expand(k, -1),
                prompt_ids[i:i + 1].expand(k, -1), prompt_mask[i:i + 1].expand(k, -1), c_ids, c_mask).cpu()
    return out


@torch.no_grad()
def predict(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> list[dict]:
    """One record per question: ``{"item", "question", "answer", "prediction", "ranked"}``
    (``ranked``: the best of ``answer_list`` by likelihood, None without a list)."""
    tok = common.need_tokenizer(tokenizer, "videoqa")
    model.eval()
    device = next(model.parameters()).device
    cands = None
    if task_cfg.answer_list:
        enc = tok(task_cfg.answer_list, padding="longest", return_tensors="pt")
        cands = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
    records: list[dict] = []
    seen = 0
    for batch in batches:
        states, states_mask = cross_states(model, batch)
        ids, mask = batch["text_ids"], batch["text_mask"]
        n = len(ids)
        items = common.item_ids(batch, seen, n)
        seen += n
        g = model.generate(states, states_mask, ids, mask, num_beams=task_cfg.num_beams,
                           max_length=task_cfg.max_length, length_penalty=task_cfg.length_penalty,
                           min_length=min(task_cfg.min_length, task_cfg.max_length - 1))
        preds = common.decode_texts(tok, g.sequences)
        questions = common.decode_texts(tok, ids)
        golds = common.decode_texts(tok, batch["answer_ids"])
        ranked = [None] * n
        if cands is not None:
            order = rank_answers(rank_scores(model, states, states_mask, ids, mask, *cands, chunk=task_cfg.rank_batch))
            ranked = [task_cfg.answer_list[j] for j in order[:, 0].tolist()]
        for i, q, a, p, r in zip(items, questions, golds, preds, ranked):
            records.append({"item": i, "question": q, "answer": a, "prediction": p, "ranked": r})
    return records


def metrics_from(records: list[dict], task_cfg: Config, tokenizer=None):
    """Exact-match accuracy (%) of generated answers, ``ranked_accuracy`` over ``answer_list`` when
    given; predictions: question, answer, prediction, correct (+ ranked_prediction)."""
    if not records:
        raise ValueError("videoqa evaluation got no batches: the validation split is empty or every clip was bad")
    records = common.sort_records(records)
    preds, golds = [r["prediction"] for r in records], [r["answer"] for r in records]
    metrics = {"accuracy": exact_match_accuracy(preds, golds), "num_questions": float(len(preds))}
    rows = [{"question": r["question"], "answer": r["answer"], "prediction": r["prediction"],
             "correct": normalize_answer(r["prediction"]) == normalize_answer(r["answer"])} for r in records]
    if task_cfg.answer_list:
        metrics["ranked_accuracy"] = exact_match_accuracy([r["ranked"] for r in records], golds)
        for row, r in zip(rows, records):
            row["ranked_prediction"] = r["ranked"]
    return metrics, rows


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None):
    """Exact-match accuracy (%) of generated answers, ``ranked_accuracy`` over ``answer_list`` when
    given; predictions: question, answer, prediction, correct (+ ranked_prediction)."""
    return metrics_from(predict(model, batches, task_cfg, tokenizer), task_cfg, tokenizer)
