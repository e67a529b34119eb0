"""Bad-clip accounting: every skipped clip is counted by reason, with example URIs.

Decode tasks run in Ray Data worker processes, possibly on other nodes, so the counts live in one
named Ray actor per run (``mplug2-badclips-<run>`` in namespace ``mplug2``).  Tasks send their
counts after each batch and wait for the answer at most a few seconds, so a slow or missing actor
never hangs decoding; the answer carries the running totals, so a task can stop the job as soon as
the bad fraction passes ``max_bad_fraction``.  Without Ray (unit tests, the benchmark's bare loop)
the same :class:`BadClipStats` counts in-process.

Reasons: ``missing`` (no such object), ``empty`` (zero bytes), ``not_video`` (no known container
signature), ``truncated`` (a container signature but unreadable), ``undecodable`` (opens, frames
fail), ``too_few_frames``, ``bad_resolution``, ``read_error`` (storage failed after retries),
``too_large`` (an object or shard member over ``data.max_object_bytes``, an image over
Pillow's decompression-bomb limit), ``malformed`` (a shard sample whose metadata is unusable),
``bad_uri`` (a media URI no storage can open: a NUL byte, no bucket, a FIFO or device file),
``error`` (anything else that went wrong with one clip: its row is dropped, the batch goes on).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.data.placement import end_state_actor, head_actor_options
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

REASONS = ("missing", "empty", "not_video", "truncated", "undecodable", "too_few_frames", "bad_resolution",
           "read_error", "too_large", "malformed", "bad_uri", "error")
NAMESPACE = "mplug2"
MAX_EXAMPLES = 5
RECORD_TIMEOUT_S = 5.0
COUNTS_FILE = "bad_clips.json"  # the run's counts, carried in every checkpoint (rank 0)


class BadClip(Exception):
    """One clip that cannot be used; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, uri: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-clip reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {uri}{': ' + detail if detail else ''}")
        self.reason, self.uri, self.detail = reason, uri, detail


class TooManyBadClips(RuntimeError, UserError):
    """The fraction of bad clips passed ``data.max_bad_fraction``; the message names reasons and URIs."""


class BadClipStats:
    """Counts of clips seen and skipped, by reason, with up to MAX_EXAMPLES URIs per reason."""

    def __init__(self) -> None:
        self.total_seen = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._epoch_mark: tuple[int, Counter[str]] = (0, Counter())
        self.epoch = 0
        # a new id each time the counts start from zero (a new driver, an actor restart): callers
        # that see it change know counts were lost and say so; restore() adds a checkpoint's counts
        self.incarnation = uuid.uuid4().hex[:12]
        self.restored_from: list[str] = []

    @property
    def bad(self) -> int:
        return sum(self.by_reason.values())

    def add(self, seen: int, bad: list[tuple[str, str]]) -> dict[str, Any]:
        """Record ``seen`` clips of which ``bad`` = [(reason, uri), ...] were skipped; returns the totals."""
        self.total_seen += seen
        for reason, uri in bad:
            self.by_reason[reason] += 1
            ex = self.examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES and uri not in ex:
                ex.append(uri)
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"total_seen": self.total_seen, "bad": self.bad, "by_reason": dict(self.by_reason),
                "examples": {k: list(v) for k, v in self.examples.items()}, "incarnation": self.incarnation,
                "restored_from": list(self.restored_from)}

    def restore(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Add the counts a checkpoint carried (``saved``, a :meth:`to_dict`) when they come from
        another incarnation (this tracker started after them: a new driver, an actor restart) and
        were not added already; the counts this incarnation recorded itself are kept on top."""
        origin = saved.get("incarnation")
        chain = [origin, *saved.get("restored_from", [])]
        if not origin or origin == self.incarnation or origin in self.restored_from:
            return self.to_dict()
        self.total_seen += int(saved.get("total_seen", 0))
        for reason, n in (saved.get("by_reason") or {}).items():
            self.by_reason[reason] += int(n)
        for reason, uris in (saved.get("examples") or {}).items():
            ex = self.examples.setdefault(reason, [])
            ex.extend(u for u in uris if u not in ex and len(ex) < MAX_EXAMPLES)
        self.restored_from.extend(c for c in chain if c and c not in self.restored_from)
        self._epoch_mark = (self.total_seen, Counter(self.by_reason))  # the restored counts are past epochs'
        return self.to_dict()

    def end_epoch(self) -> dict[str, Any]:
        """Counts since the previous call (one epoch), plus the running totals."""
        seen0, reasons0 = self._epoch_mark
        this = {"total_seen": self.total_seen - seen0, "by_reason": dict(self.by_reason - reasons0)}
        this["bad"] = sum(this["by_reason"].values())
        self._epoch_mark = (self.total_seen, Counter(self.by_reason))
        self.epoch += 1
        return {"epoch": self.epoch, "this_epoch": this, "total": self.to_dict()}


def fraction(stats: dict[str, Any]) -> float:
    return stats["bad"] / stats["total_seen"] if stats["total_seen"] else 0.0


def describe(stats: dict[str, Any]) -> str:
    reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats["by_reason"].items(), key=lambda x: -x[1])) or "none"
    examples = "; ".join(f"{r}: {', '.join(u[:3])}" for r, u in stats.get("examples", {}).items())
    return (f"{stats['bad']} bad of {stats['total_seen']} clips ({100 * fraction(stats):.1f}%) by reason: {reasons}"
            + (f"; examples: {examples}" if examples else ""))


def check(stats: dict[str, Any], max_fraction: float, min_seen: int = 1) -> None:
    """Raise TooManyBadClips when more than ``max_fraction`` of at least ``min_seen`` clips were bad."""
    if stats["total_seen"] >= min_seen and stats["bad"] and fraction(stats) > max_fraction:
        raise TooManyBadClips(
            f"too many bad clips: {describe(stats)}; the limit is data.max_bad_fraction={max_fraction}. "
            "Fix or drop these files, or raise data.max_bad_fraction.")


# ---------------------------------------------------------------------------------------------
# The per-run tracker: a named Ray actor when Ray is up, else a process-local object
# ---------------------------------------------------------------------------------------------

_LOCAL: dict[str, BadClipStats] = {}
_SEEN_INCARNATION: dict[str, str] = {}  # per process: the tracker incarnation each run's counts came from
# Actor handles held for the life of this process: a named, non-detached actor is destroyed when
# its last handle goes, and the first process to create it (the driver, in build_dataset) owns it.
_HANDLES: dict[str, object] = {}


def actor_name(run_name: str | None) -> str:
    return f"mplug2-badclips-{run_name or 'default'}"


def _ray_up() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return False
    return ray.is_initialized()


def get_tracker(run_name: str | None):
    """The named actor for ``run_name`` (created on first use), or None without Ray."""
    if not _ray_up():
        return None
    import ray

    name = actor_name(run_name)
    if name not in _HANDLES:
        # on the head node (placement.py); restarted if it dies anyway, and then empty: callers see
        # the new incarnation and warn, the loop restores the counts its last checkpoint carried
        # (restore_counts)
        cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BadClipStats)
        _HANDLES[name] = cls.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                     **head_actor_options()).remote()
    return _HANDLES[name]


class BadClipTracker:
    """Handle used by decode tasks and the train loop: ``record`` after each batch, ``stats`` any time."""

    def __init__(self, run_name: str | None):
        self.run_name = run_name
        self._actor = get_tracker(run_name)
        self._pending: list = []

    def _call(self, method: str, *args, timeout: float | None):
        """Call the actor; a dead actor (its owner went away) is looked up / created again once."""
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(2):
            ref = getattr(self._actor, method).remote(*args)
            ready, _ = ray.wait([ref], timeout=timeout)
            if not ready:
                self._pending.append(ref)  # its answer may still serve a later check (_late_answer)
                return None
            try:
                return ray.get(ready[0])
            except RayActorError:
                if attempt:
                    raise
                log.warning("bad-clip tracker %s died; starting a new one", actor_name(self.run_name))
                _HANDLES.pop(actor_name(self.run_name), None)
                self._actor = get_tracker(self.run_name)
        return None

    def record(self, seen: int, bad: list[tuple[str, str]]) -> dict[str, Any] | None:
        """Add counts; returns the run's totals, or None when the actor did not answer in time (the
        counts still arrive; an earlier answer that came late is returned instead when there is one)."""
        for reason, uri in bad:
            log.warning("skipping bad clip (%s): %s", reason, uri)
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).add(seen, bad)
        out = self._call("add", seen, bad, timeout=RECORD_TIMEOUT_S)
        if out is None:
            out = self._late_answer()
        return self._note(out)

    def _late_answer(self) -> dict[str, Any] | None:
        import ray
        ready = [r for r in self._pending if ray.wait([r], timeout=0)[0]]
        self._pending = [r for r in self._pending if r not in ready][-8:]
        for ref in reversed(ready):
            try:
                return ray.get(ref)
            except Exception:  # a late answer from a dead actor: none
                continue
        return None

    def _note(self, stats: dict[str, Any] | None) -> dict[str, Any] | None:
        """Warn when the run's counts come from another incarnation than before (the tracker reset)."""
        if stats and stats.get("incarnation"):
            name = actor_name(self.run_name)
            before = _SEEN_INCARNATION.get(name)
            if before is not None and before != stats["incarnation"] and before not in stats.get("restored_from", []):
                log.warning("bad-clip tracker %s was reset (restarted empty): counts it held since the last "
                            "checkpoint are lost; the checkpoint's counts are restored at the next one", name)
            _SEEN_INCARNATION[name] = stats["incarnation"]
        return stats

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).to_dict()
        out = self._call("to_dict", timeout=timeout)
        if out is None:
            raise TimeoutError(f"bad-clip tracker {actor_name(self.run_name)} did not answer in {timeout}s")
        return self._note(out)

    def restore(self, saved: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).restore(saved)
        out = self._call("restore", saved, timeout=timeout)
        if out is None:
            raise TimeoutError(f"bad-clip tracker {actor_name(self.run_name)} did not answer in {timeout}s")
        _SEEN_INCARNATION[actor_name(self.run_name)] = out["incarnation"]
        return out

    def end_epoch(self, timeout: float = 30.0) -> dict[str, Any]:
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).end_epoch()
        out = self._call("end_epoch", timeout=timeout)
        if out is None:
            raise TimeoutError(f"bad-clip tracker {actor_name(self.run_name)} did not answer in {timeout}s")
        return out


def get_bad_clip_stats(run_name: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """``{"total_seen", "bad", "by_reason", "examples"}`` for the run, from any process of the job."""
    return BadClipTracker(run_name).stats(timeout)


def end_epoch_report(run_name: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Call once per epoch (driver or rank 0): logs and returns this epoch's and the total counts."""
    report = BadClipTracker(run_name).end_epoch(timeout)
    log.info("epoch %d data quality: %s (run total: %s)", report["epoch"],
             describe({**report["this_epoch"], "examples": {}}), describe(report["total"]))
    return report


def check_bad_clips(run_name: str | None, max_fraction: float, min_seen: int = 1) -> dict[str, Any]:
    """Raise TooManyBadClips past the threshold; returns the stats otherwise."""
    stats = get_bad_clip_stats(run_name)
    check(stats, max_fraction, min_seen)
    return stats


def reset_local() -> None:
    """Forget process-local counts (tests); actor handles stay, so named actors stay alive."""
    _LOCAL.clear()
    _LAST_SAVED.clear()
    _SEEN_INCARNATION.clear()


def release(*run_names: str | None) -> None:
    """End the trackers of runs that are over (their driver has read the final counts).  A named
    actor lives as long as the process that created it first: in a sweep, or any job that runs
    several trainings and evaluations, every finished run would keep an idle actor process (about
    0.7% of a core and its memory each) until the job ends.  A rerun of a name starts a new tracker,
    and its checkpoint's counts come back with it (:func:`restore_counts`)."""
    if not _ray_up():
        for run_name in run_names:
            _LOCAL.pop(actor_name(run_name), None)
        return
    for run_name in run_names:
        name = actor_name(run_name)
        _SEEN_INCARNATION.pop(name, None)
        _LAST_SAVED.pop(name, None)
        end_state_actor(name, NAMESPACE, _HANDLES.pop(name, None))


_LAST_SAVED: dict[str, dict[str, Any]] = {}  # rank 0: the counts of the last checkpoint written or resumed from


def save_counts(directory: str | os.PathLike, run_name: str | None) -> dict[str, Any]:
    """Write the run's counts into a checkpoint folder (rank 0, before the upload).  A tracker that
    was reset since the previous checkpoint gets that checkpoint's counts back first (what it
    recorded between that checkpoint and the reset is lost, and the warning says so)."""
    stats = get_bad_clip_stats(run_name)
    previous = _LAST_SAVED.get(actor_name(run_name))
    if previous and previous.get("incarnation") not in (stats.get("incarnation"), *stats.get("restored_from", [])):
        log.warning("bad-clip tracker %s was reset since the last checkpoint: its counts (%s) are restored; what "
                    "it counted between that checkpoint and the reset is lost", actor_name(run_name),
                    describe({**previous, "examples": {}}))
        stats = BadClipTracker(run_name).restore(previous)
    Path(directory, COUNTS_FILE).write_text(json.dumps(stats))
    _LAST_SAVED[actor_name(run_name)] = stats
    return stats


def restore_counts(directory: str | os.PathLike, run_name: str | None) -> dict[str, Any] | None:
    """On resume: add the counts the checkpoint carried to the run's tracker when it started after
    them (a new driver or a restarted actor; see :meth:`BadClipStats.restore`), and say so."""
    f = Path(directory, COUNTS_FILE)
    if not f.is_file():
        return None
    saved = json.loads(f.read_text())
    tracker = BadClipTracker(run_name)
    out = tracker.restore(saved)
    _LAST_SAVED[actor_name(run_name)] = out
    if saved.get("incarnation") in out.get("restored_from", []) and saved.get("total_seen"):
        log.warning("bad-clip counts restored from the checkpoint (%s); the run total is now %s",
                    describe({**saved, "examples": {}}), describe({**out, "examples": {}}))
    return out


def check_run_end(run_name: str | None, max_fraction: float, min_seen: int = 1) -> dict[str, Any]:
    """The bad-fraction check at the end of every run, also one shorter than an epoch (whose
    end-of-pass check never ran)."""
    return check_bad_clips(run_name, max_fraction, min_seen)
