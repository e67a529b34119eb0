"""Sampling strategies return the frames they promise (checked on frame content), augmentation,
sparse decoding, and every kind of bad input becomes a counted BadClip, never a crash."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data import augment, sampling
from orchestrator.data.decode import DecodeSpec, decode_image, decode_media, decode_video, read_media
from orchestrator.data.quality import BadClip
from tests.data.conftest import frame_index, jpeg, numbered_clip

RNG = np.random.default_rng(0)


def spec(n=4, strategy="middle", **kw):
    return DecodeSpec(num_frames=n, sampling=strategy, **kw)


def test_middle_returns_segment_centres(clip_bytes):
    d = decode_video(clip_bytes, "c", spec(4, "middle"), RNG)  # 24 frames, 4 segments of 6
    assert d.frames.shape == (4, 48, 64, 3) and d.frames.dtype == np.uint8
    assert frame_index(d.frames) == [3, 9, 15, 21]


def test_uniform_includes_first_and_last(clip_bytes):
    d = decode_video(clip_bytes, "c", spec(4, "uniform"), RNG)
    assert frame_index(d.frames) == [0, 8, 15, 23]


def test_rand_one_frame_per_segment(clip_bytes):
    for seed in range(5):
        idx = frame_index(decode_video(clip_bytes, "c", spec(4, "rand"), np.random.default_rng(seed)).frames)
        assert [i // 6 for i in idx] == [0, 1, 2, 3], idx


def test_headtail(clip_bytes):
    idx = frame_index(decode_video(clip_bytes, "c", spec(4, "headtail"), np.random.default_rng(1)).frames)
    assert sum(i < 12 for i in idx) == 2 and sum(i >= 12 for i in idx) == 2 and idx == sorted(idx)


def test_segment_and_short_clip_padding(clip_bytes):
    # 8 fps: seconds [1, 2) are frames 8..15
    d = decode_video(clip_bytes, "c", spec(4, "middle"), RNG, start=1.0, end=2.0)
    assert frame_index(d.frames) == [9, 11, 13, 15]
    short = numbered_clip(n=3, gop=3)
    d = decode_video(short, "s", spec(6, "rand"), RNG)
    assert frame_index(d.frames) == [0, 1, 2, 2, 2, 2]


def test_sampling_indices_sorted_in_range():
    for name in sampling.STRATEGIES:
        for n in (1, 4, 16):
            idx = sampling.sample_indices(name, 10, 90, n, np.random.default_rng(3))
            assert len(idx) == n and idx == sorted(idx) and all(10 <= i < 90 for i in idx)
    with pytest.raises(ValueError, match="unknown frame sampling"):
        sampling.sample_indices("random", 0, 10, 2, RNG)


def test_sparse_decode_does_not_decode_whole_clip():
    # 80 frames, keyframe every 16: 4 middle frames need ~ keyframe-to-frame runs, not 80 frames
    long = numbered_clip(n=30, gop=10)
    d = decode_video(long, "l", spec(3, "middle"), RNG)
    assert frame_index(d.frames) == [5, 15, 25]
    assert d.decoded == sampling.frames_decoded([5, 15, 25], [0, 10, 20]) == 18
    assert sampling.frames_decoded([5, 15, 25], [0]) == 26  # one keyframe: decode straight on


def test_train_transform_crop_and_flip():
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    frames[:, :, :8] = 255  # bar on the left
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        out = augment.train_transform(frames, 32, 0.5, True, rng)
        assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
        assert np.array_equal(out[0], out[1])  # one crop/flip for the whole clip
        left, right = out[:, :, :4].mean(), out[:, :, -4:].mean()
        flips += right > left
    assert 0 < flips < 20
    box = augment.random_resized_crop_box(100, 100, 0.5, np.random.default_rng(1))
    assert 0.5 * 100 * 100 * 0.9 <= box[2] * box[3] <= 100 * 100


def test_eval_transform_centre_crop():
    frames = np.zeros((1, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 200  # the centre square of a 40x80 frame
    out = augment.eval_transform(frames, 20)
    assert out.shape == (1, 20, 20, 3)
    assert out[:, :, 2:-2].min() >= 190


def test_image_is_one_frame():
    d = decode_media(jpeg(30, 50), "x.jpg", spec(4), RNG, "image")
    assert d.frames.shape == (1, 30, 50, 3)


# ---------------------------------------------------------------------------------------------
# bad input: every kind is a BadClip with its reason
# ---------------------------------------------------------------------------------------------

def test_bad_inputs(tmp_path, clip_bytes):
    cases = {
        "empty": b"",
        "truncated": clip_bytes[: len(clip_bytes) // 2],
        "not_video": b"this is a text file, not a video\n" * 20,
    }
    for reason, data in cases.items():
        with pytest.raises(BadClip) as e:
            decode_video(data, f"{reason}.mp4", spec(), RNG)
        assert e.value.reason == reason, (reason, e.value)
    with pytest.raises(BadClip) as e:
        decode_video(numbered_clip(n=1, gop=1), "one.mp4", spec(min_frames=2), RNG)
    assert e.value.reason == "too_few_frames"
    with pytest.raises(BadClip) as e:
        decode_video(clip_bytes, "huge.mp4", spec(max_resolution=32), RNG)
    assert e.value.reason == "bad_resolution"
    with pytest.raises(BadClip) as e:
        decode_video(numbered_clip(n=4, h=16, w=256, gop=4), "thin.mp4", spec(min_resolution=20), RNG)
    assert e.value.reason == "bad_resolution"
    with pytest.raises(BadClip) as e:
        read_media(str(tmp_path / "absent.mp4"))
    assert e.value.reason == "missing"
    with pytest.raises(BadClip) as e:
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 10, "broken.jpg", spec())
    assert e.value.reason in ("truncated", "not_video")
    with pytest.raises(BadClip) as e:
        decode_image(b"not an image", "x.jpg", spec())
    assert e.value.reason == "not_video"


def test_undecodable_frames(clip_bytes):
    # corrupt the middle of the stream: the container opens, frames may fail or decode as garbage;
    # either way nothing but a BadClip or frames of the right shape may come out
    data = bytearray(clip_bytes)
    mdat = data.index(b"mdat") + 4
    data[mdat:mdat + (len(data) - mdat) // 2] = bytes((len(data) - mdat) // 2)
    try:
        d = decode_video(bytes(data), "corrupt.mp4", spec(), RNG)
        assert d.frames.shape == (4, 48, 64, 3)
    except BadClip as e:
        assert e.reason in ("undecodable", "truncated")


def test_eval_transform_resizes_the_whole_frame_by_default():
    """The reference (and the paper) resize the whole frame to size x size at evaluation; the centre
    crop of a 16:9 frame loses 44% of its width, where a shape may be."""
    from orchestrator.data.config import DataConfig
    assert DataConfig().eval_transform == "resize"
    frames = np.zeros((1, 36, 64, 3), np.uint8)
    frames[:, :, :8] = 250                                             # a bar at the left edge
    whole = augment.eval_transform(frames, 16, "resize")
    assert whole.shape == (1, 16, 16, 3) and whole[:, :, 0].min() > 200
    assert augment.eval_transform(frames, 16, "center_crop")[:, :, 0].max() < 10   # the crop loses it
    with pytest.raises(ValueError, match="accepted"):
        augment.eval_transform(frames, 16, "squash")


def test_random_resized_crop_falls_back_as_torchvision():
    """After 10 misses: the whole frame when its aspect ratio is allowed (4:3), else the centre at the
    nearest allowed ratio (a 16:9 frame keeps its full height), not a centre square."""
    never = np.random.default_rng(0)
    assert augment.random_resized_crop_box(120, 160, 1.0, never) == (0, 0, 120, 160)
    assert augment.random_resized_crop_box(90, 160, 1.0, never) == (0, 20, 90, 120)
    assert augment.random_resized_crop_box(160, 90, 1.0, never) == (20, 0, 120, 90)
