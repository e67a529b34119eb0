"""Which worker failures a restart can fix.

A worker killed mid-run, a lost node or a storage blip is a fault: Ray Train restarts the worker
group from the latest checkpoint, up to ``train.max_failures`` times.  An error raised while a
worker *sets up* (validates its config, builds the model, loads the tokenizer or the init-from
weights, opens the checkpoint) because of the configuration or a named file is not: every
restart would raise it again, after minutes of scheduling each time.  Such an error is wrapped in
:class:`SetupError` by the worker; :class:`FailFast` (a Ray Train callback in the controller) stops
the run at its first occurrence and the driver raises it once as a
:class:`~orchestrator.config.ConfigError`.

Two more errors are never retried, whenever they happen (:data:`NOT_RETRYABLE_ERRORS`): a
data-quality stop (:class:`~orchestrator.data.quality.TooManyBadClips`: every restart decoded the
same bad clips again, and counted them again, "4 bad of 48" for one bad clip of 12), and a lost
lease (:class:`~orchestrator.train.lease.LeaseLost`: another run of the name holds the folder).
"""
from __future__ import annotations

from typing import Any

from orchestrator import errors
from orchestrator.data.quality import TooManyBadClips
from orchestrator.train.lease import LeaseLost

# Raised during setup, these say the run's configuration or a file it names is wrong.  Anything
# else (RuntimeError from a collective whose peer died, ConnectionError, TimeoutError, a generic
# OSError from storage) may be transient and is left to Ray Train's retries.
NOT_RETRYABLE = (ValueError, LookupError, TypeError, ImportError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError, PermissionError)


class SetupError(RuntimeError):
    """A worker's setup failed for a reason a restart cannot fix; the message says which and why."""


# Raised anywhere in a run (a worker, a decode task feeding it, the controller), these end it at once.
NOT_RETRYABLE_ERRORS = (SetupError, TooManyBadClips, LeaseLost)


class SetupPhase:
    """Marks the end of a worker's setup; :meth:`classify` turns a setup-time config/file error
    into :class:`SetupError` and leaves every other error as it is."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> None:
        self.finished = True

    def classify(self, error: BaseException) -> BaseException:
        if self.finished or isinstance(error, SetupError) or not isinstance(error, NOT_RETRYABLE):
            return error
        return SetupError(f"worker setup failed, and a restart would fail the same way: "
                          f"{type(error).__name__}: {error}")


def find_error(error: BaseException | None, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` inside a Ray Train failure (worker failures, controller
    failure, a Ray task error's cause, ``__cause__``/``__context__``), or None."""
    return errors.find(error, kinds)


def find_setup_error(error: BaseException | None) -> SetupError | None:
    """The :class:`SetupError` inside a Ray Train failure, or None."""
    return find_error(error, (SetupError,))


def find_not_retryable(error: BaseException | None) -> BaseException | None:
    """The first of :data:`NOT_RETRYABLE_ERRORS` inside a Ray Train failure, or None."""
    return find_error(error, NOT_RETRYABLE_ERRORS)


def plain(found: BaseException) -> BaseException:
    """A fresh exception of ``found``'s kind (one of :data:`NOT_RETRYABLE_ERRORS`) with its own message:
    Ray's wrappers (a ``RayTaskError`` that is also an instance of its cause) carry tracebacks in theirs."""
    kind = next(k for k in NOT_RETRYABLE_ERRORS if isinstance(found, k))
    inner = getattr(found, "cause", None)
    if isinstance(inner, kind):
        found = inner
    message = found.args[0] if found.args and isinstance(found.args[0], str) else str(found)
    return kind(message)


def fail_fast(worker_exceptions: dict[int, BaseException]) -> None:
    """Raise (a fresh copy of) the first not-retryable error among the workers' exceptions."""
    for rank, error in sorted(worker_exceptions.items()):
        found = find_not_retryable(error)
        if isinstance(found, SetupError):
            raise SetupError(f"rank {rank}: {found}") from None
        if found is not None:
            raise plain(found) from None


def fail_fast_callback(fence=None):
    """A Ray Train ``UserCallback`` that ends the run at the first not-retryable error of any worker
    (raising in the controller is a non-retryable controller failure: no restart), and, given the
    run's :class:`~orchestrator.train.lease.LeaseFence`, at the first report after its lease was
    taken over."""
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            if fence is not None:
                fence.check()  # LeaseLost: the controller fails, the run ends, nothing restarts

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            fail_fast(worker_exceptions)

    return FailFast()
