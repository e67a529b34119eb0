"""What the train loop does at each optimizer step, and which batches a resumed epoch leaves out.

Pure Python (no Ray, no torch), so the decisions are unit-tested on their own
(``tests/train/test_schedule.py``); the loop in :mod:`orchestrator.trainer.loop` only carries them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from orchestrator.data.streams import TRAIN


@dataclass(frozen=True)
class StepActions:
    """The work due after optimizer step ``step``."""

    step: int
    log: bool               # average the losses across ranks and log them (with the validation metrics)
    validate: bool          # evaluate the val split on the workers (implies ``log``)
    checkpoint: bool        # save a checkpoint and report it to Ray Train
    check_preemption: bool  # ask Ray whether a node is being preempted (a barrier: all ranks ask together)
    last: bool              # ``train.max_steps`` reached: the loop ends after this step

    @property
    def report(self) -> bool:
        """Whether the step's metrics go to Ray Train (with the checkpoint when there is one)."""
        return self.log or self.checkpoint


class StepSchedule:
    """Decides, per optimizer step, whether to log, validate, checkpoint and check for preemption
    (the only place these are decided; the loop and the validator carry them out):

    - log every ``log_every`` steps, at the last step, and whenever validation runs;
    - validate every ``validate_every`` steps (``eval.every_steps``; 0: only at the end) and at the
      last step; never when ``validate_every`` is None (the run has no ``val`` dataset);
    - checkpoint every ``checkpoint_every`` steps and at the last step;
    - check for preemption every ``preemption_check_every`` steps, except when a checkpoint is
      taken anyway.
    """

    def __init__(self, max_steps: int, log_every: int, checkpoint_every: int, preemption_check_every: int,
                 validate_every: int | None = None) -> None:
        for name, every in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                            ("preemption_check_every", preemption_check_every)):
            if every < 1:
                raise ValueError(f"{name} must be at least 1, got {every}")
        if validate_every is not None and validate_every < 0:
            raise ValueError(f"validate_every must be 0 (at the end only) or more, got {validate_every}")
        self.max_steps, self.log_every, self.checkpoint_every = max_steps, log_every, checkpoint_every
        self.preemption_check_every, self.validate_every = preemption_check_every, validate_every

    @classmethod
    def from_config(cls, train_cfg, validate_every: int | None = None) -> "StepSchedule":
        """From ``train:``; ``validate_every``: ``eval.every_steps`` when the run validates, else None."""
        return cls(train_cfg.max_steps, train_cfg.log_every, train_cfg.checkpoint_every,
                   train_cfg.preemption_check_every, validate_every)

    def at(self, step: int) -> StepActions:
        last = step >= self.max_steps
        validate = self.validate_every is not None and (
            last or (self.validate_every > 0 and step % self.validate_every == 0))
        checkpoint = step % self.checkpoint_every == 0 or last
        return StepActions(
            step=step,
            log=step % self.log_every == 0 or last or validate,
            validate=validate,
            checkpoint=checkpoint,
            check_preemption=not checkpoint and step % self.preemption_check_every == 0,
            last=last,
        )


class ResumeSkip:
    """Leaves out the epoch's first ``n`` batches of a resumed run that has no recorded rows (a
    dataset without sample keys): they were trained on before the fault.  While skipping, the
    mixed-in streams' batches are left out as well (no mixed-in steps between skipped batches).
    The count carries over passes, so a skip longer than one pass goes on into the next."""

    def __init__(self, n: int) -> None:
        self.remaining = max(0, n)
        self.seen = 0  # batches looked at, skipped or not (an empty pass sees none)

    def filter(self, tagged: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        """``(stream, batch)`` pairs -> the pairs to train on."""
        for stream, batch in tagged:
            self.seen += 1
            if self.remaining:
                if stream == TRAIN:
                    self.remaining -= 1
                continue
            yield stream, batch
