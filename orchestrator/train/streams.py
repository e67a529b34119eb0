"""A training worker's data streams: its batches pass by pass, what each pass consumed, and the
run's bad-clip counts as a worker sees them.

- :class:`DataStreams`: one pass of the epoch's stream (``train``, this rank's shard) with the
  mixed-in streams interleaved (:class:`~orchestrator.data.mix.StreamMix`); the rows each batch
  carries are recorded in :class:`~orchestrator.train.progress.EpochProgress` (a checkpoint part:
  a resumed pass leaves them out) and in the step journal (each optimizer step's rows); a resumed
  epoch without recorded rows
  skips the batches it already trained (:class:`~orchestrator.train.schedule.ResumeSkip`).
- :class:`BadClipCounts`: the run's bad-clip tracker seen from a worker: the counts logged at each
  epoch's end, ``data.max_bad_fraction`` checked at the run's end, and the counts a checkpoint
  carries (a checkpoint part) so a new driver's tracker starts from them.

A pass is opened by :meth:`DataStreams.epoch`.  :class:`NextPass` starts the ``train`` stream's
next pass while the current one's last batches train (``data.next_epoch_batches``), so an epoch
does not open with Ray Data's start-up.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import torch

from orchestrator.data import quality
from orchestrator.data.mix import STREAM_KEY
from orchestrator.data.pipeline import SAMPLE_KEY
from orchestrator.data.streams import TRAIN
from orchestrator.train.journal import StepJournal
from orchestrator.train.progress import EpochProgress
from orchestrator.train.schedule import ResumeSkip

log = logging.getLogger(__name__)


class BadClipCounts:
    """The run's bad-clip counts (its tracker actor, named by ``run_name``) from one rank."""

    def __init__(self, run_name: str | None, rank: int, world: int, max_fraction: float) -> None:
        self.run_name, self.rank, self.world, self.max_fraction = run_name, rank, world, max_fraction

    def epoch_report(self) -> dict[str, float]:
        """At an epoch's end, rank 0: the counts as metrics (the job stops past the threshold); {} elsewhere."""
        if self.rank != 0:
            return {}
        stats = quality.end_epoch_report(self.run_name).get("total", {})
        if not stats:
            return {}
        return {"data/clips_seen": stats.get("total_seen", 0), "data/clips_bad": stats.get("bad", 0),
                **{f"data/bad_{k}": v for k, v in stats.get("by_reason", {}).items()}}

    def check_run_end(self) -> None:
        """``data.max_bad_fraction`` over the whole run, decided on rank 0 and raised on every rank together."""
        err = None
        if self.rank == 0:
            try:
                quality.check_run_end(self.run_name, self.max_fraction)  # all it saw, as at a pass's end
            except quality.TooManyBadClips as e:
                err = e
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if err is not None else 0.0])
            dist.broadcast(flag, src=0)
            if flag.item() and err is None:
                err = quality.TooManyBadClips("too many bad clips (rank 0 has the counts and reasons)")
        if err is not None:
            raise err

    # -- checkpoint part (rank 0) ------------------------------------------------------------
    def gather(self) -> None:
        return None

    def save(self, directory: str, gathered: None) -> None:
        """The run's counts into the checkpoint (rank 0): a new driver's tracker starts from them."""
        if self.rank != 0:
            return
        try:
            quality.save_counts(directory, self.run_name)
        except Exception as e:  # a slow tracker never costs the checkpoint; said loudly
            log.error("bad-clip counts not saved with this checkpoint (%s: %s); a resume from it starts them "
                      "from the tracker's own", type(e).__name__, e)

    def load(self, directory: str) -> None:
        """The counts the checkpoint carried, into the run's tracker (rank 0, on resume)."""
        if self.rank != 0:
            return
        try:
            quality.restore_counts(directory, self.run_name)
        except Exception as e:  # a slow tracker never costs the resume; said loudly
            log.error("bad-clip counts of the checkpoint not restored (%s: %s)", type(e).__name__, e)


class DataStreams:
    """This worker's training batches, one pass at a time.

    ``passes(epoch=, step=)`` yields one pass of the epoch's batches with the mixed-in ones
    interleaved from optimizer step ``step`` on (:func:`orchestrator.data.mix.epoch_batches` with
    this rank's shards).  ``resume_batches``: the batches of the current epoch a resumed run already
    trained; left out only when the checkpoint recorded no rows (a dataset without sample keys)."""

    def __init__(self, passes: Callable[..., Iterable[dict]], progress: EpochProgress, counts: BadClipCounts,
                 journal: StepJournal | None = None, resume_batches: int = 0, batch_size: int = 0,
                 world: int = 1, next_pass: "NextPass | None" = None, rank: int = 0) -> None:
        self.passes, self.progress, self.counts, self.journal = passes, progress, counts, journal
        self.batch_size, self.world, self.next_pass, self.rank = batch_size, world, next_pass, rank
        self.skip = ResumeSkip(0 if progress.has_keys(TRAIN) else resume_batches)
        self.first_batch_s: float | None = None  # the wait for the current pass's first batch

    def epoch(self, epoch: int, step: int, timed: Callable[[Iterable[dict]], Iterable[dict]] = iter
              ) -> Iterator[tuple[str, dict]]:
        """``(stream, batch)`` pairs of one pass, the rows of each recorded as consumed; ``timed``
        wraps the raw batches (the step timer's data wait).  A pass that yields no batch at all,
        with nothing recorded to explain it, is an error."""
        self.progress.begin_pass(TRAIN, epoch)
        seen = self.skip.seen
        t0, self.first_batch_s = time.perf_counter(), None
        if self.next_pass is None:
            batches = self.passes(epoch=epoch, step=step)
        else:  # this pass's train batches (started ahead when the last pass was read), holding back its last ones
            batches = self.passes(epoch=epoch, step=step, started=self.next_pass.hold_back(epoch))
        for stream, batch in self.skip.filter(_tagged(timed(batches))):
            if self.first_batch_s is None:
                self.first_batch_s = time.perf_counter() - t0
            self._record(stream, batch)
            yield stream, batch
        if self.skip.seen == seen and not self.progress.has_keys(TRAIN):  # (a resumed pass may have nothing left)
            raise RuntimeError("the training dataset yielded no batch: it is empty or smaller than one batch "
                               f"per worker (batch_size_per_worker={self.batch_size}, workers={self.world})")

    def step_done(self, step: int, epoch: int) -> None:
        """Optimizer step ``step`` was computed from the batches since the last: the step journal's line."""
        if self.journal is not None:
            self.journal.step(step, epoch)

    def end_epoch(self) -> dict[str, float]:
        """The pass is over: the next one starts afresh; rank 0's bad-clip counts and the wait for
        the pass's first batch (``data/first_batch_s``) as metrics."""
        self.progress.end_pass(TRAIN)
        out = self.counts.epoch_report()
        if self.rank == 0 and self.first_batch_s is not None:
            out["data/first_batch_s"] = self.first_batch_s
        return out

    def _record(self, stream: str, batch: dict) -> None:
        if SAMPLE_KEY not in batch:
            return
        keys = batch.pop(SAMPLE_KEY)
        self.progress.record(stream, keys)
        if self.journal is not None:
            self.journal.batch(stream, keys)


def _tagged(batches: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for batch in batches:
        yield batch.pop(STREAM_KEY, TRAIN), batch


class NextPass:
    """The ``train`` stream's next pass, started while the current pass's last batches train.

    :meth:`hold_back` yields a pass's batches ``hold`` behind its source: once the source (this
    rank's shard of the pass) is read to its end, the next pass is announced (``announce(epoch)``:
    rank 0 publishes its progress state, which the decode tasks read) and started in a thread
    (``start(epoch)``, its first batch pulled), while the held-back batches train.  Ray Data starts
    the next pass's execution once every rank has asked for it, i.e. after every rank read its
    shard of this pass to the end.  ``wanted(epoch)`` says whether the run will train that pass at
    all (the last pass of a run starts nothing).  A pass that was not started ahead (the first, a
    resumed one) starts when it is asked for, as before."""

    def __init__(self, start: Callable[[int], Iterable[dict]], announce: Callable[[int], None],
                 wanted: Callable[[int], bool], hold: int) -> None:
        self.start, self.announce, self.wanted, self.hold = start, announce, wanted, hold
        self._ahead: dict = {}  # the pass started ahead: epoch, thread, its iterator, first batch, error

    def hold_back(self, epoch: int) -> Iterator[dict]:
        source = self._take(epoch)
        if source is None:
            source = iter(self.start(epoch))
        held: deque = deque()
        for batch in source:
            held.append(batch)
            if len(held) > self.hold:
                yield held.popleft()
        self._begin(epoch + 1)
        while held:
            yield held.popleft()

    def _begin(self, epoch: int) -> None:
        if not self.hold or not self.wanted(epoch):
            return
        self.announce(epoch)
        ahead: dict = {"epoch": epoch}

        def run() -> None:
            try:
                it = iter(self.start(epoch))
                ahead["it"], ahead["first"] = it, next(it, None)
            except BaseException as e:  # raised where the pass is taken
                ahead["error"] = e

        ahead["thread"] = threading.Thread(target=run, daemon=True, name=f"next-pass-{epoch}")
        ahead["thread"].start()
        self._ahead = ahead

    def _take(self, epoch: int) -> Iterator[dict] | None:
        ahead, self._ahead = self._ahead, {}
        if ahead.get("epoch") != epoch:
            return None
        ahead["thread"].join()
        if "error" in ahead:
            raise ahead["error"]
        return iter(()) if ahead["first"] is None else itertools.chain([ahead["first"]], ahead["it"])
