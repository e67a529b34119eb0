"""Frame sampling strategies: which frame indices of ``[first, last)`` to decode.

Each strategy is a small function chosen by name (``data.sampling`` / ``data.eval_sampling``):

- ``rand``: split the range into N equal segments, one random frame from each (training);
- ``middle``: the centre frame of each of the N equal segments (evaluation);
- ``uniform``: N frames evenly spaced from the first to the last frame, both included;
- ``headtail``: N/2 random frames from the first half, the rest from the second half;
- ``keyframe`` (opt-in, training): like ``rand`` one frame per segment, but a random keyframe of
  the segment plus 0..jitter frames, so each frame returned costs at most jitter+1 decoded frames
  (a segment without a keyframe takes its first frames, the cheapest to reach).  The frames are
  no longer uniform within a segment: a choice for users who accept that for the speed.

A range shorter than N frames yields every frame once, then the last frame repeated (padding).
Indices are always sorted, so decoding seeks forward only.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _edges(first: int, last: int, n: int) -> np.ndarray:
    return np.linspace(first, last, n + 1)


def rand(first: int, last: int, n: int, rng: np.random.Generator) -> list[int]:
    e = _edges(first, last, n)
    lo = np.floor(e[:-1]).astype(int)
    hi = np.maximum(np.floor(e[1:]).astype(int), lo + 1)  # exclusive
    return [int(rng.integers(a, b)) for a, b in zip(lo, hi)]


def middle(first: int, last: int, n: int, rng: np.random.Generator) -> list[int]:
    e = _edges(first, last, n)
    return [int(x) for x in np.floor((e[:-1] + e[1:]) / 2)]


def uniform(first: int, last: int, n: int, rng: np.random.Generator) -> list[int]:
    return [int(x) for x in np.round(np.linspace(first, last - 1, n))]


def headtail(first: int, last: int, n: int, rng: np.random.Generator) -> list[int]:
    mid = first + (last - first) // 2
    head = rng.choice(np.arange(first, mid), size=n // 2, replace=False)
    tail = rng.choice(np.arange(mid, last), size=n - n // 2, replace=False)
    return sorted(int(x) for x in np.concatenate([head, tail]))


def keyframe(first: int, last: int, n: int, rng: np.random.Generator, keyframes: list[int],
             jitter: int = 2) -> list[int]:
    e = _edges(first, last, n)
    lo = np.floor(e[:-1]).astype(int)
    hi = np.maximum(np.floor(e[1:]).astype(int), lo + 1)  # exclusive
    kf = np.asarray(sorted(keyframes), dtype=int)
    out = []
    for a, b in zip(lo, hi):
        inside = kf[(kf >= a) & (kf < b)]
        base = int(rng.choice(inside)) if len(inside) else int(a)
        out.append(min(int(b) - 1, base + int(rng.integers(0, jitter + 1))))
    return out


STRATEGIES: dict[str, Callable[[int, int, int, np.random.Generator], list[int]]] = {
    "rand": rand, "middle": middle, "uniform": uniform, "headtail": headtail,
}
KEYFRAME_STRATEGIES = {"keyframe": keyframe}  # these also need the clip's keyframe indices


def sample_indices(strategy: str, first: int, last: int, n: int, rng: np.random.Generator,
                   keyframes: list[int] | None = None, jitter: int = 2) -> list[int]:
    """N sorted frame indices in ``[first, last)``; ranges shorter than N are padded with the last frame."""
    if strategy not in STRATEGIES and strategy not in KEYFRAME_STRATEGIES:
        raise ValueError(f"unknown frame sampling {strategy!r}; accepted: "
                         f"{', '.join([*STRATEGIES, *KEYFRAME_STRATEGIES])}")
    if last <= first:
        raise ValueError(f"empty frame range [{first}, {last})")
    count = last - first
    if count < n:
        return list(range(first, last)) + [last - 1] * (n - count)
    if strategy in KEYFRAME_STRATEGIES:
        return sorted(KEYFRAME_STRATEGIES[strategy](first, last, n, rng, keyframes or [first], jitter))
    return sorted(STRATEGIES[strategy](first, last, n, rng))


def frames_decoded(indices: list[int], keyframes: list[int]) -> int:
    """How many frames a seeking decoder decodes to return ``indices``: from the keyframe at or
    before each wanted frame (or straight on from the previous wanted frame when that is nearer)."""
    kf = np.asarray(sorted(keyframes) or [0])
    total, pos = 0, -1  # pos: the last frame decoded
    for i in sorted(set(indices)):
        k = int(kf[np.searchsorted(kf, i, side="right") - 1]) if i >= kf[0] else 0
        start = pos + 1 if pos >= k else k
        total += i - start + 1
        pos = i
    return total
