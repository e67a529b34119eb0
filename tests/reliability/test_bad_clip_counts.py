"""Bad-clip counts survive (issue 17, item 5): carried in every checkpoint and restored by a new
driver's tracker; a tracker reset is warned about and the last checkpoint's counts come back; the
tracker lives on the head node; the threshold is checked at the end of every run."""
from __future__ import annotations

import json
import logging

import pytest

from orchestrator.data import quality
from orchestrator.data.placement import HEAD_RESOURCE


@pytest.fixture(autouse=True)
def _fresh():
    quality.reset_local()
    yield
    quality.reset_local()


def test_a_new_drivers_tracker_restores_the_checkpoint_counts_once(tmp_path):
    first = quality.BadClipStats()
    first.add(100, [("truncated", "s3://b/a.mp4"), ("missing", "s3://b/b.mp4")])
    saved = first.to_dict()
    second = quality.BadClipStats()  # the resubmitted driver's: empty
    second.add(10, [("missing", "s3://b/c.mp4")])  # decode tasks that ran before the restore
    out = second.restore(saved)
    assert out["total_seen"] == 110 and out["by_reason"] == {"truncated": 1, "missing": 2}
    assert second.restore(saved)["total_seen"] == 110  # a later worker restart from the same checkpoint: not twice
    assert second.restore(second.to_dict())["total_seen"] == 110  # its own counts: nothing to add
    third = quality.BadClipStats()  # a third driver, resuming from a checkpoint the second wrote
    assert third.restore(second.to_dict())["total_seen"] == 110
    assert third.restore(saved)["total_seen"] == 110  # the first's counts are inside already


def test_counts_ride_in_the_checkpoint_folder_and_come_back(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(quality, "_ray_up", lambda: False)  # the driver's own counts (a session's Ray may be up)
    tracker = quality.BadClipTracker("run-a")
    tracker.record(40, [("undecodable", "s3://b/x.mp4")])
    quality.save_counts(tmp_path, "run-a")
    assert json.loads((tmp_path / quality.COUNTS_FILE).read_text())["bad"] == 1
    quality.reset_local()  # the driver died: its counts with it
    assert quality.get_bad_clip_stats("run-a")["total_seen"] == 0
    with caplog.at_level(logging.WARNING):
        out = quality.restore_counts(tmp_path, "run-a")
    assert out["total_seen"] == 40 and out["by_reason"] == {"undecodable": 1}
    assert "restored from the checkpoint" in caplog.text


def test_the_threshold_is_checked_at_the_end_of_a_run_shorter_than_an_epoch():
    quality.BadClipTracker("short").record(60, [("missing", f"s3://b/{i}.mp4") for i in range(6)])
    with pytest.raises(quality.TooManyBadClips, match="6 bad of 60"):
        quality.check_run_end("short", max_fraction=0.05, min_seen=50)
    quality.check_run_end("short", max_fraction=0.2, min_seen=50)


def test_the_loop_checks_the_threshold_when_the_run_ends_mid_epoch():
    """The loop's end-of-run check (before the final checkpoint), for a run that stopped at
    train.max_steps inside its first epoch: the end-of-pass check never ran."""
    from orchestrator.train.streams import BadClipCounts

    def worker(name: str, rank: int) -> BadClipCounts:  # data.max_bad_fraction = 0.1
        return BadClipCounts(name, rank, world=1, max_fraction=0.1)

    quality.BadClipTracker("mid-epoch").record(12, [("empty", "s3://b/e.mp4"), ("missing", "s3://b/m.mp4")])
    with pytest.raises(quality.TooManyBadClips, match="2 bad of 12"):
        worker("mid-epoch", 0).check_run_end()
    worker("mid-epoch", 1).check_run_end()  # only rank 0 decides (and tells the others)
    quality.BadClipTracker("fine").record(40, [("empty", "s3://b/e.mp4")])
    worker("fine", 0).check_run_end()


@pytest.mark.slow
def test_the_tracker_sits_on_the_head_node_and_a_reset_is_warned_and_restored(ray_local, tmp_path, caplog):
    import ray

    name = "reset-run"
    tracker = quality.BadClipTracker(name)
    tracker.record(50, [("missing", "s3://b/1.mp4"), ("empty", "s3://b/2.mp4")])
    quality.save_counts(tmp_path, name)  # checkpoint k
    handle = ray.get_actor(quality.actor_name(name), namespace=quality.NAMESPACE)
    # the node it runs on, asked of the actor itself (the state API needs the one cluster on the machine)
    actor_node = ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
    assert actor_node in head
    ray.kill(quality._HANDLES[quality.actor_name(name)], no_restart=False)  # restarts empty
    with caplog.at_level(logging.WARNING):
        for _ in range(100):  # the restart takes a moment; the first answer after it says "reset"
            stats = tracker.record(5, [])
            if stats is not None and stats["total_seen"] < 50:
                break
        assert "was reset" in caplog.text
        (tmp_path / "k1").mkdir()
        out = quality.save_counts(tmp_path / "k1", name)  # checkpoint k+1
    assert "counts (2 bad of 50" in caplog.text  # checkpoint k's counts restored at checkpoint k+1
    assert out["total_seen"] >= 55 and out["by_reason"] == {"missing": 1, "empty": 1}
