"""One run per name: a lease on the run folder, taken before any training starts.

Two drivers started with the same name would otherwise interleave their checkpoints (Ray Train
resumes from whatever the other wrote) and their MLflow metrics (both re-open the same run).  The
driver takes the lease before Ray starts, renews it while it trains (a heartbeat thread) and
releases it at the end.

The lease is a sequence of small JSON objects ``<run_dir>/_lease/<generation>.json``; the highest
generation is the current one.  Taking the lease writes the next generation with an exclusive
create (S3 conditional put ``If-None-Match: *``, a hard link locally, both atomic), so of two
drivers racing for a free or abandoned lease exactly one wins; the other gets :class:`RunNameInUse`.

Whether a holder is gone is judged without comparing anyone's wall clock with ours (hosts' clocks
drift: one running 150 s ahead used to take over live leases): a released lease is free; a holder
on this host is gone when its process is; a holder elsewhere is gone when its record (renewed, with
a heartbeat count, every :attr:`RunLease.renew_every_s`) has not changed for its TTL as measured on
*our* monotonic clock while we watch it, and alive as soon as it changes.

Takeover is fenced by the generation: a holder whose generation is no longer the highest has lost
the lease.  Its heartbeat notices (:attr:`RunLease.lost`, and the ``on_lost`` callback, with which
the driver stops the run), and every write of the run checks first (:class:`LeaseFence`: the loop
before each checkpoint and the export, the Train controller at each report), so a holder that lost
its lease writes no checkpoint and no export after the loss.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psutil

from orchestrator import storage
from orchestrator.errors import ConfigError, UserError

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
TTL_S = float(os.environ.get("MPLUG2_LEASE_TTL_S", "120"))  # a dead holder on another host blocks this long


class RunNameInUse(ConfigError):
    """Another live run holds the lease on this run name."""


class LeaseLost(RuntimeError, UserError):
    """This run's lease was taken over by a newer generation: the run must stop, writing nothing more.
    Not retried (``failures.NOT_RETRYABLE_ERRORS``): a restart would hold an older generation still."""


@dataclass
class LeaseRecord:
    generation: int
    owner: str
    host: str
    pid: int
    pid_started: float
    expires: float  # the holder's own clock's view, for people reading the file; never compared elsewhere
    released: bool = False
    beat: int = 0  # heartbeats so far: a watcher sees the holder alive when this changes
    ttl_s: float = 0.0  # the holder's TTL: unchanged this long (on the watcher's clock), the holder is gone

    @classmethod
    def parse(cls, generation: int, text: str) -> "LeaseRecord":
        d = json.loads(text)
        return cls(generation=generation, owner=str(d["owner"]), host=str(d["host"]), pid=int(d["pid"]),
                   pid_started=float(d.get("pid_started", 0.0)), expires=float(d.get("expires", 0.0)),
                   released=bool(d.get("released", False)), beat=int(d.get("beat", 0)),
                   ttl_s=float(d.get("ttl_s", 0.0)))

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "pid_started": self.pid_started,
                           "expires": self.expires, "released": self.released, "beat": self.beat,
                           "ttl_s": self.ttl_s})


def _process_alive(pid: int, started: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (not started or abs(p.create_time() - started) < 1.0)
    except psutil.Error:
        return False


def _generation_of(uri: str) -> int | None:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    stem = name[: -len(".json")] if name.endswith(".json") else ""
    return int(stem) if stem.isdigit() else None


class RunLease:
    """The lease on one run folder; :meth:`acquire`, then :meth:`release` (or use ``with``).
    ``on_lost`` is called once, from the heartbeat thread, when a newer generation took it over."""

    def __init__(self, run_dir: str, ttl_s: float | None = None, renew_every_s: float | None = None,
                 on_lost=None, poll_s: float | None = None):
        self.run_dir = run_dir
        self.dir = storage.join(run_dir, LEASE_DIR)
        self.ttl_s = TTL_S if ttl_s is None else ttl_s
        # often enough that a watcher elsewhere sees a heartbeat well within its watch
        self.renew_every_s = renew_every_s if renew_every_s is not None else min(self.ttl_s / 3, 10.0)
        self.poll_s = poll_s if poll_s is not None else min(max(self.ttl_s / 30, 0.05), 2.0)
        self.on_lost = on_lost
        me = psutil.Process()
        self.record: LeaseRecord | None = None
        self._me = dict(owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                        host=socket.gethostname(), pid=os.getpid(), pid_started=me.create_time())
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        return self._me["owner"]

    def _uri(self, generation: int) -> str:
        return storage.join(self.dir, f"{generation:08d}.json")

    def current(self) -> LeaseRecord | None:
        """The highest generation, or None when no lease was ever taken."""
        gens = sorted(g for g in (_generation_of(u) for u in storage.list_files(self.dir)) if g is not None)
        if not gens:
            return None
        top = gens[-1]
        try:
            return LeaseRecord.parse(top, storage.read_text(self._uri(top)))
        except (ValueError, KeyError, TypeError) as e:  # never written half (atomic writes): say what is there
            raise RunNameInUse(f"run folder {self.run_dir}: unreadable lease {self._uri(top)} ({e}); delete it if "
                               "no run of this name is running") from None

    def acquire(self) -> "RunLease":
        top = self.current()
        if top is not None and not top.released:
            gone = self._gone(top)  # RunNameInUse while its holder lives
            log.warning("run folder %s: taking over the lease of %s (%s)", self.run_dir, top.owner, gone)
        record = LeaseRecord(generation=(top.generation + 1) if top else 1, expires=time.time() + self.ttl_s,
                             ttl_s=self.ttl_s, **self._me)
        try:
            storage.create_exclusive(self._uri(record.generation), record.to_json().encode())
        except storage.AlreadyExists:
            raise self._in_use(self.current()) from None
        self.record = record
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _gone(self, top: LeaseRecord) -> str:
        """Why ``top``'s holder is gone, or :class:`RunNameInUse` when it is alive.  This host's holder:
        its process.  Another host's: its record, watched for its TTL on this host's monotonic clock
        (no wall clock of either host is compared): a change is a heartbeat."""
        if top.host == socket.gethostname():
            if _process_alive(top.pid, top.pid_started):
                raise self._in_use(top)
            return f"its holder (pid {top.pid} on this host) is gone"
        ttl = top.ttl_s or self.ttl_s
        log.info("run folder %s: the lease is held by %s; watching it for a heartbeat for up to %.0f s",
                 self.run_dir, top.owner, ttl)
        deadline = time.monotonic() + ttl
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.poll_s, left))
            now = self.current()
            if now is None:
                return "its record was deleted"
            if now.generation != top.generation:
                raise self._in_use(now)  # taken by a third run meanwhile
            if now.released:
                return "released"
            if now.to_json() != top.to_json():
                raise self._in_use(now)  # a heartbeat: the holder is alive
        return f"its record did not change for {ttl:.0f} s, measured on this host's clock"

    def _in_use(self, top: LeaseRecord | None) -> RunNameInUse:
        who = f"{top.owner}, generation {top.generation}" if top else "another driver"
        return RunNameInUse(f"run name in use: {self.run_dir} is being trained by another run ({who}). "
                            "Choose another name (name=...), or wait for that run to end; a run whose driver died "
                            f"releases the name once its lease has not been renewed for {self.ttl_s:.0f} s "
                            "(at once when it ran on this host)")

    def renew(self) -> bool:
        """Extend the lease; False (and :attr:`lost` set) when a newer generation took it over."""
        if self.record is None:
            return False
        top = self.current()
        if top is None or top.generation != self.record.generation or top.owner != self.owner:
            self._lose(top)
            return False
        self.record.beat += 1
        self.record.expires = time.time() + self.ttl_s
        storage.write_text(self._uri(self.record.generation), self.record.to_json())
        return True

    def _lose(self, top: LeaseRecord | None) -> None:
        if self.lost.is_set():
            return
        log.error("run folder %s: lost the lease to %s; this run stops, without further checkpoints or exports",
                  self.run_dir, top.owner if top else "nobody (deleted)")
        self.lost.set()
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception as e:  # the run is stopped by the fences anyway
                log.error("run folder %s: stopping the run after the lost lease failed: %s", self.run_dir, e)

    def fence(self) -> "LeaseFence":
        """What the run's writers check before each write (picklable: shipped to the workers)."""
        if self.record is None:
            raise RuntimeError("no lease held")
        return LeaseFence(self.run_dir, self.record.generation, self.owner)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                if not self.renew():
                    return
            except Exception as e:  # storage away for a while: retried at the next beat
                log.warning("run folder %s: could not renew the lease (%s)", self.run_dir, type(e).__name__)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.record is None or self.lost.is_set():
            return
        try:
            top = self.current()
            if top is not None and top.generation == self.record.generation and top.owner == self.owner:
                self.record.released = True
                storage.write_text(self._uri(self.record.generation), self.record.to_json())
        except Exception as e:  # never mask the run's outcome; the lease expires anyway
            log.warning("run folder %s: could not release the lease (%s); it expires in %.0f s", self.run_dir,
                        type(e).__name__, max(self.record.expires - time.time(), 0))
        self.record = None

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass(frozen=True)
class LeaseFence:
    """A run's proof of holding generation :attr:`generation` of its folder's lease; :meth:`check`
    raises :class:`LeaseLost` once a newer generation exists (or its own record is gone).  One
    listing (and one read when lost) of ``<run_dir>/_lease/``: cheap enough before every checkpoint
    and at every report."""

    run_dir: str
    generation: int
    owner: str

    def check(self) -> None:
        """LeaseLost when a newer generation holds the folder (or this one's record is gone).  A
        listing that fails (storage away beyond its retries) proves nothing: the run goes on, said
        in a warning; the write that follows meets the same storage."""
        lease_dir = storage.join(self.run_dir, LEASE_DIR)
        try:
            gens = sorted(g for g in (_generation_of(u) for u in storage.list_files(lease_dir)) if g is not None)
        except Exception as e:
            log.warning("run folder %s: could not check the lease (%s: %s)", self.run_dir, type(e).__name__,
                        str(e)[:200])
            return
        if gens and gens[-1] == self.generation:
            return
        who = "nobody (the lease was deleted)"
        if gens and gens[-1] > self.generation:
            try:
                who = LeaseRecord.parse(gens[-1], storage.read_text(storage.join(lease_dir, f"{gens[-1]:08d}.json"))).owner
            except Exception:  # the name is only for the message
                who = f"generation {gens[-1]}"
        raise LeaseLost(f"run folder {self.run_dir}: this run's lease (generation {self.generation}) was taken over "
                        f"by {who}; it stops here without writing another checkpoint or export")

    def holds(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True
