"""The reliability table (docs/reliability.md): run the fault-injection suite and tabulate what each fault cost.

    .venv/bin/python benchmarks/reliability_report.py [--out reliability.md] [pytest args ...]

Runs ``pytest tests/reliability`` with ``$MPLUG2_RELIABILITY_REPORT`` pointing at a fresh JSON
Lines file; each fault test appends one row (faults injected, whether the run survived, steps and
clips lost as measured from the run's step journal, and how); the rows are printed as a Markdown
table (and written to ``--out``), with the suite's wall time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

from orchestrator.devtools.faults.report import ENV, load, markdown

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this file")
    args, pytest_args = ap.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as d:
        rows_file = Path(d) / "rows.jsonl"
        env = {**os.environ, ENV: str(rows_file)}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider",
                               *pytest_args], cwd=REPO, env=env)
        rows = load(rows_file)
    table = markdown(rows)
    print(table)
    print(f"\n{len(rows)} fault scenarios; pytest exit status {proc.returncode}; {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
