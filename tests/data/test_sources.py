"""Every source adapter on fixture files in its dataset's exact format."""
from __future__ import annotations

import pytest

from orchestrator.data.config import SourceConfig
from orchestrator.data.sources import SOURCES, YOUKU_CATEGORIES, AnnotationError, label_vocabulary, read_rows


def rows_of(root, fmt, files, media="videos", split="train", **kw):
    return read_rows(SourceConfig(format=fmt, train=files, val=files, media=media, **kw), str(root), split)


def test_registry_names():
    expected = {"youku_pretrain", "youku_classification", "youku_retrieval", "youku_captioning", "webvid_csv",
                "webvid_wds", "msrvtt", "msrvtt_qa", "cc3m_wds", "coco_captions", "internvid", "glue_sst2",
                "glue_rte", "glue_mrpc", "glue_qqp", "glue_mnli", "glue_qnli", "wds"}
    assert expected <= set(SOURCES)


def test_unknown_format_is_a_config_error():
    with pytest.raises(ValueError, match="unknown source format 'nope'"):
        SourceConfig(format="nope")


def test_youku_pretrain(fixture_root):
    rows = rows_of(fixture_root, "youku_pretrain", ["ann/youku_pretrain.csv"])
    assert [r["text"] for r in rows] == ["一只猫在玩", "风景"]
    assert rows[0]["media_uri"] == str(fixture_root / "videos" / "a.mp4")
    assert rows[0]["modality"] == "video" and rows[0]["start"] is None


def test_youku_classification_builtin_categories(fixture_root):
    rows = rows_of(fixture_root, "youku_classification", ["ann/youku_cls.csv"])
    assert len(YOUKU_CATEGORIES) == 45
    assert [r["label"] for r in rows] == [YOUKU_CATEGORIES.index("篮球"), YOUKU_CATEGORIES.index("美食制作")]
    assert [r["label"] for r in rows] == [12, 20]


def test_classification_labels_derived_from_train(synth_data):
    src = SourceConfig(format="youku_classification", train=["annotations/youku_classification_train.csv"],
                       val=["annotations/youku_classification_val.csv"], labels="train")
    assert label_vocabulary(src, synth_data) == ["down", "left", "right", "up"]
    val = read_rows(src, synth_data, "val")
    assert {r["label_name"]: r["label"] for r in val} == {"down": 0, "left": 1, "right": 2, "up": 3}
    auto = src.model_copy(update={"labels": "auto"})
    assert label_vocabulary(auto, synth_data) == ["down", "left", "right", "up"]
    with pytest.raises(AnnotationError, match="not in the label vocabulary"):
        read_rows(src.model_copy(update={"labels": "youku"}), synth_data, "val")


def test_youku_retrieval_and_captioning(fixture_root):
    ret = rows_of(fixture_root, "youku_retrieval", ["ann/youku_ret.csv"])
    assert ret[0]["text"] == "一个人在跑步" and ret[0]["clip_index"] == 0
    val = rows_of(fixture_root, "youku_captioning", ["ann/youku_cap_val.csv"], split="val")
    assert [r["references"] for r in val] == [["一只猫", "猫在玩"], ["风景", "山"]]
    train = rows_of(fixture_root, "youku_captioning", ["ann/youku_cap_val.csv"], split="train")
    assert [r["text"] for r in train] == ["一只猫", "猫在玩", "风景", "山"]
    assert [r["clip_index"] for r in train] == [0, 0, 1, 1]


def test_synth_annotation_files_all_parse(synth_data):
    for fmt, tr, va in [("youku_pretrain", "youku_pretrain_train.csv", "youku_pretrain_val.csv"),
                        ("youku_retrieval", "youku_retrieval_train.csv", "youku_retrieval_val.csv"),
                        ("youku_captioning", "youku_captioning_train.csv", "youku_captioning_val.csv"),
                        ("msrvtt", "msrvtt_train.jsonl", "msrvtt_val.jsonl"),
                        ("msrvtt_qa", "msrvtt_qa_train.jsonl", "msrvtt_qa_val.jsonl"),
                        ("glue_sst2", "sst2_train.tsv", "sst2_dev.tsv")]:
        src = SourceConfig(format=fmt, train=[f"annotations/{tr}"], val=[f"annotations/{va}"])
        for split in ("train", "val"):
            rows = read_rows(src, synth_data, split)
            assert rows, (fmt, split)
            assert all(r["text"] for r in rows)
    qa = read_rows(SourceConfig(format="msrvtt_qa", train=["annotations/msrvtt_qa_train.jsonl"]), synth_data, "train")
    assert all(r["answer"] in ("left", "right", "up", "down") or r["answer"] for r in qa)
    assert qa[0]["media_uri"].endswith(".mp4")


def test_webvid_csv(fixture_root):
    (row,) = rows_of(fixture_root, "webvid_csv", ["ann/webvid.csv"])
    assert row["media_uri"].endswith("videos/000001_000050/1051729318.mp4")
    assert row["text"] == "Mount saint helens - wide shot" and row["id"] == "1051729318"


@pytest.mark.parametrize("name", ["msrvtt.json", "msrvtt.jsonl"])
def test_msrvtt_json_and_jsonl(fixture_root, name):
    rows = rows_of(fixture_root, "msrvtt", [f"ann/{name}"])
    assert rows[0]["text"] == "a man runs"
    if name == "msrvtt.json":  # several captions per clip share its clip index
        assert [r["clip_index"] for r in rows] == [0, 0, 1]
        assert rows[1]["references"] == ["a man runs", "someone is running"]


def test_msrvtt_qa_numeric_video_id(fixture_root):
    (row,) = rows_of(fixture_root, "msrvtt_qa", ["ann/msrvtt_qa.json"])
    assert row["media_uri"].endswith("videos/video7010.mp4")
    assert (row["text"], row["answer"]) == ("who is running?", "man")


def test_coco_captions(fixture_root):
    rows = rows_of(fixture_root, "coco_captions", ["ann/coco.json"], media="images")
    assert [r["text"] for r in rows] == ["A man riding a bike.", "A cyclist on a road."]
    assert rows[0]["modality"] == "image" and rows[0]["media_uri"].endswith("images/000000391895.jpg")
    assert rows[0]["clip_index"] == rows[1]["clip_index"]


def test_internvid_segment(fixture_root):
    (row,) = rows_of(fixture_root, "internvid", ["ann/internvid.jsonl"])
    assert row["media_uri"].endswith("videos/HdYoyzCSWyw.mp4")
    assert (row["start"], row["end"]) == (1.0, 2.0)
    assert row["text"] == "woman using a computer mouse"


@pytest.mark.parametrize("task,text,text_b,label", [
    ("sst2", "it 's a charming journey", None, 1),
    ("rte", "A man runs.", "A person moves.", 0),
    ("mrpc", 'He said "yes".', "He agreed.", 1),
    ("qqp", "How old?", "What age?", 1),
    ("mnli", "Conceptually cream skimming.", "Product and geography.", 1),
    ("qnli", "What came into force?", "The law came.", 0),
])
def test_glue(fixture_root, task, text, text_b, label):
    rows = rows_of(fixture_root, f"glue_{task}", [f"ann/{task}.tsv"])
    assert (rows[0]["text"], rows[0]["text_b"], rows[0]["label"]) == (text, text_b, label)
    assert rows[0]["media_uri"] is None and rows[0]["modality"] == "text"


def test_webdataset_sources(fixture_root):
    (img,) = rows_of(fixture_root, "cc3m_wds", ["cc3m"])
    assert img["text"] == "hard rock artist performs" and img["modality"] == "image"
    assert img["media_uri"].endswith("00000.tar#00000/000000001.jpg")
    (vid,) = rows_of(fixture_root, "webvid_wds", ["webvid/00000.tar"])
    assert vid["text"] == "Mount saint helens" and vid["modality"] == "video" and vid["id"] == "00000034"


def test_malformed_row_reported_with_file_and_line(fixture_root, caplog):
    bad = fixture_root / "ann" / "bad.jsonl"
    good = [f'{{"video": "a.mp4", "caption": "c{i}"}}' for i in range(30)]
    bad.write_text("\n".join(good[:5] + ['{"video": "a.mp4"'] + good[5:]) + "\n")
    rows = rows_of(fixture_root, "msrvtt", ["ann/bad.jsonl"])
    assert len(rows) == 30
    assert f"{bad}:6: not valid JSON" in caplog.text
    # past max_bad_fraction the file is rejected, naming file and line
    bad.write_text('{"video": "a.mp4", "caption": "ok"}\n{"video": "b.mp4"}\n')
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:2: missing field|bad\.jsonl:2: empty or missing"):
        rows_of(fixture_root, "msrvtt", ["ann/bad.jsonl"])


def test_missing_column_and_missing_file(fixture_root):
    (fixture_root / "ann" / "nocol.csv").write_text("video,title\na.mp4,x\n")
    with pytest.raises(AnnotationError, match=r"nocol\.csv:1: .*video_id:FILE"):
        rows_of(fixture_root, "youku_pretrain", ["ann/nocol.csv"])
    with pytest.raises(AnnotationError, match="not found"):
        rows_of(fixture_root, "youku_pretrain", ["ann/absent.csv"])
    (fixture_root / "ann" / "short.csv").write_text("video_id:FILE,title,label\n" + "a.mp4,t,篮球\n" * 30 + "b.mp4,t\n")
    rows = rows_of(fixture_root, "youku_classification", ["ann/short.csv"])
    assert len(rows) == 30  # the 3-field row is skipped
