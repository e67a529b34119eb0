"""Save / load the whole model with its config: ``config.json`` + ``model.safetensors``.

Independent of DeepSpeed: a DeepSpeed checkpoint is converted by the orchestrator into a plain
state dict first. Loading for a task builds only that task's modules; weights of other modules
are ignored and listed on ``model.load_report``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from .config import MPlugConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "mplug2"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)      # model keys filled from a checkpoint
    missing: list[str] = field(default_factory=list)     # model keys left at their fresh init
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for
    mismatched: list[str] = field(default_factory=list)  # same name, different shape (kept fresh)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"mismatched {len(self.mismatched)}")


def save_pretrained(model, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "task": model.task, "config": model.config.to_dict()}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt", "task": model.task})


def read_config(directory: str) -> tuple[MPlugConfig, str]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by MPlug2.save_pretrained")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an MPlug2 config (format={meta.get('format')!r}); "
                         "to start from Hugging Face CLIP/BERT weights use MPlug2.from_hf")
    return MPlugConfig.from_dict(meta["config"]), meta["task"]


def load_state_into(model, state: dict[str, torch.Tensor], report: LoadReport) -> LoadReport:
    own = model.state_dict()
    usable = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            usable[k] = v
    model.load_state_dict(usable, strict=False)
    report.loaded.extend(sorted(usable))
    report.missing.extend(sorted(set(own) - set(usable)))
    return report


def load_pretrained(cls, directory: str, task: str | None = None, **overrides):
    cfg, saved_task = read_config(directory)
    if overrides:
        cfg = MPlugConfig.from_dict({**cfg.to_dict(), **overrides})
    model = cls(cfg, task or saved_task)
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    model.load_report = load_state_into(model, state, LoadReport())
    if any(k.startswith("momentum.encoders.") for k in model.load_report.missing):
        model.momentum_reset()  # no momentum weights in the checkpoint: start them from the online ones
    return model
