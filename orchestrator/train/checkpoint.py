"""Checkpoints: DeepSpeed shards per rank, the consolidated export, and loading weights for a
downstream start (``--init-from URI`` or ``--init-from mlflow:<run_id>``)."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from orchestrator import storage
from orchestrator.tracking.mlflow_run import client
from orchestrator.tracking.redact import redact_text
from orchestrator.train import manifest

log = logging.getLogger(__name__)

TAG = "ds"                       # DeepSpeed tag directory inside each checkpoint
META = manifest.META  # written by rank 0 after every rank's upload: marks a complete checkpoint (manifest.py)
EXPORT_FILES = ("config.json", "model.safetensors")


def save(engine, directory: str, client_state: dict[str, Any], rank: int,
         metrics: dict[str, float] | None = None) -> None:
    """Every rank saves its DeepSpeed shard into its local ``directory`` (uploaded by Ray Train's
    ``report``); the completion marker comes later, from :func:`commit`, once every rank's upload is done."""
    engine.save_checkpoint(directory, tag=TAG, client_state=client_state)


def commit(files: dict[str, dict[str, Any]], ckpt_uri: str, client_state: dict[str, Any],
           metrics: dict[str, float] | None, run: dict[str, Any] | None, rank: int, world: int) -> None:
    """After ``report`` returned on this rank (its files are in storage): gather every rank's file
    list (a collective, so rank 0 passes it only once every rank's upload is done) and write the
    marker on rank 0, listing each file with its size and hash."""
    per_rank = [files]
    if world > 1:
        import torch.distributed as dist

        per_rank = [None] * world
        dist.all_gather_object(per_rank, files)
    if rank == 0:
        manifest.write_marker(ckpt_uri, manifest.merge_ranks(per_rank), client_state, metrics, run)
    if world > 1:
        dist.barrier()  # when commit returns on any rank, the marker is there


def finished_run(run_dir: str, max_steps: int, run: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(checkpoint URI, its marker)`` when the run in ``run_dir`` already reached ``max_steps``
    and exported its model, else None: a rerun of a finished name then needs no workers at all.
    Only a complete checkpoint (its marker matches storage) and a complete export count; ``run``
    (the rerun's config) must be the one the run finished with, else
    :class:`~orchestrator.train.manifest.FinishedWithOtherConfig`."""
    if manifest.resolve_export(storage.join(run_dir, "export")) is None:
        return None
    found = manifest.latest_complete(run_dir)
    if found is None:
        return None
    last, meta = found
    if int(meta.get("step", -1)) < max_steps:
        return None
    if run is not None:
        manifest.check_same_config(meta, run, run_dir)
    return last, meta


def resume_point(ckpt, run_dir: str | None):
    """The checkpoint to resume from: Ray Train's latest if it is complete, else the newest complete
    one before it (skipped ones are named in a warning), else None (start over, said loudly)."""
    point = next(resume_points(ckpt, run_dir), None)
    if point is None and ckpt is not None and run_dir:
        log.error("no complete checkpoint in %s (the latest, %s, is not): starting from step 0", run_dir, ckpt.path)
    return point


def resume_points(ckpt, run_dir: str | None) -> Iterator[Any]:
    """Every checkpoint a resume may try, best first: Ray Train's latest ``ckpt`` if it is complete
    (listing: every file of its marker there, with its size), then each older complete one.  The
    caller moves to the next when the download fails its hashes (``recovery.resume``)."""
    if ckpt is None:
        return
    if not run_dir:
        yield ckpt
        return
    check_own(ckpt.path, run_dir)
    m = manifest.CHECKPOINT_DIR.search(ckpt.path.rstrip("/"))
    step = int(m.group(1)) if m else None
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    for uri, _ in manifest.complete_checkpoints(run_dir, at_most_step=step):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if ckpt.path.rstrip("/").endswith("/" + name):
            yield ckpt
            continue
        import ray.train

        yield ray.train.Checkpoint(path=parent + "/" + name, filesystem=ckpt.filesystem)


def redo_count(latest, point) -> int:
    """The redo count of this attempt's checkpoint names (``manifest.checkpoint_dir_name``): the
    latest registered one's, plus one when the resume fell back behind it (``point`` is not Ray's
    ``latest``), since the steps redone up to it would be reported under names Ray registered."""
    if latest is None:
        return 0
    return manifest.redo_of(latest.path) + (point is not latest)


def check_own(checkpoint_path: str, run_dir: str | None) -> None:
    """A resume reads only checkpoints inside the run's own folder (``<storage>/<experiment>/<name>/``)."""
    if not run_dir:
        return
    own = (storage.split_s3(run_dir)[0] + "/" + storage.split_s3(run_dir)[1] if storage.is_s3(run_dir)
           else storage.local_path(run_dir)).rstrip("/") + "/"
    path = os.path.normpath(str(checkpoint_path)) + "/"
    if not path.startswith(own):
        raise RuntimeError(f"refusing to resume from {checkpoint_path}: not inside this run's folder {run_dir}")


def verify(directory: str) -> str | None:
    """Why the downloaded checkpoint in ``directory`` cannot be trusted (no marker, a marker without
    a file list, a file missing, of another size or whose bytes differ from its SHA-256), or None."""
    try:
        marker = json.loads(Path(directory, META).read_text())
    except FileNotFoundError:
        return f"checkpoint {directory} has no {META}: it was not completely written"
    except (ValueError, OSError) as e:
        return f"checkpoint {directory}: unreadable {META} ({e})"
    try:
        manifest.verify_local(directory, marker)
    except manifest.IncompleteCheckpoint as e:
        return str(e)
    return None


def load(engine, directory: str, verified: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and return the saved client state
    (``verified``: :func:`verify` already passed on this directory).

    Resuming trusts the run's own storage: DeepSpeed's loader unpickles (``weights_only=False``) the
    files that Ray Train restores from this run's folder, which only this run writes (the loop calls
    :func:`check_own` first). Whoever can write under the checkpoint prefix can run code in the
    training workers, so only the trainers' identity may write there (cluster/README.md, Security).
    Starting from anyone else's weights goes through :func:`load_weights`, which never unpickles.
    """
    if not verified:
        why = verify(directory)
        if why is not None:
            raise manifest.IncompleteCheckpoint(why)
    _, client_state = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    return client_state


def export(engine, zero_stage: int, out_dir: str, rank: int) -> bool:
    """Write the consolidated model (``model/`` save format) on rank 0; every rank must call."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _save_module(module, out_dir) if rank == 0 else False
    return _save_module(module, out_dir) if rank == 0 else False


def _save_module(module: torch.nn.Module, out_dir: str) -> bool:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(out_dir)
    else:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        Path(out_dir, "config.json").write_text(json.dumps({"class": type(module).__name__}))
    return True


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
