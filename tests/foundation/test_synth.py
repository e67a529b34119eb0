"""The synthetic dataset: real H.264 clips, every annotation file, and captions that need time."""
import csv
import io
import json

import numpy as np
import pytest

from orchestrator import storage
from orchestrator.devtools.synth import COLORS, ClipSpec, make_clips, render_frames


def _centroid_track(frames: np.ndarray, color) -> np.ndarray:
    """Centre of the pixels close to ``color`` in each frame: [T, 2] (x, y)."""
    d = np.abs(frames.astype(int) - np.array(color)).sum(-1)
    out = []
    for m in d < 90:
        ys, xs = np.nonzero(m)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def _direction(track: np.ndarray) -> str:
    dx, dy = track[-1] - track[0]
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_clips_decode_with_decord_and_motion_matches_caption(synth_data):
    import decord

    manifest = json.loads(storage.read_text(storage.join(synth_data, "manifest.json")))
    rows = [json.loads(line) for line in storage.read_text(storage.join(synth_data, "annotations/msrvtt_train.jsonl")).splitlines()]
    assert len(rows) == manifest["train"] and manifest["train"] + manifest["val"] == 24
    for r in rows[:8]:
        vr = decord.VideoReader(storage.join(synth_data, "videos", r["video"]))
        assert len(vr) == 16 and vr[0].shape == (64, 96, 3)
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        color = COLORS[r["caption"].split()[1]]
        assert _direction(_centroid_track(frames, color)) == r["caption"].split()[-1]


def test_direction_is_invisible_without_order():
    """'left' is the time-reverse of 'right': the bag of frames has the same distribution."""
    spec = ClipSpec(width=96, height=64, fps=8, seconds=2.0)
    left, right = [m for m in make_clips(4, 0) if m.direction in ("left", "right")]
    import random

    # same rng stream -> same end points, colour & background; only the order differs
    from dataclasses import replace

    right_same = replace(left, direction="right")
    a = render_frames(left, spec, random.Random(7))
    b = render_frames(right_same, spec, random.Random(7))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, b[::-1])


def test_every_annotation_format_is_written(synth_data):
    def ann(n):
        return storage.read_text(storage.join(synth_data, "annotations", n))
    head = next(csv.reader(io.StringIO(ann("youku_pretrain_train.csv"))))
    assert head == ["video_id:FILE", "title"]
    assert next(csv.reader(io.StringIO(ann("youku_classification_val.csv")))) == ["video_id:FILE", "title", "label"]
    assert next(csv.reader(io.StringIO(ann("youku_retrieval_val.csv")))) == ["clip_name:FILE", "caption"]
    cap = list(csv.reader(io.StringIO(ann("youku_captioning_val.csv"))))
    assert cap[0] == ["video_id:FILE", "golden_caption"] and isinstance(json.loads(cap[1][1]), list)
    qa = [json.loads(line) for line in ann("msrvtt_qa_train.jsonl").splitlines()]
    assert {"video_id", "question", "answer"} <= set(qa[0])
    tsv = ann("sst2_train.tsv").splitlines()
    assert tsv[0] == "sentence\tlabel" and tsv[1].split("\t")[1] in ("0", "1")


def test_tokenizer_covers_all_texts(synth_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(storage.join(synth_data, "tokenizer"))
    for text in ["a red square moves left", "which way does the blue circle move?", "the film is dull"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text


@pytest.mark.slow
def test_synth_to_s3_via_cli(s3_bucket):
    from orchestrator.cli import main

    out = f"{s3_bucket}/synth"
    assert main(["synth", "--out", out, "--n", "4", "--seconds", "1", "--width", "64", "--height", "48"]) == 0
    files = list(storage.list_files(out))
    assert sum(f.endswith(".mp4") for f in files) == 4
    assert any(f.endswith("tokenizer/vocab.txt") for f in files)
    assert storage.read_bytes(f"{out}/videos/clip_00000.mp4")[4:8] == b"ftyp"


def test_val_split_enumerates_every_caption_once():
    metas = make_clips(240, 0, n_val=48)
    val = [m.caption for m in metas[-48:]]
    assert len(set(val)) == 48
    train_dirs = [m.direction for m in metas[:-48]]
    assert {d: train_dirs.count(d) for d in set(train_dirs)} == {"left": 48, "right": 48, "up": 48, "down": 48}
    small_val = make_clips(24, 0, n_val=5)[-5:]  # even a tiny val split has every direction (class)
    assert {m.direction for m in small_val} == {"left", "right", "up", "down"}
