"""Webdataset tar shards: video2dataset (WebVid: mp4 + json), img2dataset (CC3M: jpg + json) and the
shards written by ``python -m orchestrator shard`` (media + json holding the whole row).

A shard is read as one stream (one GET); members sharing a key (the name up to the first dot of
the basename, webdataset's rule) form one sample.
"""
from __future__ import annotations

import json
import logging
import tarfile
from typing import Iterator

from orchestrator import storage
from orchestrator.data.sources.base import ROW_KEYS, MalformedRow, ParseReport, make_row

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardError(OSError):
    """A shard that could not be read to the end (truncated tar, storage failure)."""


def _split_key(name: str) -> tuple[str, str]:
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


TOO_LARGE = "__too_large__"  # sample entry naming a member over the size cap (its bytes are never read)


def iter_samples(uri: str, max_member_bytes: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of the shard, streamed; ShardError when it breaks.

    Shards are plain (uncompressed) tars: a gzip/bz2/xz stream is a ShardError, never inflated. A
    member larger than ``max_member_bytes`` is skipped unread and named under ``TOO_LARGE``."""
    key, sample = None, {}
    try:
        with storage.open_input(uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_key(m.name)
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                if max_member_bytes is not None and m.size > max_member_bytes:
                    sample[TOO_LARGE] = f"{m.name} is {m.size} bytes, over data.max_object_bytes={max_member_bytes}".encode()
                    continue
                f = tar.extractfile(m)
                sample[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: a URI no storage can open
        if sample:
            yield key, sample
        raise ShardError(f"{uri}: shard unreadable after key {key!r}: {e}") from None
    if sample:
        yield key, sample


def list_shards(uri: str) -> list[str]:
    """A ``.tar`` URI itself, or every ``*.tar`` under a folder / prefix (sorted)."""
    if uri.endswith(".tar"):
        return [uri]
    shards = sorted(u for u in storage.list_files(uri) if u.endswith(".tar"))
    if not shards:
        raise FileNotFoundError(f"no *.tar shards under {uri}")
    return shards


def media_of(sample: dict[str, bytes]) -> tuple[str | None, str]:
    for ext in VIDEO_EXTS:
        if ext in sample:
            return ext, "video"
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, "image"
    return None, "text"


# The fields a shard's JSON may carry, with the types a row accepts (None = absent).
_STR = (str,)
META_TYPES = {"text": _STR, "text_b": _STR, "answer": _STR, "label_name": _STR, "caption": _STR,
              "modality": _STR, "id": (str, int), "key": (str, int), "videoid": (str, int),
              "label": (int,), "clip_index": (int,), "start": (int, float), "end": (int, float),
              "references": (list,)}


def _check_meta(key: str, meta) -> dict:
    """The sample's JSON, checked field by field: a wrong type is this sample's MalformedRow."""
    import math

    if not isinstance(meta, dict):
        raise MalformedRow(f"{key}.json: the top level is a {type(meta).__name__}, expected an object")
    for k, types in META_TYPES.items():
        v = meta.get(k)
        if v is None:
            continue
        if not isinstance(v, types) or isinstance(v, bool):
            raise MalformedRow(f"{key}.json: {k!r} is a {type(v).__name__}, expected {'/'.join(t.__name__ for t in types)}")
        if k in ("start", "end") and (not math.isfinite(v) or v < 0):
            raise MalformedRow(f"{key}.json: {k}={v!r} is not a finite, non-negative number of seconds")
        if k == "references" and not all(isinstance(r, str) for r in v):
            raise MalformedRow(f"{key}.json: 'references' must be a list of strings")
        if k == "modality" and v not in ("video", "image", "text"):
            raise MalformedRow(f"{key}.json: modality {v!r} is not video, image or text")
    if meta.get("start") is not None and meta.get("end") is not None and meta["end"] <= meta["start"]:
        raise MalformedRow(f"{key}.json: end {meta['end']} is not after start {meta['start']}")
    return meta


def sample_to_row(fmt: str, shard: str, key: str, sample: dict[str, bytes]) -> dict:
    """One row (``media_uri`` = ``<shard>#<member>``) from a sample; MalformedRow when unusable."""
    if TOO_LARGE in sample:
        raise MalformedRow(sample[TOO_LARGE].decode())
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MalformedRow(f"{key}.json: not valid JSON ({str(e)[:120] or type(e).__name__})") from None
        meta = _check_meta(key, meta)
    ext, modality = media_of(sample)
    if ext is None and fmt != "wds":
        raise MalformedRow(f"sample {key!r} has no media member (has {sorted(sample)})")
    text = meta.get("text") or meta.get("caption") or sample.get("txt", b"").decode("utf-8", "replace").strip()
    if fmt != "wds" and not text:
        raise MalformedRow(f"sample {key!r} has no caption (json 'caption' or .txt)")
    media_uri = f"{shard}#{key}.{ext}" if ext else None
    if fmt == "wds":
        row = make_row(**{k: v for k, v in meta.items() if k in ROW_KEYS and k not in ("media_uri", "modality")})
        row.update(media_uri=media_uri, modality=meta.get("modality", modality) if ext else "text")
        row["text"] = row.get("text") or text
        return row
    return make_row(media_uri=media_uri, text=text, id=str(meta.get("key") or meta.get("videoid") or key),
                    modality=modality)


def read_shard_rows(fmt: str, shard: str, report: ParseReport, with_bytes: bool = False,
                    max_member_bytes: int | None = None, on_bad=None) -> list[dict]:
    """Every row of one shard: :func:`iter_shard_rows` as a list."""
    return list(iter_shard_rows(fmt, shard, report, with_bytes, max_member_bytes, on_bad))


def iter_shard_rows(fmt: str, shard: str, report: ParseReport, with_bytes: bool = False,
                    max_member_bytes: int | None = None, on_bad=None) -> Iterator[dict]:
    """Each row of one shard as it is read (``media_bytes`` kept when ``with_bytes``); malformed
    samples are counted.  Streamed: a shard of thousands of clips is never held whole.

    A sample whose media member is empty is bad (``empty``) here, once: its row would otherwise
    carry no bytes and send the decoder back to the shard.  ``on_bad(line, reason, message)`` hears
    of each sample left out (``line`` 0: the tar broke there, reason ``truncated``)."""

    def bad(line: int, reason: str, why: str) -> None:
        report.bad(line, why)
        if on_bad is not None:
            on_bad(line, reason, f"{shard}:{line}: {why}")

    try:
        for i, (key, sample) in enumerate(iter_samples(shard, max_member_bytes), 1):
            try:
                row = sample_to_row(fmt, shard, key, sample)
            except MalformedRow as e:
                bad(i, "too_large" if TOO_LARGE in sample else "malformed", str(e))
                continue
            ext, _ = media_of(sample)
            if ext and not sample[ext]:
                bad(i, "empty", f"{key}.{ext} is empty")
                continue
            if with_bytes:
                row["media_bytes"] = sample[ext] if ext else b""
            report.rows += 1
            yield row
    except ShardError as e:
        bad(0, "truncated", str(e))


def read_member(uri: str, max_bytes: int | None = None) -> bytes:
    """Bytes of ``<shard>.tar#<member>`` (scans the shard; the pipeline streams whole shards instead)."""
    shard, _, member = uri.partition("#")
    key, ext = _split_key(member)
    for k, sample in iter_samples(shard, max_bytes):
        if k == key:
            if TOO_LARGE in sample and ext not in sample:
                raise storage.TooLarge(sample[TOO_LARGE].decode())
            if ext not in sample:
                break
            return sample[ext]
    raise FileNotFoundError(f"{member} not in shard {shard}")
