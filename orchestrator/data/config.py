"""Typed configuration of the data plane (sources, decoding, tokenization, bad-input policy)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.data.formats import FORMATS


@dataclass(frozen=True)
class Caps:
    """Bounds on reading untrusted input (``data.max_annotation_bytes`` / ``data.max_object_bytes`` /
    ``data.read_timeout_s``); None = unbounded."""

    annotation_bytes: int | None = None
    object_bytes: int | None = None
    read_timeout_s: float | None = None  # one object's read, whole (data.read_timeout_s)


Sampling = Literal["rand", "middle", "uniform", "headtail", "keyframe"]


class SourceConfig(BaseModel):
    """One dataset: its annotation format, where its annotation files and media live, its weight."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field("msrvtt", description="source adapter name, see orchestrator.data.formats.FORMATS")
    # Annotation file(s): absolute URIs, or paths relative to data.root.  For the webdataset formats
    # (webvid_wds, cc3m_wds, wds) these are tar shards or folders/prefixes holding *.tar shards.
    train: list[str] = Field(default_factory=lambda: ["annotations/msrvtt_train.jsonl"])
    val: list[str] = Field(default_factory=lambda: ["annotations/msrvtt_val.jsonl"])
    # Where the media referenced by the annotations live (relative to data.root, or a URI).
    media: str = "videos"
    weight: float = Field(1.0, gt=0, description="sampling weight when several sources are mixed")
    # Classification label vocabulary: "youku" = the 45 built-in Youku-mPLUG categories; "train" =
    # the sorted distinct labels of the training split; "auto" = youku when every training label is
    # a Youku category, else train; or an explicit list of names (id = position).
    labels: Literal["auto", "youku", "train"] | list[str] = "auto"

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown source format {v!r}; accepted: {', '.join(sorted(FORMATS))}")
        return v


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("./demo_output/synth", description="dataset root URI (local path or s3://bucket/prefix)")
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig()])
    num_frames: int = Field(4, ge=1, le=128)
    sampling: Sampling = "rand"
    eval_sampling: Sampling = "middle"
    image_size: int = Field(224, ge=16, le=1024)
    scale_min: float = Field(0.5, gt=0, le=1, description="random resized crop: smallest area fraction")
    eval_transform: Literal["resize", "center_crop"] = Field(
        "resize", description="evaluation frames: the whole frame resized to image_size x image_size (the "
        "reference and the paper), or the shorter side resized and the centre square kept")
    hflip: bool = Field(True, description="random horizontal flip in training augmentation")
    tokenizer: str | None = Field(None, description="HF tokenizer dir, s3:// dir or hub name; None = <root>/tokenizer")
    max_text_len: int = Field(40, ge=4, le=512)
    max_answer_len: int = Field(16, ge=2, le=512, description="padded length of answer_ids (QA, captioning)")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="stop the job past this fraction of bad clips")
    bad_check_min_seen: int = Field(50, ge=1, description="clips seen before the bad fraction can stop a job")
    min_frames: int = Field(2, ge=1, description="a video with fewer decodable frames is bad (too_few_frames)")
    max_resolution: int = Field(8192, ge=64, description="a side longer than this is bad (bad_resolution)")
    min_resolution: int = Field(8, ge=1, description="a side shorter than this is bad (bad_resolution)")
    max_annotation_bytes: int = Field(4 * 2**30, ge=1, description="an annotation file larger than this is an "
                                      "error (a Ray task reads it whole: split larger files)")
    max_object_bytes: int = Field(2**30, ge=1, description="a clip/image object or shard member larger than "
                                  "this is a bad clip (too_large), never read whole")
    decode_timeout_s: float = Field(60.0, gt=0, description="a clip that takes longer to decode is bad (undecodable)")
    read_timeout_s: float = Field(300.0, gt=0, description="a clip/image whose bytes take longer to read is bad "
                                  "(read_error); S3 requests also time out and are retried inside it")
    allowed_media_prefixes: list[str] = Field(default_factory=list, description="folders or s3:// prefixes "
                                              "(relative to data.root, or URIs) that annotation rows may name media "
                                              "in besides their source's media folder; a row naming anything else "
                                              "is malformed")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each decode task")
    decode_concurrency: int | None = Field(None, ge=1, description="decode tasks at once (None = Ray decides)")
    decode_batch_size: int = Field(8, ge=1)
    prefetch_batches: int = Field(2, ge=0)
    next_epoch_batches: int = Field(16, ge=0, description="training batches each worker holds back at a pass's end: "
                                   "once its shard of the pass is read, the next pass starts decoding while these "
                                   "train, so an epoch does not open with Ray Data's start-up (benchmarks/train_throughput.py "
                                   "prints each pass's first-batch wait); they are held in memory (0 = each pass "
                                   "starts when the last ends)")
    cache: bool = Field(False, description="decode once and keep the decoded rows in Ray's object store for "
                        "every epoch (small datasets: frame sampling and augmentation are then drawn once per clip)")
    cache_frames: int | None = Field(None, ge=1, le=512, description="with cache: keep this many frames of each "
                                     "training clip, evenly spaced (its crop drawn once), and draw num_frames of them "
                                     "afresh every pass (data.sampling, seeded by seed, pass and row); costs "
                                     "cache_frames / num_frames times the memory. None: the num_frames drawn once")
    deterministic: bool = Field(False, description="deal the training rows to the workers in a fixed order "
                                "(Ray Data preserve_order, no locality): two runs with the same seed give each "
                                "worker the same clips in the same order, with the same frames and crops; costs "
                                "some throughput (a slow decode task holds back the ones after it)")
    shuffle_buffer: int = Field(0, ge=0, description="rows in each worker's local shuffle buffer (0 = off)")
    group_pattern: str | None = Field(None, description="a regular expression: training rows whose text gives the "
                                      "same match (its first group if it has one) form a group, and each training "
                                      "batch holds whole groups of group_size rows with different texts: hard "
                                      "negatives side by side (orchestrator/data/grouping.py); None = off")
    group_size: int = Field(4, ge=2, description="rows of one group side by side in a batch (data.group_pattern); "
                            "must divide train.batch_size_per_worker")
    group_buffer: int = Field(256, ge=1, description="rows each worker buffers to find whole groups in")
    limit: int | None = Field(None, ge=1, description="use only the first N rows of each split (debugging)")
    decoder: Literal["decord", "pyav"] = Field(
        "decord", description="video decoder: the same frames either way (data/video.py); pyav reads the header "
                              "as it opens (no separate probe) and converts only the wanted frames, so it costs less "
                              "CPU per clip (docs/benchmarks.md, feeding the trainer at the cores' limit)")
    decode_short_side: int | None = Field(None, ge=0, description="decode sources whose short side is over 2x "
                                          "this straight to it (None = from image_size and scale_min; 0 = never)")
    keyframe_jitter: int = Field(2, ge=0, le=64, description="sampling 'keyframe': frames past the keyframe, at most")
    decode_actors: bool = Field(False, description="decode in an actor pool (decode_concurrency or 1..CPUs "
                                "actors) instead of a task per batch; the pool starts afresh each epoch, so it only "
                                "pays on long epochs (benchmarks/data_throughput.py measures both)")

    @model_validator(mode="after")
    def _cache_frames(self) -> "DataConfig":
        if self.cache_frames is not None and not self.cache:
            raise ValueError(f"cache_frames={self.cache_frames} keeps frames of the cached clips: set cache=true too")
        if self.cache_frames is not None and self.cache_frames < self.num_frames:
            raise ValueError(f"cache_frames={self.cache_frames} must be at least num_frames={self.num_frames}: each "
                             "pass draws num_frames of the cached frames")
        return self

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e}); e.g. '^a (\\w+ \\w+) moves' groups the "
                                 "synthetic captions by colour and shape") from None
        return v

    def caps(self):
        """The size caps the source readers apply."""
        return Caps(annotation_bytes=self.max_annotation_bytes, object_bytes=self.max_object_bytes,
                    read_timeout_s=self.read_timeout_s)
