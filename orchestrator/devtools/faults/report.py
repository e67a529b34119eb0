"""Rows of the reliability table: each fault test records what it injected and what it cost.

A test calls :func:`record`; the row is appended (JSON Lines) to the file named by
``$MPLUG2_RELIABILITY_REPORT`` when it is set (``benchmarks/reliability_report.py`` sets it), and
is a no-op otherwise.  :func:`markdown` renders the rows as the README table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "MPLUG2_RELIABILITY_REPORT"
COLUMNS = ("fault", "injected", "runs", "survived", "steps_lost", "clips_lost", "note")


def record(fault: str, injected: int, survived: bool, steps_lost: int | str = 0, clips_lost: int | str = 0,
           note: str = "", runs: int = 1) -> dict[str, Any]:
    row = {"fault": fault, "injected": int(injected), "runs": runs, "survived": int(bool(survived)) * runs,
           "steps_lost": steps_lost, "clips_lost": clips_lost, "note": note}
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


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| fault | faults injected | runs survived | steps lost | clips lost | note |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['injected']} | {r['survived']}/{r['runs']} | {r['steps_lost']} | "
                     f"{r['clips_lost']} | {r['note']} |")
    return "\n".join(lines)
