"""Loaded in every Python process of a ``make coverage`` run (a ``.pth`` line that the Makefile
writes for the run's duration): copies the lines the process has executed so far into a data file
of its own every few seconds.

Ray ends its actors and workers with a quick exit (no ``atexit``), so coverage's own save-on-exit
never runs in them; without this, the train loop, the decode tasks and the evaluation workers would
count as never executed.  The copy goes to a separate data file with its own SQLite connection,
used only by this thread (coverage's own file is written by the process's threads at exit; two
threads on one connection crashed a worker).  Does nothing in a process that coverage does not
measure.
"""
import os
import threading
import time

PERIOD_S = float(os.environ.get("MPLUG2_COVERAGE_FLUSH_S", "3"))


def _flush_forever() -> None:
    import coverage

    own = None
    while True:
        time.sleep(PERIOD_S)
        cov = coverage.Coverage.current()
        collector = getattr(cov, "_collector", None)
        if collector is None:
            continue
        if own is None:  # <data_file>.flush.<pid>.<random>: `coverage combine` takes it with the rest
            own = coverage.CoverageData(basename=cov.config.data_file, suffix=f"flush.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            lines = {f: set(s) for f, s in dict(collector.data).items()}  # copies: the tracer goes on adding
            own.add_lines({collector.cached_mapped_file(f): s for f, s in lines.items()})
        except Exception:  # a copy racing the process's exit: the previous copy stands
            pass


if os.environ.get("COVERAGE_PROCESS_CONFIG"):
    threading.Thread(target=_flush_forever, name="coverage-flush", daemon=True).start()
