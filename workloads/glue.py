"""GLUE (SST-2, RTE, MRPC, QQP, MNLI matched / mismatched, QNLI): text encoder + universal layers +
classifier head on the [CLS] (paper Table 2, text only).

Sentence pairs arrive as one sequence with segment ids (``text_type_ids``).  ``glue_task`` picks
the metrics: accuracy for all, plus F1 of the positive class for MRPC and QQP.  MNLI matched and
mismatched are two evaluations of ``mnli`` (point ``data.sources[].val`` at the dev file of each).
``model.overrides.num_labels`` must be 3 for MNLI, 2 otherwise.
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from workloads import common
from workloads.metrics.classification import glue_metrics

TASK = "glue"
COLUMNS = ("text_ids", "text_mask", "text_type_ids", "label")
NUM_LABELS = {"sst2": 2, "rte": 2, "mrpc": 2, "qqp": 2, "mnli": 3, "qnli": 2}
# Label names in id order, as the data plane's GLUE adapters assign the ids.
LABEL_NAMES = {"sst2": ("negative", "positive"), "rte": ("entailment", "not_entailment"),
               "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
               "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment")}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    glue_task: Literal["sst2", "rte", "mrpc", "qqp", "mnli", "qnli"] = "sst2"
    eval_name: str | None = Field(None, description="prefix of the metric names, e.g. mnli_m / mnli_mm")



def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    want = NUM_LABELS[task_cfg.glue_task]
    if model_cfg.num_labels != want:
        raise ValueError(f"GLUE {task_cfg.glue_task} has {want} classes but the model has num_labels="
                         f"{model_cfg.num_labels}; set model.overrides.num_labels={want}")
    # text only: no vision encoder to load
    return common.build(TASK, model_cfg, None, text_pretrained)


def logits_of(model, batch: dict) -> torch.Tensor:
    """[B, num_labels] from the universal text [CLS]."""
    u = model(text_ids=batch["text_ids"], text_mask=batch["text_mask"], text_type_ids=batch.get("text_type_ids"))
    return model.classify(u.text_hidden[:, 0])


def _decode_pairs(tokenizer, batch: dict) -> list[str]:
    """Each row's sentence, or its two sentences joined by " ||| " (segment ids split them)."""
    ids, types, pad = batch["text_ids"], batch.get("text_type_ids"), tokenizer.pad_token_id or 0
    first = common.decode_texts(tokenizer, ids if types is None else ids.masked_fill(types != 0, pad))
    if types is None or not bool((types != 0).any()):
        return first
    second = common.decode_texts(tokenizer, ids.masked_fill(types == 0, pad))
    return [f"{a} ||| {b}" if b else a for a, b in zip(first, second)]


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits_of(model, batch).float(), batch["label"])
    return {"loss": ce, "ce": ce}


@torch.no_grad()
def predict(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> list[dict]:
    """One record per labelled row: ``{"item", "label", "prediction"(, "text")}``; unlabelled
    (test) rows, label -1, are skipped."""
    model.eval()
    records: list[dict] = []
    seen = 0
    for batch in batches:
        n = len(batch["label"])
        items = common.item_ids(batch, seen, n)
        seen += n
        keep = batch["label"] >= 0                                       # unlabelled (test) rows: -1
        if not bool(keep.any()):
            continue
        items = [i for i, k in zip(items, keep.tolist()) if k]
        batch = {k: v[keep] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == keep.shape}
        pred = logits_of(model, batch).argmax(-1).cpu().tolist()
        texts = _decode_pairs(tokenizer, batch) if tokenizer is not None else [None] * len(pred)
        for i, p, y, t in zip(items, pred, batch["label"].cpu().tolist(), texts):
            records.append({"item": i, "label": y, "prediction": p, "text": t})
    return records


def metrics_from(records: list[dict], task_cfg: Config, tokenizer=None):
    """accuracy (+ f1 for MRPC / QQP), in %; predictions: text, label, prediction, correct."""
    if not records:
        raise ValueError("GLUE evaluation got no labelled rows: evaluate on a dev split (a test TSV has no labels)")
    records = common.sort_records(records)
    pred = torch.tensor([r["prediction"] for r in records])
    label = torch.tensor([r["label"] for r in records])
    metrics = glue_metrics(task_cfg.glue_task, pred, label)
    if task_cfg.eval_name:
        metrics = {f"{task_cfg.eval_name}_{k}": v for k, v in metrics.items()}
    metrics["num_samples"] = float(len(label))
    names = LABEL_NAMES[task_cfg.glue_task]
    rows = []
    for r in records:
        row = {"label": names[r["label"]], "prediction": names[r["prediction"]], "correct": r["prediction"] == r["label"]}
        if r["text"] is not None:
            row["text"] = r["text"]
        rows.append(row)
    return metrics, rows


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None):
    """accuracy (+ f1 for MRPC / QQP), in %; predictions: text, label, prediction, correct."""
    return metrics_from(predict(model, batches, task_cfg, tokenizer), task_cfg, tokenizer)
