"""Video category prediction (Youku-mPLUG's 45 categories, Kinetics-style label files; paper Table 2:
vision + text + universal + fusion + classifier head).

With ``use_title`` the video's title is encoded, fused with the visual tokens and the fused [CLS]
is classified (Youku-mPLUG's setting); without it the universal visual [CLS] alone is.  The number
of classes is the model's ``num_labels`` (``model.overrides.num_labels`` in the run config; it must
match the data source's label vocabulary).  Metrics: top-1 and top-5 accuracy (%).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from workloads import common
from workloads.metrics.classification import topk_accuracy

TASK = "classification"
COLUMNS = ("frames", "text_ids", "text_mask", "label")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_title: bool = Field(True, description="fuse the title with the video (Youku-mPLUG); false = video only")
    label_names: list[str] | None = Field(None, description="class names in id order, for readable predictions")
    topk: list[int] = Field(default_factory=lambda: [1, 5], description="top-k accuracies to report")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


def build_model(model_cfg, task_cfg: Config, vision_pretrained=None, text_pretrained=None):
    if task_cfg.label_names is not None and len(task_cfg.label_names) != model_cfg.num_labels:
        raise ValueError(f"task.label_names lists {len(task_cfg.label_names)} classes but the model has "
                         f"num_labels={model_cfg.num_labels}; set model.overrides.num_labels to "
                         f"{len(task_cfg.label_names)}")
    return common.build(TASK, model_cfg, vision_pretrained, text_pretrained)


def logits_of(model, batch: dict, task_cfg: Config) -> torch.Tensor:
    """[B, num_labels]: fused (video + title) [CLS], or the visual [CLS] alone."""
    frames = common.frames_of(model, batch)
    if not task_cfg.use_title:
        return model.classify(model(frames=frames).vision_tokens[:, 0])
    u = model(frames=frames, text_ids=batch["text_ids"], text_mask=batch["text_mask"])
    return model.classify(model.fuse(u.text_hidden, u.text_mask, u.vision_tokens).cls)


def _check_labels(label: torch.Tensor, n: int) -> None:
    if bool(((label < 0) | (label >= n)).any()):
        raise ValueError(f"labels {sorted(set(label.tolist()))} fall outside the model's {n} classes; set "
                         "model.overrides.num_labels to the size of the label vocabulary (data.sources[].labels)")


def loss(model, batch: dict, task_cfg: Config) -> dict[str, torch.Tensor]:
    logits = logits_of(model, batch, task_cfg)
    _check_labels(batch["label"], logits.shape[1])
    ce = F.cross_entropy(logits.float(), batch["label"], label_smoothing=task_cfg.label_smoothing)
    return {"loss": ce, "ce": ce}


@torch.no_grad()
def predict(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None) -> list[dict]:
    """One record per row: ``{"item", "label", "logits" [C] fp32(, "title")}``."""
    model.eval()
    records: list[dict] = []
    seen = 0
    for batch in batches:
        logits = logits_of(model, batch, task_cfg).float().cpu()
        n = len(logits)
        items = common.item_ids(batch, seen, n)
        seen += n
        titles = (common.decode_texts(tokenizer, batch["text_ids"]) if tokenizer is not None and "text_ids" in batch
                  else [None] * n)
        for i, lg, y, t in zip(items, logits, batch["label"].cpu().tolist(), titles):
            records.append({"item": i, "label": y, "logits": lg, "title": t})
    return records


def metrics_from(records: list[dict], task_cfg: Config, tokenizer=None):
    """top-k accuracies (%); predictions: label, prediction, top-k ids (names when ``label_names``), title."""
    if not records:
        raise ValueError("classification evaluation got no batches: the validation split is empty or every clip was bad")
    records = common.sort_records(records)
    logits = torch.stack([r["logits"] for r in records])                 # [N, C]
    label = torch.tensor([r["label"] for r in records])                  # [N]
    _check_labels(label, logits.shape[1])
    metrics = topk_accuracy(logits, label, ks=task_cfg.topk)
    metrics["num_samples"] = float(len(label))
    names = task_cfg.label_names
    name = (lambda i: names[i]) if names else (lambda i: i)
    k = min(max(task_cfg.topk), logits.shape[1])
    top = logits.topk(k, dim=1).indices
    rows = []
    for i, r in enumerate(records):
        row = {"label": name(int(label[i])), "prediction": name(int(top[i, 0])),
               "correct": int(top[i, 0]) == int(label[i]), f"top{k}": [name(j) for j in top[i].tolist()]}
        if r["title"] is not None:
            row["title"] = r["title"]
        rows.append(row)
    return metrics, rows


def evaluate(model, batches: Iterable[dict], task_cfg: Config, tokenizer=None):
    """top-k accuracies (%); predictions: label, prediction, top-k ids (names when ``label_names``), title."""
    return metrics_from(predict(model, batches, task_cfg, tokenizer), task_cfg, tokenizer)
