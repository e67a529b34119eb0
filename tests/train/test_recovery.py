"""Recovery that cannot be fooled (issue 31, class 4), at unit level: a checkpoint that fails its
verification (size or hash) is skipped and the previous complete one used in the same attempt; a
marker without a file list is refused; a run that lost its lease writes no checkpoint, marker or
export, and its controller and driver stop it; a data-quality stop or a lost lease is never retried,
and the stop says the counts of one pass."""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import storage
from orchestrator.config import load_config
from orchestrator.data.quality import TooManyBadClips
from orchestrator.train import checkpoint, failures, manifest
from orchestrator.train.lease import LeaseFence, LeaseLost, RunLease
from orchestrator.trainer import loop
from orchestrator.trainer.plan import WorkerPlan


def _write_checkpoint(tmp_path: Path, run_dir: str, step: int, marker: dict | None = None) -> str:
    """A checkpoint as the loop writes it (files, then the marker listing them)."""
    uri = storage.join(run_dir, manifest.checkpoint_dir_name(step))
    local = Path(tempfile.mkdtemp(prefix=f"ck{step}-", dir=tmp_path))
    (local / "ds").mkdir()
    (local / "ds" / "mp_rank_00_model_states.pt").write_bytes(bytes([step]) * 256)
    (local / "progress.json").write_text("{}")
    storage.upload_dir(local, uri)
    files = manifest.describe_files(local)
    manifest.write_marker(uri, files, {"step": step, "epoch": 0}, {"loss": 1.0}, None)
    if marker is not None:
        storage.write_text(storage.join(uri, manifest.META), json.dumps(marker))
    return uri


class Engine:
    def __init__(self):
        self.loaded: list[str] = []

    def load_checkpoint(self, directory, tag, **kw):
        self.loaded.append(directory)
        return None, json.loads(Path(directory, manifest.META).read_text())


class Progress:  # a checkpoint part
    def gather(self):
        return None

    def save(self, directory, gathered):
        pass

    def load(self, directory):
        pass


def _checkpointer(run_dir: str) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(Engine(), [Progress()], run_dir=run_dir, rank=1, world=1)


def _resume(c: checkpoint.Checkpointer, latest) -> SimpleNamespace:
    """What the loop does with a resume: its state restored from the checkpoint's client state."""
    saved = c.resume(latest)
    state = loop.TrainState()
    if saved is not None:
        state.restore(saved)
    return SimpleNamespace(point=c.resumed_from, state=state, resumed=saved is not None, engine=c.engine)


def _ray_checkpoint(uri: str):
    import ray.train

    return ray.train.Checkpoint(uri)


def test_a_checkpoint_damaged_at_the_same_size_falls_back_in_the_same_attempt(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    _write_checkpoint(tmp_path, run_dir, 4)
    newest = _write_checkpoint(tmp_path, run_dir, 8)
    shard = Path(newest, "ds", "mp_rank_00_model_states.pt")
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size: the listing cannot tell
    assert manifest.latest_complete(run_dir)[0] == newest  # complete by size ...
    latest = _ray_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        w = _resume(_checkpointer(run_dir), latest)  # ... but its bytes fail the hash: skipped, 4 used, no raise
    point = w.point
    assert point.path.endswith("checkpoint_step_00000004") and w.state.step == 4 and w.resumed
    assert [Path(d).name for d in w.engine.loaded] == ["checkpoint_step_00000004"]
    assert "skipping checkpoint" in caplog.text and "checkpoint_step_00000008" in caplog.text
    assert "SHA-256" in caplog.text
    assert checkpoint.redo_count(latest, point) == 1  # the redone steps get names Ray never registered


def test_when_no_checkpoint_verifies_the_run_starts_over_in_the_same_attempt(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    only = _write_checkpoint(tmp_path, run_dir, 4)
    Path(only, "progress.json").write_text("{}" + " " * 0)  # same bytes: still fine
    Path(only, "ds", "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 256)
    with caplog.at_level(logging.ERROR):
        w = _resume(_checkpointer(run_dir), _ray_checkpoint(only))
        assert w.point is None
    assert w.engine.loaded == [] and not w.resumed and "no checkpoint" in caplog.text


def test_loading_an_unverified_download_refuses(tmp_path):
    run_dir = str(tmp_path / "run")
    uri = _write_checkpoint(tmp_path, run_dir, 4)
    Path(uri, "ds", "mp_rank_00_model_states.pt").write_bytes(b"\x01" * 256)
    with pytest.raises(manifest.IncompleteCheckpoint, match="SHA-256"):
        checkpoint.load(Engine(), uri)


@pytest.mark.parametrize("marker", [{"complete": True, "step": 8}, {"complete": True, "step": 8, "files": {}},
                                    {"complete": True, "step": 8, "files": None}])
def test_a_marker_without_a_file_list_is_refused(tmp_path, marker, caplog):
    run_dir = str(tmp_path / "run")
    _write_checkpoint(tmp_path, run_dir, 4)
    newest = _write_checkpoint(tmp_path, run_dir, 8, marker=marker)
    with caplog.at_level(logging.WARNING):
        uri, found = manifest.latest_complete(run_dir)
    assert uri.endswith("checkpoint_step_00000004") and "lists no files" in caplog.text
    assert "lists no files" in checkpoint.verify(newest)
    assert checkpoint.resume_point(_ray_checkpoint(newest), run_dir).path.endswith("checkpoint_step_00000004")


# --- a run that lost its lease writes nothing more ----------------------------------------------

def _taken_over(run_dir: str) -> tuple[RunLease, LeaseFence]:
    """This run held generation 1; another run took generation 2 (as after a takeover)."""
    mine = RunLease(run_dir, ttl_s=60)
    mine.acquire()
    fence = mine.fence()
    mine._stop.set()
    mine._thread.join()
    storage.write_text(storage.join(run_dir, "_lease", "00000002.json"), json.dumps(
        {"owner": "otherhost:9:new", "host": "otherhost", "pid": 9, "pid_started": 1.0, "expires": 0.0}))
    return mine, fence


def test_the_fence_holds_until_a_newer_generation_exists(tmp_path):
    run_dir = str(tmp_path / "run")
    lease = RunLease(run_dir, ttl_s=60).acquire()
    fence = lease.fence()
    fence.check()
    assert fence.holds()
    lease.release()
    _, old = _taken_over(str(tmp_path / "other"))
    with pytest.raises(LeaseLost, match="taken over by otherhost:9:new"):
        old.check()


def test_a_holder_that_lost_its_lease_writes_no_checkpoint_marker_or_export(tmp_path, monkeypatch):
    import ray.train

    run_dir = str(tmp_path / "run")
    lease, fence = _taken_over(run_dir)
    writes = []
    monkeypatch.setattr(ray.train, "report", lambda *a, **k: writes.append("report"))
    monkeypatch.setattr(checkpoint, "commit", lambda *a, **k: writes.append("marker"))
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: writes.append("save"))
    monkeypatch.setattr(checkpoint, "export", lambda *a, **k: writes.append("export") or True)
    monkeypatch.setattr(manifest, "publish_export", lambda *a, **k: writes.append("publish"))
    plan = WorkerPlan(run=load_config(None, []), run_name="r", run_dir=run_dir, model_config=None,
                      export_uri=run_dir + "/export", lease_fence=fence)
    saver = checkpoint.Checkpointer(None, [], run_dir=run_dir, fence=fence, rank=0, world=1)
    saver.saved_step = 8
    counts = SimpleNamespace(check_run_end=lambda: None)  # the run's bad-clip fraction: fine
    w = loop.TrainLoop(plan, None, None, SimpleNamespace(counts=counts), saver, None, state=loop.TrainState(step=8))
    with pytest.raises(LeaseLost):
        w.save()
    with pytest.raises(LeaseLost):
        w.finish()  # the last step was saved: straight to the export, refused
    assert writes == []
    lease.record = None  # it lost the lease: nothing of it to release


def test_the_export_pointer_is_not_written_after_a_takeover_during_the_upload(tmp_path):
    run_dir = str(tmp_path / "run")
    lease, fence = _taken_over(run_dir)
    out = tmp_path / "export-local"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"w")
    with pytest.raises(LeaseLost):
        manifest.publish_export(out, run_dir + "/export", 8, fence=fence)
    assert not storage.exists(storage.join(run_dir, "export", manifest.EXPORT_POINTER))
    assert manifest.resolve_export(run_dir + "/export") is None


def test_the_controller_stops_the_run_at_the_first_report_after_a_takeover(tmp_path):
    run_dir = str(tmp_path / "run")
    lease = RunLease(run_dir, ttl_s=60).acquire()
    callback = failures.fail_fast_callback(lease.fence())
    callback.after_report(None, [{"step": 1}], None)  # still ours: nothing happens
    lease.release()
    _, fence = _taken_over(str(tmp_path / "taken"))
    with pytest.raises(LeaseLost):
        failures.fail_fast_callback(fence).after_report(None, [{"step": 2}], None)


def test_a_lost_lease_is_noticed_by_the_heartbeat_which_stops_the_driver(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    stopped = []
    a = RunLease(run_dir, ttl_s=60, renew_every_s=0.1, on_lost=lambda: stopped.append(True)).acquire()
    storage.write_text(storage.join(run_dir, "_lease", "00000002.json"), json.dumps(
        {"owner": "otherhost:9:new", "host": "otherhost", "pid": 9, "pid_started": 1.0, "expires": 0.0}))
    assert a.lost.wait(5) and stopped == [True]
    a.release()


# --- a data-quality stop and a lost lease are never retried --------------------------------------

def _ray_wrapped(error: BaseException) -> BaseException:
    """What a worker's iterator raises when a Ray Data task raised ``error``: a RayTaskError that is
    also an instance of its cause, inside Ray Train's worker-group failure."""
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("process_batch", "Traceback (most recent call last): ...", error).as_instanceof_cause()
    outer = RuntimeError("Training failed due to worker errors")
    outer.worker_failures = {0: wrapped}
    return outer


@pytest.mark.parametrize("error", [TooManyBadClips("too many bad clips: 1 bad of 12 clips (8.3%) by reason: empty=1"),
                                   LeaseLost("run folder x: this run's lease (generation 1) was taken over")])
def test_not_retryable_errors_end_the_run_at_once_with_their_own_message(error):
    with pytest.raises(type(error)) as raised:
        failures.fail_fast({1: _ray_wrapped(error)})
    assert str(raised.value) == str(error)  # one line, no Ray traceback in it
    assert failures.find_not_retryable(_ray_wrapped(error)) is not None
    plain = failures.plain(failures.find_not_retryable(_ray_wrapped(error)))
    assert type(plain) is type(error) and str(plain) == str(error)
    failures.fail_fast({0: RuntimeError("a worker died")})  # anything else is left to the restarts


def test_the_driver_raises_a_stop_once_as_itself(monkeypatch):
    from orchestrator.trainer import driver

    class Trainer:
        def fit(self):
            raise _ray_wrapped(TooManyBadClips("too many bad clips: 1 bad of 12 clips (8.3%)"))

    class Progress:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    with pytest.raises(TooManyBadClips) as e:
        driver._fit(Trainer(), Progress())
    assert str(e.value) == "too many bad clips: 1 bad of 12 clips (8.3%)" and e.value.__cause__ is None


def test_a_stop_raised_in_a_ray_data_task_is_found_in_what_the_consumer_sees(ray_local):
    """The real wrapping: a decode task that stops the job (the bad fraction passed) as Ray Data
    hands it to whoever iterates, then the count is that one pass's."""
    import ray

    from orchestrator.data.quality import BadClipStats, check

    def decode(batch):
        stats = BadClipStats()
        stats.add(12, [("empty", "s3://b/zero-byte.mp4")])
        check(stats.to_dict(), 0.05)
        return batch

    from orchestrator.data.pipeline import original_errors

    ds = original_errors(ray.data.from_items([{"x": i} for i in range(12)])).map_batches(decode, batch_size=12)
    with pytest.raises(Exception) as raised:
        ds.take_all()
    found = failures.find_not_retryable(raised.value)
    assert isinstance(found, TooManyBadClips)
    assert str(failures.plain(found)).startswith("too many bad clips: 1 bad of 12 clips")


def test_the_failure_classes_have_one_name_each():
    assert set(failures.NOT_RETRYABLE_ERRORS) == {failures.SetupError, TooManyBadClips, LeaseLost}
    assert dataclasses.is_dataclass(LeaseFence)


def test_a_fence_that_cannot_list_its_storage_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path / "run")
    lease = RunLease(run_dir, ttl_s=60).acquire()
    fence = lease.fence()

    def down(prefix):
        raise ConnectionError("storage away")

    monkeypatch.setattr(storage, "list_files", down)
    with caplog.at_level(logging.WARNING):
        fence.check()  # a transient outage is not a lost lease
    assert "could not check the lease" in caplog.text
    monkeypatch.undo()
    lease.release()
