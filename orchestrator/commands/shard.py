"""Pack a dataset's clips and annotations into webdataset tar shards, so an epoch over a million
clips costs a few thousand GETs instead of a million.  Read them back with ``format: wds``.

Example::

    python -m orchestrator shard --source msrvtt --root s3://bucket/msrvtt \\
        --annotations annotations/train.jsonl --media videos --out s3://bucket/msrvtt-shards/train

``--transcode`` re-encodes every video into the shards at a training resolution (``--short-side``,
default 256), ``--max-fps`` (default 30), a keyframe every ``--gop`` frames (default 8) and no
B-frames; the source clips stay untouched and ``index.json`` records the parameters.  Exact frame
sampling on such shards decodes a few small frames per frame returned instead of a GOP of
full-size ones.
"""
from __future__ import annotations

import argparse
import json

from orchestrator import storage
from orchestrator.config import ConfigError
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.shards import write_shards
from orchestrator.data.sources import AnnotationError, Caps, read_rows
from orchestrator.data.transcode import TranscodeSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="source adapter name (e.g. msrvtt, youku_retrieval, webvid_csv)")
    p.add_argument("--root", default="", help="dataset root URI; annotation and media paths are relative to it")
    p.add_argument("--annotations", nargs="+", required=True, help="annotation file(s), relative to --root or URIs")
    p.add_argument("--media", default="videos", help="media folder, relative to --root or a URI (default videos)")
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="which split the files are (captioning keeps every reference on train)")
    p.add_argument("--labels", default="auto", help="classification labels: auto, youku, train (default auto)")
    p.add_argument("--out", required=True, help="destination folder or s3:// prefix for shard-NNNNNN.tar")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--shard-mb", type=float, default=512, help="shard size in MB at most (default 512)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="malformed annotation rows tolerated")
    p.add_argument("--transcode", action="store_true",
                   help="re-encode videos (H.264, short GOP, no B-frames) at a training resolution into the shards")
    p.add_argument("--short-side", type=int, default=256, help="--transcode: shorter side in pixels (0 = keep)")
    p.add_argument("--max-fps", type=float, default=30.0, help="--transcode: frame-rate cap (0 = keep)")
    p.add_argument("--gop", type=int, default=8, help="--transcode: a keyframe every N frames (default 8)")
    p.add_argument("--crf", type=int, default=23, help="--transcode: x264 quality (default 23)")
    # the caps of a training read (data.*), so what is packed could also have been trained on
    defaults = DataConfig.model_fields
    p.add_argument("--max-annotation-bytes", type=int, default=defaults["max_annotation_bytes"].default,
                   help="an annotation file larger than this is an error (as data.max_annotation_bytes)")
    p.add_argument("--max-object-bytes", type=int, default=defaults["max_object_bytes"].default,
                   help="a clip/image larger than this is skipped as too_large, never read whole "
                        "(as data.max_object_bytes)")
    p.add_argument("--read-timeout-s", type=float, default=defaults["read_timeout_s"].default,
                   help="a clip whose read takes longer is skipped as read_error (as data.read_timeout_s)")
    p.add_argument("--allow-media-prefix", action="append", default=[], metavar="URI",
                   help="a folder or s3:// prefix rows may name media in besides --media (as "
                        "data.allowed_media_prefixes; repeatable)")


def run(args: argparse.Namespace) -> int:
    try:
        files = {"train": args.annotations, "val": args.annotations}
        src = SourceConfig(format=args.source, media=args.media, labels=args.labels, **files)
        spec = (TranscodeSpec(short_side=args.short_side, max_fps=args.max_fps, gop=args.gop, crf=args.crf)
                if args.transcode else None)
        for name in ("max_annotation_bytes", "max_object_bytes", "read_timeout_s"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    except ValueError as e:
        raise ConfigError(f"shard: {e}") from None
    caps = Caps(annotation_bytes=args.max_annotation_bytes, object_bytes=args.max_object_bytes,
                read_timeout_s=args.read_timeout_s)
    allowed = tuple(storage.resolve(args.root, p) for p in args.allow_media_prefix)
    try:
        rows = read_rows(src, args.root, args.split, args.max_bad_fraction, caps, allowed)
    except AnnotationError as e:
        raise ConfigError(str(e)) from None
    report = write_shards(rows, args.out, args.shard_samples, int(args.shard_mb * 2**20), transcode=spec,
                          max_object_bytes=args.max_object_bytes, read_timeout_s=args.read_timeout_s)
    print(json.dumps({"source": args.source, "rows": len(rows), **report.to_dict()}, ensure_ascii=False))
    return 0
