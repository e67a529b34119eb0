"""Rows of the reliability table: each fault test records what it injected and what it cost.

Every column comes from the run, none is typed in.  A test calls :func:`record` with an
:class:`Injected` (the faults, counted from the injector's own log: the S3 proxy's counters, the
list of processes it killed, the outages it made), the run's outcome (``survived``: a bool or one
per run, computed from what the run returned) and a :class:`Measured`: the "steps lost" and "clips
lost" of a row are only ever computed from what a run recorded (the step journal of
:mod:`orchestrator.train.journal`, the decode counts of a clip batch), never passed in as
numbers; :func:`record` refuses anything else, and ``tests/reliability/test_measured.py`` checks
that no call passes a literal in any of these places.  The row is appended (JSON Lines) to the file
named by ``$MPLUG2_RELIABILITY_REPORT`` when it is set (``benchmarks/reliability_report.py`` sets
it), and is a no-op otherwise.  :func:`markdown` renders the rows as the table of docs/reliability.md.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

ENV = "MPLUG2_RELIABILITY_REPORT"
COLUMNS = ("fault", "injected", "runs", "survived", "steps_lost", "clips_lost", "how", "note")
_TOKEN = object()  # only this module's constructors make a Measured


class Measured:
    """Steps lost and clips lost derived from a run's records, with a sentence saying how.

    ``None`` means "does not apply" (no training run, or rows without ids) and is shown as n/a
    with the reason in ``how``; ``evidence`` keeps the counts the figures came from."""

    __slots__ = ("steps_lost", "clips_lost", "how", "evidence")

    def __init__(self, token, steps_lost: int | None, clips_lost: int | None, how: str, evidence: dict[str, Any]):
        if token is not _TOKEN:
            raise TypeError("a Measured comes from Measured.from_journal / from_clip_accounting / not_a_run, "
                            "never from figures written in")
        self.steps_lost, self.clips_lost, self.how, self.evidence = steps_lost, clips_lost, how, evidence

    def __repr__(self) -> str:
        return f"Measured(steps_lost={self.steps_lost}, clips_lost={self.clips_lost}, {self.evidence})"

    @classmethod
    def from_journal(cls, lines: Iterable[dict[str, Any]], split_size: int | None = None, bad: int = 0,
                     epochs: int | None = None, stream: str = "train") -> "Measured":
        """From the step journal of one run (all its attempts, all ranks).

        Steps lost: optimizer steps computed more than once (rank 0's step indices over every
        attempt, minus the distinct ones).  Clips lost: for each of the run's ``epochs`` complete
        epochs, the clips of the split (``split_size``) minus the distinct clips the run trained
        in that epoch, summed, minus ``bad`` (clips counted bad in the run).  A step's clips are
        those of the last attempt that computed it (a fault rolls back to the last checkpoint, so
        an earlier attempt's copy of that step did not reach the final model).
        """
        lines = list(lines)
        rank0 = [ln for ln in lines if ln.get("rank", 0) == 0]
        computed = Counter(int(ln["step"]) for ln in rank0)
        steps_lost = sum(n - 1 for n in computed.values())
        attempts = list(dict.fromkeys(ln["attempt"] for ln in rank0))
        last: dict[tuple[int, int], dict[str, Any]] = {}
        for ln in lines:  # files are appended in time order: a later line of (rank, step) replaces an earlier one
            last[(int(ln.get("rank", 0)), int(ln["step"]))] = ln
        evidence: dict[str, Any] = {"steps_computed": sum(computed.values()), "distinct_steps": len(computed),
                                    "attempts": len(attempts), "ranks": len({k[0] for k in last})}
        has_keys = any(ln.get("keys") for ln in lines)
        if split_size is None or not has_keys:
            why = "in-memory rows without clip ids" if not has_keys else "no split size given"
            return cls(_TOKEN, steps_lost, None, f"steps: step journal, repeats of a step index; clips: n/a ({why})",
                       evidence)
        per_epoch: dict[int, Counter] = defaultdict(Counter)
        for ln in last.values():
            if stream in ln.get("streams", [stream]):
                per_epoch[int(ln["epoch"])].update(int(k) for k in ln["keys"])
        n_epochs = epochs if epochs is not None else len(per_epoch)
        trained = [len(per_epoch.get(e, ())) for e in range(n_epochs)]
        twice = [sum(n - 1 for n in per_epoch.get(e, Counter()).values()) for e in range(n_epochs)]
        clips_lost = sum(split_size - t for t in trained) - int(bad)
        evidence.update({"split": split_size, "epochs": n_epochs, "trained_per_epoch": trained,
                         "trained_twice_per_epoch": twice, "counted_bad": int(bad)})
        return cls(_TOKEN, steps_lost, clips_lost,
                   "step journal: steps = repeats of a step index over attempts; clips = per epoch, split minus "
                   "distinct clip ids trained, minus counted bad", evidence)

    @classmethod
    def from_clip_accounting(cls, total: int, kept: int, bad: int) -> "Measured":
        """A clip batch read without a training run: clips lost = clips in it - decoded - counted bad."""
        return cls(_TOKEN, None, int(total) - int(kept) - int(bad),
                   "no training run; clips = rows read - decoded - counted bad",
                   {"total": int(total), "kept": int(kept), "bad": int(bad)})

    @classmethod
    def not_a_run(cls, what: str) -> "Measured":
        """A row that exercises no training run: nothing to lose; ``what`` says what was checked instead."""
        return cls(_TOKEN, None, None, f"n/a: no training run ({what})", {})


class Injected:
    """How many faults a test injected, counted from its own record of injecting them."""

    __slots__ = ("count", "what")

    def __init__(self, token, count: int, what: str):
        if token is not _TOKEN:
            raise TypeError("an Injected comes from Injected.of / Injected.counted, never from a figure written in")
        self.count, self.what = int(count), what

    def __repr__(self) -> str:
        return f"Injected({self.count}: {self.what})"

    @classmethod
    def of(cls, events: Iterable[Any], what: str) -> "Injected":
        """One fault per event the test logged as it injected it (a killed pid, an outage's start ...)."""
        return cls(_TOKEN, len(list(events)), what)

    @classmethod
    def counted(cls, count: int, by: str) -> "Injected":
        """A count kept by the injector itself (the S3 proxy's counters)."""
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"a counted injection is the injector's integer count, got {count!r}")
        return cls(_TOKEN, count, by)


def record(fault: str, injected: Injected, survived: bool | list[bool], measured: Measured,
           note: str = "") -> dict[str, Any]:
    """A row; ``survived`` is the run's outcome (one bool per run when the row covers several)."""
    if not isinstance(measured, Measured):
        raise TypeError(f"record() takes a Measured (derived from the run), got {type(measured).__name__}")
    if not isinstance(injected, Injected):
        raise TypeError(f"record() takes an Injected (counted from the injector's log), got {type(injected).__name__}")
    outcomes = list(survived) if isinstance(survived, (list, tuple)) else [survived]
    if not outcomes or not all(isinstance(o, bool) for o in outcomes):
        raise TypeError(f"survived is the run's outcome, a bool per run, got {survived!r}")
    runs = len(outcomes)
    row = {"fault": fault, "injected": injected.count, "runs": runs, "survived": sum(outcomes),
           "steps_lost": measured.steps_lost, "clips_lost": measured.clips_lost, "how": measured.how,
           "evidence": {**measured.evidence, "injected": injected.what}, "note": note}
    path = os.environ.get(ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cell(v: Any) -> str:
    return "n/a" if v is None else str(v).replace("|", "\\|")  # a pipe would end the Markdown cell


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| fault | faults injected | runs survived | steps lost | clips lost | how measured | note |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {_cell(r['fault'])} | {r['injected']} | {r['survived']}/{r['runs']} | {_cell(r['steps_lost'])} | "
                     f"{_cell(r['clips_lost'])} | {_cell(r.get('how', ''))} | {_cell(r['note'])} |")
    return "\n".join(lines)
