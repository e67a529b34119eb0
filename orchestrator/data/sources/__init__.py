"""Source adapters: each turns a dataset's own annotation files into rows (see ``base.ROW_KEYS``).

========================  ==========================================================================
name                      annotation format
========================  ==========================================================================
``youku_pretrain``        Youku-mPLUG CSV ``video_id:FILE,title``
``youku_classification``  Youku-mPLUG CSV ``video_id:FILE,title,label`` (label vocabulary: labels=)
``youku_retrieval``       Youku-mPLUG CSV ``clip_name:FILE,caption``
``youku_captioning``      Youku-mPLUG CSV ``video_id:FILE,golden_caption`` (a list literal on val/test)
``webvid_csv``            WebVid CSV ``videoid,contentUrl,duration,page_dir,name``
``webvid_wds``            video2dataset webdataset shards (``.mp4`` + ``.json`` with ``caption``)
``msrvtt``                MSR-VTT JSON list or JSON Lines ``{video, caption (str|list), duration}``
``msrvtt_qa``             MSRVTT-QA JSON/JSONL ``{video_id, question, answer}``
``cc3m_wds``              img2dataset webdataset shards (``.jpg`` + ``.json`` with ``caption``)
``coco_captions``         COCO captions JSON (``images`` + ``annotations``), images as one frame
``internvid``             InternVid JSONL ``{YoutubeID, Start_timestamp, End_timestamp, Caption}``
``glue_<task>``           GLUE TSV for sst2, rte, mrpc, qqp, mnli, qnli (text only)
``wds``                   shards written by ``python -m orchestrator shard`` (any of the above)
========================  ==========================================================================
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from orchestrator import storage
from orchestrator.data.config import Caps, SourceConfig
from orchestrator.data.formats import FORMATS, GLUE_TASKS
from orchestrator.data.sources import glue, misc, msrvtt, wds, youku
from orchestrator.data.sources.base import (
    ROW_KEYS,
    AnnotationError,
    MalformedRow,
    ParseReport,
    assign_clip_index,
    read_text,
)

log = logging.getLogger(__name__)

__all__ = ["SOURCES", "ROW_KEYS", "AnnotationError", "Caps", "MalformedRow", "Source", "read_rows", "label_vocabulary",
           "is_sharded", "YOUKU_CATEGORIES"]

YOUKU_CATEGORIES = youku.YOUKU_CATEGORIES


@dataclass(frozen=True)
class Context:
    media: str  # resolved media base URI
    split: str
    allowed: tuple[str, ...] = ()  # other folders rows may name media in (data.allowed_media_prefixes, resolved)


@dataclass(frozen=True)
class Source:
    name: str
    parse: Callable | None  # (uri, text, ctx, report) -> rows; None for webdataset shards
    sharded: bool = False
    classification: bool = False


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("youku_pretrain", youku.pretrain),
    Source("youku_classification", youku.classification, classification=True),
    Source("youku_retrieval", youku.retrieval),
    Source("youku_captioning", youku.captioning),
    Source("webvid_csv", misc.webvid_csv),
    Source("webvid_wds", None, sharded=True),
    Source("msrvtt", msrvtt.msrvtt),
    Source("msrvtt_qa", msrvtt.msrvtt_qa),
    Source("cc3m_wds", None, sharded=True),
    Source("coco_captions", misc.coco_captions),
    Source("internvid", misc.internvid),
    *[Source(f"glue_{t}", glue.make_parser(t)) for t in glue.GLUE],
    Source("wds", None, sharded=True),
]}
assert SOURCES.keys() == FORMATS.keys() and set(glue.GLUE) == set(GLUE_TASKS), "data/formats.py lists the adapters"


def is_sharded(fmt: str) -> bool:
    return SOURCES[fmt].sharded


def split_files(source: SourceConfig, root: str, split: str) -> list[str]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = source.train if split == "train" else source.val
    if not files:
        raise AnnotationError(f"source {source.format!r} lists no {split} files (data.sources[].{split})")
    return [storage.resolve(root, f) for f in files]


def _read_split(source: SourceConfig, root: str, split: str, max_bad_fraction: float,
                caps: Caps = Caps(), allowed: tuple[str, ...] = ()) -> list[dict]:
    spec = SOURCES[source.format]
    ctx = Context(media=storage.resolve(root, source.media), split=split, allowed=tuple(allowed))
    rows: list[dict] = []
    for uri in split_files(source, root, split):
        if spec.sharded:
            for shard in wds.list_shards(uri):
                report = ParseReport(shard)
                rows.extend(wds.read_shard_rows(source.format, shard, report, max_member_bytes=caps.object_bytes))
                report.check(max_bad_fraction)
            continue
        report = ParseReport(uri)
        rows.extend(spec.parse(uri, read_text(uri, caps.annotation_bytes, caps.read_timeout_s), ctx, report))
        report.check(max_bad_fraction)
    return rows


def label_vocabulary(source: SourceConfig, root: str, max_bad_fraction: float = 0.05,
                     caps: Caps = Caps()) -> list[str]:
    """Label names in id order: the 45 Youku categories, the training split's sorted labels, or a list."""
    if isinstance(source.labels, list) or source.labels == "youku":
        return vocabulary_from_names(source, set())
    return vocabulary_from_names(source, {r["label_name"] for r in _read_split(source, root, "train", max_bad_fraction,
                                                                                caps)})


def vocabulary_from_names(source: SourceConfig, names: set) -> list[str]:
    """The label vocabulary of ``source`` given the label names of its training split (only used
    for ``labels: train | auto``; the streamed reader collects them per file)."""
    if isinstance(source.labels, list):
        return list(source.labels)
    if source.labels == "youku":
        return list(YOUKU_CATEGORIES)
    names = sorted(n for n in names if n is not None)
    if source.labels == "auto" and names and all(n in YOUKU_CATEGORIES or n.isdigit() for n in names):
        return list(YOUKU_CATEGORIES)
    return names


def label_id(name: str | None, index: dict[str, int], vocab: list[str], source_format: str, row_id: str) -> int:
    """The id of label ``name`` in ``vocab`` (``index`` = name -> id), or an AnnotationError."""
    if name in index:
        return index[name]
    if name is not None and name.isdigit() and int(name) < len(vocab):
        return int(name)  # already an id
    raise AnnotationError(f"label {name!r} of row {row_id} is not in the label vocabulary of "
                          f"{source_format} ({len(vocab)} labels: {vocab[:8]}...); set "
                          "data.sources[].labels to 'train' to derive it from the training split")


def _apply_labels(rows: list[dict], vocab: list[str], source: SourceConfig) -> list[dict]:
    index = {n: i for i, n in enumerate(vocab)}
    for r in rows:
        r["label"] = label_id(r["label_name"], index, vocab, source.format, r["id"])
    return rows


def read_rows(source: SourceConfig, root: str, split: str, max_bad_fraction: float = 0.05,
              caps: Caps = Caps(), allowed: tuple[str, ...] = ()) -> list[dict]:
    """Rows of one source's ``train`` or ``val`` split, with clip indices and label ids assigned.
    ``caps`` bounds what is read (``DataConfig.caps()``); rows may name media inside the source's
    media folder or inside ``allowed`` (resolved URIs, ``DataConfig.allowed_media()``), any other is a
    malformed row."""
    spec = SOURCES.get(source.format)
    if spec is None:
        raise AnnotationError(f"unknown source format {source.format!r}; accepted: {', '.join(sorted(SOURCES))}")
    rows = _read_split(source, root, split, max_bad_fraction, caps, allowed)
    if spec.classification:
        rows = _apply_labels(rows, label_vocabulary(source, root, max_bad_fraction, caps), source)
    if not (spec.sharded and any(r["clip_index"] is not None for r in rows)):
        assign_clip_index(rows)
    return rows
