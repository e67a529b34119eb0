"""One video decoder interface, two implementations (decord, PyAV), and a header-only probe.

:func:`probe` reads only the container header (PyAV, no frame decoded) for resolution, frame count
and frame rate, so a clip can be refused (or decoded downscaled) before any frame exists in memory.

:func:`open_reader` returns a :class:`Reader` of the named decoder:

- ``decord`` (the design's decoder): ``decord.VideoReader`` with ``width``/``height`` set when a
  downscaled output is asked for, so ffmpeg's scaler writes the small RGB frames directly;
- ``pyav``: demuxes the packet index once (no decoding), seeks to the keyframe at or before each
  wanted frame, decodes forward, and converts only the wanted frames to RGB at the asked size.
  It counts every frame its decoder produced (``Reader.decoded``): the decoder's own count.

Both return the same frames for the same indices (tests/data/test_video.py compares them
frame-for-frame).  Frame index ``i`` is the i-th frame in presentation order.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

DECODERS = ("decord", "pyav")


class DecodeError(Exception):
    """The container could not be opened or a frame could not be decoded."""


@dataclass(frozen=True)
class Probe:
    width: int
    height: int
    frames: int  # from the header (0 when the container does not say)
    fps: float
    codec: str


def probe(data: bytes) -> Probe:
    """Resolution, frame count and frame rate from the container header; DecodeError when unreadable."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise DecodeError("no video stream")
            s = c.streams.video[0]
            cc = s.codec_context
            rate = s.average_rate or s.guessed_rate or 0
            frames = int(s.frames or 0)
            if not frames and s.duration and s.time_base and rate:
                frames = int(round(float(s.duration * s.time_base) * float(rate)))
            return Probe(int(cc.width or 0), int(cc.height or 0), frames, float(rate), str(cc.name))
    except DecodeError:
        raise
    except Exception as e:  # av raises InvalidDataError, EOFError, ValueError ...
        raise DecodeError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``short_side`` (aspect kept, both even, as yuv420 encoders need)."""
    s = min(width, height)
    w = max(2, int(round(width * short_side / s / 2)) * 2)
    h = max(2, int(round(height * short_side / s / 2)) * 2)
    return w, h


class Reader:
    """A clip opened for indexed frame access."""

    name = ""
    decoded = 0  # frames the decoder produced so far (-1: the decoder does not say)

    def __len__(self) -> int: ...

    def fps(self) -> float: ...

    def key_indices(self) -> list[int]: ...

    def get(self, indices: list[int]) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] (sorted indices; repeats allowed)."""
        raise NotImplementedError


class DecordReader(Reader):
    name = "decord"
    decoded = -1

    def __init__(self, data: bytes, size: tuple[int, int] | None = None):
        import decord

        w, h = size or (-1, -1)
        self.data, self.size = data, size
        try:
            self.vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=w, height=h)
        except Exception as e:  # DECORDError / RuntimeError
            raise DecodeError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None

    def __len__(self) -> int:
        return len(self.vr)

    def fps(self) -> float:
        return float(self.vr.get_avg_fps())

    def key_indices(self) -> list[int]:
        return [int(k) for k in self.vr.get_key_indices()]

    def get(self, indices: list[int]) -> np.ndarray:
        try:
            out = self.vr.get_batch(list(indices)).asnumpy()
        except Exception as e:
            if self.size is None or "must exactly match" not in str(e):
                raise DecodeError(str(e).splitlines()[0][:200]) from None
            out = None
        if self.size is not None and (out is None or out.shape[1:3] != (self.size[1], self.size[0])):
            # decord's scaler copies some small output widths (8, 12, 16, 24, 48, 72 ...) with the
            # wrong size; PyAV gives the same frames (tests/data/test_video.py), so it takes over
            return PyAVReader(self.data, self.size).get(indices)
        return out


class PyAVReader(Reader):
    """Opening it reads the container header (:attr:`width`, :attr:`height`: what :func:`probe`
    reads) and the packet index, and decodes no frame: a caller can check the resolution and set
    :attr:`size` before the first :meth:`get`, with no separate probe."""

    name = "pyav"

    def __init__(self, data: bytes, size: tuple[int, int] | None = None):
        import av

        self.size = size
        self.decoded = 0
        try:
            self.c = av.open(io.BytesIO(data), mode="r")
            if not self.c.streams.video:
                raise DecodeError("no video stream")
            self.s = self.c.streams.video[0]
            self.s.thread_type = "SLICE"
            self.s.thread_count = 1
            pts, keys = [], []
            for p in self.c.demux(self.s):  # packets only: no decoding
                if p.pts is None:
                    continue
                pts.append(int(p.pts))
                if p.is_keyframe:
                    keys.append(int(p.pts))
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
        cc = self.s.codec_context
        self.width, self.height = int(cc.width or 0), int(cc.height or 0)  # the header's, as probe() reads
        self.pts = sorted(pts)
        self.index = {p: i for i, p in enumerate(self.pts)}
        self.keys = sorted(self.index[k] for k in keys)
        rate = self.s.average_rate or self.s.guessed_rate
        self._fps = float(rate) if rate else 0.0
        self._gen = None
        self._pos = -1  # index of the last frame decoded (-1: none, or after a seek)

    def __len__(self) -> int:
        return len(self.pts)

    def fps(self) -> float:
        return self._fps

    def key_indices(self) -> list[int]:
        return list(self.keys) or [0]

    def _seek(self, index: int) -> None:
        self.c.seek(self.pts[index], backward=True, any_frame=False, stream=self.s)
        self._gen = self.c.decode(self.s)
        self._pos = -1

    def _frame(self, index: int):
        """The decoded frame at ``index``: decode straight on when the keyframe before it is behind us."""
        pos = int(np.searchsorted(self.keys, index, side="right")) - 1
        kf = self.keys[pos] if pos >= 0 else 0  # before the first keyframe: from the start
        if self._gen is None or self._pos >= index or self._pos < kf:
            self._seek(kf)
        target = self.pts[index]
        for frame in self._gen:
            self.decoded += 1
            if frame.pts is None:
                continue
            self._pos = self.index.get(int(frame.pts), self._pos)
            if frame.pts == target:
                return frame
            if frame.pts > target:
                break
        raise DecodeError(f"frame {index} (pts {target}) not produced by the decoder")

    def get(self, indices: list[int]) -> np.ndarray:
        out, last, arr = [], None, None
        try:
            for i in indices:
                if i != last:
                    f = self._frame(int(i))
                    if self.size:
                        arr = f.to_ndarray(format="rgb24", width=self.size[0], height=self.size[1])
                    else:
                        arr = f.to_ndarray(format="rgb24")
                    last = i
                out.append(arr)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
        return np.stack(out)

    def close(self) -> None:
        self.c.close()


def open_reader(decoder: str, data: bytes, size: tuple[int, int] | None = None) -> Reader:
    if decoder == "decord":
        return DecordReader(data, size)
    if decoder == "pyav":
        return PyAVReader(data, size)
    raise ValueError(f"unknown decoder {decoder!r}; accepted: {', '.join(DECODERS)}")


def decode_short_side(image_size: int, scale_min: float) -> int:
    """The smallest short side that keeps a random resized crop (area >= ``scale_min``) at full detail."""
    return int(math.ceil(image_size / math.sqrt(scale_min) / 2)) * 2
