"""Asynchronous checkpoint uploads (``train.checkpoint_upload: async``) on fakes: no Ray cluster, no
DeepSpeed.  The engine writes through a checkpoint engine as DeepSpeed's does; the upload is the
real one (a local run folder) behind a gate the test opens; other ranks are simulated at the
collective that agrees on their uploads.  What must hold: the save returns before the upload, with
the state of its step; the marker comes last, only once every rank's upload is done, then Ray
Train's report; at most one upload in flight; a failed upload raises on the main thread of every
rank; the end of the run waits for it; an upload cut short stays invisible to resume."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator import storage
from orchestrator.config import load_config
from orchestrator.train import checkpoint, manifest, upload
from orchestrator.train.upload import UploadFailed
from orchestrator.trainer import loop
from orchestrator.trainer.plan import WorkerPlan


class Writer:  # DeepSpeed's checkpoint engine: torch.save
    def save(self, state, path):
        torch.save(state, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class Engine:
    """Saves as DeepSpeed does: every tensor file through ``checkpoint_engine.save``."""

    def __init__(self):
        self.w = torch.zeros(1000)
        self.checkpoint_engine = Writer()

    def save_checkpoint(self, directory, tag, client_state):
        self.checkpoint_engine.makedirs(os.path.join(directory, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": self.w, **client_state}, os.path.join(directory, tag, "model.pt"))


class Part:
    def gather(self):
        return None

    def save(self, directory, gathered):
        Path(directory, "part.json").write_text("{}")

    def load(self, directory):
        pass


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A run folder, the events in order (uploads, markers, reports), a gate on the uploads, and the
    other rank's upload status as the collective would report it."""
    import ray.train

    run_dir = str(tmp_path / "run")
    w = SimpleNamespace(run_dir=run_dir, events=[], gate=threading.Event(), other_done=True, fail=None)
    w.gate.set()
    upload = storage.upload_dir

    def gated_upload(local, uri):
        w.events.append(("upload-start", uri.rsplit("/", 1)[-1]))
        assert w.gate.wait(10)
        if w.fail:
            raise w.fail
        upload(local, uri)
        w.events.append(("uploaded", uri.rsplit("/", 1)[-1]))

    write_marker = manifest.write_marker

    def marker(uri, files, *a):
        w.events.append(("marker", uri.rsplit("/", 1)[-1]))
        write_marker(uri, files, *a)

    monkeypatch.setattr(storage, "upload_dir", gated_upload)
    monkeypatch.setattr(manifest, "write_marker", marker)
    monkeypatch.setattr(checkpoint, "every_rank", lambda ok, world: ok and w.other_done)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, **kw: w.events.append(
        ("report", checkpoint.path.rsplit("/", 1)[-1], kw["checkpoint_upload_mode"].name)))
    ctx = SimpleNamespace(experiment_fs_path=storage.local_path(run_dir), storage_filesystem=None)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_storage=lambda: ctx))
    # world=1: the marker is written here; the other rank is the every_rank stand-in above
    w.saver = checkpoint.Checkpointer(Engine(), [Part()], run_dir=run_dir, rank=0, world=1)
    yield w
    w.gate.set()
    w.saver.close()


def _until(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.01)
    assert cond()


def _name(step):
    return manifest.checkpoint_dir_name(step)


def test_save_returns_before_the_upload_with_its_steps_state_and_the_marker_comes_last(world):
    world.gate.clear()
    world.saver.save(3, {"step": 3}, {"loss": 1.0})
    world.saver.engine.w += 1  # training goes on while the upload waits: the checkpoint keeps step 3's state
    assert world.saver.saved_step == 3 and world.saver.poll() is None  # not uploaded: nothing committed
    assert manifest.latest_complete(world.run_dir) is None
    world.gate.set()
    _until(lambda: world.saver.uploads.pending.done())
    committed = world.saver.poll()
    assert committed.step == 3
    n = _name(3)
    assert world.events == [("upload-start", n), ("uploaded", n), ("marker", n), ("report", n, "NO_UPLOAD")]
    uri, marker = manifest.latest_complete(world.run_dir)
    assert uri.endswith(n) and set(marker["files"]) == {"ds/model.pt", "part.json"}
    assert manifest.problem(uri, marker, manifest.checkpoints(world.run_dir)[1]) is None
    saved = torch.load(Path(storage.local_path(uri), "ds", "model.pt"))
    assert float(saved["w"].sum()) == 0.0 and saved["step"] == 3
    # the next save copies into the same host buffer (allocated once), and keeps its own step's state
    buffer = world.saver.uploads.buffers.pool[0].data_ptr()
    world.saver.save(4, {"step": 4}, {})
    world.saver.engine.w += 1
    world.saver.drain()
    assert world.saver.uploads.buffers.pool[0].data_ptr() == buffer
    saved = torch.load(Path(storage.local_path(world.run_dir), _name(4), "ds", "model.pt"))
    assert float(saved["w"].sum()) == 1000.0 and saved["step"] == 4


def test_prepare_allocates_the_first_saves_buffers_ahead_and_writes_nothing(world, caplog, monkeypatch):
    """The loop's first step: a dry save sizes the state (no file, no upload, no marker), the
    buffers are allocated in the upload thread, and the first checkpoint copies into them with its
    own step's state.  Asked again, it does nothing; a failed allocation costs only the head start."""
    saver = world.saver
    assert saver.prepare() > 0 and saver.prepare() == 0.0  # once
    reserved = saver.uploads.buffers.ready.result()
    assert [b.nbytes() for b in reserved] == [1000 * 4]  # the engine's one tensor (w), every page touched
    assert world.events == [] and not os.path.exists(storage.local_path(world.run_dir))
    saver.engine.w += 2
    saver.save(5, {"step": 5}, {})
    saver.engine.w += 1
    saver.drain()
    assert saver.uploads.buffers.pool[0].data_ptr() == reserved[0].data_ptr()  # no allocation on the step
    saved = torch.load(Path(storage.local_path(world.run_dir), _name(5), "ds", "model.pt"))
    assert float(saved["w"].sum()) == 2000.0 and saved["step"] == 5

    other = checkpoint.Checkpointer(Engine(), [], run_dir=world.run_dir + "-b", rank=0, world=1)
    try:
        monkeypatch.setattr(upload, "allocate", lambda nbytes, device: 1 / 0)
        other.prepare()
        with caplog.at_level("WARNING"):
            other.save(1, {"step": 1}, {})
            other.drain()
        assert "could not be allocated ahead" in caplog.text
        assert float(torch.load(Path(storage.local_path(world.run_dir + "-b"), _name(1), "ds", "model.pt"))["w"].sum()) == 0
    finally:
        other.close()
    sync = checkpoint.Checkpointer(Engine(), [], run_dir=world.run_dir + "-c", rank=0, world=1, upload="sync")
    assert sync.prepare() == 0.0  # sync saves hold no host copy


class Trained(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1000))
        self.register_buffer("queue", torch.zeros(10))  # changed by the forward, as a contrastive queue is
        self.register_buffer("ema", torch.zeros(10))  # changed after the optimizer step, as a momentum encoder's weights

    def after_step_buffers(self):
        return [self.ema]


class OptimizedEngine(Engine):
    """A module and a torch optimizer, as DeepSpeed's engine has (its ZeRO and mixed-precision
    wrappers hold the torch optimizer as ``optimizer``): its saves defer their host copies."""

    def __init__(self):
        self.module = Trained()
        self.optimizer = SimpleNamespace(optimizer=torch.optim.SGD(self.module.parameters(), lr=1.0))
        self.checkpoint_engine = Writer()

    def save_checkpoint(self, directory, tag, client_state):
        self.checkpoint_engine.makedirs(os.path.join(directory, tag), exist_ok=True)
        self.checkpoint_engine.save({"module": self.module.state_dict(), "optimizer": self.optimizer.optimizer.state_dict(),
                                     **client_state}, os.path.join(directory, tag, "model.pt"))


def test_the_next_update_waits_for_the_saves_host_copies_made_in_the_upload_thread(world, monkeypatch):
    """With the host buffers there, a save records its copies and the upload thread makes them while
    the next step's forward and backward run: the module's buffers (a forward changes them) are
    copied at once, and the optimizer's next step waits until the rest is copied.  Without that
    wait the checkpoint would hold the next step's weights; without the eager copy, the queue the
    forward changed.  A buffer the module says only a step of the loop changes (``after_step_buffers``:
    the momentum encoders' EMA runs after the optimizer step) is copied in the upload thread too."""
    held, made = threading.Event(), []
    copy_all = upload.copy_all

    def gated(pending):  # the upload thread's copies wait for the test
        assert held.wait(10)
        made.append(len(pending))
        copy_all(pending)

    monkeypatch.setattr(upload, "copy_all", gated)
    taken, take = [], upload.HostBuffers.copy

    def recorded(self, src, on_cpu=True):  # which thread takes each storage of the state
        taken.append((src.nbytes(), threading.current_thread() is threading.main_thread()))
        return take(self, src, on_cpu)

    monkeypatch.setattr(upload.HostBuffers, "copy", recorded)
    run_dir = world.run_dir + "-d"
    saver = checkpoint.Checkpointer(OptimizedEngine(), [], run_dir=run_dir, rank=0, world=1)
    module, opt = saver.engine.module, saver.engine.optimizer.optimizer
    try:
        saver.prepare()
        saver.uploads.buffers.ready.result()
        taken.clear()
        saver.save(1, {"step": 1}, {})
        assert not saver._copying.copied.is_set() and made == []  # nothing copied on the step path but the queue
        _until(lambda: len(taken) == 3)  # the module's state (w, ema) is walked in the upload thread
        assert sorted(taken) == [(40, False), (40, True), (4000, False)], taken  # the queue at once, on the step
        module.queue += 1  # the next forward
        module.w.grad = torch.ones(1000)  # ... and backward
        stepping = threading.Thread(target=lambda: (opt.step(), module.ema.add_(1)))  # the update, then the EMA
        stepping.start()
        stepping.join(0.3)
        assert stepping.is_alive() and float(module.w.detach().sum()) == 0.0  # the update waits for the copies
        held.set()
        stepping.join(10)
        assert float(module.w.detach().sum()) == -1000.0 and made == [2] and saver.copy_wait_s > 0.2  # w and ema
        saver.drain()
        saved = torch.load(Path(storage.local_path(run_dir), _name(1), "ds", "model.pt"))
        assert float(saved["module"]["w"].sum()) == 0.0 and float(saved["module"]["queue"].sum()) == 0.0
        assert float(saved["module"]["ema"].sum()) == 0.0
        opt.step()  # no save outstanding: no wait
        assert float(module.w.detach().sum()) == -2000.0
    finally:
        held.set()
        saver.close()
    assert not opt._optimizer_step_pre_hooks  # close takes its hook off the optimizer


class NoCopy:
    """An object in a state that refuses ``copy.deepcopy`` (and pickles)."""

    def __deepcopy__(self, memo):
        raise TypeError("this object cannot be copied")


@pytest.mark.parametrize("where", ["small entries", "module state"])
def test_a_state_that_cannot_be_copied_is_written_from_the_live_state_before_the_next_update(world, caplog, where):
    """The save goes on without a copy: a small entry that refuses it makes the file written on the
    step path; one in the module's state (walked in the upload thread) makes the upload thread write
    the file from the live state while the optimizer's next update still waits.  Either way the
    checkpoint holds the saved step's weights, and a warning says which."""
    engine = OptimizedEngine()

    def save_checkpoint(directory, tag, client_state):
        engine.checkpoint_engine.makedirs(os.path.join(directory, tag), exist_ok=True)
        state = {"module": engine.module.state_dict(), "optimizer": engine.optimizer.optimizer.state_dict(),
                 **client_state}
        (state if where == "small entries" else state["module"])["odd"] = NoCopy()
        engine.checkpoint_engine.save(state, os.path.join(directory, tag, "model.pt"))

    engine.save_checkpoint = save_checkpoint
    run_dir = world.run_dir + "-e"
    saver = checkpoint.Checkpointer(engine, [], run_dir=run_dir, rank=0, world=1)
    module, opt = engine.module, engine.optimizer.optimizer
    try:
        saver.prepare()
        saver.uploads.buffers.ready.result()
        with caplog.at_level("WARNING"):
            saver.save(1, {"step": 1}, {})
            module.w.grad = torch.ones(1000)
            opt.step()  # at once: it waits for the upload thread's copies (or its live write)
            saver.drain()
        assert float(module.w.detach().sum()) == -1000.0
        saved = torch.load(Path(storage.local_path(run_dir), _name(1), "ds", "model.pt"), weights_only=False)
        assert float(saved["module"]["w"].sum()) == 0.0 and saved["step"] == 1
        assert ("written on the step path" if where == "small entries" else
                "written from the live state before the next update") in caplog.text
        assert manifest.latest_complete(run_dir)[0].endswith(_name(1))
    finally:
        saver.close()


def test_a_real_deepspeed_engines_deferred_copies_keep_the_saved_steps_state(ds_checkpoints):
    """Real DeepSpeed engines (ZeRO 0, 1 in bf16, 2 and 3; one process, gloo on CPU): saved at step 2,
    trained at once on step 3 while the upload thread's copies come half a second late.  The
    checkpoint holds step 2's weights, optimizer tensors and forward-changed buffer; the update
    waited for the copies.  ZeRO-3 copies at once (``tests/train/ds_deferred_save.py``, run in the
    subprocess that writes ``ds_checkpoints``)."""
    import json

    lines = (ds_checkpoints / "deferred.jsonl").read_text().splitlines()
    runs = {r["stage"]: r for r in map(json.loads, lines)}
    assert sorted(runs) == [0, 1, 2, 3]
    for stage, r in runs.items():
        assert r["moved_after"] and r["optimizer_tensors"] > 0 and r["optimizer_is_step_2"], r
        if stage < 3:
            assert r["deferred"] and r["module_is_step_2"] and r["copy_wait_s"] > 0.3, r
        else:
            assert not r["deferred"] and r["copy_wait_s"] == 0.0, r


def test_the_marker_waits_for_every_ranks_upload(world):
    world.other_done = False  # this rank's upload ends; the other rank's does not yet
    world.saver.save(2, {"step": 2}, {})
    _until(lambda: world.saver.uploads.pending.done())
    assert world.saver.poll() is None and world.saver.poll() is None
    assert not any(e[0] == "marker" for e in world.events)
    assert manifest.latest_complete(world.run_dir) is None  # invisible to resume
    world.other_done = True
    assert world.saver.poll().step == 2
    assert [e[0] for e in world.events][-2:] == ["marker", "report"]


def test_at_most_one_upload_in_flight_the_next_save_commits_the_previous_first(world):
    world.gate.clear()
    world.saver.save(2, {"step": 2}, {})
    second = threading.Thread(target=world.saver.save, args=(4, {"step": 4}, {}))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # blocked on the previous upload
    assert world.events == [("upload-start", _name(2))]
    world.gate.set()
    second.join(10)
    assert not second.is_alive()
    assert world.events[:4] == [("upload-start", _name(2)), ("uploaded", _name(2)), ("marker", _name(2)),
                                ("report", _name(2), "NO_UPLOAD")]
    world.saver.drain()
    assert world.events[4] == ("upload-start", _name(4))
    assert manifest.latest_complete(world.run_dir)[0].endswith(_name(4))


@pytest.mark.parametrize("where", ["this rank", "another rank"])
def test_a_failed_upload_raises_on_the_main_thread_and_writes_no_marker(world, monkeypatch, where):
    if where == "this rank":
        world.fail = OSError("storage down")
    else:  # the other rank's upload failed: the second agreement (no error anywhere) fails
        answers = iter([True, False])
        monkeypatch.setattr(checkpoint, "every_rank", lambda ok, w: ok and next(answers))
    world.saver.save(2, {"step": 2}, {})
    with pytest.raises(UploadFailed, match=f"{_name(2)}.*{where}'s upload failed") as e:
        world.saver.drain()
    if where == "this rank":
        assert isinstance(e.value.__cause__, OSError)
    assert not any(ev[0] in ("marker", "report") for ev in world.events)
    assert manifest.latest_complete(world.run_dir) is None


def test_the_end_of_the_run_waits_for_the_upload_before_the_export(world, monkeypatch):
    exported = []
    monkeypatch.setattr(checkpoint, "export", lambda engine, stage, out, rank: exported.append(
        manifest.latest_complete(world.run_dir)) or False)
    world.saver.engine.zero_optimization_stage = lambda: 0
    plan = WorkerPlan(run=load_config(None, []), run_name="r", run_dir=world.run_dir, model_config=None,
                      export_uri=world.run_dir + "/export")
    counts = SimpleNamespace(check_run_end=lambda: None)
    w = loop.TrainLoop(plan, None, None, SimpleNamespace(counts=counts), world.saver, None,
                       state=loop.TrainState(step=8))
    world.gate.clear()
    threading.Timer(0.3, world.gate.set).start()
    w.finish()  # the last step's save, its upload (held 0.3 s), its marker, then the export
    assert exported and exported[0][0].endswith(_name(8))
    assert world.saver.uploads.pending is None


def test_an_upload_cut_short_stays_invisible_and_a_stale_marker_goes_before_a_redo(world):
    world.saver.save(2, {"step": 2}, {})
    world.saver.drain()
    # the worker ends while step 4 uploads: its files land, nothing commits them; resume takes step 2
    world.gate.clear()
    world.saver.save(4, {"step": 4}, {})
    _until(lambda: ("upload-start", _name(4)) in world.events)
    world.saver.close()
    world.gate.set()
    _until(lambda: Path(storage.local_path(world.run_dir), _name(4), "part.json").exists())
    assert manifest.latest_complete(world.run_dir)[0].endswith(_name(2))
    # an earlier attempt committed step 2 again but was never registered: its marker must not
    # outlive the start of the redo's upload
    redo = checkpoint.Checkpointer(Engine(), [Part()], run_dir=world.run_dir, rank=0, world=1)
    world.gate.clear()
    redo.save(2, {"step": 2}, {})
    assert manifest.read_marker(storage.join(world.run_dir, _name(2))) is None
    world.gate.set()
    redo.drain()
    assert manifest.latest_complete(world.run_dir)[0].endswith(_name(2))
    redo.close()


def test_sync_mode_keeps_the_step_waiting_for_the_upload(tmp_path, monkeypatch):
    import ray.train

    events = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, **kw: events.append(
        ("report", kw.get("checkpoint_upload_mode"))))
    monkeypatch.setattr(checkpoint, "commit", lambda *a, **k: events.append(("marker",)))
    saver = checkpoint.Checkpointer(Engine(), [Part()], run_dir=str(tmp_path / "run"), upload="sync")
    saver.save(1, {"step": 1}, {})
    assert events == [("report", None), ("marker",)] and saver.uploads is None and saver.poll() is None


def test_the_snapshot_keeps_storage_sharing_and_takes_tensors_that_are_not_graph_leaves(tmp_path):
    from orchestrator.train.upload import snapshot

    flat = torch.arange(6.0, requires_grad=True) * 1.0  # not a leaf: deepcopy refuses it
    state = {"flat": flat, "views": [flat[:3], flat[3:]], "n": 3, "shape": torch.Size([6])}
    copied = snapshot(state)
    flat.data += 10  # the live state moves on
    assert copied["flat"].tolist() == list(range(6)) and not copied["flat"].requires_grad
    assert copied["views"][1].untyped_storage().data_ptr() == copied["flat"].untyped_storage().data_ptr()
    torch.save(copied, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt")
    assert loaded["views"][1].tolist() == [3.0, 4.0, 5.0] and loaded["shape"] == torch.Size([6])
