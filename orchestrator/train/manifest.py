"""Checkpoints and exports that are complete or invisible.

A checkpoint is ``<run_dir>/checkpoint_step_<N>/``: every rank uploads its own DeepSpeed files
there (Ray Train's ``report``).  Only after every rank's upload returned (a collective over the
ranks) does rank 0 write the completion marker :data:`META`, listing each file of every rank with
its size and SHA-256, the client state, the metrics and the run's config fingerprint.  Readers
(resume, "is this run finished") trust a checkpoint only when the marker is there and every file
it lists is in storage with that size (one listing, no body read); a resume also checks the hashes
of what it downloaded.  A checkpoint that fails either (a file missing or of another size, one
whose bytes differ from its hash, a marker that lists no files) is skipped with a warning and the
previous complete one is used, in the same attempt (``Checkpointer.resume``).

An export is ``<run_dir>/export/step_<N>/``; the pointer :data:`EXPORT_POINTER`
(``<run_dir>/export/LATEST.json``, naming that folder and its files' sizes) is written after the
upload, so a crash mid-upload leaves the previous export in force.  Readers of ``<run_dir>/export``
follow the pointer (:func:`resolve_export`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from orchestrator import storage
from orchestrator.errors import ConfigError
from orchestrator.mappings import flatten
from orchestrator.tracking.redact import redact

log = logging.getLogger(__name__)

META = "mplug2_checkpoint.json"
EXPORT_POINTER = "LATEST.json"
# checkpoint_step_<step>[_redo<k>]: k counts the times a restart fell back behind Ray Train's latest
# registered checkpoint (an incomplete one) and redid steps it had registered; see checkpoint_dir_name
CHECKPOINT_DIR = re.compile(r"checkpoint_step_(\d{8})(?:_redo(\d+))?$")
# config keys a rerun of a finished name may change: where it logs, how long/robustly it runs
RERUN_MAY_CHANGE = ("name", "tracking.", "train.max_steps", "train.max_failures", "train.keep_checkpoints")


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint whose marker is missing or does not match what is in storage."""


class FinishedWithOtherConfig(ConfigError):
    """A rerun of a finished run name with a different config."""


def _norm(uri: str) -> str:
    """The form :func:`storage.list_sizes` names things in: ``s3://...`` or an absolute local path."""
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.normpath(storage.local_path(uri))


def checkpoint_dir_name(step: int, redo: int = 0) -> str:
    """The folder of step ``step``'s checkpoint. Ray Train's registry keeps one entry per report and
    deletes the oldest by path: a name reported twice is deleted twice, and the second deletion ends
    the run (``Path not found``, a controller error). A restart that falls back behind the latest
    registered checkpoint therefore names what it redoes with ``redo`` (one more than the latest's),
    so no name is ever reported twice."""
    return f"checkpoint_step_{step:08d}" + (f"_redo{redo}" if redo else "")


def redo_of(checkpoint_path: str | None) -> int:
    """The ``redo`` count in a checkpoint folder's name (0 for none or a plain name)."""
    m = CHECKPOINT_DIR.search(str(checkpoint_path or "").rstrip("/"))
    return int(m.group(2) or 0) if m else 0


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(local_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``local_dir`` (before its upload)."""
    root = Path(local_dir)
    return {f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != META}


def merge_ranks(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One file list from every rank's; a path two ranks wrote differently keeps no size/hash
    (whichever upload came last is in storage), so it is listed but not checked."""
    out: dict[str, dict[str, Any]] = {}
    for files in per_rank:
        for rel, desc in files.items():
            if rel in out and out[rel] != desc:
                out[rel] = {"size": None, "sha256": None}
            else:
                out.setdefault(rel, desc)
    return out


def config_fingerprint(run: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(SHA-256 of the config a result depends on, its flattened and redacted values for messages)."""
    flat = {k: v for k, v in flatten(run).items() if not any(k == p or k.startswith(p) for p in RERUN_MAY_CHANGE)}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    return digest, {k: str(v) for k, v in redact(flat).items()}


def write_marker(ckpt_uri: str, files: dict[str, dict[str, Any]], client_state: dict[str, Any],
                 metrics: dict[str, float] | None, run: dict[str, Any] | None) -> None:
    """The completion marker: call once every rank's files are in storage (rank 0 only)."""
    digest, values = config_fingerprint(run) if run else (None, {})
    marker = {"complete": True, **client_state, "metrics": metrics or {}, "files": files,
              "config_digest": digest, "config": values}
    storage.write_text(storage.join(ckpt_uri, META), json.dumps(marker, default=float))


def read_marker(ckpt_uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(storage.join(ckpt_uri, META)))
    except FileNotFoundError:
        return None
    except Exception as e:  # a missing S3 key, a torn marker: not a complete checkpoint
        if storage.is_missing(e):
            return None
        if isinstance(e, ValueError):
            return {"complete": False, "error": f"unreadable marker ({e})"}
        raise


def problem(ckpt_uri: str, marker: dict[str, Any] | None, sizes: dict[str, int]) -> str | None:
    """Why ``ckpt_uri`` is not a complete checkpoint (None when it is). ``sizes``: the listing of
    storage under it (or a wider prefix), ``{uri: size}``."""
    if marker is None:
        return f"no {META} (not completely written)"
    if not marker.get("complete"):
        return marker.get("error") or "marker says incomplete"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "the marker lists no files (nothing to verify it against)"
    base = _norm(ckpt_uri) + "/"
    for rel, desc in files.items():
        have = sizes.get(base + rel)
        if have is None:
            return f"{rel} is missing"
        if desc.get("size") is not None and have != desc["size"]:
            return f"{rel} has {have} bytes, the marker lists {desc['size']}"
    return None


def verify_local(directory: str | os.PathLike, marker: dict[str, Any]) -> None:
    """Every file the marker lists is in ``directory`` with its size and hash (a resume's download);
    a marker that lists no files verifies nothing and is refused."""
    files = marker.get("files")
    if not marker.get("complete") or not isinstance(files, dict) or not files:
        raise IncompleteCheckpoint(f"{directory}: the marker lists no files (nothing to verify it against)")
    for rel, desc in files.items():
        if not isinstance(desc, dict):
            raise IncompleteCheckpoint(f"{directory}: the marker's entry for {rel!r} is not a size and hash")
        f = Path(directory, rel)
        if not f.is_file():
            raise IncompleteCheckpoint(f"{directory}: {rel} is missing")
        if desc.get("size") is not None and f.stat().st_size != desc["size"]:
            raise IncompleteCheckpoint(f"{directory}: {rel} has {f.stat().st_size} bytes, the marker lists "
                                       f"{desc['size']}")
        if desc.get("sha256") and sha256_file(f) != desc["sha256"]:
            raise IncompleteCheckpoint(f"{directory}: {rel} differs from the marker's SHA-256")


def checkpoints(run_dir: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """``([(step, uri)] newest first, the run folder's listing {uri: size})``."""
    base = _norm(run_dir) + "/"
    sizes = storage.list_sizes(base[:-1])
    found = set()
    for uri in sizes:
        if not uri.startswith(base):
            continue
        m = CHECKPOINT_DIR.match(uri[len(base):].split("/", 1)[0])
        if m:
            found.add((int(m.group(1)), int(m.group(2) or 0), base + m.group(0)))
    return [(step, uri) for step, _, uri in sorted(found, reverse=True)], sizes


def complete_checkpoints(run_dir: str, at_most_step: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(uri, marker)`` of every complete checkpoint in ``run_dir`` (at or before ``at_most_step``),
    newest first; each incomplete one met on the way is skipped with a warning."""
    found, sizes = checkpoints(run_dir)
    for step, uri in found:
        if at_most_step is not None and step > at_most_step:
            continue
        marker = read_marker(uri)
        why = problem(uri, marker, sizes)
        if why is None:
            yield uri, marker
        else:
            log.warning("skipping checkpoint %s: %s; using an earlier complete one", uri, why)


def latest_complete(run_dir: str, at_most_step: int | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(uri, marker)`` of the newest complete checkpoint in ``run_dir`` (at or before
    ``at_most_step``); every newer one that is incomplete is skipped with a warning."""
    return next(complete_checkpoints(run_dir, at_most_step), None)


def check_same_config(marker: dict[str, Any], run: dict[str, Any], run_dir: str) -> None:
    """Raise :class:`FinishedWithOtherConfig` when ``run`` is not the config ``marker`` was trained with."""
    if not marker.get("config_digest"):
        return  # written before markers carried the config
    digest, values = config_fingerprint(run)
    if digest == marker["config_digest"]:
        return
    old = marker.get("config") or {}
    differ = sorted(k for k in set(old) | set(values) if old.get(k) != values.get(k))
    shown = "; ".join(f"{k}: {old.get(k, '(unset)')} -> {values.get(k, '(unset)')}" for k in differ[:8])
    raise FinishedWithOtherConfig(
        f"run {run_dir} already finished with another config ({len(differ)} setting(s) differ: {shown or 'secret values'}"
        f"{'; ...' if len(differ) > 8 else ''}). Choose a new name (name=...) to train this config, or rerun with "
        "the finished config to get its result")


# ---------------------------------------------------------------------------------------------
# Exports: one folder per step, and a pointer written last
# ---------------------------------------------------------------------------------------------

def export_version_uri(export_uri: str, step: int) -> str:
    return storage.join(export_uri, f"step_{step:08d}")


def publish_export(local_dir: str | os.PathLike, export_uri: str, step: int, fence=None) -> str:
    """Upload an export to its step's folder, then point ``export_uri`` at it; returns the folder.
    ``fence`` (the run's ``lease.LeaseFence``) is checked again before the pointer is written: a run
    that lost its lease during the upload never makes its export the one in force."""
    target = export_version_uri(export_uri, step)
    storage.upload_dir(local_dir, target)
    files = {rel: d["size"] for rel, d in describe_files(local_dir).items()}
    if fence is not None:
        fence.check()
    storage.write_text(storage.join(export_uri, EXPORT_POINTER),
                       json.dumps({"step": step, "path": target.rstrip("/").rsplit("/", 1)[-1], "files": files}))
    return target


def resolve_export(export_uri: str) -> str | None:
    """The folder of the export ``export_uri`` points at (``export_uri`` itself for an export of
    another layout: a plain folder with ``model.safetensors``), or None when there is no complete one."""
    try:
        pointer = json.loads(storage.read_text(storage.join(export_uri, EXPORT_POINTER)))
    except Exception:  # no pointer: a plain export folder, or nothing
        return export_uri if storage.exists(storage.join(export_uri, "model.safetensors")) else None
    target = storage.join(export_uri, str(pointer.get("path", "")))
    if not pointer.get("path") or "/" in str(pointer["path"]) or str(pointer["path"]).startswith("."):
        log.warning("export pointer %s names no folder of its own: ignored", export_uri)
        return None
    sizes = storage.list_sizes(target)
    base = _norm(target) + "/"
    for rel, size in (pointer.get("files") or {}).items():
        if sizes.get(base + rel) != size:
            log.warning("export %s: %s missing or of another size than its pointer lists", target, rel)
            return None
    return target
