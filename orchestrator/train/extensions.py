"""DeepSpeed's JIT-built ops (on CPU: the shared-memory allreduce) in a worker: the build uses the
locked environment's ninja, one process of a node builds at a time, and a build lock left by a
killed process does not hang the node."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

STALE_LOCK_S = 600  # far longer than DeepSpeed's CPU op takes to compile (~30 s)


def use_locked_build_tools() -> str | None:
    """Put this interpreter's own ``bin`` folder first on ``PATH`` when it holds ``ninja``.

    DeepSpeed JIT-builds its ops (on CPU: the shared-memory allreduce) with torch's extension
    builder, which runs whichever ``ninja`` ``PATH`` finds first.  The locked environment has its
    own (``requirements/main.lock``); a worker started without it on ``PATH`` finds the system's
    instead.  Two ninja versions read each other's build log as "too new" / "too old" and start
    over: each switch rebuilt the op from scratch (a minute of two cores, every worker of the node
    waiting on the build lock), three times in one run of the slow tests (its ``.ninja_log``).
    Returns the folder, or None when it has no ninja (the system's is then the only one)."""
    here = os.path.dirname(sys.executable)
    if not os.access(os.path.join(here, "ninja"), os.X_OK):
        return None
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]
    os.environ["PATH"] = os.pathsep.join([here, *parts])
    return here


def extensions_root() -> str:
    """Where torch keeps JIT-built extensions (each op's build folder and its ``lock`` below it)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")


@contextlib.contextmanager
def node_build_lock():
    """One process of this node at a time, across every process of this project that builds or
    loads DeepSpeed's ops: an ``flock`` on a file beside torch's extensions, which the kernel
    releases when its holder dies.  Inside it no live process of this project holds torch's own
    build lock (a plain file that a killed builder leaves behind), so any such lock found is a dead
    process's."""
    root = extensions_root()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".mplug2-build.flock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_cpu_comm_op():
    """Build or load DeepSpeed's CPU shared-memory allreduce before ``deepspeed.init_distributed``
    does, under :func:`node_build_lock`, after removing any torch build lock there (a killed
    builder's: the next worker waited on it forever, which a fixed age could only bound; seen as a
    9-minute hang of a job started while a killed worker's lock was younger than that age).
    DeepSpeed keeps the loaded op per process, so its own load later takes no lock.  Returns the
    op's module, or None where DeepSpeed has no such op for this machine."""
    from deepspeed.comm.torch import build_shm_op

    with node_build_lock():
        clear_stale_extension_locks(max_age_s=0.0)
        return build_shm_op()


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove torch JIT-extension build locks left by a killed process.

    DeepSpeed's CPU backend JIT-builds its shared-memory allreduce op under a lock file in the
    torch extensions directory; a worker SIGKILLed while holding it (a preemption, a fault) leaves
    the file behind and every later worker on that node waits for it forever.  A lock older than
    any real build is stale: remove it, and say so.
    """
    root = extensions_root()
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
        except OSError:
            continue  # another worker removed it first
    if removed:
        log.warning("removed stale torch extension build lock(s) left by a killed process: %s", removed)
    return removed
