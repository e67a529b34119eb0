"""Names that become one folder of a storage path (run, experiment and sweep names).  Light on
purpose: the config layer validates names with it before anything heavy is imported."""
from __future__ import annotations

import re

SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_segment(value: str, what: str) -> str:
    """``value`` used as one folder name of a storage path: letters, digits, '-', '_', '.', not
    starting with '.' or '-' (so never '..', never a hidden or option-like name); ValueError otherwise."""
    if not isinstance(value, str) or not SAFE_SEGMENT.fullmatch(value):
        raise ValueError(f"{what} {value!r} is used as a folder name in storage paths: letters, digits, '-', '_' "
                         "and '.' only, starting with a letter, digit or '_' (at most 200 characters)")
    return value
