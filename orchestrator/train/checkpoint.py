"""The run's own checkpoints: DeepSpeed shards per rank, the completion marker, resuming from the
newest checkpoint that verifies, and the consolidated export (weights for another run's start:
:mod:`orchestrator.train.weights`)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from orchestrator import storage
from orchestrator.train import manifest
from orchestrator.train.lease import LeaseLost
from orchestrator.train.upload import BackgroundUpload, DeferredWrites, Pending, Sizer, UploadFailed, upload_job

log = logging.getLogger(__name__)

TAG = "ds"                       # DeepSpeed tag directory inside each checkpoint
META = manifest.META  # written by rank 0 after every rank's upload: marks a complete checkpoint (manifest.py)
EXPORT_FILES = ("config.json", "model.safetensors")


def save(engine, directory: str, client_state: dict[str, Any], rank: int,
         metrics: dict[str, float] | None = None) -> None:
    """Every rank saves its DeepSpeed shard into its local ``directory`` (uploaded by Ray Train's
    ``report``, or in the background: ``Checkpointer``); the completion marker comes later, from
    :func:`commit`, once every rank's upload is done."""
    engine.save_checkpoint(directory, tag=TAG, client_state=client_state)


def commit(files: dict[str, dict[str, Any]], ckpt_uri: str, client_state: dict[str, Any],
           metrics: dict[str, float] | None, run: dict[str, Any] | None, rank: int, world: int) -> None:
    """Once this rank's upload returned (its files are in storage): gather every rank's file
    list (a collective, so rank 0 passes it only once every rank's upload is done) and write the
    marker on rank 0, listing each file with its size and hash."""
    per_rank = [files]
    if world > 1:
        import torch.distributed as dist

        per_rank = [None] * world
        dist.all_gather_object(per_rank, files)
    if rank == 0:
        manifest.write_marker(ckpt_uri, manifest.merge_ranks(per_rank), client_state, metrics, run)
    if world > 1:
        dist.barrier()  # when commit returns on any rank, the marker is there


def finished_run(run_dir: str, max_steps: int, run: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(checkpoint URI, its marker)`` when the run in ``run_dir`` already reached ``max_steps``
    and exported its model, else None: a rerun of a finished name then needs no workers at all.
    Only a complete checkpoint (its marker matches storage) and a complete export count; ``run``
    (the rerun's config) must be the one the run finished with, else
    :class:`~orchestrator.train.manifest.FinishedWithOtherConfig`."""
    if manifest.resolve_export(storage.join(run_dir, "export")) is None:
        return None
    found = manifest.latest_complete(run_dir)
    if found is None:
        return None
    last, meta = found
    if int(meta.get("step", -1)) < max_steps:
        return None
    if run is not None:
        manifest.check_same_config(meta, run, run_dir)
    return last, meta


def resume_point(ckpt, run_dir: str | None):
    """The checkpoint to resume from: Ray Train's latest if it is complete, else the newest complete
    one before it (skipped ones are named in a warning), else None (start over, said loudly)."""
    point = next(resume_points(ckpt, run_dir), None)
    if point is None and ckpt is not None and run_dir:
        log.error("no complete checkpoint in %s (the latest, %s, is not): starting from step 0", run_dir, ckpt.path)
    return point


def resume_points(ckpt, run_dir: str | None) -> Iterator[Any]:
    """Every checkpoint a resume may try, best first: Ray Train's latest ``ckpt`` if it is complete
    (listing: every file of its marker there, with its size), then each older complete one.  The
    caller moves to the next when the download fails its hashes (``Checkpointer.resume``)."""
    if ckpt is None:
        return
    if not run_dir:
        yield ckpt
        return
    check_own(ckpt.path, run_dir)
    m = manifest.CHECKPOINT_DIR.search(ckpt.path.rstrip("/"))
    step = int(m.group(1)) if m else None
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    for uri, _ in manifest.complete_checkpoints(run_dir, at_most_step=step):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if ckpt.path.rstrip("/").endswith("/" + name):
            yield ckpt
            continue
        import ray.train

        yield ray.train.Checkpoint(path=parent + "/" + name, filesystem=ckpt.filesystem)


def redo_count(latest, point) -> int:
    """The redo count of this attempt's checkpoint names (``manifest.checkpoint_dir_name``): the
    latest registered one's, plus one when the resume fell back behind it (``point`` is not Ray's
    ``latest``), since the steps redone up to it would be reported under names Ray registered."""
    if latest is None:
        return 0
    return manifest.redo_of(latest.path) + (point is not latest)


def check_own(checkpoint_path: str, run_dir: str | None) -> None:
    """A resume reads only checkpoints inside the run's own folder (``<storage>/<experiment>/<name>/``)."""
    if not run_dir:
        return
    own = (storage.split_s3(run_dir)[0] + "/" + storage.split_s3(run_dir)[1] if storage.is_s3(run_dir)
           else storage.local_path(run_dir)).rstrip("/") + "/"
    path = os.path.normpath(str(checkpoint_path)) + "/"
    if not path.startswith(own):
        raise RuntimeError(f"refusing to resume from {checkpoint_path}: not inside this run's folder {run_dir}")


def verify(directory: str) -> str | None:
    """Why the downloaded checkpoint in ``directory`` cannot be trusted (no marker, a marker without
    a file list, a file missing, of another size or whose bytes differ from its SHA-256), or None."""
    try:
        marker = json.loads(Path(directory, META).read_text())
    except FileNotFoundError:
        return f"checkpoint {directory} has no {META}: it was not completely written"
    except (ValueError, OSError) as e:
        return f"checkpoint {directory}: unreadable {META} ({e})"
    try:
        manifest.verify_local(directory, marker)
    except manifest.IncompleteCheckpoint as e:
        return str(e)
    return None


def load(engine, directory: str, verified: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and return the saved client state
    (``verified``: :func:`verify` already passed on this directory).

    Resuming trusts the run's own storage: DeepSpeed's loader unpickles (``weights_only=False``) the
    files that Ray Train restores from this run's folder, which only this run writes (the loop calls
    :func:`check_own` first). Whoever can write under the checkpoint prefix can run code in the
    training workers, so only the trainers' identity may write there (cluster/README.md, Security).
    Starting from anyone else's weights goes through :func:`load_weights`, which never unpickles.
    """
    if not verified:
        why = verify(directory)
        if why is not None:
            raise manifest.IncompleteCheckpoint(why)
    _, client_state = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    return client_state


def export(engine, zero_stage: int, out_dir: str, rank: int) -> bool:
    """Write the consolidated model (``model/`` save format) on rank 0; every rank must call."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _save_module(module, out_dir) if rank == 0 else False
    return _save_module(module, out_dir) if rank == 0 else False


def _save_module(module: torch.nn.Module, out_dir: str) -> bool:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(out_dir)
    else:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        Path(out_dir, "config.json").write_text(json.dumps({"class": type(module).__name__}))
    return True


# ------------------------------------------------------------------------------- the component
class CheckpointPart(Protocol):
    """A component whose state a checkpoint carries beside the engine's (the epoch's consumed rows,
    the bad-clip counts, rank 0's undelivered metric points)."""

    def gather(self) -> Any:
        """Its state, collected on every rank before anything is written (a collective for a
        state spread over the ranks)."""

    def save(self, directory: str, gathered: Any) -> None:
        """Write ``gathered`` into this rank's local checkpoint folder (a part held by rank 0 writes there only)."""

    def load(self, directory: str) -> None:
        """Take its state back from a downloaded, verified checkpoint (on resume)."""


class Checkpointer:
    """The run's own checkpoints, on every rank of a training run.

    - :meth:`resume`: the newest checkpoint whose download verifies on every rank (Ray Train's
      latest first; one failing its marker's sizes or hashes is skipped with a warning and the
      previous complete one tried, in this same attempt: a restart could not fix a damaged file);
      the engine and each part are loaded from it.
    - :meth:`save`: every rank writes its DeepSpeed shard and the parts' files; then, with
      ``upload="sync"``, reports them to Ray Train (which uploads them) and rank 0 writes the
      completion marker listing every rank's files once every rank's upload returned (the step
      waits for all of it).  With ``upload="async"`` (the default) the step only takes the state
      and writes the parts' files; a background thread per rank copies the state into host memory
      (the optimizer's next update waits until it has: :attr:`copy_wait_s`), serialises, hashes and
      uploads them (:mod:`~orchestrator.train.upload`: rank-local, no collective), and the commit
      (every rank's upload done, agreed by a collective; the marker by rank 0 under the fence;
      then the report to Ray Train, which registers the uploaded folder) runs on the main thread
      at the first step boundary after every rank's upload ended (:meth:`poll`), before the next
      save and at the end of the run (:meth:`drain`).  At most one upload is in flight.  A
      checkpoint whose upload did not finish on every rank has no marker: resume skips it.
    - :meth:`export`: the consolidated model into ``<export_uri>/step_<N>/`` and its pointer.
    - :meth:`preempted`: whether Ray signalled a node of this run is being preempted (checkpoint now).

    Nothing is written once the run's lease was taken over (:meth:`fenced` before each write).
    Its state: :attr:`saved_step` (the step of the last checkpoint: the last step is not saved
    twice), :attr:`resumed_from` and :attr:`redo` (the redo count of this attempt's checkpoint
    names), :attr:`uploads` (the upload in flight; None for ``upload="sync"``).
    """

    def __init__(self, engine, parts: list[CheckpointPart], *, run_dir: str | None, fence=None, rank: int = 0,
                 world: int = 1, run_config: dict[str, Any] | None = None,
                 preemption: "PreemptionCheckpointer | None" = None, upload: str = "async",
                 defer_copies: bool = True) -> None:
        if upload not in ("async", "sync"):
            raise ValueError(f"upload={upload!r}: 'async' (off the step path) or 'sync'")
        self.engine, self.parts, self.preemption = engine, list(parts), preemption
        # async needs the run's folder to upload into; without one Ray Train's report uploads (sync)
        self.uploads = BackgroundUpload() if upload == "async" and run_dir else None
        self.run_dir, self.fence, self.rank, self.world = run_dir, fence, rank, world
        self.run_config = run_config  # the run config the completion marker records (its fingerprint)
        self.saved_step = -1
        self.redo = 0
        self.resumed_from = None  # the checkpoint the run resumed from (a ray.train.Checkpoint), if any
        self.copy_wait_s = 0.0  # how long optimizer steps waited for a save's deferred host copies (async)
        self.defer_copies = defer_copies  # async: the host copies in the upload thread (False: on the step)
        self._copying: DeferredWrites | None = None  # the save whose copies the next update waits for
        self._hook = None  # that wait, on the engine's optimizer (registered at the first deferred save)

    def resume(self, latest) -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies (``latest``: ``ray.train.get_checkpoint()``) and
        return the client state it was saved with, or None (start from step 0, said loudly when
        there was something to resume)."""
        state, point, tried = None, None, 0
        for candidate in resume_points(latest, self.run_dir):
            tried += 1
            with storage.local_folder(storage.checkpoint_uri(candidate)) as d:
                why = verify(d)
                if every_rank(why is None, self.world):
                    state = load(self.engine, d, verified=True)
                    for part in self.parts:
                        part.load(d)
                    point = candidate
                    break
            log.warning("skipping checkpoint %s: %s; using the previous complete one", candidate.path,
                        why or "another rank's copy failed its verification")
        if point is None and latest is not None:
            log.error("no checkpoint of %s verifies (%d tried): starting from step 0", self.run_dir, tried)
        self.resumed_from = point
        self.redo = redo_count(latest, point)  # a fall back behind Ray's latest: new names for redone steps
        if state is not None:
            self.saved_step = int(state.get("step", 0))
            if self.rank == 0:
                log.info("resumed from step %d (epoch %d)", self.saved_step, int(state.get("epoch", 0)))
        return state

    def save(self, step: int, client_state: dict[str, Any], metrics: dict[str, Any], durable: bool = False) -> None:
        """Checkpoint optimizer step ``step`` (a collective: every rank calls it at the same step).
        ``durable``: return only once it is complete (a preemption's checkpoint), also when async."""
        import ray.train

        self.drain()  # at most one upload in flight: the previous one is committed first
        self.fenced()  # a run whose lease was taken over writes no checkpoint (LeaseLost, not retried)
        reported = {**metrics, "step": step}
        gathered = [part.gather() for part in self.parts]  # collectives: before any rank saves
        name = manifest.checkpoint_dir_name(step, self.redo)
        if self.uploads is not None:
            self._start_upload(name, step, client_state, reported, gathered)
            if durable:
                self.drain()
        else:
            with tempfile.TemporaryDirectory() as d:
                save(self.engine, d, client_state, self.rank, metrics=reported)
                for part, value in zip(self.parts, gathered):
                    part.save(d, value)
                files = manifest.describe_files(d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
                self._publish(name, files, checkpoint, client_state, reported)
        self.saved_step = step

    def _start_upload(self, name: str, step: int, client_state: dict[str, Any], reported: dict[str, Any],
                      gathered: list[Any]) -> None:
        """The step-path part of an async save: the state copied in memory, the parts' files
        written, the upload handed to the background thread."""
        target = storage.join(self.run_dir, name)
        if self.rank == 0:
            # a marker left by an earlier attempt of this name (committed, never registered) goes
            # before any rank uploads (DeepSpeed's save starts with a barrier): the folder stays
            # invisible until this save's own marker
            storage.delete_prefix(storage.join(target, META))
        d = tempfile.mkdtemp(prefix="mplug2-ckpt-")
        optimizer = self._held_optimizer()
        try:
            deferred = DeferredWrites.around(self.engine, lambda: save(self.engine, d, client_state, self.rank),
                                             self.uploads.buffers, defer=optimizer is not None,
                                             eager=self._forward_buffers())
            for part, value in zip(self.parts, gathered):
                part.save(d, value)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        self.uploads.start(upload_job(d, target, deferred, manifest.describe_files, storage.upload_dir),
                           name, step, client_state, reported)
        if deferred is not None and not deferred.copied.is_set():
            self._hold_update(optimizer, deferred)

    def _forward_buffers(self) -> list[torch.Tensor]:
        """The module's buffers a forward may change (queues, running statistics), copied first and
        on the step when a save defers the rest: every buffer but those the module says only a
        step of the loop changes (``after_step_buffers()``: the momentum encoders' weights, whose
        EMA runs after the optimizer step, which waits for the copies).  None when nothing is
        deferred (no held optimizer): the save then copies everything at once, in DeepSpeed's
        order.  ``prepare`` and every save take them alike, so the buffers line up."""
        if self._held_optimizer() is None:
            return []
        module = self.engine.module
        later = {id(b) for b in getattr(module, "after_step_buffers", list)()}
        return [b for b in module.buffers() if id(b) not in later]

    def _held_optimizer(self):
        """The torch optimizer whose next step waits for a save's deferred host copies, or None
        (the save copies at once): the innermost ``optimizer`` of the engine's (DeepSpeed's ZeRO
        and mixed-precision wrappers step it before they change any state they save; nothing else
        does in a step but the forward, whose module buffers are copied at once).  None under ZeRO-3,
        whose forward gathers and releases the parameters' data."""
        stage = getattr(self.engine, "zero_optimization_stage", None)
        if not self.defer_copies or stage is not None and stage() >= 3 or getattr(self.engine, "module", None) is None:
            return None
        opt = getattr(self.engine, "optimizer", None)
        for _ in range(4):
            if isinstance(opt, torch.optim.Optimizer):
                return opt
            opt = getattr(opt, "optimizer", None)
        return None

    def _hold_update(self, optimizer, deferred: DeferredWrites) -> None:
        """The optimizer's next step waits until ``deferred``'s copies are made (one hook per
        checkpointer, left in place; it waits only while a save's copies are outstanding)."""
        self._copying = deferred
        if self._hook is None:
            def wait(*_):
                held = self._copying
                if held is not None:
                    t0 = time.perf_counter()
                    held.copied.wait()
                    self.copy_wait_s += time.perf_counter() - t0
                    self._copying = None

            self._hook = optimizer.register_step_pre_hook(wait)

    def prepare(self) -> float:
        """Async only, once, at the run's first optimizer step (every rank: DeepSpeed's save is a
        collective; the optimizer's state exists by then): learn the sizes of the storages a save
        copies, with a dry save that copies and writes nothing, and allocate host buffers for them
        in the upload thread while training goes on.  The first checkpoint then copies into memory
        that exists instead of allocating the whole state on the step path.  Returns the seconds it
        took on the step path."""
        if self.uploads is None or self.uploads.buffers.pool or self.uploads.buffers.ready is not None:
            return 0.0
        t0 = time.perf_counter()
        sizer = Sizer()
        with tempfile.TemporaryDirectory() as d:
            DeferredWrites.around(self.engine, lambda: save(self.engine, d, {}, self.rank), sizer,
                                  eager=self._forward_buffers())
        self.uploads.reserve(sizer.sizes)
        return time.perf_counter() - t0

    def poll(self) -> Pending | None:
        """At a step boundary (every rank, the same step): commit the checkpoint in flight if every
        rank's upload is done (one small collective per step while one is in flight); the
        committed one, or None."""
        return self._settle(wait=False)

    def drain(self) -> Pending | None:
        """Wait for the upload in flight and commit it (every rank): before the next save, the
        export and the end of the run.  The committed one, or None."""
        return self._settle(wait=True)

    def close(self) -> None:
        """The worker is ending (also on an error): an upload in flight is left uncommitted."""
        if self.uploads is not None:
            self.uploads.close()
        if self._copying is not None:  # a copy the closed upload thread may never make: nothing waits for it
            self._copying.copied.set()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _settle(self, wait: bool) -> Pending | None:
        uploads = self.uploads
        if uploads is None or uploads.pending is None:  # every rank agrees: saves are collective
            return None
        if wait:
            uploads.wait()
        if not every_rank(uploads.pending.done(), self.world):
            return None
        pending = uploads.take()
        error = pending.future.exception()
        if not every_rank(error is None, self.world):  # every rank raises, here, on the main thread
            why = f"this rank's upload failed: {error!r}" if error else "another rank's upload failed"
            raise UploadFailed(f"checkpoint {pending.name} (step {pending.step}): {why}") from error
        self._commit_uploaded(pending)
        return pending

    def _commit_uploaded(self, pending: Pending) -> None:
        """Every rank's files are in storage: the marker (rank 0, under the fence), then the
        report that makes Ray Train register the folder (it uploads nothing: ``NO_UPLOAD``)."""
        import ray.train

        self.fenced()
        commit(pending.future.result(), storage.join(self.run_dir, pending.name), pending.client_state,
               pending.reported, self.run_config, self.rank, self.world)
        ray.train.report(pending.reported, checkpoint=self._uploaded(pending.name), checkpoint_dir_name=pending.name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
                         delete_local_checkpoint_after_upload=False)

    def _uploaded(self, name: str):
        """The uploaded folder ``name`` as Ray Train's storage names it (its run folder is ours)."""
        import ray.train

        try:
            ctx = ray.train.get_context().get_storage()
        except NotImplementedError:  # Ray Train's local mode: no storage context, nothing registered
            return ray.train.Checkpoint(path=storage.join(self.run_dir, name))
        return ray.train.Checkpoint(path=ctx.experiment_fs_path.rstrip("/") + "/" + name,
                                    filesystem=ctx.storage_filesystem)

    def _publish(self, name: str, files: dict[str, dict[str, Any]], checkpoint, client_state: dict[str, Any],
                 reported: dict[str, Any]) -> None:
        """Ray Train uploads the rank's files (``report``); then the completion marker, last, and only
        while the lease is still this run's."""
        import ray.train

        ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=name)
        if self.run_dir:
            self.fenced()
            commit(files, storage.join(self.run_dir, name), client_state, reported, self.run_config, self.rank,
                   self.world)

    def export(self, export_uri: str, step: int) -> None:
        """The consolidated model of step ``step`` into ``<export_uri>/step_<N>/`` and its pointer
        (every rank calls; rank 0 writes), once the checkpoint in flight is complete."""
        self.drain()
        self.fenced()  # no export by a run whose lease was taken over
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "export")
            if export(self.engine, self.engine.zero_optimization_stage(), out, self.rank):
                manifest.publish_export(out, export_uri, step, fence=self.fence)

    def preempted(self) -> bool:
        """A preemption notice not yet answered (a barrier: every rank asks at the same step)."""
        return self.preemption is not None and self.preemption.should_checkpoint()

    def fenced(self) -> None:
        """Raise :class:`~orchestrator.train.lease.LeaseLost` on every rank when the run's lease is
        no longer its own (rank 0 looks: one listing of the lease folder); no-op without a fence."""
        if self.fence is None:
            return
        lost = None
        if self.rank == 0:
            try:
                self.fence.check()
            except LeaseLost as e:
                lost = e
        if not every_rank(lost is None, self.world):
            raise lost or LeaseLost(f"run folder {self.fence.run_dir}: this run's lease was taken over (rank 0 saw "
                                    "it); it stops here without writing another checkpoint or export")


class PreemptionCheckpointer:
    """Checkpoint once when Ray signals that a node of this run is being preempted (a spot reclaim
    drains the node before it goes).  ``ray.train.get_preemption_info`` is a barrier, so every rank
    calls :meth:`should_checkpoint` at the same step; it answers True once per preemption event."""

    def __init__(self) -> None:
        import ray.train

        self._get = getattr(ray.train, "get_preemption_info", None)  # Ray Train V2 (2.55+)
        self._handled: tuple | None = None

    def should_checkpoint(self) -> bool:
        if self._get is None:
            return False
        info = self._get()
        if info is None:
            return False
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key == self._handled:
            return False
        self._handled = key
        log.warning("node preemption signalled (nodes %s, ranks %s, deadline %s ms): checkpointing now",
                    info.preempted_node_ids, info.preempted_ranks, info.deadline_ms)
        return True


def every_rank(ok: bool, world: int) -> bool:
    """True when ``ok`` holds on every rank (a collective: all ranks take the same decision)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
