"""Pack clips and their annotations into webdataset tar shards.

A million small objects cost a million GETs per epoch; packed into shards of a few hundred MB
they cost a few thousand.  Layout (webdataset): ``<out>/shard-000000.tar`` ... each holding, per
sample, ``<key>.<ext>`` (the clip or image as stored) and ``<key>.json`` (the row: text, answer,
label, clip_index, start/end, ...), plus ``<out>/index.json`` listing shards and counts.  Read them
back with the ``wds`` source format (``data.sources[].format: wds``, ``train: [<out>]``).

With ``transcode`` (:class:`~orchestrator.data.transcode.TranscodeSpec`) each video is re-encoded
at a training resolution, a capped frame rate, a short GOP and no B-frames before it is packed
(the source objects stay untouched); ``index.json`` then records the parameters under
``transcode``, and clips that cannot be probed or decoded are counted under ``skipped``, not shipped.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass, field

from orchestrator import storage
from orchestrator.data.decode import is_image, read_media
from orchestrator.data.process import with_timeout
from orchestrator.data.quality import BadClip
from orchestrator.data.transcode import TranscodeSpec
from orchestrator.data.transcode import transcode as transcode_clip

log = logging.getLogger(__name__)

META_KEYS = ("text", "text_b", "answer", "label", "label_name", "clip_index", "id", "modality", "references",
             "start", "end")


@dataclass
class ShardReport:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> URIs
    transcode: dict | None = None  # the TranscodeSpec used (None: media packed as stored)
    transcoded: int = 0
    transcode_s: float = 0.0  # seconds spent re-encoding, all clips
    shard_samples: dict[str, int] = field(default_factory=dict)  # shard file name -> samples in it

    def to_dict(self) -> dict:
        d = {"shards": self.shards, "samples": self.samples, "shard_samples": self.shard_samples,
             "skipped": {k: len(v) for k, v in self.skipped.items()},
             "skipped_examples": {k: v[:5] for k, v in self.skipped.items()}}
        if self.transcode is not None:
            d.update(transcode=self.transcode, transcoded=self.transcoded, transcode_s=round(self.transcode_s, 3))
        return d


class _ShardWriter:
    def __init__(self, out: str, max_samples: int, max_bytes: int):
        self.out, self.max_samples, self.max_bytes = out, max_samples, max_bytes
        self.buf: io.BytesIO | None = None
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.written: list[str] = []
        self.counts: dict[str, int] = {}  # shard file name -> samples (index.json: a truncated shard's loss is known)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self.buf = io.BytesIO()
            self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        for ext, data in members:
            self._add(f"{key}.{ext}", data)
        self.count += 1
        if self.count >= self.max_samples or self.buf.tell() >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        uri = storage.join(self.out, f"shard-{len(self.written):06d}.tar")
        storage.write_bytes(uri, self.buf.getvalue())
        log.info("wrote %s (%d samples, %.1f MB)", uri, self.count, self.buf.tell() / 1e6)
        self.written.append(uri)
        self.counts[uri.rstrip("/").rsplit("/", 1)[-1]] = self.count
        self.tar, self.buf = None, None


def write_shards(rows: list[dict], out: str, max_samples: int = 1000, max_bytes: int = 512 * 2**20,
                 transcode: TranscodeSpec | None = None, max_object_bytes: int | None = None,
                 read_timeout_s: float | None = None) -> ShardReport:
    """Pack ``rows`` (from ``sources.read_rows``) and their media into tar shards under ``out``
    (videos re-encoded per ``transcode`` when given).  The caps of a training read apply: a media
    object over ``max_object_bytes`` (``data.max_object_bytes``) is skipped as ``too_large`` without
    being read whole, one whose read outlasts ``read_timeout_s`` as ``read_error``."""
    if max_samples < 1 or max_bytes < 1:
        raise ValueError(f"max_samples ({max_samples}) and max_bytes ({max_bytes}) must be positive")
    writer = _ShardWriter(out, max_samples, max_bytes)
    report = ShardReport(transcode=transcode.to_dict() if transcode else None)
    for i, row in enumerate(rows):
        key = f"{i:09d}"
        meta = {k: row.get(k) for k in META_KEYS}
        meta["source_uri"] = row.get("media_uri")
        members = []
        if row.get("media_uri"):
            uri = row["media_uri"]
            try:
                if read_timeout_s is None:
                    data = read_media(uri, max_object_bytes)
                else:
                    data = with_timeout(read_timeout_s, uri, read_media, uri, max_object_bytes, reason="read_error",
                                        what="reading", setting="--read-timeout-s")
            except BadClip as e:
                report.skipped.setdefault(e.reason, []).append(uri)
                log.warning("shard: skipping %s (%s)", uri, e.reason)
                continue
            if not data:
                report.skipped.setdefault("empty", []).append(uri)
                continue
            ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else "mp4"
            if transcode is not None and row.get("modality") != "image" and not is_image(uri):
                t0 = time.perf_counter()
                try:
                    data, info = transcode_clip(data, uri, transcode)
                except BadClip as e:
                    report.skipped.setdefault(e.reason, []).append(uri)
                    log.warning("shard: skipping %s (%s: %s)", uri, e.reason, e.detail)
                    continue
                finally:
                    report.transcode_s += time.perf_counter() - t0
                report.transcoded += 1
                meta["transcode"] = info
                ext = "mp4"
            members.append((ext, data))
        members.append(("json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
        writer.add(key, members)
        report.samples += 1
    writer.flush()
    report.shards = writer.written
    report.shard_samples = writer.counts
    storage.write_text(storage.join(out, "index.json"), json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report
