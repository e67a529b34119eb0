"""An optional record of every optimizer step a worker computes, for measuring what a fault cost.

With ``$MPLUG2_STEP_JOURNAL`` set to a local folder (the driver forwards it to the Ray Train
workers), each rank appends one JSON line per optimizer step to ``<folder>/rank<r>.jsonl``:
the attempt (host, pid, start time: one per worker process, so one per restart), the step index,
the epoch, and the ``sample_key`` of every row the step trained on.  A step index that appears
in two attempts was computed twice (work lost to a fault); the rows of the last attempt that
computed a step are the ones the final model trained on.  ``tests/reliability`` derives the
reliability table's "steps lost" and "clips lost" from these files.  Unset: nothing is recorded.
"""
from __future__ import annotations

import json
import os
import socket
import time

ENV = "MPLUG2_STEP_JOURNAL"


class StepJournal:
    def __init__(self, rank: int, folder: str | None = None) -> None:
        self.folder = folder if folder is not None else os.environ.get(ENV) or None
        self.rank = rank
        self.attempt = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._keys: list[int] = []
        self._streams: list[str] = []

    def batch(self, stream: str, keys) -> None:
        """A micro-batch's sample keys (before the optimizer step it belongs to)."""
        if self.folder is None:
            return
        values = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        self._keys.extend(int(k) for k in values)
        self._streams.append(stream)

    def step(self, step: int, epoch: int) -> None:
        """The optimizer step ``step`` was computed (in ``epoch``): one line with its rows."""
        if self.folder is None:
            return
        line = {"attempt": self.attempt, "rank": self.rank, "step": int(step), "epoch": int(epoch),
                "keys": self._keys, "streams": sorted(set(self._streams))}
        self._keys, self._streams = [], []
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{self.rank}.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def read(folder: str) -> list[dict]:
    """Every line of every rank's journal in ``folder`` (a torn last line of a killed worker skipped)."""
    out = []
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out
