"""The train loop's record of what it consumed in the current pass of each data stream.

Every trained micro-batch's ``sample_key``s are recorded per stream (``train`` = the epoch's
stream; ``train_image`` / ``train_text`` = streams mixed in by :class:`~orchestrator.data.mix.StreamMix`).
At a checkpoint the keys of every rank are gathered (all ranks call :meth:`EpochProgress.gather`)
and rank 0 writes them beside the DeepSpeed shards (``progress.npz``).  On resume every rank
loads them, and at the start of each pass rank 0 publishes the keys already consumed in it to
the dataset's filter stage (:mod:`orchestrator.data.progress`), so the resumed pass trains exactly
the rows the fault-free pass would have trained and not yet had: robust to Ray Data's dynamic
split across workers, block order, shuffle buffer and frame sampling.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from orchestrator.data import progress

log = logging.getLogger(__name__)

FILE = "progress.npz"


class EpochProgress:
    def __init__(self, run_name: str | None, rank: int, world: int) -> None:
        self.run_name, self.rank, self.world = run_name, rank, world
        self.passes: dict[str, int] = {}
        self.mine: dict[str, list[np.ndarray]] = {}      # this rank's keys since the last gather
        self.gathered: dict[str, np.ndarray] = {}        # every rank's keys up to the last gather / resume

    # ---------------------------------------------------------------- recording
    def record(self, stream: str, keys) -> None:
        self.mine.setdefault(stream, []).append(np.asarray(keys.cpu() if hasattr(keys, "cpu") else keys, np.int64))

    def consumed(self, stream: str) -> np.ndarray:
        """The keys of ``stream``'s current pass known on this rank (all ranks' up to the last gather)."""
        parts = [self.gathered.get(stream, np.zeros(0, np.int64)), *self.mine.get(stream, [])]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def has_keys(self, stream: str) -> bool:
        return len(self.gathered.get(stream, ())) > 0

    # ---------------------------------------------------------------- passes
    def begin_pass(self, stream: str, epoch: int | None = None) -> None:
        """Before a pass's first batch, on every rank: publish what it must leave out (on a fresh
        pass: nothing) and the pass number that seeds frame sampling; then wait for every rank."""
        if epoch is not None:
            self.passes[stream] = epoch
        epoch = self.passes.setdefault(stream, 0)
        if self.rank == 0:

            progress.publish(self.run_name, stream, epoch, self.gathered.get(stream, np.zeros(0, np.int64)))
        self._barrier()

    def announce(self, stream: str, epoch: int) -> None:
        """Rank 0, ahead of a fresh pass ``epoch`` (nothing to leave out): publish its state, so that
        its decode tasks may start before :meth:`begin_pass` (which publishes the same again)."""
        if self.rank == 0:
            progress.publish(self.run_name, stream, epoch, np.zeros(0, np.int64))

    def end_pass(self, stream: str) -> None:
        self.passes[stream] = self.passes.get(stream, 0) + 1
        self.mine.pop(stream, None)
        self.gathered.pop(stream, None)

    # ---------------------------------------------------------------- checkpoints
    def gather(self) -> dict[str, Any]:
        """Collective: every rank's keys of each stream's current pass (call on all ranks)."""
        for stream in sorted(set(self.passes) | set(self.mine)):
            mine = np.concatenate(self.mine.pop(stream, [])) if self.mine.get(stream) else np.zeros(0, np.int64)
            every = self._all_gather(mine)
            self.gathered[stream] = np.concatenate([self.gathered.get(stream, np.zeros(0, np.int64)), every])
        return {"passes": dict(self.passes), "keys": dict(self.gathered)}

    def save(self, directory: str, state: dict[str, Any]) -> None:
        """Rank 0 writes the gathered state (from :meth:`gather`) into the checkpoint directory."""
        if self.rank != 0:
            return
        arrays = {f"keys/{s}": k for s, k in state["keys"].items()}
        arrays.update({f"pass/{s}": np.asarray(p, np.int64) for s, p in state["passes"].items()})
        np.savez_compressed(os.path.join(directory, FILE), **arrays)

    def load(self, directory: str) -> None:
        path = os.path.join(directory, FILE)
        if not os.path.exists(path):
            return  # a checkpoint from before progress was recorded: the loop skips by count
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                kind, stream = name.split("/", 1)
                if kind == "keys":
                    self.gathered[stream] = z[name].astype(np.int64)
                else:
                    self.passes[stream] = int(z[name])
        if self.rank == 0:
            log.info("resuming: rows already trained in the current pass: %s",
                     {s: len(k) for s, k in self.gathered.items()})

    # ---------------------------------------------------------------- collectives
    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _all_gather(self, mine: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return mine
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        n = torch.tensor([len(mine)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(int(s) for s in sizes))
        buf = torch.zeros(longest, dtype=torch.int64, device=device)
        buf[: len(mine)] = torch.from_numpy(mine).to(device)
        parts = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return np.concatenate([p[: int(s)].cpu().numpy() for p, s in zip(parts, sizes)])
