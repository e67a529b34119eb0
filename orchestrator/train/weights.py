"""Weights from elsewhere, for a downstream start (``--init-from URI`` or ``--init-from
mlflow:<run_id>``) and for evaluating a checkpoint: an exported model or a DeepSpeed checkpoint
read without unpickling anything but tensors, fitted to the model (position embeddings
interpolated, the vocabulary checked, momentum copies filled), and the MLflow run id resolved to
the URI it exported."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from orchestrator import storage
from orchestrator.tracking.mlflow_run import client
from orchestrator.tracking.redact import redact_text
from orchestrator.train import manifest
from orchestrator.train.checkpoint import EXPORT_FILES, TAG

log = logging.getLogger(__name__)


def _fetch(uri: str, tmp: str) -> str:
    uri = manifest.resolve_export(uri) or uri  # a run's export/: the version its pointer names
    if storage.is_s3(uri):
        if storage.download_dir(uri, tmp) == 0:  # refuses keys that would leave tmp
            raise FileNotFoundError(f"nothing found under {uri}")
        return tmp
    path = storage.local_path(uri)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {uri}")
    return path


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that would need unpickling arbitrary objects to load."""


def _safe_globals() -> list:
    """The few DeepSpeed classes its checkpoint files hold besides tensors and containers: plain
    records, rebuilt by the weights-only unpickler from their fields (no code of the file's choosing)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location="cpu", **kwargs):
    """``torch.load`` with ``weights_only=True`` whatever the caller asked for: a file that needs
    any other global (a pickle that would run code) raises :class:`UnsafeCheckpoint`."""
    import pickle

    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            first = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln), str(e)[:200])
            raise UnsafeCheckpoint(f"{path}: refused to unpickle ({first}). --init-from loads weights without "
                                   "running code from the checkpoint; start from an exported model "
                                   "(model.safetensors) instead") from None


class _WeightsOnlyTorch:
    """Stands in for the ``torch`` module inside DeepSpeed's zero_to_fp32, whose loaders call
    ``torch.load(..., weights_only=False)``: every load goes through :func:`safe_torch_load`."""

    def __getattr__(self, name):
        return safe_torch_load if name == "load" else getattr(torch, name)


def _zero_to_fp32(path: str) -> dict[str, torch.Tensor]:
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    with mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(path, tag=TAG)


def _read_state_dict(path: str, uri: str) -> dict[str, torch.Tensor]:
    """Weights only: safetensors, or DeepSpeed files through the weights-only unpickler."""
    if Path(path, "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(os.path.join(path, "model.safetensors"))
    tag_dir = Path(path, TAG)
    if tag_dir.is_dir():
        zero_files = list(tag_dir.glob("*optim_states.pt"))
        if zero_files and any("zero" in f.name for f in zero_files):
            return _zero_to_fp32(path)
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if states:
            return safe_torch_load(states[0])["module"]
    raise ValueError(f"{uri}: neither an exported model ({', '.join(EXPORT_FILES)}) nor a DeepSpeed "
                     f"checkpoint (a '{TAG}/' directory)")


def _read_vocab(path: str) -> dict[str, int] | None:
    """The token -> id map the exported model was trained with (``vocab.json``), if recorded."""
    f = Path(path, VOCAB_FILE)
    if not f.is_file():
        return None
    vocab = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{f}: not a token -> id mapping")
    return vocab


def state_dict_from(uri: str) -> dict[str, torch.Tensor]:
    """A full fp32 state dict from an exported model or a DeepSpeed (ZeRO 0-3) checkpoint; nothing
    is unpickled beyond tensors and plain containers (see :func:`safe_torch_load`)."""
    return _read_checkpoint(uri)[0]


def _read_checkpoint(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    with tempfile.TemporaryDirectory() as tmp:
        path = _fetch(uri, tmp)
        return _read_state_dict(path, uri), _read_vocab(path)


VOCAB_FILE = "vocab.json"  # beside an export: the tokenizer's token -> id map
MOMENTUM_PREFIX = "momentum.encoders."  # model/momentum.py: a copy of each online encoder under this prefix


class InitMismatch(ValueError):
    """``--init-from`` weights that do not fit the model (shapes) or its tokenizer (vocabulary)."""


def write_vocab(tokenizer, export_uri: str) -> None:
    """Record the tokenizer's vocabulary beside an exported model (checked by :func:`load_weights`)."""
    storage.write_text(storage.join(export_uri, VOCAB_FILE), json.dumps(tokenizer.get_vocab(), ensure_ascii=False))


def interpolate_pos_embed(pos: torch.Tensor, new_len: int) -> torch.Tensor | None:
    """ViT position embeddings ``[1 + g*g, C]`` -> ``[new_len, C]``: the [CLS] row kept, the patch
    grid resized bicubically (as CLIP fine-tuning at another image size does); None if not square grids."""
    import math

    import torch.nn.functional as F

    if pos.dim() != 2:
        return None
    g_old, g_new = math.isqrt(pos.shape[0] - 1), math.isqrt(new_len - 1)
    if g_old * g_old != pos.shape[0] - 1 or g_new * g_new != new_len - 1 or g_old == 0 or g_new == 0:
        return None
    c = pos.shape[1]
    grid = pos[1:].float().reshape(1, g_old, g_old, c).permute(0, 3, 1, 2)          # [1, C, g, g]
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(g_new * g_new, c)                      # [g'*g', C]
    return torch.cat([pos[:1].float(), grid], dim=0).to(pos.dtype)                  # [1 + g'*g', C]


def _check_vocab(ckpt_vocab: dict[str, int] | None, tokenizer, uri: str, allow_new_vocab: bool) -> None:
    if tokenizer is None or ckpt_vocab is None:
        if tokenizer is not None:
            log.warning("init-from %s: no %s beside the weights; the vocabulary is checked by embedding "
                        "size only", uri, VOCAB_FILE)
        return
    ours = tokenizer.get_vocab()
    if ours == ckpt_vocab:
        return
    by_id_ours = {i: t for t, i in ours.items()}
    by_id_ckpt = {i: t for t, i in ckpt_vocab.items()}
    differ = sorted(i for i in set(by_id_ours) | set(by_id_ckpt) if by_id_ours.get(i) != by_id_ckpt.get(i))
    examples = ", ".join(f"id {i}: {by_id_ckpt.get(i)!r} in the checkpoint vs {by_id_ours.get(i)!r}" for i in differ[:5])
    msg = (f"init-from {uri}: the checkpoint was trained with another vocabulary ({len(ckpt_vocab)} tokens) than "
           f"data.tokenizer ({len(ours)} tokens); {len(differ)} ids differ ({examples})")
    if not allow_new_vocab:
        raise InitMismatch(msg + ". Use the pre-train's tokenizer, or set train.init_allow_new_vocab=true (and "
                           "list the embedding keys in train.init_allow_mismatch if their sizes differ) to "
                           "fine-tune on a new vocabulary")
    log.warning("%s; allowed by train.init_allow_new_vocab", msg)


def load_weights(model: torch.nn.Module, uri: str, allow_mismatch: list[str] | tuple[str, ...] = (),
                 tokenizer=None, allow_new_vocab: bool = False) -> dict[str, list[str]]:
    """Load pre-trained weights into ``model``; returns the report of what happened to each key.

    - ViT position embeddings of another image size are interpolated (bicubic) to the model's grid.
    - Any other tensor whose shape differs raises :class:`InitMismatch` listing every such key with
      both shapes, unless a glob in ``allow_mismatch`` (``train.init_allow_mismatch``) matches it:
      then it keeps its fresh initialisation, and says so.
    - ``tokenizer``: the run's tokenizer, checked against the vocabulary recorded with an export.
    - Momentum copies the checkpoint lacks start equal to their online encoder (as after ``MPlug2``
      construction), not at an unrelated fresh init.
    Keys the model has and the checkpoint lacks (new task heads) stay freshly initialised.
    The report: ``missing``, ``unexpected``, ``shape_mismatch`` (the allowed ones), and when any,
    ``interpolated`` and ``momentum_copied``.
    """
    from fnmatch import fnmatchcase

    sd, ckpt_vocab = _read_checkpoint(uri)
    own = model.state_dict()
    interpolated = []
    for k, v in list(sd.items()):
        if k in own and own[k].shape != v.shape and k.endswith("vision.position_embedding.weight"):
            new = interpolate_pos_embed(v, own[k].shape[0])
            if new is not None and new.shape == own[k].shape:
                log.info("init-from: %s interpolated (bicubic) from %s to %s", k, tuple(v.shape), tuple(new.shape))
                sd[k] = new
                interpolated.append(k)
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and own[k].shape != v.shape}
    allowed = sorted(k for k in mismatched if any(fnmatchcase(k, p) for p in allow_mismatch))
    refused = sorted(set(mismatched) - set(allowed))
    if refused:
        lines = "\n  ".join(f"{k}: {mismatched[k][0]} in the checkpoint, {mismatched[k][1]} in the model"
                            for k in refused)
        raise InitMismatch(f"init-from {uri}: {len(refused)} tensor(s) do not fit the model:\n  {lines}\n"
                           "Fix the model config (model.preset / model.overrides / data.tokenizer) to match the "
                           "checkpoint, or list these keys (globs) in train.init_allow_mismatch to start them fresh")
    _check_vocab(ckpt_vocab, tokenizer, uri, allow_new_vocab)
    for k in allowed:
        log.warning("init-from: %s left freshly initialised (checkpoint %s, model %s; allowed by "
                    "train.init_allow_mismatch)", k, mismatched[k][0], mismatched[k][1])
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    result = model.load_state_dict(sd, strict=False)
    momentum_copied = _fill_momentum_copies(model, list(result.missing_keys))
    missing = [k for k in result.missing_keys if k not in set(momentum_copied)]
    report = {"missing": missing, "unexpected": list(result.unexpected_keys), "shape_mismatch": allowed}
    report.update({k: v for k, v in (("interpolated", interpolated), ("momentum_copied", momentum_copied)) if v})
    log.info("init-from %s: %d tensors loaded, %d missing, %d unexpected, %d allowed shape mismatches, "
             "%d interpolated, %d momentum copies from their online encoder", uri,
             len(sd) - len(result.unexpected_keys), len(missing), len(result.unexpected_keys), len(allowed),
             len(interpolated), len(momentum_copied))
    return report


@torch.no_grad()
def _fill_momentum_copies(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """Momentum copies absent from the checkpoint take their online encoder's (loaded) value."""
    state = model.state_dict()
    copied = []
    for k in missing:
        online = k[len(MOMENTUM_PREFIX):] if k.startswith(MOMENTUM_PREFIX) else None
        if online in state and state[online].shape == state[k].shape:
            state[k].copy_(state[online])
            copied.append(k)
    return copied


def resolve_init_from(spec: str | None, tracking_uri: str | None) -> tuple[str | None, str | None]:
    """``mlflow:<run_id>`` -> (that run's exported model URI, run_id); a URI -> (URI, None)."""
    if not spec:
        return None, None
    if not spec.startswith("mlflow:"):
        return spec, None
    run_id = spec[len("mlflow:"):]

    try:
        run = client(tracking_uri).get_run(run_id)
    except Exception as e:

        raise ValueError(f"--init-from {spec}: no such MLflow run at {redact_text(str(tracking_uri))} "
                         f"({type(e).__name__})") from None
    tags = run.data.tags
    uri = tags.get("mplug2.export_uri") or tags.get("mplug2.checkpoint_uri")
    if not uri:
        raise ValueError(f"--init-from {spec}: the run has no exported model or checkpoint recorded "
                         "(tags mplug2.export_uri / mplug2.checkpoint_uri); did it finish?")
    return uri, run_id
