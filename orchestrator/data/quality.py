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
Pillow's decompression-bomb limit), ``malformed`` (a shard sample whose metadata is unusable).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("missing", "empty", "not_video", "truncated", "undecodable", "too_few_frames", "bad_resolution",
           "read_error", "too_large", "malformed")
NAMESPACE = "mplug2"
MAX_EXAMPLES = 5
RECORD_TIMEOUT_S = 5.0


class BadClip(Exception):
    """One clip that cannot be used; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, uri: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-clip reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {uri}{': ' + detail if detail else ''}")
        self.reason, self.uri, self.detail = reason, uri, detail


class TooManyBadClips(RuntimeError):
    """The fraction of bad clips passed ``data.max_bad_fraction``; the message names reasons and URIs."""


class BadClipStats:
    """Counts of clips seen and skipped, by reason, with up to MAX_EXAMPLES URIs per reason."""

    def __init__(self) -> None:
        self.total_seen = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._epoch_mark: tuple[int, Counter[str]] = (0, Counter())
        self.epoch = 0

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
                "examples": {k: list(v) for k, v in self.examples.items()}}

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
        cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BadClipStats)
        _HANDLES[name] = cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
    return _HANDLES[name]


class BadClipTracker:
    """Handle used by decode tasks and the train loop: ``record`` after each batch, ``stats`` any time."""

    def __init__(self, run_name: str | None):
        self.run_name = run_name
        self._actor = get_tracker(run_name)

    def _call(self, method: str, *args, timeout: float | None):
        """Call the actor; a dead actor (its owner went away) is looked up / created again once."""
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(2):
            ref = getattr(self._actor, method).remote(*args)
            ready, _ = ray.wait([ref], timeout=timeout)
            if not ready:
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
        """Add counts; returns the run's totals, or None when the actor did not answer in time."""
        for reason, uri in bad:
            log.warning("skipping bad clip (%s): %s", reason, uri)
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).add(seen, bad)
        return self._call("add", seen, bad, timeout=RECORD_TIMEOUT_S)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        if self._actor is None:
            return _LOCAL.setdefault(actor_name(self.run_name), BadClipStats()).to_dict()
        out = self._call("to_dict", timeout=timeout)
        if out is None:
            raise TimeoutError(f"bad-clip tracker {actor_name(self.run_name)} did not answer in {timeout}s")
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
