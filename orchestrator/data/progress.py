"""What a resumed epoch leaves out: the rows already trained on before the fault.

Ray Data's split across workers is dynamic (a block goes to whichever worker asks first) and
block order, frame sampling and the local shuffle buffer all vary, so "skip the first N batches"
after a restart skips different rows than were trained.  Instead the train loop records the
``sample_key`` of every row it trains on, checkpoints that set (gathered from all ranks, see
``orchestrator.train.progress``), and on resume publishes it here before the epoch starts.  A
filter stage of the dataset (:func:`skip_consumed`, before decoding) then drops those rows, so
the rest of the epoch is exactly the rows not yet trained on, split equally between the workers.

The published state lives in one named Ray actor per run (``mplug2-progress-<run>``): per stream
(``train``, ``train_image``, ``train_text``) the pass (epoch) number and the keys to leave out.
The filter stage also stamps each row with the pass number, so frame sampling is seeded by
(seed, epoch, clip) rather than by fresh entropy.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np

from orchestrator.data.placement import end_state_actor, head_actor_options

log = logging.getLogger(__name__)

NAMESPACE = "mplug2"
EPOCH_COLUMN = "epoch"
_HANDLES: dict[str, Any] = {}
_CACHE: dict[tuple[str, str], tuple[str, int, np.ndarray]] = {}  # (run, stream) -> (version, epoch, keys)


class ProgressState:
    """Per stream: (version, pass number, sorted keys to leave out).  A version names this actor's
    incarnation too: a process that cached a released run's state never takes it for a rerun's."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[str, int, np.ndarray]] = {}
        self._incarnation = uuid.uuid4().hex[:12]
        self._published = 0

    def publish(self, stream: str, epoch: int, keys: np.ndarray) -> str:
        self._published += 1
        version = f"{self._incarnation}-{self._published}"
        self._state[stream] = (version, int(epoch), np.unique(np.asarray(keys, np.int64)))
        return version

    def get(self, stream: str, known_version: str) -> tuple[str, int, np.ndarray] | None:
        """The state when it is newer than ``known_version`` (else None: nothing to send)."""
        st = self._state.get(stream)
        if st is None or st[0] == known_version:
            return None
        return st


def actor_name(run_name: str | None) -> str:
    return f"mplug2-progress-{run_name or 'default'}"


def get_registry(run_name: str | None):
    """The named actor for ``run_name`` (created on first use, by the driver in build_dataset)."""
    import ray

    name = actor_name(run_name)
    if name not in _HANDLES:
        cls = ray.remote(num_cpus=0)(ProgressState)  # on the head node (placement.py)
        _HANDLES[name] = cls.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                     **head_actor_options()).remote()
    return _HANDLES[name]


def release(run_name: str | None) -> None:
    """End a finished run's registry (the driver, after the run): otherwise it lives as long as the
    job, one idle actor process per run.  A rerun of the name starts a new one."""
    name = actor_name(run_name)
    for key in [k for k in _CACHE if k[0] == (run_name or "")]:
        del _CACHE[key]
    end_state_actor(name, NAMESPACE, _HANDLES.pop(name, None))


def _call(run_name: str | None, method: str, *args):
    """Call the registry; a handle to an actor that died (its owner went away) is dropped and the
    actor looked up / created again once."""
    import ray
    from ray.exceptions import RayActorError

    for attempt in range(2):
        try:
            return ray.get(getattr(get_registry(run_name), method).remote(*args))
        except RayActorError:
            if attempt:
                raise
            log.warning("progress registry %s died; looking it up again", actor_name(run_name))
            _HANDLES.pop(actor_name(run_name), None)
            _CACHE.clear()
    return None


def publish(run_name: str | None, stream: str, epoch: int, keys) -> None:
    """Rows of ``stream`` whose key is in ``keys`` are left out from now on; rows are stamped ``epoch``.
    Call before the pass starts (its first batch is requested): the filter reads it per block."""
    _call(run_name, "publish", stream, epoch, np.asarray(keys, np.int64))


def _current(run_name: str | None, stream: str) -> tuple[int, np.ndarray]:
    cached = _CACHE.get((run_name or "", stream), ("", 0, np.zeros(0, np.int64)))  # "": nothing published seen
    newer = _call(run_name, "get", stream, cached[0])
    if newer is not None:
        cached = newer
        _CACHE[(run_name or "", stream)] = newer
    return cached[1], cached[2]


def skip_consumed(batch: dict[str, np.ndarray], run_name: str | None, stream: str, stamp_epoch: bool = True,
                  key_column: str = "sample_key") -> dict[str, np.ndarray]:
    """Ray Data batch function: drop the rows published as consumed; add the pass number column."""
    epoch, consumed = _current(run_name, stream)
    keys = np.asarray(batch[key_column], np.int64)
    keep = ~np.isin(keys, consumed, assume_unique=False) if len(consumed) else np.ones(len(keys), bool)
    out = {k: v[keep] for k, v in batch.items()}
    if stamp_epoch:
        out[EPOCH_COLUMN] = np.full(int(keep.sum()), epoch, np.int64)
    return out
