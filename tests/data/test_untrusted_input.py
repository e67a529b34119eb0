"""Annotation files, shards and media are untrusted input (issue 16, item 3): each attack below
used to abort a whole job; now it is one counted malformed row or bad clip with its reason, sizes
are capped by config, and tar shards are read uncompressed only."""
from __future__ import annotations

import gzip
import io
import json
import warnings

import numpy as np
import pytest

from orchestrator import storage
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.decode import DecodeSpec, decode_image, decode_video, read_media
from orchestrator.data.quality import BadClip
from orchestrator.data.sources import AnnotationError, Caps, read_rows, wds
from orchestrator.data.sources.base import ParseReport
from orchestrator.devtools.synth import tar_bytes


def rows_and_report(tmp_path, fmt, name, text, max_bad_fraction=1.0, caps=Caps()):
    (tmp_path / name).write_text(text, encoding="utf-8")
    src = SourceConfig(format=fmt, train=[name], val=[name], media="videos")
    return read_rows(src, str(tmp_path), "train", max_bad_fraction, caps)


def test_csv_field_over_the_field_limit_is_one_malformed_row(tmp_path, caplog):
    text = "video_id:FILE,title\na.mp4,ok one\nb.mp4," + "x" * 200_000 + "\nc.mp4,ok two\n"
    rows = rows_and_report(tmp_path, "youku_pretrain", "a.csv", text)
    assert [r["text"] for r in rows] == ["ok one", "ok two"]
    assert "field larger than field limit" in caplog.text


def test_csv_field_over_the_limit_counts_against_the_bad_fraction(tmp_path):
    text = "video_id:FILE,title\na.mp4,ok\nb.mp4," + "x" * 200_000 + "\n"
    with pytest.raises(AnnotationError, match="1 of 2 rows are malformed"):
        rows_and_report(tmp_path, "youku_pretrain", "a.csv", text, max_bad_fraction=0.1)


def test_deeply_nested_jsonl_line_is_one_malformed_row(tmp_path):
    good = json.dumps({"video": "v.mp4", "caption": "a cat"})
    text = "\n".join([good, '{"video": "x.mp4", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}", good])
    rows = rows_and_report(tmp_path, "msrvtt", "a.jsonl", text)
    assert [r["text"] for r in rows] == ["a cat", "a cat"]


def test_deeply_nested_element_of_a_json_list_is_one_malformed_row(tmp_path):
    good = {"video": "v.mp4", "caption": ["a, [cat]", "b"]}
    deep = '{"video": "x.mp4", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}"
    text = "[" + json.dumps(good) + ",\n" + deep + ",\n" + json.dumps(good) + ", 123456789" + "9" * 5000 + "]"
    report_rows = rows_and_report(tmp_path, "msrvtt", "a.json", text)
    assert [r["text"] for r in report_rows] == ["a, [cat]", "b", "a, [cat]", "b"]


def test_deeply_nested_caption_literal_is_one_malformed_row(tmp_path):
    text = "video_id:FILE,golden_caption\na.mp4,\"['x', 'y']\"\nb.mp4," + "[" * 50_000 + "\n"
    rows = rows_and_report(tmp_path, "youku_captioning", "a.csv", text)
    assert [r["text"] for r in rows] == ["x", "y"]


def test_coco_with_wrong_types_is_counted_not_fatal(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": [1], "file_name": "b.jpg"}, ["x"]],
           "annotations": [{"image_id": 1, "id": 5, "caption": "ok"}, {"image_id": [1], "caption": "x"}, [1, 2],
                           {"image_id": 1, "caption": {"a": 1}}]}
    rows = rows_and_report(tmp_path, "coco_captions", "c.json", json.dumps(doc))
    assert [r["text"] for r in rows] == ["ok"]
    with pytest.raises(AnnotationError, match="nested|not usable"):
        rows_and_report(tmp_path, "coco_captions", "d.json", '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "1e400", "-5", "00:00:inf"])
def test_internvid_non_finite_or_negative_timestamp_is_malformed(tmp_path, bad):
    good = {"YoutubeID": "a", "Start_timestamp": "00:00:01.000", "End_timestamp": "00:00:03.000", "Caption": "c"}
    lines = [good, {**good, "YoutubeID": "b", "End_timestamp": bad}, {**good, "YoutubeID": "c", "Start_timestamp": bad}]
    rows = rows_and_report(tmp_path, "internvid", "i.jsonl", "\n".join(json.dumps(x) for x in lines))
    assert [r["id"] for r in rows] == ["a_1.000"]


def test_decoder_refuses_a_non_finite_segment():
    from tests.data.conftest import numbered_clip

    spec = DecodeSpec(num_frames=2, sampling="middle")
    for start, end in ((0.0, float("inf")), (float("nan"), 1.0), (-1.0, 2.0)):
        with pytest.raises(BadClip) as e:
            decode_video(numbered_clip(), "x.mp4", spec, np.random.default_rng(0), start, end)
        assert e.value.reason == "undecodable"


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")  # a few KB of zlib for hundreds of megapixels
    return buf.getvalue()


@pytest.mark.parametrize("side", [20_000, 12_000])  # > 2x Pillow's limit (error) and between 1x and 2x (warning)
def test_decompression_bomb_is_a_bad_clip(side):
    data = _png(side, side)
    assert len(data) < 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping would also be a failure
        with pytest.raises(BadClip) as e:
            decode_image(data, "bomb.png", DecodeSpec(num_frames=1, sampling="middle", max_resolution=100_000))
    assert e.value.reason == "too_large"


def test_oversized_image_is_refused_before_its_pixels_are_decoded():
    with pytest.raises(BadClip) as e:
        decode_image(_png(9000, 16), "wide.png", DecodeSpec(num_frames=1, sampling="middle", max_resolution=8192))
    assert e.value.reason == "bad_resolution"


def _shard(tmp_path, members, name="s.tar", compress=False) -> str:
    data = tar_bytes(members)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


def test_compressed_shards_are_not_inflated(tmp_path):
    """A .tar that is really a gzip stream (a decompression bomb's usual shape) is a broken shard."""
    shard = _shard(tmp_path, [("000.jpg", b"x" * 1_000_000), ("000.json", b'{"caption": "c"}')], compress=True)
    assert (tmp_path / "s.tar").stat().st_size < 10_000
    report = ParseReport(shard)
    assert wds.read_shard_rows("cc3m_wds", shard, report) == []
    assert len(report.malformed) == 1 and ":0:" in report.malformed[0]


@pytest.mark.parametrize("meta", [b"[1, 2, 3]", b'"just a string"', b'{"caption": ["not", "a", "string"]}',
                                  b'{"caption": "c", "start": "abc"}', b'{"caption": "c", "end": 1e999}',
                                  b'{"caption": "c", "label": "7"}', b'{"caption": "c", "clip_index": 1.5}',
                                  b'{"caption": "c", "references": [1, 2]}', b'{"caption": "c", "modality": "exe"}',
                                  b'{"text": "c", "start": 5, "end": 2}', b'{"caption": ' + b"[" * 100_000 + b"}",
                                  b'{"caption": "c", "id": {"a": 1}}'])
@pytest.mark.parametrize("fmt", ["cc3m_wds", "wds"])
def test_webdataset_json_with_wrong_types_is_a_malformed_sample(tmp_path, meta, fmt):
    shard = _shard(tmp_path, [("000.jpg", b"img"), ("000.json", meta), ("001.jpg", b"img"),
                              ("001.json", b'{"caption": "fine", "text": "fine"}')])
    report = ParseReport(shard)
    rows = wds.read_shard_rows(fmt, shard, report)
    assert [r["text"] for r in rows] == ["fine"] and len(report.malformed) == 1
    from orchestrator.data.pipeline import _expand_shard
    from orchestrator.data.process import to_dataset_row

    for r in rows:
        to_dataset_row(r)  # every kept row has the types the dataset needs
    expanded = _expand_shard({"shard": shard}, fmt)
    assert sorted(r["bad"] for r in expanded) == ["", "malformed"]  # the bad sample is counted, not lost


def test_shard_member_over_the_cap_is_never_read(tmp_path):
    shard = _shard(tmp_path, [("000.mp4", b"v" * 5000), ("000.json", b'{"caption": "big"}'),
                              ("001.mp4", b"v" * 10), ("001.json", b'{"caption": "small"}')])
    report = ParseReport(shard)
    rows = wds.read_shard_rows("webvid_wds", shard, report, max_member_bytes=1000)
    assert [r["text"] for r in rows] == ["small"] and "max_object_bytes" in report.malformed[0]
    from orchestrator.data.pipeline import _expand_shard

    expanded = _expand_shard({"shard": shard}, "webvid_wds", max_member_bytes=1000)
    assert sorted(r["bad"] for r in expanded) == ["", "too_large"]
    with pytest.raises(storage.TooLarge):
        wds.read_member(shard + "#000.mp4", max_bytes=1000)
    assert wds.read_member(shard + "#001.mp4", max_bytes=1000) == b"v" * 10


def test_media_object_over_the_cap_is_a_bad_clip(tmp_path, s3_bucket):
    for base in (str(tmp_path), s3_bucket):
        storage.write_bytes(storage.join(base, "big.mp4"), b"\0" * 5000)
        with pytest.raises(BadClip) as e:
            read_media(storage.join(base, "big.mp4"), max_bytes=1000)
        assert e.value.reason == "too_large"
        assert read_media(storage.join(base, "big.mp4"), max_bytes=5000) == b"\0" * 5000


def test_annotation_file_over_the_cap_is_a_clear_error(tmp_path, s3_bucket):
    text = "video_id:FILE,title\n" + "a.mp4,t\n" * 1000
    with pytest.raises(AnnotationError, match="max_annotation_bytes"):
        rows_and_report(tmp_path, "youku_pretrain", "a.csv", text, caps=Caps(annotation_bytes=1000))
    storage.write_text(s3_bucket + "/ann/a.csv", text)
    src = SourceConfig(format="youku_pretrain", train=["ann/a.csv"], val=["ann/a.csv"], media="videos")
    with pytest.raises(AnnotationError, match="max_annotation_bytes"):
        read_rows(src, s3_bucket, "train", 1.0, Caps(annotation_bytes=1000))
    assert len(read_rows(src, s3_bucket, "train", 1.0, Caps(annotation_bytes=len(text)))) == 1000


def test_caps_come_from_the_data_config():
    cfg = DataConfig(max_annotation_bytes=123, max_object_bytes=456)
    assert cfg.caps() == Caps(annotation_bytes=123, object_bytes=456, read_timeout_s=cfg.read_timeout_s)
    from orchestrator.data.pipeline import process_params

    assert process_params(cfg, True, ("frames",), 0, None).max_object_bytes == 456
