"""Fixtures of the data-plane tests: numbered clips (frame t is grey level STEP * t) and annotation
files in each dataset's exact format."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from orchestrator.devtools.synth import tar_bytes

STEP = 8  # grey level per frame index: frame t has value STEP * t


def numbered_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 [n, h, w, 3]; frame t is flat grey STEP * t (a bright bar on the left to test flips)."""
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t] = STEP * t
        frames[t, :, : w // 8] = 255
    return frames


def numbered_clip(n: int = 24, fps: int = 8, gop: int = 8, h: int = 48, w: int = 64) -> bytes:
    from orchestrator.devtools.synth import encode_h264

    return encode_h264(numbered_frames(n, h, w), fps, gop)


def frame_index(frames: np.ndarray) -> list[int]:
    """Which numbered frame each decoded frame is (from its grey level, right of the bar)."""
    w = frames.shape[2]
    return [int(round(float(f[:, w // 4:].mean()) / STEP)) for f in frames]


def jpeg(h: int = 40, w: int = 60, value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()




@pytest.fixture(scope="session")
def clip_bytes():
    return numbered_clip()


@pytest.fixture
def fixture_root(tmp_path, clip_bytes):
    """A dataset root with a few numbered clips and an annotation file per format."""
    root = tmp_path / "ds"
    (root / "videos" / "000001_000050").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "ann").mkdir()
    for name in ("a.mp4", "b.mp4", "video7010.mp4", "HdYoyzCSWyw.mp4", "000001_000050/1051729318.mp4"):
        (root / "videos" / name).write_bytes(clip_bytes)
    (root / "images" / "000000391895.jpg").write_bytes(jpeg())
    ann = root / "ann"
    (ann / "youku_pretrain.csv").write_text("video_id:FILE,title\na.mp4,一只猫在玩\nb.mp4,风景\n", encoding="utf-8")
    (ann / "youku_cls.csv").write_text("video_id:FILE,title,label\na.mp4,篮球比赛,篮球\nb.mp4,做饭,美食制作\n",
                                       encoding="utf-8")
    (ann / "youku_ret.csv").write_text("clip_name:FILE,caption\na.mp4,一个人在跑步\n", encoding="utf-8")
    (ann / "youku_cap_val.csv").write_text(
        'video_id:FILE,golden_caption\na.mp4,"[\'一只猫\', \'猫在玩\']"\nb.mp4,"[""风景"", ""山""]"\n', encoding="utf-8")
    (ann / "webvid.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1051729318,https://ak.picdn.net/x.mp4,PT00H00M09S,000001_000050,Mount saint helens - wide shot\n")
    (ann / "msrvtt.json").write_text(json.dumps([
        {"video": "a.mp4", "caption": ["a man runs", "someone is running"], "duration": 3.0},
        {"video": "b.mp4", "caption": "a cat plays", "duration": 3.0}]))
    (ann / "msrvtt.jsonl").write_text('{"video": "a.mp4", "caption": "a man runs", "duration": 3.0}\n'
                                      '{"video": "b.mp4", "caption": "a cat plays", "duration": 3.0}\n')
    (ann / "msrvtt_qa.json").write_text(json.dumps([
        {"answer": "man", "id": 0, "question": "who is running?", "video_id": 7010}]))
    (ann / "coco.json").write_text(json.dumps({
        "info": {"year": 2017}, "licenses": [],
        "images": [{"license": 3, "file_name": "000000391895.jpg", "height": 40, "width": 60, "id": 391895}],
        "annotations": [{"image_id": 391895, "id": 37, "caption": "A man riding a bike."},
                        {"image_id": 391895, "id": 38, "caption": "A cyclist on a road."}]}))
    (ann / "internvid.jsonl").write_text(json.dumps(
        {"YoutubeID": "HdYoyzCSWyw", "Start_timestamp": "00:00:01.000", "End_timestamp": "00:00:02.000",
         "Caption": "woman using a computer mouse", "Aesthetic_Score": 4.58, "UMT_Score": 0.39}) + "\n")
    glue = {
        "sst2.tsv": "sentence\tlabel\nit 's a charming journey \t1\nthe movie is dull \t0\n",
        "rte.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA man runs.\tA person moves.\tentailment\n"
                   "1\tA cat sleeps.\tA dog barks.\tnot_entailment\n",
        "mrpc.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tHe said \"yes\".\tHe agreed.\n",
        "qqp.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow old?\tWhat age?\t1\n",
        "mnli.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                    "0\t31193\t31193n\tgovernment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tConceptually cream skimming.\t"
                    "Product and geography.\tneutral\tneutral\n",
        "qnli.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came into force?\tThe law came.\tentailment\n",
    }
    for name, text in glue.items():
        (ann / name).write_text(text)
    cc3m = tar_bytes([("00000/000000001.jpg", jpeg()),
                     ("00000/000000001.json", json.dumps({"caption": "hard rock artist performs", "url": "u",
                                                          "key": "000000001", "status": "success"}).encode()),
                     ("00000/000000001.txt", b"hard rock artist performs")])
    (root / "cc3m").mkdir()
    (root / "cc3m" / "00000.tar").write_bytes(cc3m)
    webvid = tar_bytes([("00000034.mp4", clip_bytes),
                       ("00000034.json", json.dumps({"videoid": 1051729318, "page_dir": "095551_095600",
                                                     "duration": "PT00H00M09S", "caption": "Mount saint helens",
                                                     "key": "00000034", "status": "success"}).encode()),
                       ("00000034.txt", b"Mount saint helens")])
    (root / "webvid").mkdir()
    (root / "webvid" / "00000.tar").write_bytes(webvid)
    return root
