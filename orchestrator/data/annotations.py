"""Annotation files as a streamed Ray Data source: parsed in Ray tasks, never all rows in the driver.

A corpus like WebVid-10M has ~10M annotation rows.  The driver holds only the list of annotation
files and one small summary per file; the rows themselves are parsed by Ray tasks and stream into
the decode stage block by block:

1. **Count pass** (:func:`summarize`): one Ray task per annotation file parses it with the source's
   adapter and returns ``{rows, records, malformed, error, labels}``.  The driver then raises the
   same :class:`~orchestrator.data.sources.AnnotationError` as before, before training starts, for a
   file past ``data.max_bad_fraction`` malformed rows or a label outside the vocabulary; sums the
   rows per source for the MLflow dataset inputs; and applies ``data.limit`` per file.
2. **Stream** (:func:`read_files`, a ``map_batches`` generator over the file list): each task parses
   its file again and yields its rows as it goes (a training read shuffles them in windows of
   :data:`SHUFFLE_WINDOW` rows); Ray Data ships them in blocks of up to its target block size
   (128 MiB), which a streaming repartition cuts into ``data.decode_batch_size`` rows (or more, to
   keep to :data:`MAX_BLOCKS` blocks per source) for the decode stage.  A file's first block is ready after its first 128 MiB of rows, not the whole file.

Ids are computed where the row is parsed (``orchestrator.data.ids``): ``clip_index`` hashes the
source and the row's media + segment (rows of one source showing the same clip share it, as the
old driver-side numbering did), ``sample_key`` hashes the source, the file, the row's position in
that file and its weight copy, so a resumed epoch (``orchestrator.data.progress``) leaves out the
same rows whatever order the files or blocks come in.

Weights: ``weight`` whole copies of every row, plus one more copy of each row with probability
``weight - int(weight)`` (a seeded draw per row), so a weight of 0.3 keeps about, not exactly, 30%.
The driver's memory is the file list: flat in the number of rows.  A task's is one file's text
plus a shuffle window (``data.max_annotation_bytes`` caps the text).
"""
from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.ids import SAMPLE_KEY, clip_id, seed_part, stable_id, unit_draw
from orchestrator.data.placement import outside_caller_group
from orchestrator.data.process import EMPTY_ROW, to_dataset_row
from orchestrator.data.sources import SOURCES, Context, label_id, split_files, vocabulary_from_names
from orchestrator.data.sources.base import AnnotationError, ParseReport, read_text

log = logging.getLogger(__name__)

SHUFFLE_WINDOW = 4096  # rows a training read shuffles at once (per file, per task)
READ_CPUS = 0.25
MAX_BLOCKS = 200  # parsing is light next to decoding; the decode stage's backpressure paces it

ROW_SCHEMA = pa.schema([("media_uri", pa.string()), ("media_bytes", pa.binary()), ("bad", pa.string()),
                        ("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                        ("text_b", pa.string()), ("answer", pa.string()), ("label", pa.int64()),
                        ("clip_index", pa.int64()), ("id", pa.string()), ("modality", pa.string()),
                        (SAMPLE_KEY, pa.int64())])
assert set(ROW_SCHEMA.names) == set(EMPTY_ROW) | {SAMPLE_KEY}


@dataclass(frozen=True)
class FilePlan:
    """Everything a read task needs about its source (no driver globals)."""

    fmt: str
    media: str
    split: str
    ns: str  # the source's namespace in ids: format + its files
    annotation_bytes: int | None
    max_bad_fraction: float
    vocab: tuple[str, ...] | None = None  # classification: label names in id order
    training: bool = False
    weight: float = 1.0
    seed: int = 0
    block_rows: int = 8
    root: str = ""  # data.root: seeds use paths relative to it (ids.seed_part)
    allowed: tuple[str, ...] = ()  # data.allowed_media_prefixes, resolved: media rows may name besides `media`
    read_timeout_s: float | None = None  # data.read_timeout_s: reading the file, whole


def source_namespace(fmt: str, files: list[str]) -> str:
    return f"{fmt}|{'|'.join(sorted(files))}"


def _parse(uri: str, plan: FilePlan, report: ParseReport) -> Iterator[dict]:
    ctx = Context(media=plan.media, split=plan.split, allowed=plan.allowed)
    return SOURCES[plan.fmt].parse(uri, read_text(uri, plan.annotation_bytes, plan.read_timeout_s), ctx, report)


def summarize_file(uri: str, plan: FilePlan, collect_labels: bool) -> dict[str, Any]:
    """Parse one file and return its counts (runs in a Ray task: the count pass)."""
    report = ParseReport(uri)
    rows, labels = 0, {}
    try:
        for r in _parse(uri, plan, report):
            rows += 1
            if collect_labels and r.get("label_name") is not None:
                labels.setdefault(r["label_name"], r["id"])
        report.check(plan.max_bad_fraction)
        error = None
    except AnnotationError as e:
        error = str(e)
    return {"uri": uri, "rows": rows, "records": report.rows, "malformed": len(report.malformed),
            "first_malformed": report.malformed[:10], "error": error, "labels": labels}


def summarize(jobs: list[tuple[str, FilePlan, bool]]) -> list[dict[str, Any]]:
    """:func:`summarize_file` for every (uri, plan, collect_labels), one Ray task each, in order."""
    import ray  # here, not at the top: importing this module never starts Ray

    task = ray.remote(num_cpus=READ_CPUS, max_retries=3, scheduling_strategy=outside_caller_group())(summarize_file)
    return ray.get([task.remote(*job) for job in jobs])


def _raise_errors(summaries: list[dict[str, Any]]) -> None:
    for s in summaries:
        if s["error"]:
            raise AnnotationError(s["error"])
        if s["malformed"]:
            log.warning("%s: %d malformed annotation rows skipped of %d (first: %s)", s["uri"], s["malformed"],
                        s["records"] + s["malformed"], s["first_malformed"][:1])


def _vocabulary(src: SourceConfig, data_cfg: DataConfig, split: str, summaries: list[dict]) -> tuple[str, ...]:
    """The label vocabulary (classification sources), from the training split's label names."""
    if isinstance(src.labels, list) or src.labels == "youku":
        return tuple(vocabulary_from_names(src, set()))
    if split != "train":
        train_files = split_files(src, data_cfg.root, "train")
        summaries = summarize([(u, _plan(src, data_cfg, "train", train_files), True) for u in train_files])
        _raise_errors(summaries)
    return tuple(vocabulary_from_names(src, {n for s in summaries for n in s["labels"]}))


def allowed_media(data_cfg: DataConfig) -> tuple[str, ...]:
    """``data.allowed_media_prefixes`` resolved against ``data.root``."""
    return tuple(storage.resolve(data_cfg.root, p) for p in data_cfg.allowed_media_prefixes)


def _plan(src: SourceConfig, data_cfg: DataConfig, split: str, files: list[str], **kw) -> FilePlan:
    return FilePlan(fmt=src.format, media=storage.resolve(data_cfg.root, src.media), split=split,
                    ns=source_namespace(src.format, files), annotation_bytes=data_cfg.max_annotation_bytes,
                    max_bad_fraction=data_cfg.max_bad_fraction, block_rows=data_cfg.decode_batch_size,
                    root=data_cfg.root, allowed=allowed_media(data_cfg), read_timeout_s=data_cfg.read_timeout_s, **kw)


def annotation_dataset(src: SourceConfig, data_cfg: DataConfig, split: str, training: bool, seed: int,
                       order: random.Random):
    """``(dataset, rows parsed)`` of one parsed (not sharded) source: the count pass in the driver,
    then a streamed read.  ``order`` shuffles the file order (training)."""
    import ray

    files = split_files(src, data_cfg.root, split)
    classification = SOURCES[src.format].classification
    plan = _plan(src, data_cfg, split, files)
    summaries = summarize([(u, plan, classification) for u in files])
    _raise_errors(summaries)
    vocab = None
    if classification:
        vocab = _vocabulary(src, data_cfg, split, summaries)
        index = {n: i for i, n in enumerate(vocab)}
        for s in summaries:  # every label of the split is known before training starts
            for name, row_id in s["labels"].items():
                label_id(name, index, list(vocab), src.format, row_id)
    takes, left = [], data_cfg.limit
    for s in summaries:  # data.limit: the first N rows of the split, in file order
        take = s["rows"] if left is None else min(s["rows"], left)
        takes.append(take)
        left = None if left is None else left - take
    parsed = sum(takes)
    if not parsed:
        raise ValueError(f"source {src.format!r} has no usable {split} rows")
    weight = src.weight if training else 1.0
    # blocks of decode batches, at most MAX_BLOCKS per source (as from_items was given before): small
    # sources spread over every decode task, large ones without a Ray Data block per 8 rows
    block_rows = max(data_cfg.decode_batch_size, -(-int(parsed * weight) // MAX_BLOCKS))
    plan = FilePlan(**{**plan.__dict__, "vocab": vocab, "training": training, "weight": weight, "seed": seed,
                       "block_rows": block_rows})
    items = [{"uri": u, "take": t} for u, t in zip(files, takes) if t]
    if training:
        order.shuffle(items)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_files, fn_kwargs={"plan": plan}, batch_size=1, batch_format="numpy",
                        num_cpus=READ_CPUS)
    # Ray Data merges what one task yields into blocks of up to DataContext.target_max_block_size
    # (128 MiB); cut them to decode batches again, so the decode stage runs in parallel on them
    return ds.repartition(target_num_rows_per_block=plan.block_rows), parsed


def read_files(batch: dict[str, np.ndarray], plan: FilePlan) -> Iterator[pa.Table]:
    """Ray Data batch function: annotation files -> blocks of dataset rows, as they are parsed."""
    for uri, take in zip(batch["uri"], batch["take"]):
        yield from file_blocks(str(uri), int(take), plan)


def file_blocks(uri: str, take: int, plan: FilePlan) -> Iterator[pa.Table]:
    """Blocks of ``plan.block_rows`` dataset rows from the first ``take`` rows of one file."""
    rows = _file_rows(uri, take, plan)
    if plan.training:
        rows = _window_shuffled(rows, random.Random(f"{plan.seed}|{seed_part(uri, plan.root)}"))
    while True:
        block = list(itertools.islice(rows, plan.block_rows))
        if not block:
            return
        yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)


def _file_rows(uri: str, take: int, plan: FilePlan) -> Iterator[dict]:
    index = {n: i for i, n in enumerate(plan.vocab)} if plan.vocab is not None else None
    whole, frac = int(plan.weight), plan.weight - int(plan.weight)
    report = ParseReport(uri)  # the count pass already judged this file
    for pos, r in enumerate(itertools.islice(_parse(uri, plan, report), take)):
        if index is not None:
            r["label"] = label_id(r["label_name"], index, list(plan.vocab), plan.fmt, r["id"])
        r["clip_index"] = clip_id(plan.ns, r)
        copies = whole + (1 if frac and unit_draw(plan.seed, plan.fmt, seed_part(uri, plan.root), pos) < frac else 0)
        for copy in range(copies):
            row = to_dataset_row(r)
            row[SAMPLE_KEY] = stable_id(plan.ns, uri, pos, copy)
            yield row


def _window_shuffled(rows: Iterator[dict], rng: random.Random) -> Iterator[dict]:
    while True:
        window = list(itertools.islice(rows, SHUFFLE_WINDOW))
        if not window:
            return
        rng.shuffle(window)
        yield from window
