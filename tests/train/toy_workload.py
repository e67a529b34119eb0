"""A small real workload for testing the train loop apart from the mPLUG-2 model: predict which
half of the frame is brighter (label) from uint8 frames.  Learnable in a few steps."""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

TASK = "toy"
COLUMNS = ("frames", "label")
USES_MODEL_CONFIG = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 16


class ToyNet(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(2 * 3, hidden)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float() / 255.0                     # [B, T, H, W, 3]
        w = x.shape[3] // 2
        halves = torch.cat([x[:, :, :, :w].mean((1, 2, 3)), x[:, :, :, w:].mean((1, 2, 3))], -1)  # [B, 6]
        return self.head(torch.relu(self.proj(halves)))


def build_model(model_cfg, task_cfg: Config, **_):
    return ToyNet(task_cfg.hidden)


def loss(model, batch, task_cfg):
    logits = model(batch["frames"])
    ce = torch.nn.functional.cross_entropy(logits, batch["label"])
    acc = (logits.argmax(-1) == batch["label"]).float().mean()
    return {"loss": ce, "acc": acc}


def evaluate(model, batches, task_cfg, tokenizer=None):
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            correct += int((model(b["frames"]).argmax(-1) == b["label"]).sum())
            total += len(b["label"])
    return {"accuracy": correct / max(total, 1)}


def make_rows(n: int, seed: int = 0, t: int = 2, size: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        f = rng.integers(0, 100, size=(t, size, size, 3), dtype=np.uint8)
        f[:, :, (size // 2 if label else 0):(size if label else size // 2)] += 100
        rows.append({"frames": f, "label": np.int64(label)})
    return rows
