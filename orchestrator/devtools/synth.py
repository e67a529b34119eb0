"""A synthetic video-text dataset that can only be solved by watching clips in order.

Each clip shows one coloured shape moving in a straight line over a noisy background.  The pair
of end points is drawn independently of the direction, and "left" is the time-reverse of
"right" (likewise "up"/"down"), so a single frame, or an unordered bag of frames, carries no
information about the direction: only a model that uses frame order can tell the captions apart.

Written under ``--out`` (a local folder or ``s3://`` URI)::

    videos/clip_00000.mp4 ...                        real H.264 (PyAV/libx264)
    annotations/youku_pretrain_{train,val}.csv       video_id:FILE,title   (Youku-mPLUG pre-train)
    annotations/youku_classification_{train,val}.csv video_id:FILE,title,label (category = direction)
    annotations/youku_retrieval_{train,val}.csv      clip_name:FILE,caption
    annotations/youku_captioning_{train,val}.csv     video_id:FILE,golden_caption (list literal on val)
    annotations/msrvtt_{train,val}.jsonl             {"video", "caption", "duration"} per line
    annotations/msrvtt_qa_{train,val}.jsonl          {"video_id", "question", "answer"}
    annotations/sst2_{train,dev}.tsv                 GLUE SST-2 layout: sentence<TAB>label
    tokenizer/                                       a WordPiece tokenizer covering every text above
    manifest.json                                    counts, seed, clip geometry
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from dataclasses import asdict, dataclass

import numpy as np

from orchestrator import storage
from orchestrator.devtools.hf_assets import build_wordpiece_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
POSITIVE = ("wonderful", "delightful", "brilliant", "charming", "moving", "superb", "lovely")
NEGATIVE = ("dull", "tedious", "awful", "clumsy", "boring", "dreadful", "lifeless")
NOUNS = ("film", "movie", "story", "performance", "script", "picture")


@dataclass(frozen=True)
class ClipSpec:
    width: int = 256
    height: int = 192
    fps: int = 8
    seconds: float = 4.0
    gop: int = 16  # a keyframe every 2 s at 8 fps
    # the shape's side, drawn per clip between these fractions of the frame height
    shape_min: float = 1 / 6
    shape_max: float = 1 / 4


@dataclass(frozen=True)
class ClipMeta:
    video_id: str
    file: str
    color: str
    shape: str
    direction: str
    duration: float

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moves {self.direction}"


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    # triangle pointing up: rows widen downwards
    half = (yy + 1) / size * c
    return np.abs(xx - c) <= half


def render_frames(meta: ClipMeta, spec: ClipSpec, rng: random.Random) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of one clip."""
    n = int(round(spec.fps * spec.seconds))
    size = rng.randint(int(spec.height * spec.shape_min + 1e-9), int(spec.height * spec.shape_max + 1e-9))
    mask = _shape_mask(meta.shape, size)
    horizontal = meta.direction in ("left", "right")
    extent = (spec.width if horizontal else spec.height) - size
    a, b = sorted(rng.sample(range(0, extent), 2))
    while b - a < extent // 3:  # make the motion clearly visible
        a, b = sorted(rng.sample(range(0, extent), 2))
    start, end = (a, b) if meta.direction in ("right", "down") else (b, a)
    other = rng.randint(0, (spec.height if horizontal else spec.width) - size)
    bg = np.array([rng.randint(60, 110)] * 3, np.int16)
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = np.clip(bg + nrng.integers(-12, 13, size=(spec.height, spec.width, 3)), 0, 255).astype(np.uint8)
    color = np.array(COLORS[meta.color], np.uint8)
    frames = np.empty((n, spec.height, spec.width, 3), np.uint8)
    for t in range(n):
        pos = int(round(start + (end - start) * t / max(n - 1, 1)))
        x, y = (pos, other) if horizontal else (other, pos)
        f = base.copy()
        f[y:y + size, x:x + size][mask] = color
        frames[t] = f
    return frames


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain tar of ``members`` ((name, bytes), in order), as webdataset shards are."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encode_h264(frames: np.ndarray, fps: int, gop: int) -> bytes:
    """Encode uint8 [T, H, W, 3] frames as an H.264 MP4 in memory (PyAV + libx264)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # deterministic bytes: one encoder and one lookahead thread, no macroblock tree.  With x264's own
        # threads about one clip in fifty came out with other bytes (and pixels up to 10 levels apart) from
        # one encoding to the next; single-threaded, the macroblock tree still did so with short GOPs
        stream.codec_context.thread_count = 1
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "23", "preset": "veryfast",
                          "x264-params": "threads=1:lookahead-threads=1:mbtree=0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_clips(n: int, seed: int, n_val: int = 0) -> list[ClipMeta]:
    """The first ``n - n_val`` clips (train) are balanced over directions with random colour and
    shape; the last ``n_val`` (val) enumerate every (colour, shape, direction) combination in turn,
    so with ``n_val`` = 48 each val caption is unique and text-to-video R@1 has chance 1/48."""
    rng = random.Random(seed)
    metas = []
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    rng.shuffle(pairs)
    combos = [(c, s, d) for c, s in pairs for d in DIRECTIONS]  # every 4 in a row cover all directions
    for i in range(n):
        if i < n - n_val:
            direction, color, shape = DIRECTIONS[i % len(DIRECTIONS)], rng.choice(list(COLORS)), rng.choice(SHAPES)
        else:
            color, shape, direction = combos[(i - (n - n_val)) % len(combos)]
        metas.append(ClipMeta(f"clip_{i:05d}", f"clip_{i:05d}.mp4", color, shape, direction, 0.0))
    return metas


def _questions(m: ClipMeta, rng: random.Random) -> list[tuple[str, str]]:
    qa = [
        (f"which way does the {m.color} {m.shape} move?", m.direction),
        (f"what color is the {m.shape}?", m.color),
        (f"what shape moves {m.direction}?", m.shape),
    ]
    rng.shuffle(qa)
    return qa


def _sst2_rows(n: int, rng: random.Random) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        label = i % 2
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        noun = rng.choice(NOUNS)
        tpl = rng.choice(["the {n} is {a}", "a {a} {n}", "what a {a} {n} it was", "this {n} feels {a}"])
        rows.append((tpl.format(n=noun, a=adj), label))
    return rows


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def all_texts(metas: list[ClipMeta]) -> list[str]:
    """Every string the tokenizer must cover (captions, questions, answers, prompts, GLUE)."""
    texts = [m.caption for m in metas]
    for c in COLORS:
        for s in SHAPES:
            for d in DIRECTIONS:
                m = ClipMeta("", "", c, s, d, 0)
                texts.append(m.caption)
                texts.extend(q + " " + a for q, a in _questions(m, random.Random(0)))
    texts += [f"the {n} is {a}" for n in NOUNS for a in POSITIVE + NEGATIVE]
    texts += ["what a this feels it was", "what does the video describe?", "what does the image describe?"]
    return texts


def _encoded_clip(job: tuple[ClipMeta, ClipSpec, int]) -> tuple[bytes, int]:
    """(H.264 bytes, frame count) of one clip; its frames are seeded by ``job``'s seed alone."""
    meta, spec, clip_seed = job
    frames = render_frames(meta, spec, random.Random(clip_seed))
    return encode_h264(frames, spec.fps, spec.gop), len(frames)


def generate(out: str, n: int = 200, seed: int = 0, spec: ClipSpec = ClipSpec(), val_fraction: float = 0.2,
             with_tokenizer: bool = True, log=print, workers: int = 1) -> dict:
    """Write the dataset under ``out``; returns the manifest.  ``workers`` processes render and encode
    the clips (the same bytes for any number: each clip is seeded by its index)."""
    if n < 4:
        raise ValueError(f"--n must be at least 4 (one clip per direction), got {n}")
    rng = random.Random(seed)
    n_val = max(len(DIRECTIONS), int(round(n * val_fraction)))
    metas = make_clips(n, seed, n_val)
    jobs = [(m, spec, seed * 1_000_003 + i) for i, m in enumerate(metas)]
    done = []
    with contextlib.ExitStack() as stack:
        if workers > 1:
            import multiprocessing

            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
            clips = pool.imap(_encoded_clip, jobs, chunksize=16)
        else:
            clips = map(_encoded_clip, jobs)
        for i, (m, (data, frames)) in enumerate(zip(metas, clips)):
            storage.write_bytes(storage.join(out, "videos", m.file), data)
            done.append(ClipMeta(m.video_id, m.file, m.color, m.shape, m.direction, frames / spec.fps))
            if (i + 1) % 500 == 0:
                log(f"synth: {i + 1}/{n} clips")
    metas = done
    splits = {"train": metas[: n - n_val], "val": metas[n - n_val:]}
    def ann(name):
        return storage.join(out, "annotations", name)
    for split, ms in splits.items():
        storage.write_text(ann(f"youku_pretrain_{split}.csv"),
                           _csv([[m.file, m.caption] for m in ms], ["video_id:FILE", "title"]))
        storage.write_text(ann(f"youku_classification_{split}.csv"),
                           _csv([[m.file, m.caption, m.direction] for m in ms], ["video_id:FILE", "title", "label"]))
        storage.write_text(ann(f"youku_retrieval_{split}.csv"),
                           _csv([[m.file, m.caption] for m in ms], ["clip_name:FILE", "caption"]))
        golden = [[m.file, m.caption if split == "train" else json.dumps([m.caption, f"the {m.shape} goes {m.direction}"])]
                  for m in ms]
        storage.write_text(ann(f"youku_captioning_{split}.csv"), _csv(golden, ["video_id:FILE", "golden_caption"]))
        storage.write_text(ann(f"msrvtt_{split}.jsonl"), _jsonl(
            [{"video": m.file, "caption": m.caption, "duration": m.duration} for m in ms]))
        qa = []
        for m in ms:
            for q, a in _questions(m, rng)[: (3 if split == "train" else 1)]:
                qa.append({"video_id": m.video_id, "video": m.file, "question": q, "answer": a})
        storage.write_text(ann(f"msrvtt_qa_{split}.jsonl"), _jsonl(qa))
    for split, k in (("train", max(64, n)), ("dev", max(32, n // 4))):
        rows = _sst2_rows(k, rng)
        storage.write_text(ann(f"sst2_{split}.tsv"), "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
    if with_tokenizer:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            build_wordpiece_tokenizer(all_texts(metas), tmp)
            storage.upload_dir(tmp, storage.join(out, "tokenizer"))
    manifest = {
        "n": n, "seed": seed, "train": len(splits["train"]), "val": len(splits["val"]),
        "clip": asdict(spec), "colors": list(COLORS), "shapes": list(SHAPES), "directions": list(DIRECTIONS),
    }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2))
    log(f"synth: wrote {n} clips ({manifest['train']} train / {manifest['val']} val) to {out}")
    return manifest
