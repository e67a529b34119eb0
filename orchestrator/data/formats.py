"""The annotation formats by name and the modality of their rows: the one list that the config
validates ``data.sources[].format`` against, that the source registry (``sources/__init__.py``)
implements, and that the driver and the pipeline split the video epoch from the mixed-in image and
text streams by.  Imports nothing heavy, so the config layer can use it."""
from __future__ import annotations

from typing import Literal

Modality = Literal["video", "image", "text"]

GLUE_TASKS = ("sst2", "rte", "mrpc", "qqp", "mnli", "qnli")

FORMATS: dict[str, Modality] = {
    "youku_pretrain": "video",
    "youku_classification": "video",
    "youku_retrieval": "video",
    "youku_captioning": "video",
    "webvid_csv": "video",
    "webvid_wds": "video",
    "msrvtt": "video",
    "msrvtt_qa": "video",
    "cc3m_wds": "image",
    "coco_captions": "image",
    "internvid": "video",
    **{f"glue_{t}": "text" for t in GLUE_TASKS},
    "wds": "video",  # shards written by `python -m orchestrator shard`; their rows say their modality
}

IMAGE_FORMATS = tuple(f for f, m in FORMATS.items() if m == "image")
TEXT_FORMATS = tuple(f for f, m in FORMATS.items() if m == "text")
