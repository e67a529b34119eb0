"""The data streams of a run: their names, and which sources and columns form each.

A training run hands Ray Train one dataset per stream
(:func:`orchestrator.data.pipeline.build_stream_datasets`):

- :data:`TRAIN` (``"train"``): the epoch; the video sources, or the image sources of an image-only run;
- :data:`TRAIN_IMAGE` (``"train_image"``): the image sources of a video run, kept one frame (T = 1:
  no temporal module, the image instruction), mixed in per step;
- :data:`TRAIN_TEXT` (``"train_text"``): text-only corpora (pre-training's MLM), mixed in per step;
- :data:`VAL` (``"val"``): the dev split, evaluated on the workers (validation during training and
  the ``evaluate`` verb), cut into uneven shards that hold every row once.

A mixed-in stream's share of the micro-batches is its sources' weight over all sources' weight
(:func:`orchestrator.data.mix.stream_fractions`).  Pure Python: no Ray, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.data.config import SourceConfig
from orchestrator.data.formats import IMAGE_FORMATS, TEXT_FORMATS

TRAIN = "train"
TRAIN_IMAGE = "train_image"
TRAIN_TEXT = "train_text"
VAL = "val"
MIXED = {TRAIN_TEXT: TEXT_FORMATS, TRAIN_IMAGE: IMAGE_FORMATS}  # the mixed-in streams and their formats
TEXT_COLUMNS = ("text_ids", "text_mask")                       # all a text-only stream carries


@dataclass(frozen=True)
class Stream:
    name: str
    sources: tuple[SourceConfig, ...]
    columns: tuple[str, ...]


def plan_streams(sources: list[SourceConfig], columns: tuple[str, ...]) -> list[Stream]:
    """The training streams of a run with these sources and a workload needing ``columns``: the
    epoch's :data:`TRAIN` first, then the mixed-in ones it has.  A workload without frames reads
    every source in :data:`TRAIN`; so does a run of text sources only (the pipeline explains why
    that cannot train a video workload)."""
    if "frames" not in columns:
        return [Stream(TRAIN, tuple(sources), columns)]
    text = tuple(s for s in sources if s.format in TEXT_FORMATS)
    image = tuple(s for s in sources if s.format in IMAGE_FORMATS)
    video = tuple(s for s in sources if s.format not in TEXT_FORMATS and s.format not in IMAGE_FORMATS)
    if not video and not image:
        return [Stream(TRAIN, tuple(sources), columns)]
    streams = [Stream(TRAIN, video or image, columns)]
    if video and image:
        streams.append(Stream(TRAIN_IMAGE, image, columns))
    if text:
        streams.append(Stream(TRAIN_TEXT, text, tuple(c for c in columns if c in TEXT_COLUMNS)))
    return streams
