"""MSR-VTT captions (JSON list or JSON Lines) and MSRVTT-QA."""
from __future__ import annotations

from typing import Iterator

from orchestrator.data.sources.base import (
    MalformedRow,
    ParseReport,
    json_records,
    make_row,
    media_uri,
    need,
    parse_records,
)


def msrvtt(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    """``{"video": "video9770.mp4", "caption": str | [str, ...], "duration": 10.8}``: one row per caption."""
    def row(r, line):
        media = media_uri(ctx, need(r, "video"))
        caps = need(r, "caption")
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise MalformedRow("caption must be a non-empty string or list of strings")
        return [make_row(media_uri=media, text=c.strip(), references=[c.strip() for c in caps], id=f"{line}.{i}")
                for i, c in enumerate(caps)]
    return parse_records(uri, json_records(uri, text), row, report)


def _qa_video_file(r: dict) -> str:
    if r.get("video"):
        return str(r["video"])
    vid = need(r, "video_id")
    if isinstance(vid, int) or str(vid).isdigit():  # the original MSRVTT-QA: 7010 -> video7010.mp4
        return f"video{int(vid)}.mp4"
    vid = str(vid)
    return vid if "." in vid else f"{vid}.mp4"


def msrvtt_qa(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    """``{"video_id": 7010 | "video7010", "question": ..., "answer": ...}`` (optional ``video`` file)."""
    def row(r, line):
        return make_row(media_uri=media_uri(ctx, _qa_video_file(r)), text=str(need(r, "question")),
                        answer=str(need(r, "answer")).strip(), id=str(r.get("id", line)))
    return parse_records(uri, json_records(uri, text), row, report)
