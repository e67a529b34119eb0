"""The training streams of a worker: the epoch's batches with the mixed-in streams interleaved.

A run's ``train`` dataset is the epoch (the video sources, or the image sources of an image-only
run); ``train_image`` (images among videos, T = 1 frame) and ``train_text`` (text-only corpora,
MLM only) are mixed in per step with a share equal to their sources' weight over all weights
(:func:`stream_fractions`).  Batches of a mixed-in stream carry its name under :data:`STREAM_KEY`.
"""
from __future__ import annotations

import random
import zlib
from typing import Any, Iterable, Iterator

from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.grouping import group_batches
from orchestrator.data.pipeline import iter_worker_batches
from orchestrator.data.streams import MIXED, TRAIN, TRAIN_TEXT

STREAM_KEY = "_stream"  # set by StreamMix on the batches it mixes in


def stream_fractions(sources: list[SourceConfig], streams) -> dict[str, float]:
    """Share of micro-batches drawn from each mixed-in stream among ``streams`` (dataset names):
    its sources' weight over all sources' weight."""
    total = sum(s.weight for s in sources)
    return {name: sum(s.weight for s in sources if s.format in MIXED[name]) / total
            for name in streams if name in MIXED and total}


def pass_seed(seed: int, stream: str, epoch: int, rank: int) -> int:
    """The local shuffle seed of one pass of one stream on one rank."""
    return zlib.crc32(f"{seed}-{stream}-{epoch}-{rank}".encode())


def iter_train_batches(shard, batch_size: int, data_cfg: DataConfig, run_name: str | None,
                       shuffle_seed: int | None = None):
    """Full batches only: every rank takes the same number of steps (DeepSpeed's collectives).
    The local shuffle buffer is seeded by ``shuffle_seed`` (one per (seed, stream, epoch, rank)); a
    stream whose rows carry their group (``data.group_pattern``) is re-dealt into batches of whole
    groups (:func:`orchestrator.data.grouping.group_batches`, as many batches as it gets)."""
    batches = iter_worker_batches(shard, batch_size=batch_size, device="cpu", prefetch_batches=data_cfg.prefetch_batches,
                                  drop_last=True, local_shuffle_buffer_size=data_cfg.shuffle_buffer or None,
                                  run_name=run_name, max_bad_fraction=data_cfg.max_bad_fraction,
                                  local_shuffle_seed=shuffle_seed)
    if not data_cfg.group_pattern:
        return batches
    return group_batches(batches, batch_size, data_cfg.group_size, data_cfg.group_buffer, shuffle_seed or 0)


class StreamMix:
    """Interleaves batches of other streams with the epoch's batches: mixed-in text-only batches
    (pre-training's text corpora, MLM only) and, in a run mixing images and videos, image batches
    (T = 1 frame, so images skip the temporal module and are prompted as images).  Before each
    epoch batch, a coin decides whether a mixed-in batch comes first and from which stream
    (P(stream) = ``fractions[stream]``); the coin is seeded by (seed, step) alone, so every rank
    makes the same draws, runs the same modules in the same order (ZeRO-3, DeepSpeed's
    collectives) and stays in step.  A mixed-in stream starts a new pass whenever it runs out.
    Each mixed-in batch carries its stream's name under ``STREAM_KEY``.  ``progress`` (an
    ``EpochProgress``) numbers the passes and records what a resumed pass leaves out."""

    def __init__(self, shards: dict, fractions: dict[str, float], batch_size: int, data_cfg, seed: int,
                 progress=None, rank: int = 0, run_name: str | None = None):
        if sum(fractions.values()) >= 1:
            raise ValueError(f"mixed-in stream fractions {fractions} must sum to less than 1")
        self.shards, self.fractions, self.batch_size, self.data_cfg, self.seed = shards, dict(fractions), batch_size, \
            data_cfg, seed
        self.progress, self.rank, self.run_name = progress, rank, run_name
        self._its: dict[str, Any] = {}

    def _next(self, name: str) -> dict:
        for _ in range(2):
            if name not in self._its:
                epoch = 0
                if self.progress is not None:
                    self.progress.begin_pass(name)
                    epoch = self.progress.passes[name]
                self._its[name] = iter(iter_train_batches(self.shards[name], self.batch_size, self.data_cfg,
                                                          self.run_name, pass_seed(self.seed, name, epoch, self.rank)))
            try:
                return {**next(self._its[name]), STREAM_KEY: name}
            except StopIteration:
                del self._its[name]
                if self.progress is not None:
                    self.progress.end_pass(name)
        raise RuntimeError(f"the {name} training dataset yielded no full batch")

    def interleave(self, batches, step: int) -> Iterator[dict]:
        coin = random.Random(f"{self.seed}-{step}")  # same draws on every rank
        streams = sorted(self.fractions)
        for batch in batches:
            while True:
                r, edge, pick = coin.random(), 0.0, None
                for name in streams:
                    edge += self.fractions[name]
                    if r < edge:
                        pick = name
                        break
                if pick is None:
                    break
                yield self._next(pick)
            yield batch


class TextMix(StreamMix):
    """:class:`StreamMix` with one mixed-in stream, the text-only ``train_text``."""

    def __init__(self, shard, fraction: float, batch_size: int, data_cfg, seed: int):
        super().__init__({TRAIN_TEXT: shard}, {TRAIN_TEXT: fraction}, batch_size, data_cfg, seed)

    def _next(self, name: str) -> dict:
        return self._next_text()

    def _next_text(self) -> dict:
        return StreamMix._next(self, TRAIN_TEXT)


def epoch_batches(shard, mix: StreamMix | None, batch_size: int, data_cfg: DataConfig, run_name: str | None,
                  seed: int, epoch: int, rank: int, step: int, started: Iterable[dict] | None = None) -> Iterator[dict]:
    """One pass over the epoch's ``train`` shard on this rank, with the mixed-in streams
    interleaved from optimizer step ``step`` on; ``started``: that pass's train batches when they
    were started ahead (:func:`train_pass`)."""
    batches = started if started is not None else train_pass(shard, batch_size, data_cfg, run_name, seed, epoch, rank)
    return mix.interleave(batches, step) if mix is not None else batches


def train_pass(shard, batch_size: int, data_cfg: DataConfig, run_name: str | None, seed: int, epoch: int,
               rank: int) -> Iterator[dict]:
    """The ``train`` stream's batches of one pass on this rank (without the mixed-in streams)."""
    return iter_train_batches(shard, batch_size, data_cfg, run_name, pass_seed(seed, TRAIN, epoch, rank))
