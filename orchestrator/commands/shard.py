"""Pack a dataset's clips and annotations into webdataset tar shards, so an epoch over a million
clips costs a few thousand GETs instead of a million.  Read them back with ``format: wds``.

Example::

    python -m orchestrator shard --source msrvtt --root s3://bucket/msrvtt \\
        --annotations annotations/train.jsonl --media videos --out s3://bucket/msrvtt-shards/train
"""
from __future__ import annotations

import argparse
import json


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


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError  # noqa: PLC0415
    from orchestrator.data.config import SourceConfig  # noqa: PLC0415
    from orchestrator.data.shards import write_shards  # noqa: PLC0415
    from orchestrator.data.sources import AnnotationError, read_rows  # noqa: PLC0415

    try:
        files = {"train": args.annotations, "val": args.annotations}
        src = SourceConfig(format=args.source, media=args.media, labels=args.labels, **files)
    except ValueError as e:
        raise ConfigError(f"shard: {e}") from None
    try:
        rows = read_rows(src, args.root, args.split, args.max_bad_fraction)
    except AnnotationError as e:
        raise ConfigError(str(e)) from None
    report = write_shards(rows, args.out, args.shard_samples, int(args.shard_mb * 2**20))
    print(json.dumps({"source": args.source, "rows": len(rows), **report.to_dict()}, ensure_ascii=False))
    return 0
