"""The Ray Data pipeline: annotation rows -> decoded, augmented, tokenized contract rows.

``build_dataset`` is called by the driver (or the train loop) and handed to Ray Train as a
dataset; each worker then iterates its shard with ``iter_worker_batches``::

    ds = build_dataset(cfg.data, "train", training=True, columns=workload.COLUMNS, seed=cfg.seed,
                       run_name=run_name)
    trainer = TorchTrainer(..., datasets={"train": ds})
    # inside the worker:
    for batch in iter_worker_batches(ray.train.get_dataset_shard("train"), batch_size, device,
                                     cfg.data.prefetch_batches):
        ...

Decode tasks reserve ``data.decode_cpus`` CPUs each, so they run beside the training workers
(which hold their own CPUs/GPUs) on one machine and on a cluster; Ray Data streams, so decoding of
the next batches overlaps the training step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
from typing import Any, Iterator

import numpy as np

from orchestrator import storage
from orchestrator.data import progress, quality
from orchestrator.data.annotations import READ_CPUS, annotation_dataset
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.decode import DecodeSpec
from orchestrator.data.formats import IMAGE_FORMATS, TEXT_FORMATS
from orchestrator.data.grouping import GROUP_KEY
from orchestrator.data.ids import HASHED, SAMPLE_KEY, stable_id
from orchestrator.data.process import BatchProcessor, ProcessParams, process_batch, redraw_frames, to_dataset_row
from orchestrator.data.sources import is_sharded, split_files, wds
from orchestrator.data.sources.base import ParseReport
from orchestrator.data.streams import TRAIN, plan_streams
from orchestrator.data.tokenize import default_tokenizer, load_tokenizer
from orchestrator.data.video import decode_short_side
from workloads.base import BATCH_KEYS

log = logging.getLogger(__name__)

__all__ = ["BATCH_KEYS", "HASHED", "SAMPLE_KEY", "build_dataset", "build_stream_datasets", "iter_worker_batches",
           "process_params", "stable_id"]


def _expand_shard(item: dict, fmt: str, max_member_bytes: int | None = None) -> list[dict]:
    """One shard URI -> its rows with the media bytes inline (one GET per shard).

    Clip ids are made unique across the run's sources: a stored ``clip_index`` (shards written by
    ``orchestrator shard``) is hashed with the source it belongs to (``item["ns"]``), so captions of
    one clip still share an id; a sample without one (video2dataset / img2dataset) is its own clip,
    hashed from its media URI and segment.  ``sample_key`` is hashed from the shard and position.
    Members over ``max_member_bytes`` and samples with unusable JSON become counted bad rows."""
    shard, ns = item["shard"], item.get("ns", "")
    report = ParseReport(shard)
    bad_rows: list[tuple[str, str, str]] = []  # (reason, where, message): one per sample left out
    broke: list[str] = []

    def on_bad(line: int, reason: str, msg: str) -> None:
        if line == 0:
            broke.append(msg)
        else:
            bad_rows.append((reason, msg, msg))

    rows = []
    samples = wds.read_shard_rows(fmt, shard, report, with_bytes=True, max_member_bytes=max_member_bytes, on_bad=on_bad)
    for i, r in enumerate(samples):
        local = r.get("clip_index")
        r["clip_index"] = (stable_id(ns, "clip", local) if local is not None
                           else stable_id(r.get("media_uri") or r.get("id"), r.get("start"), r.get("end")))
        row = to_dataset_row(r)
        row[SAMPLE_KEY] = stable_id(shard, i)
        rows.append(row)
    if broke:  # the tar itself broke: every sample after the break is lost, each one counted
        lost = shard_remainder(shard, report.rows + len(bad_rows))
        bad_rows += [("truncated", shard if lost == 1 else f"{shard}#remainder-{j}", f"{broke[0]}#{j}")
                     for j in range(lost)]
    for bad, where, msg in bad_rows:  # each reaches the bad-clip counts (and the job's bad fraction)
        row = to_dataset_row({"media_uri": where, "bad": bad, "modality": "video", "id": where})
        row[SAMPLE_KEY] = stable_id(shard, "bad", msg)
        rows.append(row)
    return rows


def shard_remainder(shard: str, read: int) -> int:
    """Samples of a truncated shard lost after its break: its count in the ``index.json`` beside it
    (written by ``orchestrator shard``) less the ``read`` ones; 1 (the shard itself) when no index
    says how many it held."""
    expected = _shard_counts(shard.rsplit("/", 1)[0]).get(shard.rsplit("/", 1)[-1])
    if expected is None:
        log.warning("%s is truncated and no index.json says how many samples it held: counted as 1 bad item", shard)
        return 1
    return max(int(expected) - read, 1)


@functools.lru_cache(maxsize=64)
def _shard_counts(folder: str) -> dict[str, int]:
    try:
        return dict(json.loads(storage.read_text(storage.join(folder, "index.json"))).get("shard_samples") or {})
    except Exception:  # shards of other writers carry no index
        return {}


def _source_dataset(src: SourceConfig, data_cfg: DataConfig, split: str, training: bool, rng: random.Random,
                    seed: int):
    """``(dataset, rows parsed or None)`` of one source: webdataset shards expanded by Ray tasks, or
    annotation files parsed and streamed by Ray tasks (:mod:`orchestrator.data.annotations`)."""
    import ray

    if is_sharded(src.format):

        files = split_files(src, data_cfg.root, split)
        shards = [s for f in files for s in wds.list_shards(f)]
        if training:
            rng.shuffle(shards)
        ns = f"{src.format}|{'|'.join(sorted(files))}"
        ds = ray.data.from_items([{"shard": s, "ns": ns} for s in shards], override_num_blocks=max(1, len(shards)))
        ds = ds.flat_map(_expand_shard, fn_kwargs={"fmt": src.format, "max_member_bytes": data_cfg.max_object_bytes})
        return (ds.limit(data_cfg.limit) if data_cfg.limit else ds), None
    return annotation_dataset(src, data_cfg, split, training, seed, rng)


def _short_side(data_cfg: DataConfig, training: bool) -> int:
    if data_cfg.decode_short_side is not None:
        return data_cfg.decode_short_side

    return decode_short_side(data_cfg.image_size, data_cfg.scale_min if training else 1.0)


def process_params(data_cfg: DataConfig, training: bool, columns: tuple[str, ...], seed: int,
                   run_name: str | None) -> ProcessParams:
    formats = {s.format for s in data_cfg.sources}
    image_only = formats <= set(IMAGE_FORMATS)
    return ProcessParams(
        columns=tuple(columns),
        decode=DecodeSpec(num_frames=data_cfg.num_frames,
                          sampling=data_cfg.sampling if training else data_cfg.eval_sampling,
                          min_frames=data_cfg.min_frames, min_resolution=data_cfg.min_resolution,
                          max_resolution=data_cfg.max_resolution, decoder=data_cfg.decoder,
                          short_side=_short_side(data_cfg, training), keyframe_jitter=data_cfg.keyframe_jitter),
        frames_out=1 if image_only else data_cfg.num_frames,
        image_size=data_cfg.image_size, training=training, scale_min=data_cfg.scale_min, hflip=data_cfg.hflip,
        tokenizer=data_cfg.tokenizer or default_tokenizer(data_cfg.root),
        max_text_len=data_cfg.max_text_len, max_answer_len=data_cfg.max_answer_len, seed=seed,
        run_name=run_name, max_bad_fraction=data_cfg.max_bad_fraction,
        bad_check_min_seen=data_cfg.bad_check_min_seen, decode_timeout_s=data_cfg.decode_timeout_s,
        read_timeout_s=data_cfg.read_timeout_s,
        max_object_bytes=data_cfg.max_object_bytes, root=data_cfg.root, eval_transform=data_cfg.eval_transform,
        group_pattern=data_cfg.group_pattern)


def build_dataset(data_cfg: DataConfig, split: str, training: bool, columns: tuple[str, ...], seed: int = 0,
                  run_name: str | None = None, progress_stream: str | None = None,
                  row_counts: dict[tuple[str, str], int] | None = None, epoch: int | None = None):
    """A ``ray.data.Dataset`` of contract rows (only ``columns``), bad clips removed and counted.

    ``split`` is ``"train"`` or ``"val"``; ``training`` picks ``data.sampling`` + random crop/flip,
    else ``data.eval_sampling`` + centre crop.  Bad clips are counted under ``run_name``
    (see :func:`orchestrator.data.quality.get_bad_clip_stats`).  Clip ids are unique across the
    sources.  ``progress_stream`` (the train loop's datasets): rows the run's progress registry
    publishes as consumed are dropped before decoding and frame sampling is seeded by the epoch
    (:mod:`orchestrator.data.progress`); ``columns`` may then also ask for :data:`SAMPLE_KEY`.
    ``epoch`` seeds a training dataset's frame sampling and augmentation as that epoch's (the train
    loop's cached datasets, decoded once); without it and without ``progress_stream`` every pass
    draws fresh randomness.
    """
    unknown = [c for c in columns if c not in BATCH_KEYS + (SAMPLE_KEY, GROUP_KEY)]
    if unknown:
        raise ValueError(f"unknown batch column(s) {unknown}; the contract (workloads/base.py) has {BATCH_KEYS}")
    if not columns:
        raise ValueError("build_dataset needs at least one column")
    text_only = {s.format for s in data_cfg.sources} <= set(TEXT_FORMATS)
    if "frames" in columns and text_only:
        raise ValueError(f"columns ask for 'frames' but every source is text-only ({[s.format for s in data_cfg.sources]})")
    params = dataclasses.replace(process_params(data_cfg, training, tuple(columns), seed, run_name), epoch=epoch)
    needs_text = bool({"text_ids", "text_mask", "text_type_ids", "answer_ids", "answer_mask"} & set(columns))
    if needs_text and not storage.has_scheme(params.tokenizer) and not storage.exists(params.tokenizer):
        log.info("tokenizer %s is not a local path; treating it as a hub name", params.tokenizer)
    if needs_text:  # fail early, in the driver, on a bad tokenizer setting

        load_tokenizer(params.tokenizer)
    quality.get_tracker(run_name)  # the named actor exists before any decode task runs
    rng = random.Random(seed)
    parts = []
    for src in data_cfg.sources:
        part, parsed = _source_dataset(src, data_cfg, split, training, rng, seed)
        parts.append(part)
        if row_counts is not None and parsed is not None:  # rows parsed (before weights); shards: unknown
            row_counts[(src.format, split)] = row_counts.get((src.format, split), 0) + parsed
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Training order: files and shards in a seeded order, rows shuffled in windows as they are read
    # (annotations.SHUFFLE_WINDOW), then each worker's local shuffle buffer (data.shuffle_buffer).  No
    # randomize_block_order: it is an all-to-all step that holds every block before the first batch.
    if progress_stream is not None:

        progress.get_registry(run_name)  # the named actor exists (owned by the driver) before any task
        ds = ds.map_batches(progress.skip_consumed, fn_kwargs={"run_name": run_name, "stream": progress_stream},
                            batch_size=None, batch_format="numpy", num_cpus=0.1)
    if data_cfg.deterministic:  # decoded rows leave in input order, also when cached by materialize()
        ds.context.execution_options.preserve_order = True
    original_errors(ds)
    kwargs: dict[str, Any] = {"num_cpus": data_cfg.decode_cpus}
    if data_cfg.decode_concurrency:
        kwargs["concurrency"] = data_cfg.decode_concurrency
    if data_cfg.decode_actors:  # long-lived decode actors instead of a task (and a process warm-up) per batch
        return ds.map_batches(BatchProcessor, fn_constructor_kwargs={"params": params},
                              batch_size=data_cfg.decode_batch_size, batch_format="numpy",
                              **_actor_pool(data_cfg, kwargs))
    if "concurrency" in kwargs:  # at most that many decode tasks at once (Ray 2.51+ spells it compute=)
        import ray.data

        kwargs["compute"] = ray.data.TaskPoolStrategy(size=kwargs.pop("concurrency"))
    return ds.map_batches(process_batch, fn_kwargs={"params": params}, batch_size=data_cfg.decode_batch_size,
                          batch_format="numpy", **kwargs)


def build_stream_datasets(data_cfg: DataConfig, seed: int, columns: tuple[str, ...], run_name: str,
                          row_counts: dict | None = None) -> dict:
    """One training dataset per stream of the run (:func:`orchestrator.data.streams.plan_streams`:
    ``train``, and ``train_image`` / ``train_text`` when the sources mix them in).  Every row carries
    a ``sample_key`` and every stream a progress filter, so a resumed pass leaves out what it already
    trained on.  ``row_counts`` collects the rows parsed per (source format, split), for lineage."""
    progress.get_registry(run_name)  # owned by the driver: outlives every worker restart
    out = {}
    for stream in plan_streams(list(data_cfg.sources), columns):
        cfg = data_cfg.model_copy(update={"sources": list(stream.sources)})
        cols = stream.columns + (SAMPLE_KEY,)
        if data_cfg.group_pattern and stream.name == TRAIN:  # the epoch's batches hold whole groups
            cols += (GROUP_KEY,)
        out[stream.name] = _stream_dataset(cfg, seed, cols, run_name, stream.name, row_counts)
    return out


CACHED_FILTER_ROWS = 512  # rows per progress-filter task over a cached (decoded once) dataset


def _stream_dataset(data_cfg: DataConfig, seed: int, columns: tuple[str, ...], run_name: str, stream: str,
                    row_counts: dict | None):
    if not data_cfg.cache:
        return build_dataset(data_cfg, TRAIN, training=True, columns=columns, seed=seed, run_name=run_name,
                             progress_stream=stream, row_counts=row_counts)
    # cached: decoded once here; the progress filter then runs on the decoded rows every pass, a few
    # hundred rows per task and two tasks at a time (one task per decoded block of data.decode_batch_size
    # rows started dozens of Ray worker processes every pass on a few thousand clips); with
    # data.cache_frames the decoded clips keep that many frames and each pass draws its own
    import ray.data

    redraw = data_cfg.cache_frames is not None and "frames" in columns
    decode_cfg = data_cfg
    if redraw:  # every clip's frames evenly spaced, drawn from each pass (progress stamps the pass)
        decode_cfg = data_cfg.model_copy(update={"num_frames": data_cfg.cache_frames, "sampling": "uniform"})
    ds = build_dataset(decode_cfg, TRAIN, training=True, columns=columns, seed=seed, run_name=run_name,
                       row_counts=row_counts, epoch=0)  # crops drawn once, seeded: the same in every run
    kwargs = {"run_name": run_name, "stream": stream}
    if redraw:
        kwargs.update(num_frames=data_cfg.num_frames, sampling=data_cfg.sampling, seed=seed)
    return ds.materialize().map_batches(_skip_and_redraw if redraw else progress.skip_consumed,
                                        batch_size=CACHED_FILTER_ROWS, batch_format="numpy", num_cpus=0.1,
                                        compute=ray.data.TaskPoolStrategy(size=2),
                                        fn_kwargs=kwargs if redraw else {**kwargs, "stamp_epoch": False})


def _skip_and_redraw(batch: dict[str, np.ndarray], run_name: str, stream: str, num_frames: int, sampling: str,
                     seed: int) -> dict[str, np.ndarray]:
    """A cached pass with ``data.cache_frames``, in one task per block: the progress filter (which
    stamps the pass) and then this pass's draw of ``num_frames`` of each clip's kept frames."""
    return redraw_frames(progress.skip_consumed(batch, run_name, stream, stamp_epoch=True), num_frames, sampling,
                         seed)


def original_errors(ds):
    """Let a decode task's error leave it as itself: a data-quality stop (``TooManyBadClips``) then
    reaches the train worker inside a ``RayTaskError`` that is also a ``TooManyBadClips``, which
    ``train.failures`` recognises as not retryable.  Ray Data's default wraps it in a
    ``UserCodeException`` whose pickled form drops its cause: the stop looked like any crash, and
    every restart decoded and counted the same bad clips again."""
    ds.context.raise_original_map_exception = True
    return ds


def _actor_pool(data_cfg: DataConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``decode_concurrency`` actors, or an autoscaling pool of 1 .. (cluster CPUs left beside the
    annotation read tasks / decode_cpus).  A pool that would hold every CPU starves the read tasks
    that feed it, and the dataset never yields (seen with 1 CPU): refused instead."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    room = cpus - READ_CPUS  # one annotation read task runs beside the pool
    most = int(room // data_cfg.decode_cpus) if "concurrency" not in kwargs else kwargs["concurrency"]
    if most < 1 or most * data_cfg.decode_cpus > room:
        raise ValueError(f"data.decode_actors: {most} actor(s) x data.decode_cpus={data_cfg.decode_cpus} leave no "
                         f"CPU of the cluster's {cpus:g} for the annotation read ({READ_CPUS} CPU), so the pool would "
                         "wait for its input forever; lower data.decode_cpus / data.decode_concurrency, add CPUs, or "
                         "decode with tasks (data.decode_actors=false)")
    kwargs.setdefault("concurrency", (1, most))
    return kwargs


def _contract_collate_cls():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ContractCollate(NumpyBatchCollateFn):
        """numpy batch -> tensors: ``frames`` uint8, everything else int64 (moved to the device by Ray)."""

        def __call__(self, batch):
            import torch

            # [B, T, H, W, 3] frames stay uint8; ids, masks, labels become int64
            return {k: torch.from_numpy(np.require(v, requirements="W")) if k == "frames"
                    else torch.from_numpy(np.array(v, dtype=np.int64)) for k, v in batch.items()}

    return ContractCollate


def _ContractCollate():  # built lazily so importing this module never imports Ray
    return _contract_collate_cls()()


def iter_worker_batches(dataset_shard, batch_size: int, device=None, prefetch_batches: int = 2, *,
                        drop_last: bool = False, local_shuffle_buffer_size: int | None = None,
                        run_name: str | None = None, max_bad_fraction: float | None = None,
                        local_shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
    """Tensor batches from a worker's shard (``ray.train.get_dataset_shard("train")``) or any dataset.

    ``frames`` stay uint8 (normalised on the device by the model); every other key is int64.  When
    ``max_bad_fraction`` is given, the run's bad-clip counts are checked at the end of the pass and
    :class:`~orchestrator.data.quality.TooManyBadClips` raised past it.
    """
    iterator = dataset_shard.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=prefetch_batches, device=device if device is not None else "auto",
        collate_fn=_ContractCollate(), drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size or None,
        local_shuffle_seed=local_shuffle_seed if local_shuffle_buffer_size else None)
    for batch in iterator:
        if batch and len(next(iter(batch.values()))):
            yield batch
    if max_bad_fraction is not None:
        quality.check_bad_clips(run_name, max_bad_fraction)
