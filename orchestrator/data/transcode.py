"""Re-encode a clip once, at shard time, into what training reads cheaply (PyAV + libx264).

A source clip at 1080p with a keyframe every few seconds and B-frames costs, per sampled frame,
a whole GOP of full-size decoding, every epoch.  Re-encoded at a training resolution (short side
e.g. 256), a capped frame rate, a short GOP and no B-frames, the same exact sampling decodes a
few small frames per frame returned.  The original clip is not touched; the parameters are
recorded in the shard index (``index.json`` -> ``transcode``) so a run knows what it reads.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction

from orchestrator.data.decode import _has_video_signature
from orchestrator.data.quality import BadClip
from orchestrator.data.video import DecodeError, probe, scaled_size


@dataclass(frozen=True)
class TranscodeSpec:
    short_side: int = 256  # 0 = keep the source size
    max_fps: float = 30.0  # 0 = keep the source rate
    gop: int = 8  # a keyframe every `gop` output frames
    crf: int = 23
    preset: str = "veryfast"
    min_frames: int = 2
    min_resolution: int = 8
    max_resolution: int = 8192
    max_frames: int = 200_000  # a longer clip is refused (undecodable) before any frame is decoded

    def __post_init__(self):
        if self.short_side < 0 or self.short_side % 2 or self.gop < 1 or self.max_fps < 0:
            raise ValueError(f"bad transcode settings {self}: short_side even >= 0, gop >= 1, max_fps >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(codec="h264", bframes=0, pix_fmt="yuv420p", container="mp4")
        return d


def _keep(n_in: int, fps_in: float, fps_out: float) -> bool:
    """Keep input frame ``n_in`` when it is the first to reach the next output timestamp."""
    if fps_out >= fps_in:
        return True
    return int(n_in * fps_out / fps_in) != int((n_in - 1) * fps_out / fps_in) if n_in else True


def transcode(data: bytes, uri: str, spec: TranscodeSpec) -> tuple[bytes, dict]:
    """The clip re-encoded per ``spec`` -> (mp4 bytes, {"src": ..., "out": ...}); BadClip when unusable."""
    import av

    if not data:
        raise BadClip("empty", uri)
    try:
        p = probe(data)
    except DecodeError as e:

        raise BadClip("truncated" if _has_video_signature(data) else "not_video", uri, str(e)) from None
    if min(p.width, p.height) < spec.min_resolution or max(p.width, p.height) > spec.max_resolution:
        raise BadClip("bad_resolution", uri, f"{p.width}x{p.height} outside [{spec.min_resolution}, {spec.max_resolution}]")
    if p.frames > spec.max_frames:
        raise BadClip("undecodable", uri, f"too long: {p.frames} frames > {spec.max_frames} (max_frames)")
    src_fps = p.fps or 30.0
    out_fps = min(src_fps, spec.max_fps) if spec.max_fps else src_fps
    rate = Fraction(out_fps).limit_denominator(1001)
    if spec.short_side and min(p.width, p.height) > spec.short_side:
        w, h = scaled_size(p.width, p.height, spec.short_side)
    else:
        w, h = p.width - p.width % 2, p.height - p.height % 2
    out = io.BytesIO()
    n_in = n_out = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as src, av.open(out, mode="w", format="mp4") as dst:
            s_in = src.streams.video[0]
            s_in.thread_type = "AUTO"
            s_out = dst.add_stream("libx264", rate=rate)
            s_out.width, s_out.height, s_out.pix_fmt = w, h, "yuv420p"
            s_out.options = {"g": str(spec.gop), "keyint_min": str(spec.gop), "sc_threshold": "0", "bf": "0",
                             "crf": str(spec.crf), "preset": spec.preset}
            for frame in src.decode(s_in):
                keep = _keep(n_in, src_fps, out_fps)
                n_in += 1
                if not keep:
                    continue
                small = frame.reformat(width=w, height=h, format="yuv420p")
                small.pts, small.time_base = n_out, Fraction(1) / rate
                n_out += 1
                for packet in s_out.encode(small):
                    dst.mux(packet)
            for packet in s_out.encode():
                dst.mux(packet)
    except Exception as e:  # a clip that breaks mid-way is bad, not a crash
        raise BadClip("undecodable", uri, (str(e).splitlines() or [type(e).__name__])[0][:200]) from None
    if n_out < spec.min_frames:
        raise BadClip("too_few_frames", uri, f"{n_out} frame(s), need {spec.min_frames}")
    info = {"src": {"width": p.width, "height": p.height, "fps": round(src_fps, 3), "frames": n_in, "codec": p.codec},
            "out": {"width": w, "height": h, "fps": round(float(rate), 3), "frames": n_out}}
    return out.getvalue(), info
