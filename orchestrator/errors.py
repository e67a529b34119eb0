"""Errors a user can fix, and finding them inside the wrappers Ray puts around them.

:class:`UserError` marks an error whose message already says what is wrong and how to fix it (a
setting, a file, a run name): the CLI prints that message as one line, without a traceback
(``--verbose`` shows it).  :func:`find` looks for an exception of given kinds inside a Ray failure:
Ray Train's worker-group and controller failures, a ``RayTaskError``'s cause, ``__cause__`` and
``__context__``.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the run's settings or inputs; the message names it and how to fix it."""


class ConfigError(ValueError, UserError):
    """A configuration problem a user can fix; the message says how."""


def find(error: BaseException | None, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``error``'s chain (Ray's wrappers included), or None."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend([getattr(e, "controller_failure", None), getattr(e, "_base_exc", None),
                      getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def message(error: BaseException) -> str:
    """``error``'s own message: a Ray task error that is also an instance of its cause (a
    ``RayTaskError(TooManyBadClips)``) carries the remote traceback in its text; its cause does not."""
    inner = getattr(error, "cause", None)
    if isinstance(inner, UserError):
        error = inner
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
