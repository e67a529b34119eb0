"""Read one clip's bytes and decode only the frames a sampling strategy asks for.

Every failure becomes a :class:`~orchestrator.data.quality.BadClip` with a reason, never a crash:
the caller skips and counts it.  Videos go through :mod:`orchestrator.data.video` (decord by
default, or PyAV: both seek to the keyframe before each wanted frame, so a sparse sample of a long
clip never decodes the whole clip); images through Pillow, as one frame.

The container header is read first (no frame decoded: :func:`~orchestrator.data.video.probe`, or
the PyAV reader's own opening): a resolution outside the limits is
refused there, and a source whose short side is more than twice ``DecodeSpec.short_side`` is
decoded straight to that size by the decoder's scaler, so an 8K clip never materialises
full-size RGB frames.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from orchestrator import storage
from orchestrator.data import video
from orchestrator.data.quality import BadClip
from orchestrator.data.sampling import frames_decoded, sample_indices

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class DecodeSpec:
    num_frames: int
    sampling: str
    min_frames: int = 2
    min_resolution: int = 8
    max_resolution: int = 8192
    decoder: str = "decord"  # orchestrator.data.video.DECODERS
    short_side: int = 0  # decode downscaled to this short side when the source's is > 2x it (0 = never)
    keyframe_jitter: int = 2  # 'keyframe' sampling: frames past the keyframe, at most


def read_media(uri: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes (S3 through pyarrow.fs, a local path only when it is a regular file);
    BadClip('missing'/'read_error') on failure, BadClip('bad_uri') for a URI no storage can open
    (a NUL byte, ``s3:///x``, a FIFO or device), BadClip('too_large') past ``max_bytes`` (at most
    ``max_bytes + 1`` bytes are read)."""
    try:
        with storage.open_input(uri, storage.S3_READ_CHUNK if max_bytes is None else max_bytes + 1) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise BadClip("missing", uri, str(e)) from None
    except storage.NotARegularFile as e:
        raise BadClip("bad_uri", uri, str(e)) from None
    except OSError as e:  # what storage retries (a body cut short included) it has retried
        raise BadClip("missing" if storage.is_missing(e) else "read_error", uri, str(e)) from None
    except ValueError as e:  # pyarrow's ArrowInvalid (NUL in a path), a URI without a bucket ...
        raise BadClip("bad_uri", uri, str(e)[:200]) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise BadClip("too_large", uri, f"larger than data.max_object_bytes={max_bytes}")
    return data


def _has_video_signature(data: bytes) -> bool:
    head = data[:16]
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4 / MOV
            or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska / WebM
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
            or head[:1] == b"\x47"  # MPEG-TS sync byte
            or head[:3] == b"FLV")


def _unopenable(data: bytes, uri: str, e: Exception) -> BadClip:
    """A container that could not be opened: 'truncated' when its bytes start like a video, else 'not_video'."""
    return BadClip("truncated" if _has_video_signature(data) else "not_video", uri, str(e))


def _check_resolution(uri: str, h: int, w: int, spec: DecodeSpec) -> None:
    if min(h, w) < spec.min_resolution or max(h, w) > spec.max_resolution:
        raise BadClip("bad_resolution", uri, f"{w}x{h} outside [{spec.min_resolution}, {spec.max_resolution}]")


@dataclass
class Decoded:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    decoded: int  # frames the decoder had to decode (>= T for a seeking decoder)


def decode_size(width: int, height: int, spec: DecodeSpec) -> tuple[int, int] | None:
    """The (w, h) the decoder should output, or None for the source size."""
    if spec.short_side and min(width, height) > 2 * spec.short_side:
        return video.scaled_size(width, height, spec.short_side)
    return None


def decode_video(data: bytes, uri: str, spec: DecodeSpec, rng: np.random.Generator,
                 start: float | None = None, end: float | None = None) -> Decoded:
    """Sample ``spec.num_frames`` frames of the clip (or of ``[start, end]`` seconds) -> uint8 [T, H, W, 3]."""
    if not data:
        raise BadClip("empty", uri)
    try:
        if spec.decoder == "pyav":  # its reader reads the header on opening, before any frame: no probe
            vr = video.PyAVReader(data)
            width, height = vr.width, vr.height
        else:
            head = video.probe(data)  # the header only: nothing decoded yet
            width, height = head.width, head.height
        if width <= 0 or height <= 0:
            raise video.DecodeError("no frame size in the header")
    except video.DecodeError as e:
        raise _unopenable(data, uri, e) from None
    _check_resolution(uri, height, width, spec)
    size = decode_size(width, height, spec)
    if spec.decoder == "pyav":
        vr.size = size
    else:
        try:
            vr = video.open_reader(spec.decoder, data, size)
        except video.DecodeError as e:
            raise _unopenable(data, uri, e) from None
    n = len(vr)
    if n < spec.min_frames:
        raise BadClip("too_few_frames", uri, f"{n} frame(s), need {spec.min_frames}")
    first, last = 0, n
    if any(v is not None and not (math.isfinite(v) and v >= 0) for v in (start, end)):
        raise BadClip("undecodable", uri, f"segment [{start}, {end}] s is not finite and non-negative")
    if start is not None or end is not None:
        fps = vr.fps() or 1.0
        first = min(max(0, int(math.floor((start or 0.0) * fps))), n - 1)
        last = n if end is None else min(n, max(first + 1, int(math.ceil(end * fps))))
    try:
        keys = vr.key_indices()
        indices = sample_indices(spec.sampling, first, last, spec.num_frames, rng, keyframes=keys,
                                 jitter=spec.keyframe_jitter)
        frames = vr.get(indices)  # [T, H, W, 3]
    except video.DecodeError as e:
        raise BadClip("undecodable", uri, str(e)) from None
    if frames.ndim != 4 or frames.shape[0] != len(indices):
        raise BadClip("undecodable", uri, f"decoder returned shape {frames.shape}")
    return Decoded(frames, vr.decoded if vr.decoded >= 0 else frames_decoded(indices, keys))


def decode_image(data: bytes, uri: str, spec: DecodeSpec) -> Decoded:
    """An image as one frame: uint8 [1, H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadClip("empty", uri)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # from the header: checked before a pixel is decoded
                _check_resolution(uri, h, w, spec)
                arr = np.asarray(im.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadClip("too_large", uri, str(e)[:200]) from None
    except UnidentifiedImageError as e:
        raise BadClip("not_video", uri, str(e)[:200]) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadClip("truncated", uri, str(e)[:200]) from None
    _check_resolution(uri, arr.shape[0], arr.shape[1], spec)
    return Decoded(arr[None], 1)


def is_image(uri: str) -> bool:
    return uri.lower().split("?")[0].endswith(IMAGE_EXTS)


def decode_media(data: bytes, uri: str, spec: DecodeSpec, rng: np.random.Generator, modality: str,
                 start: float | None = None, end: float | None = None) -> Decoded:
    if modality == "image" or is_image(uri):
        return decode_image(data, uri, spec)
    return decode_video(data, uri, spec, rng, start, end)
