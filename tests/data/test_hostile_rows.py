"""One bad row never stops a run (issue 31, class 1): whatever bytes a row or its media name holds,
it is one counted malformed row or bad clip; media stay inside the source's media folder (or the
prefixes the config allows); every read is size-bound, timed and refuses what is not a regular
file; memory per annotation row is flat; a shard is read once; ``shard`` applies the caps of a
training read."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import storage
from orchestrator.data import quality
from orchestrator.data.annotations import FilePlan, allowed_media, summarize_file
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.decode import DecodeSpec
from orchestrator.data.process import EMPTY_ROW, ProcessParams, process_batch
from orchestrator.data.quality import REASONS
from orchestrator.data.sources import AnnotationError, Context, read_rows
from orchestrator.data.sources.base import MalformedRow, media_uri
from orchestrator.devtools.synth import tar_bytes

HOSTILE_NAMES = ["a\x00b.mp4", "s3:///x.mp4", "s3://", "../../etc/passwd", "/etc/passwd", "videos/../../x.mp4",
                 "s3://another-bucket/x.mp4", "http://example.com/x.mp4", "a\nb.mp4", "\x7f.mp4", ""]


def _msrvtt(tmp_path, names, **kw):
    lines = [json.dumps({"video": n, "caption": f"c{i}"}) for i, n in enumerate(names)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = SourceConfig(format="msrvtt", train=["a.jsonl"], val=["a.jsonl"], media="videos")
    return read_rows(src, str(tmp_path), "train", 1.0, **kw)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_media_name_is_one_malformed_row_naming_its_line(tmp_path, name, caplog):
    with caplog.at_level(logging.WARNING):
        rows = _msrvtt(tmp_path, ["ok.mp4", name, "sub/ok2.mp4"])
    assert [r["text"] for r in rows] == ["c0", "c2"]
    assert f"{tmp_path / 'a.jsonl'}:2:" in caplog.text  # the row, by file and line
    root = str(tmp_path / "videos")
    assert all(storage.is_within(r["media_uri"], root) for r in rows)


def test_every_adapter_confines_its_media(tmp_path):
    """The CSV, JSON and JSONL adapters all name their media through the same check."""
    cases = {
        "youku_pretrain": ("a.csv", "video_id:FILE,title\nok.mp4,t\n../x.mp4,t\n/etc/passwd,t\n"),
        "webvid_csv": ("w.csv", "videoid,contentUrl,duration,page_dir,name\n1,u,PT00H00M09S,p,n\n2,u,PT00H00M09S,../..,n\n"),
        "internvid": ("i.jsonl", "\n".join(json.dumps({"YoutubeID": y, "Start_timestamp": "0:00:01", "End_timestamp":
                                                       "0:00:02", "Caption": "c"}) for y in ("ok", "../../../x"))),
        "msrvtt_qa": ("q.jsonl", "\n".join(json.dumps({"video": v, "question": "q", "answer": "a"})
                                            for v in ("ok.mp4", "/abs.mp4"))),
        "coco_captions": ("c.json", json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name":
                                                                                            "../../b.jpg"}],
                                                "annotations": [{"image_id": 1, "caption": "x"},
                                                                {"image_id": 2, "caption": "y"}]})),
    }
    for fmt, (name, text) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        src = SourceConfig(format=fmt, train=[name], val=[name], media="videos")
        rows = read_rows(src, str(tmp_path), "train", 1.0)
        assert len(rows) == 1 and storage.is_within(rows[0]["media_uri"], str(tmp_path / "videos")), (fmt, rows)


def test_allowed_media_prefixes_admit_other_folders(tmp_path):
    other = tmp_path / "shared-clips"
    rows = _msrvtt(tmp_path, [str(other / "a.mp4"), "/etc/passwd"], allowed=(str(other),))
    assert [r["media_uri"] for r in rows] == [str(other / "a.mp4")]
    cfg = DataConfig(root=str(tmp_path), allowed_media_prefixes=["shared-clips", "s3://b/p"])
    assert allowed_media(cfg) == (str(other), "s3://b/p")
    ctx = Context(media="s3://data/videos", split="train", allowed=("s3://b/p",))
    assert media_uri(ctx, "s3://b/p/x.mp4") == "s3://b/p/x.mp4"
    for name in ("s3://b/p2/x.mp4", "s3://b/x.mp4", "s3://data/videos/../secret.mp4"):
        with pytest.raises(MalformedRow):
            media_uri(ctx, name)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=30), min_size=1, max_size=6))
def test_random_media_names_are_confined_rows_or_counted_malformed(tmp_path, names):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"video": n, "caption": "c"}) for n in names),
                                      encoding="utf-8")
    plan = FilePlan(fmt="msrvtt", media=str(tmp_path / "videos"), split="train", ns="x", annotation_bytes=None,
                    max_bad_fraction=1.0)
    s = summarize_file(str(tmp_path / "a.jsonl"), plan, False)
    assert s["rows"] + s["malformed"] == len(names)
    assert s["error"] is None or s["rows"] == 0  # all malformed: the file (not the run) says so
    if not s["rows"]:
        return
    src = SourceConfig(format="msrvtt", train=["a.jsonl"], val=["a.jsonl"], media="videos")
    for r in read_rows(src, str(tmp_path), "train", 1.0):
        assert storage.is_within(r["media_uri"], str(tmp_path / "videos")), r["media_uri"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_random_row_bytes_cost_their_row_not_the_file(tmp_path, payloads):
    """Any bytes in a CSV row (NUL, invalid UTF-8, stray quotes) cost rows, never the file: the count
    pass returns counts.  (A stray quote opens a quoted field that may swallow the rows after it, as
    CSV reads it; the first row, before any payload, always stays.)"""
    body = b"".join(b"ok%d.mp4,title %d\n" % (i, i) + p.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n"
                    for i, p in enumerate(payloads))
    (tmp_path / "a.csv").write_bytes(b"video_id:FILE,title\n" + body)
    plan = FilePlan(fmt="youku_pretrain", media=str(tmp_path / "videos"), split="train", ns="x",
                    annotation_bytes=None, max_bad_fraction=1.0)
    s = summarize_file(str(tmp_path / "a.csv"), plan, False)
    assert s["error"] is None, s
    assert s["rows"] >= 1 and s["rows"] + s["malformed"] <= 2 * len(payloads)


def _params(**kw) -> ProcessParams:
    base = dict(columns=("frames", "clip_index"), decode=DecodeSpec(num_frames=2, sampling="middle"), frames_out=2,
                image_size=32, training=False, scale_min=0.5, hflip=False, tokenizer="unused", max_text_len=8,
                max_answer_len=4, seed=0, run_name=None, max_bad_fraction=1.0, bad_check_min_seen=1,
                decode_timeout_s=5.0)
    return ProcessParams(**{**base, **kw})


def _batch(uris: list[str], inline: list[bytes] | None = None) -> dict[str, np.ndarray]:
    rows = [{**EMPTY_ROW, "media_uri": u, "modality": "video", "id": str(i),
             "media_bytes": (inline or [b""] * len(uris))[i]} for i, u in enumerate(uris)]
    return {k: np.array([r[k] for r in rows], dtype=object) for k in EMPTY_ROW}


def _stats_for(run_name):
    return quality.get_bad_clip_stats(run_name)


def test_hostile_uris_reaching_the_decoder_are_counted_bad_and_the_batch_goes_on(tmp_path):
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    run = f"hostile-{os.getpid()}-{time.time_ns()}"
    uris = ["/tmp/a\x00b.mp4", "s3:///x.mp4", "s3://", str(fifo), str(tmp_path), str(tmp_path / "absent.mp4")]
    t0 = time.monotonic()
    out = process_batch(_batch(uris), _params(run_name=run))
    assert time.monotonic() - t0 < 4.0, "a FIFO blocked the read"
    assert out["frames"].shape[0] == 0
    stats = _stats_for(run)
    assert stats["total_seen"] == len(uris) and stats["bad"] == len(uris)
    assert stats["by_reason"] == {"bad_uri": 5, "missing": 1}
    quality.release(run)


def test_a_read_that_stalls_is_a_bad_clip_after_the_read_timeout(tmp_path, monkeypatch):
    from orchestrator.data import process

    release = threading.Event()
    monkeypatch.setattr(process, "read_media", lambda uri, max_bytes=None: release.wait(30) and b"")
    run = f"stall-{os.getpid()}-{time.time_ns()}"
    t0 = time.monotonic()
    process_batch(_batch([str(tmp_path / "slow.mp4")]), _params(run_name=run, read_timeout_s=0.3))
    release.set()
    assert time.monotonic() - t0 < 5
    assert _stats_for(run)["by_reason"] == {"read_error": 1}
    quality.release(run)


def test_an_unexpected_error_costs_one_clip(tmp_path, monkeypatch):
    from orchestrator.data import process

    monkeypatch.setattr(process, "decode_media", lambda *a, **k: (_ for _ in ()).throw(KeyError("surprise")))
    run = f"err-{os.getpid()}-{time.time_ns()}"
    process_batch(_batch(["x.mp4", "y.mp4"], [b"\x00" * 10, b"\x00" * 10]), _params(run_name=run))
    assert _stats_for(run)["by_reason"] == {"error": 2} and "error" in REASONS
    quality.release(run)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_decode_task_being_stopped_counts_nothing_and_stops(tmp_path, monkeypatch, stop):
    """Ray interrupts a decode task it no longer needs and its worker's SIGTERM handler raises
    SystemExit; landing in ``Event.wait`` they surfaced as "RuntimeError: release unlocked lock",
    and a good clip was counted bad while the worker went on.  The stop is raised, nothing counted."""
    from orchestrator.data import process

    def stopped(*a, **k):
        try:
            raise stop()
        except BaseException:
            raise RuntimeError("release unlocked lock") from None  # the stop stays its __context__

    monkeypatch.setattr(process, "decode_media", stopped)
    run = f"stop-{os.getpid()}-{time.time_ns()}"
    with pytest.raises(stop):
        process_batch(_batch(["a.mp4", "b.mp4"], [b"\x00" * 10, b"\x00" * 10]), _params(run_name=run))
    assert _stats_for(run)["total_seen"] == 0
    quality.release(run)


def test_local_reads_refuse_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "ann.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(storage.NotARegularFile):
        storage.read_bytes(str(fifo), max_bytes=10)
    src = SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"])
    with pytest.raises(AnnotationError, match="not a regular file"):
        read_rows(src, str(tmp_path), "train")
    (tmp_path / "real").write_bytes(b"abc")
    os.symlink(tmp_path / "real", tmp_path / "link")  # a symlink to a regular file is read
    assert storage.read_bytes(str(tmp_path / "link")) == b"abc"


def _peak_bytes_per_row(path: str, fmt: str, n: int) -> float:
    plan = FilePlan(fmt=fmt, media="/videos", split="train", ns="x", annotation_bytes=None, max_bad_fraction=1.0)
    text = os.path.getsize(path)
    logging.disable(logging.WARNING)
    tracemalloc.start()
    try:
        s = summarize_file(path, plan, False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    assert s["rows"] + s["malformed"] == n
    return (peak - 2 * text) / n  # the file's bytes and its text are bounded by data.max_annotation_bytes


def test_memory_per_annotation_row_is_flat(tmp_path):
    """Tiny malformed rows cost 177 bytes each before (every message was kept; 300k rows measured), a
    JSON list 261 bytes per row (parsed into one list, 200k rows); now both stay under a few bytes
    per row, whatever the count (60k here, to keep the test short under tracemalloc)."""
    n = 60_000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "v.mp4", "caption": "ok"}\n' + "{}\n" * (n - 1))
    array = tmp_path / "a.json"
    array.write_text("[" + ",".join('{"video": "v%d.mp4", "caption": "a cat"}' % i for i in range(n // 3)) + "]")
    per_row = {"malformed": _peak_bytes_per_row(str(bad), "msrvtt", n),
               "json_list": _peak_bytes_per_row(str(array), "msrvtt", n // 3)}
    assert all(v < 8 for v in per_row.values()), per_row


def test_an_empty_shard_member_is_counted_and_the_shard_read_once(tmp_path, monkeypatch):
    from orchestrator.data.pipeline import _expand_shard

    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("000.mp4", b""), ("000.json", b'{"text": "a"}'), ("001.mp4", b""),
                                ("001.json", b'{"text": "b"}'), ("002.mp4", b"\x00" * 64),
                                ("002.json", b'{"text": "c"}')]))
    opened = []
    real = storage.open_input
    monkeypatch.setattr(storage, "open_input", lambda uri: opened.append(uri) or real(uri))
    rows = _expand_shard({"shard": str(shard)}, "wds")
    run = f"empty-{os.getpid()}-{time.time_ns()}"
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in EMPTY_ROW}
    process_batch(batch, _params(run_name=run))
    assert opened == [str(shard)], "an empty member sent the reader back to its shard"
    stats = _stats_for(run)
    assert stats["total_seen"] == 3 and stats["by_reason"].get("empty") == 2
    quality.release(run)


def test_the_shard_verb_applies_the_training_caps(tmp_path, clip_bytes):
    from orchestrator.cli import main

    root = tmp_path / "d"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "ok.mp4").write_bytes(clip_bytes)
    (root / "videos" / "big.mp4").write_bytes(clip_bytes + b"\x00" * 4096)
    os.mkfifo(root / "videos" / "fifo.mp4")
    (tmp_path / "secret.mp4").write_bytes(b"not yours")
    (root / "a.jsonl").write_text("\n".join(json.dumps({"video": v, "caption": "c"}) for v in
                                            ("ok.mp4", "big.mp4", "fifo.mp4", "../../secret.mp4")))
    out = tmp_path / "shards"
    cap = len(clip_bytes) + 100
    t0 = time.monotonic()
    assert main(["shard", "--source", "msrvtt", "--root", str(root), "--annotations", "a.jsonl",
                 "--out", str(out), "--max-object-bytes", str(cap), "--max-bad-fraction", "0.5"]) == 0
    assert time.monotonic() - t0 < 30
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 1 and index["skipped"] == {"too_large": 1, "bad_uri": 1}
    assert b"not yours" not in (out / "shard-000000.tar").read_bytes()



def test_an_annotation_read_that_stalls_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from orchestrator.data.sources.base import read_text

    (tmp_path / "a.jsonl").write_text("{}\n")
    release = threading.Event()
    real = storage.open_regular
    monkeypatch.setattr(storage, "open_regular", lambda path: release.wait(30) and real(path))
    t0 = time.monotonic()
    with pytest.raises(AnnotationError, match=r"a\.jsonl took longer than 0\.3 s \(data\.read_timeout_s\)"):
        read_text(str(tmp_path / "a.jsonl"), None, 0.3)
    release.set()
    assert time.monotonic() - t0 < 5
    assert DataConfig(read_timeout_s=7).caps().read_timeout_s == 7
