"""Row ids of the data plane: ``clip_index`` (rows showing the same clip share it) and ``sample_key``
(one per row and epoch, what a resumed epoch leaves out), both stable across processes and runs.

Both are 63-bit hashes with the :data:`HASHED` bit set, computed where the row is read (a Ray
task), from the row's source, file and content or position in its file, never from a position
the driver counted: the driver never holds the rows (``orchestrator.data.annotations``).
"""
from __future__ import annotations

import hashlib
from typing import Any

# Not part of the workload contract: a per-row id unique within an epoch, which the train loop
# records so a resumed epoch leaves out the rows it already trained on (orchestrator.data.progress).
SAMPLE_KEY = "sample_key"
HASHED = 1 << 62  # ids hashed from a URI carry this bit; counted ids (offsets, positions) stay below it


def stable_id(*parts: Any) -> int:
    """A 63-bit id from ``parts`` (the same in every process and run), with the :data:`HASHED` bit
    set so it never equals a counted id."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return HASHED | (int.from_bytes(digest, "big") & (HASHED - 1))


def unit_draw(*parts: Any) -> float:
    """A number in [0, 1) from ``parts``, the same in every process (seeded weight fractions)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def seed_part(uri: str, root: str) -> str:
    """``uri`` as a seed ingredient: relative to the data root when under it, so a seeded draw
    (shuffle window, weight fraction, frames, crops) is the same wherever the dataset lives (a
    fresh clone, another bucket); ids stay absolute."""
    root = root.rstrip("/")
    if root and uri.startswith(root + "/"):
        return uri[len(root) + 1:]
    return uri


def clip_id(ns: str, row: dict) -> int:
    """Rows of one source (``ns``) showing the same media and segment share an id; a text-only row
    is its own clip (by its id)."""
    if row.get("media_uri"):
        return stable_id(ns, "clip", row["media_uri"], row.get("start"), row.get("end"))
    return stable_id(ns, "text", row.get("id"))
