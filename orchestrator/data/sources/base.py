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
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

ROW_KEYS = ("media_uri", "start", "end", "text", "text_b", "answer", "label", "label_name", "clip_index", "id",
            "modality", "references")


class AnnotationError(ValueError, UserError):
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


class Counted:
    """How many items were added, and the first :attr:`keep` of them: ``len()`` is the count,
    iterating and indexing see the kept examples.  A file of a million malformed rows costs a few
    bytes, not a message per row (``data.max_annotation_bytes`` bounds the file, this the memory)."""

    def __init__(self, keep: int = 20):
        self.keep, self.count, self.examples = keep, 0, []

    def append(self, item: str) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(item)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __repr__(self) -> str:
        return f"Counted({self.count}, first {self.examples[:3]})"


@dataclass
class ParseReport:
    """Rows kept and malformed rows skipped (file:line: why) for one annotation file: every
    malformed row is counted, the first 20 are kept as examples (:class:`Counted`)."""

    uri: str
    rows: int = 0
    malformed: Counted = field(default_factory=Counted)

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


def read_text(uri: str, max_bytes: int | None = None, timeout_s: float | None = None) -> str:
    """The whole annotation file as text; larger than ``max_bytes`` (``data.max_annotation_bytes``)
    is an AnnotationError before it is read, and so is a read longer than ``timeout_s``
    (``data.read_timeout_s``)."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    except storage.TooLarge as e:
        raise AnnotationError(f"{e}; raise data.max_annotation_bytes if this file is meant to be this big, "
                              "or split it") from None
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {uri}") from None
    except TimeoutError as e:
        raise AnnotationError(f"{e} (data.read_timeout_s)") from None
    except storage.NotARegularFile:
        raise AnnotationError(f"annotation file {uri} is not a regular file (a FIFO, device or folder)") from None
    except IsADirectoryError:
        raise AnnotationError(f"annotation file {uri} is a folder") from None
    except Exception as e:  # boto's NoSuchKey and friends
        if storage.is_missing(e):
            raise AnnotationError(f"annotation file not found: {uri}") from None
        raise
    # bytes that are not UTF-8 become lone surrogates, and the rows holding them malformed rows
    # (parse_records): one bad row costs that row, not the file
    return data.decode("utf-8-sig", errors="surrogateescape")


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
    """(line, record) from a JSON list (line = index + 1) or JSON Lines; bad lines yield an error.
    Streamed: one record is decoded at a time, so a file's parse holds its text and the current
    record, never a list of every record (memory per row stays flat, however many rows)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_array_elements(uri, text, len(text) - len(stripped))
        return
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        yield i, _loads_record(line)


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (``str.splitlines`` would hold all of them at once)."""
    start, n = 0, len(text)
    while start < n:
        end = text.find("\n", start)
        end = n if end < 0 else end
        yield text[start:end]
        start = end + 1


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
_JSON_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _json_array_elements(uri: str, text: str, start: int) -> Iterator[tuple[int, Any]]:
    """The elements of the top-level JSON array opening at ``text[start]``, one by one (index + 1,
    record).  Each is decoded where it stands (``raw_decode``); one that cannot be (nested too deep,
    a 5000-digit number, a syntax error inside it) is one malformed row, found its end by a bracket
    scan that skips strings whole.  Brackets that never close are an :class:`AnnotationError`."""
    pos, index = _JSON_WS.match(text, start + 1).end(), 0
    if text.startswith("]", pos):
        return
    while True:
        index += 1
        try:
            rec, end = _DECODER.raw_decode(text, pos)
            pos = _JSON_WS.match(text, end).end()
            if not text.startswith((",", "]"), pos):
                raise json.JSONDecodeError("expected ',' or ']' after an element", text, pos)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            rec = {"__error__": _why(e)}
            pos = _element_end(uri, text, pos)
        yield index, rec
        if text.startswith("]", pos):
            return
        pos = _JSON_WS.match(text, pos + 1).end()


def _why(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e.msg}"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"not usable JSON: {str(e)[:120]}"


def _element_end(uri: str, text: str, pos: int) -> int:
    """The position of the ``,`` or ``]`` that ends the array element starting at ``pos``."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, pos):
        tok = m.group()
        if tok[0] == '"':
            continue
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            if depth == 0:
                return m.start()
            depth -= 1
        elif depth == 0:  # a comma between top-level elements
            return m.start()
    raise AnnotationError(f"{uri}: not valid JSON: unbalanced brackets")


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
        out = out if isinstance(out, list) else [out]
        if any(_undecodable(r) for r in out):
            report.bad(line, "holds bytes that are not UTF-8 text")
            continue
        report.rows += 1
        yield from out


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def media_uri(ctx, name: Any) -> str:
    """The URI of a row's media ``name``: relative names under the source's media folder
    (``ctx.media``), absolute ones (a path, an ``s3://`` URI) only inside it or inside a prefix the
    config allows (``ctx.allowed``: ``data.allowed_media_prefixes``).  A name with a control
    character (NUL ...), one that names no object (``s3:///x.mp4``), another scheme, or one that
    leads elsewhere (``../../etc/passwd``, another bucket) is this row's :class:`MalformedRow`,
    counted with its file and line like any other: an annotation file cannot make a run read
    what its config did not point at."""
    name = str(name).strip()
    if not name:
        raise MalformedRow("empty media name")
    if _CONTROL.search(name):
        raise MalformedRow(f"media name {name[:80]!r} holds a control character")
    uri = storage.resolve(ctx.media, name)
    try:
        storage.normalized(uri)
    except ValueError as e:
        raise MalformedRow(f"media name {name[:80]!r}: {e}") from None
    allowed = (ctx.media, *getattr(ctx, "allowed", ()))
    if not any(storage.is_within(uri, folder) for folder in allowed):
        raise MalformedRow(f"media {name[:80]!r} lies outside the source's media folder {ctx.media}; a row may only "
                           "name media inside it (or inside data.allowed_media_prefixes)")
    return uri


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" made of bytes that are not UTF-8


def _undecodable(row: dict) -> bool:
    return any(isinstance(v, str) and _NOT_UTF8.search(v) for v in row.values()) or any(
        _NOT_UTF8.search(r) for r in row.get("references") or () if isinstance(r, str))


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
