"""Training batches that hold whole groups of related rows: hard negatives side by side.

A contrastive batch teaches what tells its rows apart.  When the rows that differ in one detail only
(the same scene with another action; the synthetic clips' four directions of one coloured shape)
rarely meet in a batch, the losses that compare in-batch rows never ask for that detail: the
matching loss draws its hard negatives from the batch alone.  ``data.group_pattern`` names the groups:
rows whose text gives the same match of the regular expression (its first group when it has one)
belong together; the data plane writes each row's group id (:func:`group_id`, the :data:`GROUP_KEY`
column), and each worker re-deals its stream (:func:`group_batches`) so that every batch holds
``batch_size / data.group_size`` groups of ``data.group_size`` rows with different texts each.

The re-dealing keeps the worker's number of batches: one batch leaves for every batch that comes in
once ``data.group_buffer`` rows are buffered, and the buffer is emptied at the end of the pass (so
every rank still takes the same number of steps). Rows without a group, and rows no complete group
can take, fill the batches in the order they came. The choice of groups is seeded (the pass's
shuffle seed), so a deterministic run stays deterministic.
"""
from __future__ import annotations

import random
import re
import zlib
from typing import Any, Iterator

GROUP_KEY = "group"  # int64 per row: its group (-1: none); dropped before the batch reaches the workload
NO_GROUP = -1


def group_id(text: str, pattern: re.Pattern | None) -> int:
    """The row's group: a 31-bit hash of the pattern's match in ``text`` (its first group when it has
    one), or :data:`NO_GROUP` when it does not match."""
    if pattern is None:
        return NO_GROUP
    m = pattern.search(text)
    if m is None:
        return NO_GROUP
    key = m.group(1) if pattern.groups else m.group(0)
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch[GROUP_KEY])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _text_key(row: dict[str, Any]) -> tuple:
    """Rows with equal text ids (and mask) are one text: never two of them in one group's rows."""
    ids = row.get("text_ids")
    if ids is None:
        return (id(row),)
    mask = row.get("text_mask")
    return tuple((ids * mask if mask is not None else ids).tolist())


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != GROUP_KEY}


class _Pool:
    """The buffered rows, in arrival order, and a seeded choice of complete groups from them."""

    def __init__(self, group_size: int, seed: int) -> None:
        self.group_size, self.rng = group_size, random.Random(seed)
        self.rows: list[dict[str, Any]] = []

    def take(self, batch_size: int) -> list[dict[str, Any]]:
        by_group: dict[int, dict[tuple, int]] = {}   # group -> text -> its oldest row's position
        for pos, row in enumerate(self.rows):
            g = int(row[GROUP_KEY])
            if g != NO_GROUP:
                by_group.setdefault(g, {}).setdefault(_text_key(row), pos)
        complete = sorted(g for g, texts in by_group.items() if len(texts) >= self.group_size)
        self.rng.shuffle(complete)
        picked: list[int] = []
        for g in complete[:batch_size // self.group_size]:
            picked += self.rng.sample(sorted(by_group[g].values()), self.group_size)
        chosen = set(picked)
        for pos in range(len(self.rows)):                     # the rest: oldest first
            if len(picked) >= batch_size:
                break
            if pos not in chosen:
                picked.append(pos)
                chosen.add(pos)
        out = [self.rows[p] for p in picked]
        self.rows = [r for p, r in enumerate(self.rows) if p not in chosen]
        return out


def group_batches(batches, batch_size: int, group_size: int, buffer_rows: int, seed: int) -> Iterator[dict]:
    """Re-deal full batches (each carrying :data:`GROUP_KEY`) into batches of whole groups; as many
    batches out as in, :data:`GROUP_KEY` dropped."""
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size {batch_size}")
    pool = _Pool(group_size, seed)
    pending = 0                                               # batches in, not yet out
    for batch in batches:
        if GROUP_KEY not in batch:                            # an ungrouped stream: passes through
            yield batch
            continue
        pool.rows += _rows(batch)
        pending += 1
        if len(pool.rows) >= max(buffer_rows, batch_size):
            yield _stack(pool.take(batch_size))
            pending -= 1
    while pending and len(pool.rows) >= batch_size:
        yield _stack(pool.take(batch_size))
        pending -= 1
