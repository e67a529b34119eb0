"""What a run reads, described for lineage (MLflow dataset inputs): per source and split, the
annotation files or shards it names and, where the data plane counted them, the rows."""
from __future__ import annotations

from typing import Any

from orchestrator.data.config import DataConfig
from orchestrator.data.sources import is_sharded, split_files, wds


def describe_sources(data_cfg: DataConfig, splits: tuple[str, ...] = ("train",),
                     rows: dict[tuple[str, str], int] | None = None) -> list[dict[str, Any]]:
    """``[{"format", "split", "files", "rows", "context"}]``; ``rows`` maps (format, split) to the
    count the data plane parsed. A source that lists no files for a split is left out."""
    out = []
    for split in splits:
        for src in data_cfg.sources:
            files = src.train if split == "train" else src.val
            if not files:
                continue
            uris = split_files(src, data_cfg.root, split)
            if is_sharded(src.format):
                uris = [s for u in uris for s in wds.list_shards(u)]
            out.append({"format": src.format, "split": split, "files": uris,
                        "rows": (rows or {}).get((src.format, split)),
                        "context": "training" if split == "train" else "evaluation"})
    return out
