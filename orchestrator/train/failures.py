"""Which worker failures a restart can fix.

A worker killed mid-run, a lost node or a storage blip is a fault: Ray Train restarts the worker
group from the latest checkpoint, up to ``train.max_failures`` times.  An error raised while a
worker *sets up* (validates its config, builds the model, loads the tokenizer or the init-from
weights, opens the checkpoint) because of the configuration or a named file is not: every
restart would raise it again, after minutes of scheduling each time.  Such an error is wrapped in
:class:`SetupError` by the worker; :class:`FailFast` (a Ray Train callback in the controller) stops
the run at its first occurrence and the driver raises it once as a
:class:`~orchestrator.config.ConfigError`.
"""
from __future__ import annotations

from typing import Any

# Raised during setup, these say the run's configuration or a file it names is wrong.  Anything
# else (RuntimeError from a collective whose peer died, ConnectionError, TimeoutError, a generic
# OSError from storage) may be transient and is left to Ray Train's retries.
NOT_RETRYABLE = (ValueError, LookupError, TypeError, ImportError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError, PermissionError)


class SetupError(RuntimeError):
    """A worker's setup failed for a reason a restart cannot fix; the message says which and why."""


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


def find_setup_error(error: BaseException | None) -> SetupError | None:
    """The :class:`SetupError` inside a Ray Train failure (worker failures, controller failure,
    causes), or None."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SetupError):
            return e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack.extend([getattr(e, "controller_failure", None), getattr(e, "_base_exc", None), e.__cause__,
                      e.__context__])
    return None


def fail_fast_callback():
    """A Ray Train ``UserCallback`` that ends the run at the first :class:`SetupError` of any worker
    (raising in the controller is a non-retryable controller failure: no restart)."""
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for rank, error in sorted(worker_exceptions.items()):
                found = find_setup_error(error)
                if found is not None:
                    raise SetupError(f"rank {rank}: {found}") from None

    return FailFast()
