"""One run per name: a lease on the run folder, taken before any training starts.

Two drivers started with the same name would otherwise interleave their checkpoints (Ray Train
resumes from whatever the other wrote) and their MLflow metrics (both re-open the same run).  The
driver takes the lease before Ray starts, renews it while it trains (a heartbeat thread) and
releases it at the end; a lease whose holder died is taken over once it expires, or at once when
the holder ran on this host and its process is gone (a killed driver that is resubmitted).

The lease is a sequence of small JSON objects ``<run_dir>/_lease/<generation>.json``; the highest
generation is the current one.  Taking the lease writes the next generation with an exclusive
create (S3 conditional put ``If-None-Match: *``, a hard link locally, both atomic), so of two
drivers racing for a free or expired lease exactly one wins; the other gets :class:`RunNameInUse`.
Renewing rewrites the holder's own generation; a holder that finds a newer generation has lost the
lease (it was taken over after it failed to renew in time) and says so.
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
from orchestrator.config import ConfigError

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
TTL_S = float(os.environ.get("MPLUG2_LEASE_TTL_S", "120"))  # a dead holder on another host blocks this long


class RunNameInUse(ConfigError):
    """Another live run holds the lease on this run name."""


@dataclass
class LeaseRecord:
    generation: int
    owner: str
    host: str
    pid: int
    pid_started: float
    expires: float
    released: bool = False

    @classmethod
    def parse(cls, generation: int, text: str) -> "LeaseRecord":
        d = json.loads(text)
        return cls(generation=generation, owner=str(d["owner"]), host=str(d["host"]), pid=int(d["pid"]),
                   pid_started=float(d.get("pid_started", 0.0)), expires=float(d["expires"]),
                   released=bool(d.get("released", False)))

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "pid_started": self.pid_started,
                           "expires": self.expires, "released": self.released})

    def holder_gone(self, now: float) -> str | None:
        """Why this lease no longer holds (released, expired, holder process gone), or None if it holds."""
        if self.released:
            return "released"
        if self.expires <= now:
            return f"expired {now - self.expires:.0f} s ago"
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_started):
            return f"its holder (pid {self.pid} on this host) is gone"
        return None


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
    """The lease on one run folder; :meth:`acquire`, then :meth:`release` (or use ``with``)."""

    def __init__(self, run_dir: str, ttl_s: float | None = None, renew_every_s: float | None = None):
        self.run_dir = run_dir
        self.dir = storage.join(run_dir, LEASE_DIR)
        self.ttl_s = TTL_S if ttl_s is None else ttl_s
        self.renew_every_s = renew_every_s if renew_every_s is not None else self.ttl_s / 3
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
        now = time.time()
        top = self.current()
        if top is not None:
            gone = top.holder_gone(now)
            if gone is None:
                raise self._in_use(top, now)
            if not top.released:
                log.warning("run folder %s: taking over the lease of %s (%s)", self.run_dir, top.owner, gone)
        record = LeaseRecord(generation=(top.generation + 1) if top else 1, expires=now + self.ttl_s, **self._me)
        try:
            storage.create_exclusive(self._uri(record.generation), record.to_json().encode())
        except storage.AlreadyExists:
            raise self._in_use(self.current(), time.time()) from None
        self.record = record
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _in_use(self, top: LeaseRecord | None, now: float) -> RunNameInUse:
        who = f"{top.owner}, lease valid for {max(top.expires - now, 0):.0f} s more" if top else "another driver"
        return RunNameInUse(f"run name in use: {self.run_dir} is being trained by another run ({who}). "
                            "Choose another name (name=...), or wait for that run to end; a run whose driver died "
                            f"releases the name when its lease expires (at most {self.ttl_s:.0f} s after it stopped "
                            "renewing it, at once when it ran on this host)")

    def renew(self) -> bool:
        """Extend the lease; False (and :attr:`lost` set) when a newer generation took it over."""
        if self.record is None:
            return False
        top = self.current()
        if top is None or top.generation != self.record.generation or top.owner != self.owner:
            if not self.lost.is_set():
                log.error("run folder %s: lost the lease to %s; another run of this name is now writing here",
                          self.run_dir, top.owner if top else "nobody (deleted)")
            self.lost.set()
            return False
        self.record.expires = time.time() + self.ttl_s
        storage.write_text(self._uri(self.record.generation), self.record.to_json())
        return True

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
