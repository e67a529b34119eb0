"""Annotation files parsed and streamed by Ray tasks (orchestrator/data/annotations.py): malformed
rows counted, ids stable whatever the order, several files per source, the training shuffle,
weights, data.limit and a resumed epoch's skip list."""
from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import pytest

from orchestrator.data import annotations, progress
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.ids import HASHED, clip_id
from orchestrator.data.pipeline import build_dataset, iter_worker_batches
from orchestrator.data.sources import AnnotationError, read_rows

pytestmark = pytest.mark.slow

COLS = ("clip_index", "sample_key")
HEADER = "videoid,contentUrl,duration,page_dir,name\n"


def webvid(path, ids, bad_lines=(), page="000"):
    """A WebVid CSV with one row per id (``ids`` may repeat: captions of one clip); the rows at
    ``bad_lines`` (0-based) lack their fields."""
    lines = [HEADER]
    for n, vid in enumerate(ids):
        lines.append(f"{vid},\n" if n in bad_lines else f"{vid},https://x/{vid}.mp4,PT00H00M09S,{page},caption {n}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def rows_of(ds):
    return [(int(c), int(k)) for b in iter_worker_batches(ds, 7, "cpu", 1) for c, k in zip(b["clip_index"],
                                                                                         b["sample_key"])]


def source(*files, **kw):
    return SourceConfig(format="webvid_csv", train=list(files), val=list(files), media="videos", **kw)


def test_malformed_rows_are_counted_in_the_streamed_read(ray_local, tmp_path):
    webvid(tmp_path / "a.csv", [f"v{i}" for i in range(40)], bad_lines=(5,))
    cfg = DataConfig(root=str(tmp_path), sources=[source("a.csv")])
    plan = annotations._plan(cfg.sources[0], cfg, "train", [str(tmp_path / "a.csv")])
    (summary,) = annotations.summarize([(str(tmp_path / "a.csv"), plan, False)])
    assert (summary["rows"], summary["malformed"], summary["error"]) == (39, 1, None)
    assert summary["first_malformed"][0].startswith(f"{tmp_path / 'a.csv'}:7:")  # file:line (header = line 1)
    counts = {}
    got = rows_of(build_dataset(cfg, "train", True, COLS, seed=0, row_counts=counts))
    assert len(got) == 39 and counts == {("webvid_csv", "train"): 39}
    # past data.max_bad_fraction (1 of 40 > 2%): the same AnnotationError as the driver-side reader,
    # raised by build_dataset in the driver before any batch
    strict = cfg.model_copy(update={"max_bad_fraction": 0.02})
    with pytest.raises(AnnotationError, match=r"1 of 40 rows are malformed"):
        build_dataset(strict, "train", True, COLS, seed=0)
    with pytest.raises(AnnotationError, match=r"1 of 40 rows are malformed"):
        read_rows(strict.sources[0], str(tmp_path), "train", 0.02)


def test_ids_are_hashed_from_the_row_and_stable_across_order_and_seed(ray_local, tmp_path):
    # 12 rows, clips v0..v3 each shown by 3 captions
    webvid(tmp_path / "a.csv", [f"v{i % 4}" for i in range(12)])
    cfg = DataConfig(root=str(tmp_path), sources=[source("a.csv")])
    runs = [rows_of(build_dataset(cfg, "train", True, COLS, seed=s)) for s in (0, 1)]
    runs.append(rows_of(build_dataset(cfg, "val", False, COLS)))
    assert all(sorted(r) == sorted(runs[0]) for r in runs)        # the same (clip, key) pairs in every order
    assert runs[0] != runs[1]                                      # ... which the seed changes
    clips = Counter(c for c, _ in runs[0])
    assert sorted(clips.values()) == [3, 3, 3, 3] and all(c >= HASHED for c in clips)
    # the documented scheme: clip_index = clip_id(source namespace, row) of the driver-side reader's rows
    ns = annotations.source_namespace("webvid_csv", [str(tmp_path / "a.csv")])
    assert set(clips) == {clip_id(ns, r) for r in read_rows(cfg.sources[0], str(tmp_path), "train")}
    assert len({k for _, k in runs[0]}) == 12


def test_several_files_per_source_and_the_limit(ray_local, tmp_path):
    webvid(tmp_path / "a.csv", [f"v{i}" for i in range(10)])
    webvid(tmp_path / "b.csv", [f"v{i}" for i in range(5, 20)])     # v5..v9 appear in both files
    cfg = DataConfig(root=str(tmp_path), sources=[source("a.csv", "b.csv")])
    counts = {}
    got = rows_of(build_dataset(cfg, "train", True, COLS, seed=0, row_counts=counts))
    assert len(got) == 25 and counts == {("webvid_csv", "train"): 25}
    assert len({c for c, _ in got}) == 20                           # the same clip in two files: one id
    assert len({k for _, k in got}) == 25                           # every row its own key
    limited = cfg.model_copy(update={"limit": 13})
    counts = {}
    got = rows_of(build_dataset(limited, "val", False, COLS, row_counts=counts))
    assert len(got) == 13 and counts == {("webvid_csv", "val"): 13}
    first = read_rows(cfg.sources[0], str(tmp_path), "val")[:13]   # the first 13 rows, in file order
    ns = annotations.source_namespace("webvid_csv", [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert sorted(c for c, _ in got) == sorted(clip_id(ns, r) for r in first)


def test_training_shuffles_rows_and_weights_copy_them(ray_local, tmp_path, monkeypatch):
    webvid(tmp_path / "a.csv", [f"v{i}" for i in range(60)])
    cfg = DataConfig(root=str(tmp_path), sources=[source("a.csv")])
    in_order = rows_of(build_dataset(cfg, "val", False, COLS))
    shuffled = rows_of(build_dataset(cfg, "train", True, COLS, seed=4))
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert rows_of(build_dataset(cfg, "train", True, COLS, seed=4)) == shuffled  # the seed decides the order
    # a shuffle window smaller than the file: rows still move, but only within their window
    monkeypatch.setattr(annotations, "SHUFFLE_WINDOW", 20)
    rows = list(annotations.file_blocks(str(tmp_path / "a.csv"), 60, annotations.FilePlan(
        "webvid_csv", str(tmp_path / "videos"), "train", "ns", None, 0.05, training=True, block_rows=8)))
    names = [t for b in rows for t in b.column("text").to_pylist()]
    windows = [sorted(int(n.split()[1]) for n in names[i:i + 20]) for i in (0, 20, 40)]
    assert windows == [list(range(0, 20)), list(range(20, 40)), list(range(40, 60))]
    assert names != [f"caption {i}" for i in range(60)]
    # weight 2: every row twice, each copy its own sample key; weight 0.5: about half the rows, seeded
    twice = rows_of(build_dataset(cfg.model_copy(update={"sources": [source("a.csv", weight=2.0)]}),
                                  "train", True, COLS, seed=0))
    assert len(twice) == 120 and len({k for _, k in twice}) == 120 and set(Counter(c for c, _ in twice).values()) == {2}
    half = [rows_of(build_dataset(cfg.model_copy(update={"sources": [source("a.csv", weight=0.5)]}),
                                  "train", True, COLS, seed=s)) for s in (0, 0, 1)]
    assert half[0] == half[1] and sorted(half[0]) != sorted(half[2]) and 15 <= len(half[0]) <= 45


def test_a_resumed_epoch_leaves_out_the_consumed_keys(ray_local, tmp_path):
    webvid(tmp_path / "a.csv", [f"v{i}" for i in range(30)])
    webvid(tmp_path / "b.csv", [f"w{i}" for i in range(20)])
    cfg = DataConfig(root=str(tmp_path), sources=[source("a.csv", "b.csv")])
    name = f"t-{uuid.uuid4().hex[:8]}"
    full = rows_of(build_dataset(cfg, "train", True, COLS, seed=2, run_name=name, progress_stream="train"))
    consumed = [k for _, k in full[:17]]
    progress.publish(name, "train", 1, consumed)
    # another process order (seed) and the keys still name the same rows
    rest = rows_of(build_dataset(cfg, "train", True, COLS, seed=9, run_name=name, progress_stream="train"))
    assert len(rest) == 33 and {k for _, k in rest} == {k for _, k in full} - set(consumed)


def test_released_run_state_goes_and_a_rerun_never_sees_the_old_keys(ray_local):
    """A finished run's registries (progress, bad-clip counts) are ended by its driver; a process
    that cached the released registry's keys takes a rerun's new keys, not the old ones."""
    import ray

    from orchestrator.data import quality

    name = f"t-{uuid.uuid4().hex[:8]}"
    progress.publish(name, "train", 1, [1, 2, 3])
    batch = {"sample_key": np.arange(6, dtype=np.int64)}
    assert progress.skip_consumed(batch, name, "train")["sample_key"].tolist() == [0, 4, 5]
    quality.BadClipTracker(name).record(4, [("empty", "s3://b/e.mp4")])
    stale = dict(progress._CACHE)  # what a Ray Data worker of the first run still holds

    def named():
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}

    assert {progress.actor_name(name), quality.actor_name(name)} <= named()
    progress.release(name)
    quality.release(name)
    assert not {progress.actor_name(name), quality.actor_name(name)} & named()

    progress._CACHE.update(stale)
    progress.publish(name, "train", 1, [4])  # the rerun's own first publication
    assert progress.skip_consumed(batch, name, "train")["sample_key"].tolist() == [0, 1, 2, 3, 5]
    assert quality.get_bad_clip_stats(name)["total_seen"] == 0  # a new tracker
    progress.release(name)
    quality.release(name)
