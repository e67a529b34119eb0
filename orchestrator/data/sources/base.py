"""Shared pieces of the source adapters: the row shape, line-numbered parsing, malformed rows.

A row is a plain dict::

    media_uri   str | None   the clip / image (None for text-only rows)
    start, end  float | None a segment of the clip in seconds (None = the whole clip)
    text        str          caption / title / question / first sentence
    text_b      str | None   second sentence (GLUE pairs)
    answer      str | None   QA answer (captioning targets come from ``text``)
    label       int | None   class id
    label_name  str | None   the class as written in the file
    clip_index  int          rows showing the same clip share it (retrieval)
    id          str          stable id within the split
    modality    "video" | "image" | "text"
    references  list[str]    every reference caption (captioning evaluation)

A malformed row is skipped and reported with its file and line; a file where more than
``max_bad_fraction`` of the rows are malformed, or a missing required column, raises
:class:`AnnotationError`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from orchestrator import storage

log = logging.getLogger(__name__)

ROW_KEYS = ("media_uri", "start", "end", "text", "text_b", "answer", "label", "label_name", "clip_index", "id",
            "modality", "references")


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is; the message names the file (and line)."""


class MalformedRow(ValueError):
    """One row that cannot be parsed (raised inside an adapter, caught and counted by the reader)."""


def make_row(**kw: Any) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update(kw)
    if row["references"] is None:
        row["references"] = [row["text"]] if row.get("text") else []
    if row["modality"] is None:
        row["modality"] = "video" if row["media_uri"] else "text"
    return row


@dataclass
class ParseReport:
    """Rows kept and malformed rows skipped (file:line: why) for one annotation file."""

    uri: str
    rows: int = 0
    malformed: list[str] = field(default_factory=list)

    def bad(self, line: int, why: str) -> None:
        msg = f"{self.uri}:{line}: {why}"
        if len(self.malformed) < 20:
            log.warning("malformed annotation row skipped: %s", msg)
        self.malformed.append(msg)

    def check(self, max_bad_fraction: float) -> None:
        total = self.rows + len(self.malformed)
        if self.malformed and (self.rows == 0 or len(self.malformed) / total > max_bad_fraction):
            shown = "\n  ".join(self.malformed[:10])
            raise AnnotationError(f"{self.uri}: {len(self.malformed)} of {total} rows are malformed "
                                  f"(limit {max_bad_fraction:.0%}); first ones:\n  {shown}")


def read_text(uri: str) -> str:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {uri}") from None
    except Exception as e:  # noqa: BLE001 - boto's NoSuchKey and friends
        if "NoSuchKey" in str(e) or "404" in str(e):
            raise AnnotationError(f"annotation file not found: {uri}") from None
        raise
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{uri}: not UTF-8 text ({e})") from None


def csv_records(uri: str, text: str, required: tuple[str, ...], delimiter: str = ",",
                quoting: int = csv.QUOTE_MINIMAL) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) for each data row; checks the header names ``required``."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise AnnotationError(f"{uri}: empty file, expected a header with {', '.join(required)}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(f"{uri}:1: header {header} lacks column(s) {missing}; this format needs "
                              f"{', '.join(required)}")
    for values in reader:
        line = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield line, {"__error__": f"{len(values)} fields, the header has {len(header)}"}
            continue
        yield line, dict(zip(header, values))


def json_records(uri: str, text: str) -> Iterator[tuple[int, Any]]:
    """(line, record) from a JSON list (line = index + 1) or JSON Lines; bad lines yield an error."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{uri}:{e.lineno}: not valid JSON: {e.msg}") from None
        yield from ((i + 1, r) for i, r in enumerate(items))
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, {"__error__": f"not valid JSON: {e.msg}"}


def parse_records(uri: str, records: Iterator[tuple[int, Any]], to_row, report: ParseReport) -> list[dict]:
    """Apply ``to_row(record, line)`` to each record; MalformedRow/KeyError/ValueError are counted."""
    rows = []
    for line, rec in records:
        if isinstance(rec, dict) and "__error__" in rec:
            report.bad(line, rec["__error__"])
            continue
        try:
            out = to_row(rec, line)
        except KeyError as e:
            report.bad(line, f"missing field {e}")
            continue
        except (MalformedRow, ValueError, TypeError) as e:
            report.bad(line, str(e))
            continue
        for r in out if isinstance(out, list) else [out]:
            rows.append(r)
        report.rows += 1
    return rows


def need(rec: dict, key: str) -> Any:
    v = rec.get(key) if isinstance(rec, dict) else None
    if v is None or (isinstance(v, str) and not v.strip()):
        raise MalformedRow(f"empty or missing field {key!r}")
    return v


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.mmm`` / ``MM:SS`` / seconds -> seconds."""
    parts = str(text).strip().split(":")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise MalformedRow(f"bad timestamp {text!r}, expected HH:MM:SS.mmm") from None
    secs = 0.0
    for v in vals:
        secs = secs * 60 + v
    return secs


def assign_clip_index(rows: list[dict]) -> list[dict]:
    """Rows showing the same media share a clip index, in order of first appearance."""
    seen: dict[Any, int] = {}
    for r in rows:
        key = (r["media_uri"], r["start"], r["end"]) if r["media_uri"] else ("text", r["id"])
        r["clip_index"] = seen.setdefault(key, len(seen))
    return rows
