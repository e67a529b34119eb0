"""WebVid CSV, COCO captions JSON and InternVid JSONL."""
from __future__ import annotations

import json
import re
from typing import Iterator

from orchestrator.data.sources.base import (
    AnnotationError,
    MalformedRow,
    ParseReport,
    csv_records,
    json_records,
    make_row,
    media_uri,
    need,
    parse_records,
    parse_timestamp,
)


def parse_iso_duration(text: str) -> float:
    """``PT00H00M09S`` -> 9.0"""
    m = re.fullmatch(r"P(?:T)?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", str(text).strip())
    if not m:
        raise MalformedRow(f"duration {text!r} is not ISO 8601 like PT00H00M09S")
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def webvid_csv(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    """``videoid,contentUrl,duration,page_dir,name``; the clip is ``<media>/<page_dir>/<videoid>.mp4``."""
    def row(r, line):
        vid = need(r, "videoid").strip()
        if r.get("duration"):
            parse_iso_duration(r["duration"])  # validates the row
        return make_row(media_uri=media_uri(ctx, f"{need(r, 'page_dir').strip()}/{vid}.mp4"),
                        text=need(r, "name").strip(), id=vid)
    return parse_records(uri, csv_records(uri, text, ("videoid", "contentUrl", "name", "page_dir", "duration")),
                         row, report)


def coco_captions(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    """COCO ``captions_*.json``: ``images`` [{id, file_name}] + ``annotations`` [{image_id, id, caption}]."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{uri}:{e.lineno}: not valid JSON: {e.msg}") from None
    except (RecursionError, ValueError) as e:  # one document: nested too deep, a 5000-digit number ...
        raise AnnotationError(f"{uri}: not usable JSON: {str(e)[:120] or type(e).__name__}") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("images"), list)
            or not isinstance(doc.get("annotations"), list)):
        raise AnnotationError(f"{uri}: a COCO captions file needs top-level lists 'images' and 'annotations'")
    files = {}
    for i, im in enumerate(doc["images"]):
        if (isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str)
                and im["file_name"]):
            files[im["id"]] = im["file_name"]
        else:
            report.bad(i + 1, f"images[{i}] lacks id/file_name")
    by_image: dict = {}
    for a in doc["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and isinstance(a.get("image_id"), (int, str)):
            by_image.setdefault(a.get("image_id"), []).append(a["caption"].strip())

    def row(a, line):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str)):
            raise MalformedRow(f"annotations[{line - 1}]: not an object with an image_id")
        if a.get("image_id") not in files:
            raise MalformedRow(f"annotations[{line - 1}]: image_id {a.get('image_id')!r} not in 'images'")
        cap = need(a, "caption")
        if not isinstance(cap, str):
            raise MalformedRow(f"annotations[{line - 1}]: caption is not a string")
        return make_row(media_uri=media_uri(ctx, files[a["image_id"]]), text=cap.strip(),
                        references=by_image[a["image_id"]], id=str(a.get("id", line)), modality="image")
    return parse_records(uri, ((i + 1, a) for i, a in enumerate(doc["annotations"])), row, report)


def internvid(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    """``{"YoutubeID", "Start_timestamp", "End_timestamp", "Caption", ...}``: the segment of ``<id>.mp4``."""
    def row(r, line):
        start, end = parse_timestamp(need(r, "Start_timestamp")), parse_timestamp(need(r, "End_timestamp"))
        if end <= start:
            raise MalformedRow(f"End_timestamp {r['End_timestamp']} is not after Start_timestamp {r['Start_timestamp']}")
        return make_row(media_uri=media_uri(ctx, f"{need(r, 'YoutubeID')}.mp4"), start=start, end=end,
                        text=str(need(r, "Caption")).strip(), id=f"{r['YoutubeID']}_{start:.3f}")
    return parse_records(uri, json_records(uri, text), row, report)
