"""Checkpoints: DeepSpeed shards per rank, the consolidated export, and loading weights for a
downstream start (``--init-from URI`` or ``--init-from mlflow:<run_id>``)."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator import storage

log = logging.getLogger(__name__)

TAG = "ds"                       # DeepSpeed tag directory inside each checkpoint
META = "mplug2_checkpoint.json"  # written by rank 0 after every rank saved: marks a complete checkpoint
EXPORT_FILES = ("config.json", "model.safetensors")


def save(engine, directory: str, client_state: dict[str, Any], rank: int,
         metrics: dict[str, float] | None = None) -> None:
    """Every rank saves its DeepSpeed shard into ``directory``; rank 0 then writes the marker
    (the client state and the metrics reported with this checkpoint)."""
    engine.save_checkpoint(directory, tag=TAG, client_state=client_state)
    if rank == 0:
        Path(directory, META).write_text(json.dumps({"complete": True, **client_state, "metrics": metrics or {}},
                                                   default=float))


def finished_run(run_dir: str, max_steps: int) -> tuple[str, dict[str, Any]] | None:
    """``(checkpoint URI, its marker)`` when the run in ``run_dir`` already reached ``max_steps``
    and exported its model, else None: a rerun of a finished name then needs no workers at all."""
    if not storage.exists(storage.join(run_dir, "export", "model.safetensors")):
        return None
    markers = [u for u in storage.list_files(run_dir) if u.endswith("/" + META) and "/checkpoint_step_" in u]
    if not markers:
        return None
    last = max(markers)  # the step in the directory name is zero-padded: key order is step order
    meta = json.loads(storage.read_text(last))
    if int(meta.get("step", -1)) < max_steps:
        return None
    return last[: -len(META) - 1], meta


def load(engine, directory: str) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and return the saved client state."""
    if not Path(directory, META).is_file():
        raise RuntimeError(f"checkpoint {directory} has no {META}: it was not completely written")
    _, client_state = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    return client_state


def export(engine, zero_stage: int, out_dir: str, rank: int) -> bool:
    """Write the consolidated model (``model/`` save format) on rank 0; every rank must call."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _save_module(module, out_dir) if rank == 0 else False
    return _save_module(module, out_dir) if rank == 0 else False


def _save_module(module: torch.nn.Module, out_dir: str) -> bool:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(out_dir)
    else:
        from safetensors.torch import save_file  # noqa: PLC0415

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        Path(out_dir, "config.json").write_text(json.dumps({"class": type(module).__name__}))
    return True


def _fetch(uri: str, tmp: str) -> str:
    if storage.is_s3(uri):
        if storage.download_dir(uri, tmp) == 0:
            raise FileNotFoundError(f"nothing found under {uri}")
        return tmp
    path = storage.local_path(uri)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {uri}")
    return path


def state_dict_from(uri: str) -> dict[str, torch.Tensor]:
    """A full fp32 state dict from an exported model or a DeepSpeed (ZeRO 0-3) checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _fetch(uri, tmp)
        if Path(path, "model.safetensors").is_file():
            from safetensors.torch import load_file  # noqa: PLC0415

            return load_file(os.path.join(path, "model.safetensors"))
        tag_dir = Path(path, TAG)
        if tag_dir.is_dir():
            zero_files = list(tag_dir.glob("*optim_states.pt"))
            if zero_files and any("zero" in f.name for f in zero_files):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

                return get_fp32_state_dict_from_zero_checkpoint(path, tag=TAG)
            states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if states:
                return torch.load(states[0], map_location="cpu", weights_only=False)["module"]
        raise ValueError(f"{uri}: neither an exported model ({', '.join(EXPORT_FILES)}) nor a DeepSpeed "
                         f"checkpoint (a '{TAG}/' directory)")


def load_weights(model: torch.nn.Module, uri: str) -> dict[str, list[str]]:
    """Load pre-trained weights non-strictly; returns the missing and unexpected key names."""
    sd = state_dict_from(uri)
    own = model.state_dict()
    shape_mismatch = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    sd = {k: v for k, v in sd.items() if k not in shape_mismatch}
    result = model.load_state_dict(sd, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
              "shape_mismatch": shape_mismatch}
    log.info("init-from %s: %d tensors loaded, %d missing, %d unexpected, %d shape mismatches", uri,
             len(sd) - len(report["unexpected"]), len(report["missing"]), len(report["unexpected"]), len(shape_mismatch))
    return report


def resolve_init_from(spec: str | None, tracking_uri: str | None) -> tuple[str | None, str | None]:
    """``mlflow:<run_id>`` -> (that run's exported model URI, run_id); a URI -> (URI, None)."""
    if not spec:
        return None, None
    if not spec.startswith("mlflow:"):
        return spec, None
    run_id = spec[len("mlflow:"):]
    from orchestrator.tracking.mlflow_run import client  # noqa: PLC0415

    try:
        run = client(tracking_uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--init-from {spec}: no such MLflow run at {tracking_uri} ({type(e).__name__})") from None
    tags = run.data.tags
    uri = tags.get("mplug2.export_uri") or tags.get("mplug2.checkpoint_uri")
    if not uri:
        raise ValueError(f"--init-from {spec}: the run has no exported model or checkpoint recorded "
                         "(tags mplug2.export_uri / mplug2.checkpoint_uri); did it finish?")
    return uri, run_id
