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
import math
import re
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


def read_text(uri: str, max_bytes: int | None = None) -> str:
    """The whole annotation file as text; larger than ``max_bytes`` (``data.max_annotation_bytes``)
    is an AnnotationError before it is read."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.TooLarge as e:
        raise AnnotationError(f"{e}; raise data.max_annotation_bytes if this file is meant to be this big, "
                              "or split it") from None
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {uri}") from None
    except Exception as e:  # boto's NoSuchKey and friends
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
    except csv.Error as e:
        raise AnnotationError(f"{uri}:1: unreadable header: {e}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationError(f"{uri}:1: header {header} lacks column(s) {missing}; this format needs "
                              f"{', '.join(required)}")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over csv.field_size_limit() (128 KiB), a NUL byte ...: this row only
            yield reader.line_num, {"__error__": f"unreadable CSV row: {e}"}
            continue
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
        except (RecursionError, ValueError):  # an element nested too deep, a 5000-digit number ...
            yield from _json_array_elements(uri, text)
            return
        yield from ((i + 1, r) for i, r in enumerate(items))
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        yield i, _loads_record(line)


def _loads_record(text: str) -> Any:
    """One JSON record, or an ``__error__`` record saying why not (never an exception)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return {"__error__": f"not valid JSON: {e.msg}"}
    except RecursionError:
        return {"__error__": "JSON nested too deeply"}
    except ValueError as e:  # e.g. an integer past sys.get_int_max_str_digits()
        return {"__error__": f"not usable JSON: {str(e)[:120]}"}


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _json_array_elements(uri: str, text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array one by one (index + 1, record), so one element that
    cannot be decoded (nested too deep) is one malformed row; strings are skipped whole by the regex."""
    depth, start, index = 0, None, 0
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            continue
        if tok in "[{":
            depth += 1
            if depth == 1:
                start = m.end()
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1:  # a comma between top-level elements
            index += 1
            yield index, _loads_record(text[start:m.start()])
            start = m.end()
        if depth < 0:
            break
    if depth != 0 or start is None:
        raise AnnotationError(f"{uri}: not valid JSON: unbalanced brackets")
    last = text[start:m.start()]
    if last.strip():
        index += 1
        yield index, _loads_record(last)


def parse_records(uri: str, records: Iterator[tuple[int, Any]], to_row, report: ParseReport) -> Iterator[dict]:
    """Apply ``to_row(record, line)`` to each record; MalformedRow/KeyError/ValueError are counted.
    Lazy: rows come out as the records are read (a streamed read holds one file's text, not its rows);
    ``report`` is complete once the iterator is exhausted."""
    for line, rec in records:
        if isinstance(rec, dict) and "__error__" in rec:
            report.bad(line, rec["__error__"])
            continue
        try:
            out = to_row(rec, line)
        except KeyError as e:
            report.bad(line, f"missing field {e}")
            continue
        except RecursionError:
            report.bad(line, "record nested too deeply")
            continue
        except (MalformedRow, ValueError, TypeError, AttributeError, IndexError, OverflowError) as e:
            # a field of the wrong type (a list where a string belongs ...) is this row's problem only
            report.bad(line, str(e)[:300] or type(e).__name__)
            continue
        report.rows += 1
        yield from out if isinstance(out, list) else [out]


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
    if not math.isfinite(secs) or secs < 0:
        raise MalformedRow(f"bad timestamp {text!r}: expected a finite, non-negative HH:MM:SS.mmm")
    return secs


def assign_clip_index(rows: list[dict]) -> list[dict]:
    """Rows showing the same media share a clip index, in order of first appearance."""
    seen: dict[Any, int] = {}
    for r in rows:
        key = (r["media_uri"], r["start"], r["end"]) if r["media_uri"] else ("text", r["id"])
        r["clip_index"] = seen.setdefault(key, len(seen))
    return rows
