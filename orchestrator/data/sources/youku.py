"""Youku-mPLUG CSVs (pre-train, classification, retrieval, captioning)."""
from __future__ import annotations

import ast
import json
from typing import Iterator

from orchestrator.data.sources.base import (
    MalformedRow,
    ParseReport,
    csv_records,
    make_row,
    media_uri,
    need,
    parse_records,
)

# The 45 video categories of Youku-mPLUG's category-prediction benchmark, in id order.
YOUKU_CATEGORIES = (
    "翻唱", "电视剧剪辑", "电视剧周边（预告/杂谈）", "财经", "美发美妆", "萌娃日常", "传统文化", "少儿动漫",
    "医疗健康", "亲子育儿", "养生保健", "电影周边（预告/杂谈）", "篮球", "日常生活", "搞笑", "少儿才艺", "街舞",
    "广场舞", "学历教育", "房产装修", "美食制作", "竞技体育", "相声小品", "MV", "穿搭", "科技", "健身",
    "家居装饰", "纪录片", "三农", "职业职场", "游戏", "乐器演奏", "综艺", "电影剪辑", "美容护肤", "宠物",
    "生活百科", "旅游", "足球", "汽车", "动漫", "少儿玩具", "科学科普", "美食测评",
)
assert len(YOUKU_CATEGORIES) == 45


def _media(ctx, name: str) -> str:
    return media_uri(ctx, name)


def pretrain(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    def row(r, line):
        return make_row(media_uri=_media(ctx, need(r, "video_id:FILE")), text=need(r, "title"), id=f"{line}")
    return parse_records(uri, csv_records(uri, text, ("video_id:FILE", "title")), row, report)


def classification(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    def row(r, line):
        return make_row(media_uri=_media(ctx, need(r, "video_id:FILE")), text=r.get("title") or "",
                        label_name=str(need(r, "label")).strip(), id=f"{line}")
    return parse_records(uri, csv_records(uri, text, ("video_id:FILE", "title", "label")), row, report)


def retrieval(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    def row(r, line):
        return make_row(media_uri=_media(ctx, need(r, "clip_name:FILE")), text=need(r, "caption"), id=f"{line}")
    return parse_records(uri, csv_records(uri, text, ("clip_name:FILE", "caption")), row, report)


def parse_caption_list(value: str) -> list[str]:
    """``golden_caption``: a plain caption, or a list literal (JSON or Python) of captions."""
    v = value.strip()
    if not v.startswith("["):
        return [v]
    try:
        caps = json.loads(v)
    except (ValueError, RecursionError):  # not JSON (or nested too deep): try a Python literal
        try:
            caps = ast.literal_eval(v)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):  # untrusted text
            raise MalformedRow(f"golden_caption {v[:60]!r} is neither a caption nor a list literal") from None
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise MalformedRow(f"golden_caption {v[:60]!r}: expected a non-empty list of strings")
    return [c.strip() for c in caps]


def captioning(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
    def row(r, line):
        media = _media(ctx, need(r, "video_id:FILE"))
        caps = parse_caption_list(need(r, "golden_caption"))
        if ctx.split == "train":  # every reference is a training target
            return [make_row(media_uri=media, text=c, references=caps, id=f"{line}.{i}") for i, c in enumerate(caps)]
        return make_row(media_uri=media, text=caps[0], references=caps, id=f"{line}")
    return parse_records(uri, csv_records(uri, text, ("video_id:FILE", "golden_caption")), row, report)
