"""A checkpoint's upload off the training step's critical path (``train.checkpoint_upload: async``).

On the step path a save only runs DeepSpeed's save path, takes the small entries of its files and
the module's buffers a forward may change (:class:`DeferredWrites`: the engine's files are
serialised later) and writes the parts' small files; one background thread per worker then walks
the module and optimizer states (:func:`snapshot`: their tensors pointed at host buffers), copies
them into those buffers (before the optimizer's next update, which waits for it:
``Checkpointer``), serialises the state to a local folder, hashes every file and uploads the
folder (:class:`BackgroundUpload`).  The thread is
rank-local: it makes no collective call, so it never runs one concurrently with the training
step's on the same process group.  The agreement that
every rank's upload is done, and the completion marker after it, are the caller's, on the main
thread (``Checkpointer.poll`` at each step boundary, ``Checkpointer.drain`` before the next save
and at the end of the run).  At most one upload is in flight: the next save waits for it, so the
memory (one copy of the state) and the local disk (one checkpoint) it holds do not grow.
"""
from __future__ import annotations

import copy
import gc
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class UploadFailed(RuntimeError):
    """A checkpoint upload that failed in the background (raised on the main thread of every rank)."""


class HostBuffers:
    """Host-memory copies of a state's tensor storages, kept from one save to the next: the first
    save allocates them, the later ones copy into the same buffers in the same order (no page
    faults on the step path).  Reused only once the upload that read them ended: one upload in
    flight, and the next save waits for it.  Holds one copy of the checkpointed state.

    :attr:`ready` holds them while they are allocated ahead, off the step path
    (:meth:`BackgroundUpload.reserve`, from ``Checkpointer.prepare``): the first save then copies
    into buffers whose pages exist (on a GPU worker: pinned memory), instead of allocating the
    whole state's size while every worker waits.

    A save started with ``defer=True`` copies nothing of a host (CPU) storage into a buffer it
    already has: it records the copy (:meth:`finish` hands them back) for the upload thread to
    make while the next step's forward and backward run; the caller holds the optimizer's next
    update until they are made (``Checkpointer``).  Storages in ``eager`` (the module's buffers a
    forward may change: queues, running statistics) are copied at once.  The snapshot's
    tensors over the buffers are kept from one save to the next (each save keeps those it used): a
    save of the same state builds none."""

    def __init__(self) -> None:
        self.pool: list[torch.UntypedStorage] = []   # the previous save's, in the order they were taken
        self.taken: list[torch.UntypedStorage] = []  # this save's
        self.ready: Future | None = None  # buffers being allocated ahead (BackgroundUpload.reserve)
        self.defer, self.eager = False, frozenset()
        self.pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []  # (buffer, source) to copy
        self._views: dict = {}  # (buffer data_ptr, offset, size, stride, dtype) -> the snapshot's tensor
        self._views_before: dict = {}

    def start(self, defer: bool = False, eager: frozenset = frozenset()) -> None:
        if self.ready is not None:  # the buffers allocated ahead: wait for them, once
            ready, self.ready = self.ready, None
            if ready.exception() is None:
                self.pool = ready.result()
            else:
                log.warning("checkpoint host buffers could not be allocated ahead (%s): this save allocates them",
                            ready.exception())
        self.taken, self.pending, self.defer, self.eager = [], [], defer, eager
        self._views_before, self._views = self._views, {}

    def finish(self) -> list[tuple[torch.UntypedStorage, torch.UntypedStorage]]:
        """End this save's snapshot: its buffers are the next save's; returns the copies it deferred."""
        self.pool = self.taken
        self._views_before = {}  # the views this save did not use are let go
        pending, self.pending = self.pending, []
        return pending

    def copy(self, src: torch.UntypedStorage, on_cpu: bool = True) -> torch.UntypedStorage:
        """The host buffer that holds (or, deferred, will hold) a copy of ``src`` for this save."""
        i = len(self.taken)
        if i < len(self.pool) and self.pool[i].nbytes() == src.nbytes():
            buf = self.pool[i]
            if self.defer and on_cpu and src.data_ptr() not in self.eager:
                self.pending.append((buf, src))
            else:
                buf.copy_(src)
        else:  # into host memory (DeepSpeed loads checkpoints onto the CPU anyway)
            buf = src.clone() if on_cpu else src.cpu()
        self.taken.append(buf)
        return buf

    def view(self, held: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
        """A tensor over ``held`` shaped as ``like`` is over its own storage (the same one as the
        previous save's when it had it: the view keeps ``held`` alive, so its address is its own)."""
        key = (held.data_ptr(), like.storage_offset(), like.size(), like.stride(), like.dtype)
        out = self._views_before.get(key)
        if out is None:
            out = self._views.get(key)
            if out is None:
                out = torch.empty((0,), dtype=like.dtype).set_(held, like.storage_offset(), like.size(), like.stride())
        self._views[key] = out
        return out


def copy_all(pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]]) -> None:
    """Make the copies a deferred snapshot recorded (buffer <- source; each releases the GIL while
    it copies)."""
    for dst, src in pending:
        dst.copy_(src)


def allocate(nbytes: int, device: str) -> torch.UntypedStorage:
    """``nbytes`` of host memory with every page touched (pinned when its source is a CUDA device)."""
    pin = device == "cuda" and torch.cuda.is_available()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    buf.zero_()
    return buf.untyped_storage()


class Sizer:
    """Stands in for :class:`HostBuffers` in a dry :func:`snapshot`: it records each storage's size
    and device in the order a save takes them, and copies nothing (the snapshot's tensors are then
    views of the live state, never written)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, str]] = []
        self.pending: list = []  # it never defers a copy

    def start(self, defer: bool = False, eager: frozenset = frozenset()) -> None:
        self.sizes = []

    def finish(self) -> list:
        return []

    def copy(self, src: torch.UntypedStorage, on_cpu: bool = True) -> torch.UntypedStorage:
        self.sizes.append((src.nbytes(), src.device.type))
        return src

    def view(self, held: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
        return torch.empty((0,), dtype=like.dtype, device=held.device).set_(held, like.storage_offset(), like.size(),
                                                                             like.stride())


_IMMUTABLE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def snapshot(obj: Any, buffers: HostBuffers | None = None, storages: dict | None = None) -> Any:
    """A copy of ``obj`` in host memory that no later training step changes: each tensor storage
    copied once (tensors that shared one, views included, share its copy, so ``torch.save`` writes
    what it would have written of the live state), into ``buffers`` when given; containers
    rebuilt; immutable values kept; other objects deep-copied.  Unlike ``copy.deepcopy`` it accepts
    tensors that are not graph leaves (ZeRO's flat groups).  It runs on the step path once per
    tensor of the state (thousands), so each visit is kept to a few calls."""
    buffers = HostBuffers() if buffers is None else buffers
    storages = {} if storages is None else storages
    return _snapshot(obj, buffers, storages)


def _snapshot(obj: Any, buffers: HostBuffers, storages: dict) -> Any:
    kind = type(obj)
    if kind in _IMMUTABLE:
        return obj
    if isinstance(obj, torch.Tensor):
        src = obj.untyped_storage()
        key = (src.data_ptr(), src.nbytes(), src.device)
        held = storages.get(key)
        if held is None:
            held = storages[key] = buffers.copy(src, obj.is_cpu)
        return buffers.view(held, obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # its type (OrderedDict, defaultdict ...), then each value copied
        for k, v in obj.items():
            out[k] = _snapshot(v, buffers, storages)
        return out
    if isinstance(obj, list):
        return [_snapshot(v, buffers, storages) for v in obj]
    if kind is tuple:
        return tuple(_snapshot(v, buffers, storages) for v in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return kind(*(_snapshot(v, buffers, storages) for v in obj))
    return copy.deepcopy(obj)


LATER_KEYS = ("module", "optimizer", "optimizer_state_dict")  # DeepSpeed's files: the module's and the optimizer's states


class DeferredWrites:
    """Stands in for a DeepSpeed engine's ``checkpoint_engine`` during ``save_checkpoint``: what
    DeepSpeed asks it to write is copied in memory (:func:`snapshot`) and written by :meth:`write`
    later, from any thread, through the engine's own checkpoint engine (its serialisation
    settings).  Everything else is the real checkpoint engine's.  A state that cannot be copied is
    written from the live state (a warning says so): at once when it is a small entry, by the upload
    thread before the optimizer's next update may run when it is in the module or optimizer state
    (only a forward-changed buffer there may then be one forward newer).  Slower, not lost.

    The walk over a file's state goes in a fixed order on every save (the storages of ``eager``
    first, then each file's small entries, then its module and optimizer states, :data:`LATER_KEYS`),
    so each save copies into the buffers the previous one used.  With ``defer`` (:meth:`around`)
    the module and optimizer states (thousands of tensors, built afresh by each ``state_dict()``
    call, changed by nothing but the optimizer's next update) are walked, and the host copies made,
    by :meth:`copy`, first thing in the upload thread: the step path copies only ``eager`` and the
    small entries.  :attr:`copied` is set once the copies are made (or failed)."""

    def __init__(self, inner, buffers: HostBuffers | None = None) -> None:
        self.inner, self.buffers = inner, buffers or HostBuffers()
        self.held: list[tuple[str, Any]] = []
        self.storages: dict = {}  # this save's storages (over all its files) -> their host copies
        self.later: list[tuple[dict, str]] = []  # (held state, key): a live module / optimizer state to walk
        self.copied = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        mark = len(self.later)
        try:
            if isinstance(state_dict, dict):
                held = copy.copy(state_dict)
                for k, v in state_dict.items():
                    if k in LATER_KEYS and isinstance(v, dict):
                        self.later.append((held, k))  # walked by copy()
                    else:
                        held[k] = _snapshot(v, self.buffers, self.storages)
            else:
                held = snapshot(state_dict, self.buffers, self.storages)
        except Exception as e:  # an object in the state that refuses to be copied
            log.warning("checkpoint file %s written on the step path: its state could not be copied (%s)", path, e)
            del self.later[mark:]  # this file's states are written live, below
            copy_all(self.buffers.pending)  # what was recorded before it: the file below reads the live state
            self.buffers.pending.clear()
            self.inner.save(state_dict, path)
            return
        self.held.append((path, held))

    def copy(self) -> None:
        """Walk the module and optimizer states set aside and make the host copies (those a
        deferred snapshot recorded); a state that cannot be copied is written from the live state
        here, while the optimizer's next update still waits."""
        try:
            later, self.later = self.later, []
            failed = None
            for held, key in later:
                try:
                    held[key] = _snapshot(held[key], self.buffers, self.storages)
                except Exception as e:  # the live state is written below, before the update may run
                    failed = e
            pending = self.buffers.finish()
            if pending:
                copy_all(pending)
            if failed is not None:
                log.warning("checkpoint written from the live state before the next update: a module or "
                            "optimizer state could not be copied (%s)", failed)
                self._write_held()
        finally:
            self.copied.set()

    def write(self) -> None:
        self.copy()
        self._write_held()

    def _write_held(self) -> None:
        while self.held:
            path, state = self.held.pop(0)
            self.inner.save(state, path)

    @classmethod
    def around(cls, engine, save: Callable[[], None], buffers: HostBuffers | None = None, defer: bool = False,
               eager: list[torch.Tensor] | tuple = ()) -> "DeferredWrites | None":
        """Run ``save`` (the engine's ``save_checkpoint``) with the writes deferred (copies into
        ``buffers``); the holder, or None for an engine without a checkpoint engine (``save`` then
        wrote its files itself).  ``eager``: tensors a forward may change (the module's buffers),
        copied first and at once.  ``defer``: the module and optimizer states are walked and copied
        by :meth:`copy` in the upload thread, and the caller holds the next change of the state
        until :attr:`copied`; else everything is copied before this returns."""
        inner = getattr(engine, "checkpoint_engine", None)
        if inner is None:
            save()
            return None
        deferred = cls(inner, buffers)
        deferred.buffers.start(defer, frozenset(t.untyped_storage().data_ptr() for t in eager))
        engine.checkpoint_engine = deferred
        collecting = gc.isenabled()
        gc.disable()  # the snapshot makes thousands of small objects: no collection pass in the middle of it
        try:
            for t in eager:
                _snapshot(t, deferred.buffers, deferred.storages)
            save()
        finally:
            if collecting:
                gc.enable()
            engine.checkpoint_engine = inner
        if not defer:
            deferred.copy()
        return deferred


@dataclass
class Pending:
    """One checkpoint whose upload was started: what its marker and its report will carry."""

    name: str
    step: int
    client_state: dict[str, Any]
    reported: dict[str, Any]
    future: Future
    started: float = field(default_factory=time.perf_counter)

    def done(self) -> bool:
        return self.future.done()


def upload_job(local_dir: str, target: str, deferred: DeferredWrites | None,
               describe: Callable[[str], dict], upload: Callable[[str, str], Any]) -> Callable[[], dict]:
    """The background work of one rank's checkpoint: write the deferred state into ``local_dir``,
    describe its files (sizes, hashes), upload the folder to ``target``, remove ``local_dir``;
    returns the description (what the marker lists for this rank)."""

    def run() -> dict:
        try:
            if deferred is not None:
                deferred.write()
            files = describe(local_dir)
            upload(local_dir, target)
            return files
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    return run


class BackgroundUpload:
    """One rank's checkpoint uploads, one at a time, in one background thread.  It never commits
    anything: :attr:`pending` is handed back to the caller (:meth:`take`) once done."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: Pending | None = None
        self.buffers = HostBuffers()  # the state's copy, reused by each save once the last upload ended

    def start(self, job: Callable[[], dict], name: str, step: int, client_state: dict[str, Any],
              reported: dict[str, Any]) -> None:
        if self.pending is not None:
            raise RuntimeError(f"checkpoint {self.pending.name} is still pending: take it before starting {name}")
        self.pending = Pending(name, step, client_state, reported, self._pool.submit(job))

    def reserve(self, sizes: list[tuple[int, str]]) -> None:
        """Allocate :attr:`buffers` of ``sizes`` ((bytes, source device type), in the order a save
        takes them) on the upload thread, every page touched; the next save waits for them."""
        self.buffers.ready = self._pool.submit(lambda: [allocate(n, device) for n, device in sizes])

    def wait(self) -> None:
        """Block until the pending upload ended (well or not); no-op without one."""
        if self.pending is not None:
            self.pending.future.exception()

    def take(self) -> Pending:
        pending, self.pending = self.pending, None
        return pending

    def close(self) -> None:
        """Stop taking work (an upload in flight finishes on its own and removes its folder; nothing
        commits it, so it stays invisible)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
