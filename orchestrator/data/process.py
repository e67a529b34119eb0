"""The Ray Data batch function: read bytes, decode and sample frames, augment, tokenize.

Runs inside Ray Data tasks (``map_batches``), so everything it needs arrives in :class:`ProcessParams`
(no driver globals).  A bad clip is dropped from the batch, counted by reason in the run's
:class:`~orchestrator.data.quality.BadClipTracker`, and the job stops with
:class:`~orchestrator.data.quality.TooManyBadClips` once the run's bad fraction passes the limit.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from orchestrator.data import augment, quality
from orchestrator.data.decode import DecodeSpec, decode_media, read_media
from orchestrator.data.grouping import GROUP_KEY, group_id
from orchestrator.data.ids import seed_part
from orchestrator.data.quality import BadClip
from orchestrator.data.sampling import sample_indices
from orchestrator.data.tokenize import encode, load_tokenizer

log = logging.getLogger(__name__)

# The columns of a dataset row before decoding (no None values, so Arrow types stay fixed).
EMPTY_ROW = {"media_uri": "", "media_bytes": b"", "bad": "", "start": math.nan, "end": math.nan, "text": "",
             "text_b": "", "answer": "", "label": -1, "clip_index": -1, "id": "", "modality": "text"}


@dataclass(frozen=True)
class ProcessParams:
    columns: tuple[str, ...]
    decode: DecodeSpec
    frames_out: int  # T of the output (images are repeated to it when videos are mixed in)
    image_size: int
    training: bool
    scale_min: float
    hflip: bool
    tokenizer: str
    max_text_len: int
    max_answer_len: int
    seed: int
    run_name: str | None
    max_bad_fraction: float
    bad_check_min_seen: int
    decode_timeout_s: float = 60.0
    read_timeout_s: float = 300.0  # reading one clip's bytes longer than this: bad (read_error)
    max_object_bytes: int | None = None  # a larger clip/image is bad (too_large), never read whole
    epoch: int | None = None  # training rows without an epoch column are seeded as this epoch (None: fresh)
    root: str = ""  # data.root: frames and crops are seeded by paths relative to it (ids.seed_part)
    eval_transform: str = "resize"  # data.eval_transform: augment.EVAL_TRANSFORMS
    group_pattern: str | None = None  # data.group_pattern: the GROUP_KEY column (grouping.group_id)


def to_dataset_row(row: dict) -> dict:
    """A source row (``sources.base.ROW_KEYS``) as a fixed-type dataset row."""
    out = dict(EMPTY_ROW)
    for k in ("media_uri", "text", "text_b", "answer", "id", "modality"):
        if row.get(k) is not None:
            out[k] = str(row[k])
    for k in ("start", "end"):
        if row.get(k) is not None:
            out[k] = float(row[k])
    for k in ("label", "clip_index"):
        if row.get(k) is not None:
            out[k] = int(row[k])
    if row.get("media_bytes") is not None:
        out["media_bytes"] = bytes(row["media_bytes"])
    if row.get("bad"):
        out["bad"] = str(row["bad"])
    return out


def _rng(params: ProcessParams, key: str, epoch: int | None = None) -> np.random.Generator:
    """Evaluation: the same frames every time.  Training: seeded by (seed, epoch, clip) when the
    row carries its epoch (the train loop's datasets) or the dataset names one (``params.epoch``:
    the train loop's cached datasets, decoded once), else fresh randomness every pass."""
    base = [params.seed, zlib.crc32(key.encode())]
    if epoch is None:
        epoch = params.epoch
    if params.training and epoch is None:
        return np.random.default_rng(np.random.SeedSequence(entropy=None, spawn_key=tuple(base)))
    return np.random.default_rng(base if epoch is None else [params.seed, int(epoch), base[1]])


def _fetch(uri: str, inline: bytes, max_bytes: int | None = None) -> bytes:
    """The clip's bytes: those its row carries (a shard member, read with its shard), else one read
    of its object.  A shard member never sends the reader back to its shard: a member without bytes
    is bad here (the shard reader already counts empty members, ``wds.read_shard_rows``)."""
    if inline:
        return inline
    if "#" in uri and uri.split("#", 1)[0].endswith(".tar"):
        raise BadClip("empty", uri, "no bytes came with this shard member")
    return read_media(uri, max_bytes)


class _Runner:
    """One long-lived daemon thread that runs calls handed to it, one at a time: a clip's decode
    runs here instead of in a thread started and joined per call.  A call that overruns its
    deadline leaves its runner behind (:func:`with_timeout` starts a fresh one); the runner ends
    once that call returns."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child inherits this object but not its thread
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="decode-runner")
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:  # abandoned after a timeout: end once the stuck call returned
                return
            fn, args, box, done = job
            try:
                box["out"] = fn(*args)
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e
            done.set()
            del job, fn, args, box, done  # nothing of a finished call is kept alive while idle


_runners = threading.local()  # each calling thread its own runner (concurrent decode actors' calls)


def with_timeout(seconds: float, uri: str, fn, *args, reason: str = "undecodable", what: str = "decoding",
                 setting: str = "data.decode_timeout_s"):
    """Run ``fn(*args)`` on this thread's runner thread; past ``seconds`` the clip is bad (``reason``)
    and the runner is abandoned, still busy, for a fresh one (decord and storage reads release the
    GIL, so one pathological file or a stalled read cannot stall the batch)."""
    runner = getattr(_runners, "runner", None)
    if runner is None or runner.pid != os.getpid():
        runner = _runners.runner = _Runner()
    box: dict = {}
    done = threading.Event()
    runner.jobs.put((fn, args, box, done))
    if not done.wait(seconds):
        _runners.runner = None  # stuck in this call: the next one gets a fresh thread
        runner.jobs.put(None)
        raise BadClip(reason, uri, f"{what} took longer than {seconds}s ({setting})")
    if "err" in box:
        raise box["err"]
    return box["out"]


def _frames(i: int, batch: dict, params: ProcessParams) -> np.ndarray:
    """uint8 [frames_out, S, S, 3] for row ``i``, or BadClip."""
    uri = str(batch["media_uri"][i])
    if batch["bad"][i]:
        raise BadClip(str(batch["bad"][i]), uri)
    # a shard member's bytes came with its shard: nothing to read, nothing to wait for
    data = bytes(batch["media_bytes"][i]) or with_timeout(
        params.read_timeout_s, uri, _fetch, uri, b"", params.max_object_bytes, reason="read_error", what="reading",
        setting="data.read_timeout_s")
    start, end = float(batch["start"][i]), float(batch["end"][i])
    rng = _rng(params, f"{seed_part(uri, params.root)}|{batch['id'][i]}", int(batch["epoch"][i]) if "epoch" in batch else None)
    dec = with_timeout(params.decode_timeout_s, uri, decode_media, data, uri, params.decode, rng,
                       str(batch["modality"][i]), None if math.isnan(start) else start, None if math.isnan(end) else end)
    if params.training:
        frames = augment.train_transform(dec.frames, params.image_size, params.scale_min, params.hflip, rng)
    else:
        frames = augment.eval_transform(dec.frames, params.image_size, params.eval_transform)
    if frames.shape[0] != params.frames_out:  # an image among videos: repeat it
        frames = np.repeat(frames[:1], params.frames_out, axis=0)
    return frames


def _stopping(error: Exception) -> None:
    """Re-raise the ``KeyboardInterrupt`` / ``SystemExit`` behind ``error``, if any.  Ray stops a
    decode task it no longer needs (a restarted worker group's dataset) by interrupting it, and its
    worker's SIGTERM handler raises ``SystemExit``; landing inside ``Event.wait`` they left the
    condition's lock released, and what escaped was "RuntimeError: release unlocked lock", which
    counted a good clip bad (the fault-injection run's ``clips_lost=-1``, in two full runs of the
    suite) and let the worker told to exit go on decoding."""
    seen, e = set(), error.__cause__ or error.__context__
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise e
        e = e.__cause__ or e.__context__


def redraw_frames(batch: dict[str, np.ndarray], num_frames: int, sampling: str, seed: int,
                  epoch_column: str = "epoch", key_column: str = "sample_key") -> dict[str, np.ndarray]:
    """Cached rows holding more frames than a clip shows (``data.cache_frames``): draw ``num_frames``
    of each row's frames with ``sampling`` (in order), seeded by (seed, the row's pass, its key); the
    pass column is dropped.  Rows with ``num_frames`` frames or fewer (images) are left as they are."""
    out = {k: v for k, v in batch.items() if k != epoch_column}
    frames = batch.get("frames")
    if frames is None or frames.ndim != 5 or frames.shape[1] <= num_frames:
        return out
    epochs, keys = batch[epoch_column], batch[key_column]
    picks = [sample_indices(sampling, 0, frames.shape[1], num_frames,
                            np.random.default_rng([seed, int(e), int(k) & 0x7FFFFFFFFFFFFFFF]))
             for e, k in zip(epochs, keys)]
    out["frames"] = np.stack([f[idx] for f, idx in zip(frames, picks)]) if picks else frames[:, :num_frames]
    return out


def process_batch(batch: dict[str, np.ndarray], params: ProcessParams) -> dict[str, np.ndarray]:
    """Dataset rows -> contract rows (only ``params.columns``); bad clips dropped and counted."""
    n = len(batch["text"])
    keep, frames, bad = [], [], []
    want_frames = "frames" in params.columns
    for i in range(n):
        if not want_frames or batch["modality"][i] == "text":
            if batch["bad"][i] and not want_frames:
                continue  # the placeholder of a broken shard / sample: nothing to train on
            if want_frames:  # a text-only row cannot feed a model that needs frames
                bad.append(("missing", f"{batch['id'][i]} (text-only row)"))
                continue
            keep.append(i)
            continue
        try:
            frames.append(_frames(i, batch, params))
            keep.append(i)
        except BadClip as e:
            bad.append((e.reason, e.uri))
        except Exception as e:  # whatever a row's bytes do, they cost that row only, never the batch
            _stopping(e)  # ... unless the task is being stopped
            log.warning("bad clip %s: %s: %s", str(batch["media_uri"][i])[:200], type(e).__name__, str(e)[:200],
                        exc_info=True)
            bad.append(("error", str(batch["media_uri"][i])))
    seen = n if want_frames else 0
    if seen:
        stats = quality.BadClipTracker(params.run_name).record(seen, bad)
        if stats is not None:
            quality.check(stats, params.max_bad_fraction, params.bad_check_min_seen)
    return _assemble(batch, keep, frames, params)


def _assemble(batch: dict, keep: list[int], frames: list[np.ndarray], params: ProcessParams) -> dict[str, np.ndarray]:
    cols = params.columns
    out: dict[str, np.ndarray] = {}
    s, t = params.image_size, params.frames_out
    if "frames" in cols:
        out["frames"] = np.stack(frames) if frames else np.zeros((0, t, s, s, 3), np.uint8)  # [B, T, S, S, 3]
    texts = [str(batch["text"][i]) for i in keep]
    if {"text_ids", "text_mask", "text_type_ids"} & set(cols):
        pairs = [str(batch["text_b"][i]) for i in keep]
        tok = load_tokenizer(params.tokenizer)
        enc = encode(tok, texts, params.max_text_len, pairs if any(pairs) else None) if keep else None
        empty = np.zeros((0, params.max_text_len), np.int64)
        for col, key in (("text_ids", "ids"), ("text_mask", "mask"), ("text_type_ids", "type_ids")):
            if col in cols:
                out[col] = enc[key] if enc else empty
    if {"answer_ids", "answer_mask"} & set(cols):
        # captioning: the caption itself is the generation target when a row has no answer
        answers = [str(batch["answer"][i]) or str(batch["text"][i]) for i in keep]
        tok = load_tokenizer(params.tokenizer)
        enc = encode(tok, answers, params.max_answer_len) if keep else None
        empty = np.zeros((0, params.max_answer_len), np.int64)
        if "answer_ids" in cols:
            out["answer_ids"] = enc["ids"] if enc else empty
        if "answer_mask" in cols:
            out["answer_mask"] = enc["mask"] if enc else empty
    for col in ("label", "clip_index", "sample_key"):
        if col in cols:
            out[col] = np.asarray([int(batch[col][i]) for i in keep], np.int64)
    if GROUP_KEY in cols:
        pattern = re.compile(params.group_pattern) if params.group_pattern else None
        out[GROUP_KEY] = np.asarray([group_id(t, pattern) for t in texts], np.int64)
    return out
