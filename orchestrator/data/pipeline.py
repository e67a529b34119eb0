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
from orchestrator.data.process import ProcessParams, process_batch, redraw_frames, to_dataset_row
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
    """One shard URI -> its rows with the media bytes inline: :func:`iter_shard` as a list."""
    return list(iter_shard(item, fmt, max_member_bytes))


def iter_shard(item: dict, fmt: str, max_member_bytes: int | None = None) -> Iterator[dict]:
    """One shard URI -> its rows with the media bytes inline, as they are read (one GET per shard).

    Clip ids are made unique across the run's sources: a stored ``clip_index`` (shards written by
    ``orchestrator shard``) is hashed with the source it belongs to (``item["ns"]``), so captions of
    one clip still share an id; a sample without one (video2dataset / img2dataset) is its own clip,
    hashed from its media URI and segment.  ``sample_key`` is hashed from the shard and position.
    Members over ``max_member_bytes`` and samples with unusable JSON become counted bad rows, after
    the shard's good rows."""
    shard, ns = item["shard"], item.get("ns", "")
    report = ParseReport(shard)
    bad_rows: list[tuple[str, str, str]] = []  # (reason, where, message): one per sample left out
    broke: list[str] = []

    def on_bad(line: int, reason: str, msg: str) -> None:
        if line == 0:
            broke.append(msg)
        else:
            bad_rows.append((reason, msg, msg))

    samples = wds.iter_shard_rows(fmt, shard, report, with_bytes=True, max_member_bytes=max_member_bytes,
                                  on_bad=on_bad)
    for i, r in enumerate(samples):
        local = r.get("clip_index")
        r["clip_index"] = (stable_id(ns, "clip", local) if local is not None
                           else stable_id(r.get("media_uri") or r.get("id"), r.get("start"), r.get("end")))
        row = to_dataset_row(r)
        row[SAMPLE_KEY] = stable_id(shard, i)
        yield row
    if broke:  # the tar itself broke: every sample after the break is lost, each one counted
        lost = shard_remainder(shard, report.rows + len(bad_rows))
        bad_rows += [("truncated", shard if lost == 1 else f"{shard}#remainder-{j}", f"{broke[0]}#{j}")
                     for j in range(lost)]
    for bad, where, msg in bad_rows:  # each reaches the bad-clip counts (and the job's bad fraction)
        row = to_dataset_row({"media_uri": where, "bad": bad, "modality": "video", "id": where})
        row[SAMPLE_KEY] = stable_id(shard, "bad", msg)
        yield row


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
    """``(dataset, rows parsed or None, input rows per decode task)`` of one source: its webdataset
    shard URIs (read by the decode tasks), or annotation files parsed and streamed by Ray tasks
    (:mod:`orchestrator.data.annotations`)."""
    import ray

    if is_sharded(src.format):

        files = split_files(src, data_cfg.root, split)
        shards = [s for f in files for s in wds.list_shards(f)]
        if training:
            rng.shuffle(shards)
        ns = f"{src.format}|{'|'.join(sorted(files))}"
        # the shard URIs only: each decode task reads its shards itself (DecodeStage)
        ds = ray.data.from_items([{"shard": s, "ns": ns} for s in shards], override_num_blocks=max(1, len(shards)))
        return ds, None, shards_per_task(shards, data_cfg.decode_batch_size)
    return (*annotation_dataset(src, data_cfg, split, training, seed, rng), data_cfg.decode_batch_size)


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
    if progress_stream is not None:
        progress.get_registry(run_name)  # the named actor exists (owned by the driver) before any task
    rng = random.Random(seed)
    parts = []
    for src in data_cfg.sources:
        part, parsed, per_task = _source_dataset(src, data_cfg, split, training, rng, seed)
        parts.append((part, src.format if is_sharded(src.format) else None, per_task))
        if row_counts is not None and parsed is not None:  # rows parsed (before weights); shards: unknown
            row_counts[(src.format, split)] = row_counts.get((src.format, split), 0) + parsed
    # Training order: files and shards in a seeded order, rows shuffled in windows as they are read
    # (annotations.SHUFFLE_WINDOW), then each worker's local shuffle buffer (data.shuffle_buffer).  No
    # randomize_block_order: it is an all-to-all step that holds every block before the first batch.
    decoded = []
    single_operator = all(fmt for _, fmt, _ in parts)
    for part, shard_format, per_task in parts:
        stage = DecodeStage(params, data_cfg.decode_batch_size, shard_format, data_cfg.max_object_bytes,
                            progress_stream)
        out = _decode(_settings(part, data_cfg, single_operator), stage, data_cfg, per_task, len(parts))
        decoded.append(out.limit(data_cfg.limit) if shard_format and data_cfg.limit else out)
    ds = decoded[0].union(*decoded[1:]) if len(decoded) > 1 else decoded[0]
    return _settings(ds, data_cfg, single_operator)


def _settings(ds, data_cfg: DataConfig, single_operator: bool = False):
    """The dataset's execution settings.  ``single_operator`` (every source sharded: the decode
    operators read their inputs themselves, nothing upstream competes for CPUs): Ray Data's per-operator
    resource reservation is off, which otherwise held the decode operator to one task at a time on 2
    CPUs (``benchmarks/data_throughput.py --transcoded-only``: decode tasks at once)."""
    if data_cfg.deterministic:  # decoded rows leave in input order, also when cached by materialize()
        ds.context.execution_options.preserve_order = True
    if single_operator:
        ds.context.op_resource_reservation_enabled = False
    return original_errors(ds)


@dataclasses.dataclass(frozen=True)
class DecodeStage:
    """What one decode task does with its input: a source's rows (or its shard URIs, read here)
    become decoded contract rows in one task, with no task, process hop or object-store copy of the
    media bytes between reading, the progress filter and decoding (three operators before: an
    expand task per shard and a filter task per block, each one scheduled by the driver)."""
    params: ProcessParams
    rows_per_block: int  # data.decode_batch_size: rows decoded together and yielded as one block
    shard_format: str | None = None  # the input rows are shard URIs of this format: streamed here
    max_member_bytes: int | None = None  # data.max_object_bytes: a larger shard member is a bad row
    progress_stream: str | None = None  # the train loop's stream: rows already trained this pass dropped


def decode_stage(batch: dict[str, np.ndarray], stage: DecodeStage) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function (a generator: one block per ``rows_per_block`` rows, as decoded)."""
    out = None
    for rows in _input_chunks(batch, stage):
        if stage.progress_stream is not None:
            rows = progress.skip_consumed(rows, stage.params.run_name, stage.progress_stream)
        out = process_batch(rows, stage.params)
        if len(next(iter(out.values()))):
            yield out
            out = None
    if out is not None:  # nothing decoded at all: one empty block keeps the schema
        yield out


def _input_chunks(batch: dict[str, np.ndarray], stage: DecodeStage) -> Iterator[dict[str, np.ndarray]]:
    if stage.shard_format is None:
        yield batch
        return
    rows: list[dict] = []
    for shard, ns in zip(batch["shard"], batch["ns"]):
        for row in iter_shard({"shard": str(shard), "ns": str(ns)}, stage.shard_format, stage.max_member_bytes):
            rows.append(row)
            if len(rows) == stage.rows_per_block:
                yield _columns(rows)
                rows = []
    if rows:
        yield _columns(rows)


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


class DecodeActor:
    """:func:`decode_stage` in a decode actor (``data.decode_actors``): the decoder libraries, the
    tokenizer and the bad-clip tracker handle are loaded once per actor; the work is the same.
    Ray Data starts the pool for each execution (each epoch), whereas tasks run in Ray's warm
    worker processes, which keep these imports and caches between batches and epochs: on short
    epochs the task path is faster (measured in benchmarks/data_throughput.py), so tasks stay the
    default."""

    def __init__(self, stage: DecodeStage):
        self.stage = stage
        if {"text_ids", "text_mask", "text_type_ids", "answer_ids", "answer_mask"} & set(stage.params.columns):
            load_tokenizer(stage.params.tokenizer)
        quality.get_tracker(stage.params.run_name)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        yield from decode_stage(batch, self.stage)


def _decode(ds, stage: DecodeStage, data_cfg: DataConfig, batch_size: int, n_parts: int):
    """One source's decode operator, ``batch_size`` input rows per task (a sharded source's
    :func:`shards_per_task`, an annotation source's ``data.decode_batch_size``).
    ``data.decode_concurrency`` (and an actor pool's size) is shared among the run's ``n_parts``
    sources."""
    kwargs: dict[str, Any] = {"num_cpus": data_cfg.decode_cpus}
    if data_cfg.decode_concurrency:
        kwargs["concurrency"] = max(1, data_cfg.decode_concurrency // n_parts)
    if data_cfg.decode_actors:  # long-lived decode actors instead of a task (and a process warm-up) per batch
        return ds.map_batches(DecodeActor, fn_constructor_kwargs={"stage": stage}, batch_size=batch_size,
                              batch_format="numpy", **_actor_pool(data_cfg, kwargs, n_parts))
    if "concurrency" in kwargs:  # at most that many decode tasks at once (Ray 2.51+ spells it compute=)
        import ray.data

        kwargs["compute"] = ray.data.TaskPoolStrategy(size=kwargs.pop("concurrency"))
    return ds.map_batches(decode_stage, fn_kwargs={"stage": stage}, batch_size=batch_size, batch_format="numpy",
                          **kwargs)


def shards_per_task(shards: list[str], clips_per_task: int) -> int:
    """Shards one decode task reads: about ``clips_per_task`` clips' worth, by the shard counts in
    the ``index.json`` of the first shard's folder (``orchestrator shard`` writes one); 1 when no
    index says (video2dataset / img2dataset shards hold thousands of clips each)."""
    if not shards:
        return 1
    counts = list(_shard_counts(shards[0].rsplit("/", 1)[0]).values())
    if not counts:
        return 1
    typical = sorted(counts)[len(counts) // 2]
    return max(1, clips_per_task // max(1, int(typical)))


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


def _actor_pool(data_cfg: DataConfig, kwargs: dict[str, Any], n_parts: int = 1) -> dict[str, Any]:
    """``decode_concurrency`` actors, or an autoscaling pool of 1 .. (cluster CPUs left beside the
    annotation read tasks / decode_cpus), shared among the run's ``n_parts`` sources.  A pool that would hold every CPU starves the read tasks
    that feed it, and the dataset never yields (seen with 1 CPU): refused instead."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    room = cpus - READ_CPUS  # one annotation read task runs beside the pool
    most = int(room // data_cfg.decode_cpus) // n_parts if "concurrency" not in kwargs else kwargs["concurrency"]
    if most < 1 or most * n_parts * data_cfg.decode_cpus > room:
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
