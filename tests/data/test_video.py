"""The decoder interface (decord and PyAV give the same frames), header probing before decoding
(an 8K clip never materialises full-size frames), 'keyframe' sampling, and shard-time transcoding
(frames read from a transcoded shard are those of a direct decode of the transcoded clip)."""
from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest

from orchestrator.data import decode as decode_mod
from orchestrator.data import sampling, video
from orchestrator.data.decode import DecodeSpec, decode_video
from orchestrator.data.quality import BadClip
from orchestrator.data.transcode import TranscodeSpec, transcode
from tests.data.conftest import frame_index, numbered_clip

RNG = np.random.default_rng(0)


def spec(n=4, strategy="middle", **kw):
    return DecodeSpec(num_frames=n, sampling=strategy, **kw)


def _has_bframes(data: bytes) -> bool:
    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        dts_pts = [(p.dts, p.pts) for p in c.demux(s) if p.pts is not None]
    return any(d != p for d, p in dts_pts)  # reordering: presentation order differs from decode order


@pytest.fixture(scope="module")
def bframe_clip():
    data = numbered_clip(n=30, gop=10)
    assert _has_bframes(data)  # the case where seeking decoders return wrong frames
    return data


# ---------------------------------------------------------------------------------------------
# one interface, two decoders, identical frames
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [None, (32, 24)])
def test_decord_and_pyav_give_identical_frames(bframe_clip, size):
    rng = np.random.default_rng(4)
    cases = [[0, 1, 2, 3], [5, 15, 25, 29], [9, 10, 10, 11], [29, 29, 29, 29]]
    cases += [sampling.sample_indices("rand", 0, 30, 6, rng) for _ in range(4)]
    readers = {name: video.open_reader(name, bframe_clip, size) for name in video.DECODERS}
    assert len(readers["decord"]) == len(readers["pyav"]) == 30
    assert readers["decord"].key_indices() == readers["pyav"].key_indices() == [0, 10, 20]
    for idx in cases:
        a, b = readers["decord"].get(idx), readers["pyav"].get(idx)
        assert a.shape == b.shape == (len(idx), *(size[::-1] if size else (48, 64)), 3)
        assert np.array_equal(a, b), idx
        if size is None:
            assert frame_index(a) == idx


@pytest.mark.parametrize("width", [8, 16, 24, 48, 72, 64])
def test_small_scaled_widths_decode_in_both_decoders(width):
    # decord 0.6 fails ("The size must exactly match") on some small output widths
    clip = numbered_clip(n=8, gop=4, h=64, w=96)
    for name in video.DECODERS:
        frames = video.open_reader(name, clip, (width, 16)).get([1, 5])
        assert frames.shape == (2, 16, width, 3), name
        assert frame_index(frames) == [1, 5], name


def test_pyav_counts_the_frames_its_decoder_produced(bframe_clip):
    r = video.open_reader("pyav", bframe_clip)
    r.get([5, 15, 25])
    assert r.decoded >= 18  # at least keyframe -> frame for each (the model's figure)
    assert r.decoded < 30  # a seek per segment: not the whole clip
    r2 = video.open_reader("pyav", bframe_clip)
    r2.get([1, 2, 3])  # straight on from the first keyframe: no seeks
    assert r2.decoded == 4
    d = decode_video(bframe_clip, "c", spec(3, decoder="pyav"), RNG)
    assert d.decoded >= 18 and frame_index(d.frames) == [5, 15, 25]


def test_probe_reads_the_header_only(bframe_clip):
    p = video.probe(bframe_clip)
    assert (p.width, p.height, p.frames, p.fps, p.codec) == (64, 48, 30, 8.0, "h264")
    with pytest.raises(video.DecodeError):
        video.probe(b"not a video" * 10)


# ---------------------------------------------------------------------------------------------
# header probing: big sources refused or decoded small, before any full-size frame exists
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_8k():
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 7680, 4320, "yuv420p"
        s.options = {"preset": "ultrafast", "g": "2"}
        for i in range(3):
            fr = av.VideoFrame(7680, 4320, "yuv420p")
            for plane in fr.planes:
                plane.update(bytes([40 + 60 * i]) * plane.buffer_size)
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return buf.getvalue()


FULL_FRAME = 7680 * 4320 * 3  # bytes of one full-size RGB frame


@pytest.mark.parametrize("decoder", video.DECODERS)
def test_8k_clip_never_allocates_full_size_frames(clip_8k, decoder):
    tracemalloc.start()  # numpy arrays (every RGB frame handed to Python) are traced
    try:
        d = decode_video(clip_8k, "8k.mp4", spec(2, "middle", decoder=decoder, short_side=160), RNG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d.frames.shape == (2, 160, 284, 3)
    assert peak < FULL_FRAME / 4, peak  # the old path held 2 full frames (~200 MB)
    # the frames are the source's frames 0 and 2 (flat planes of 40 and 160), only smaller
    lo, hi = (float(f.mean()) for f in d.frames)
    assert hi > lo + 50 and d.frames[0].reshape(-1, 3).std(0).max() < 2  # flat, as encoded


def test_oversized_clip_refused_from_the_header(clip_bytes, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the decoder was opened for a clip the header already rules out")

    monkeypatch.setattr(decode_mod.video, "open_reader", never)
    with pytest.raises(BadClip) as e:
        decode_video(clip_bytes, "big.mp4", spec(max_resolution=32), RNG)
    assert e.value.reason == "bad_resolution"


def test_pyav_reads_the_header_once_and_refuses_before_decoding(clip_bytes, monkeypatch):
    """With PyAV the reader's own opening is the probe: no second open of the container, and an
    oversized clip is refused before any frame is decoded."""
    def never(*a, **k):
        raise AssertionError("called")

    monkeypatch.setattr(decode_mod.video, "probe", never)
    monkeypatch.setattr(decode_mod.video.PyAVReader, "get", never)
    with pytest.raises(BadClip) as e:
        decode_video(clip_bytes, "big.mp4", spec(max_resolution=32, decoder="pyav"), RNG)
    assert e.value.reason == "bad_resolution" and "64x48" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(decode_mod.video, "probe", never)
    assert decode_video(clip_bytes, "c", spec(short_side=20, decoder="pyav"), RNG).frames.shape[1:3] == (20, 26)
    with pytest.raises(BadClip) as e:
        decode_video(clip_bytes[: len(clip_bytes) // 3], "cut.mp4", spec(decoder="pyav"), RNG)
    assert e.value.reason in ("truncated", "undecodable")


def test_small_sources_are_decoded_at_their_size(clip_bytes):
    # 48x64 with short_side 20: 48 <= 2 * 20 is not "much larger", so the source size is kept
    assert decode_video(clip_bytes, "c", spec(short_side=24), RNG).frames.shape[1:3] == (48, 64)
    assert decode_video(clip_bytes, "c", spec(short_side=20), RNG).frames.shape[1:3] == (20, 26)


# ---------------------------------------------------------------------------------------------
# keyframe-aware sampling
# ---------------------------------------------------------------------------------------------

def test_keyframe_sampling_stays_near_keyframes(bframe_clip):
    keys = [0, 10, 20]
    for seed in range(8):
        idx = sampling.sample_indices("keyframe", 0, 30, 3, np.random.default_rng(seed), keyframes=keys, jitter=2)
        assert [i // 10 for i in idx] == [0, 1, 2]  # one frame per segment
        assert all(0 <= i - 10 * (i // 10) <= 2 for i in idx), idx  # within jitter of the segment's keyframe
        d = decode_video(bframe_clip, "c", spec(3, "keyframe", decoder="pyav", keyframe_jitter=2),
                         np.random.default_rng(seed))
        assert [i // 10 for i in frame_index(d.frames)] == [0, 1, 2]
        assert d.decoded <= 3 * 3  # at most jitter + 1 frames per frame returned, counted by the decoder
    # a segment without a keyframe takes its first frames (cheapest to reach from the previous one)
    idx = sampling.sample_indices("keyframe", 0, 40, 4, np.random.default_rng(0), keyframes=[0], jitter=0)
    assert idx == [0, 10, 20, 30]
    # the existing strategies are untouched
    assert sampling.sample_indices("middle", 0, 30, 3, RNG) == [5, 15, 25]


def test_keyframe_is_a_config_choice():
    from orchestrator.data.config import DataConfig

    assert DataConfig(sampling="keyframe").sampling == "keyframe"
    with pytest.raises(ValueError):
        DataConfig(sampling="keyframes")


# ---------------------------------------------------------------------------------------------
# shard-time transcoding
# ---------------------------------------------------------------------------------------------

def test_transcode_short_gop_no_bframes_resolution_fps():
    src = numbered_clip(n=32, fps=16, gop=32, h=96, w=128)
    out, info = transcode(src, "c.mp4", TranscodeSpec(short_side=48, max_fps=8, gop=4))
    assert info["out"] == {"width": 64, "height": 48, "fps": 8.0, "frames": 16}
    assert info["src"]["width"] == 128 and info["src"]["frames"] == 32
    assert not _has_bframes(out)
    r = video.open_reader("decord", out)
    assert len(r) == 16 and r.key_indices() == [0, 4, 8, 12]
    # every second source frame kept, content preserved
    assert frame_index(r.get(list(range(16)))) == list(range(0, 32, 2))


def test_transcode_bad_clips_are_reasons():
    for data, reason in ((b"", "empty"), (b"hello" * 50, "not_video")):
        with pytest.raises(BadClip) as e:
            transcode(data, "x.mp4", TranscodeSpec())
        assert e.value.reason == reason
    with pytest.raises(BadClip) as e:
        transcode(numbered_clip(n=4, gop=4), "big.mp4", TranscodeSpec(max_resolution=32))
    assert e.value.reason == "bad_resolution"


def test_transcoded_shard_frames_match_a_direct_decode(tmp_path, fixture_root, capsys):
    from orchestrator.cli import main
    from orchestrator.data.sources import wds

    src = numbered_clip(n=24, fps=8, gop=24, h=96, w=128)
    (fixture_root / "videos" / "big.mp4").write_bytes(src)
    (fixture_root / "videos" / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    (fixture_root / "ann" / "t.jsonl").write_text('{"video": "big.mp4", "caption": "x"}\n'
                                                 '{"video": "junk.mp4", "caption": "y"}\n')
    out = tmp_path / "s"
    rc = main(["shard", "--source", "msrvtt", "--root", str(fixture_root), "--annotations", "ann/t.jsonl",
               "--out", str(out), "--transcode", "--short-side", "48", "--gop", "4"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 1 and index["transcoded"] == 1
    assert index["skipped"] == {"truncated": 1}  # the broken clip is counted, not shipped
    assert index["transcode"]["short_side"] == 48 and index["transcode"]["gop"] == 4
    assert index["transcode"]["bframes"] == 0
    assert (fixture_root / "videos" / "big.mp4").read_bytes() == src  # the original is untouched
    (row,) = wds.read_shard_rows("wds", str(out / "shard-000000.tar"), wds.ParseReport("s"), with_bytes=True)
    direct, _ = transcode(src, "big.mp4", TranscodeSpec(short_side=48, gop=4))
    for strategy in ("middle", "uniform"):
        a = decode_video(row["media_bytes"], row["media_uri"], spec(4, strategy), RNG).frames
        b = decode_video(direct, "direct", spec(4, strategy), RNG).frames
        assert a.shape == (4, 48, 64, 3) and np.array_equal(a, b)
        assert frame_index(a) == frame_index(decode_video(src, "src", spec(4, strategy), RNG).frames)
