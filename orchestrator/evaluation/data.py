"""The evaluated split as a Ray dataset: the ``val`` sources (validation during training, the
``evaluate`` verb) or every source's ``train`` split, at most ``eval.max_samples`` rows, bad clips
counted under the pass's own tracker."""
from __future__ import annotations

import logging

from orchestrator.config import RunSpec
from orchestrator.data.formats import TEXT_FORMATS
from orchestrator.data.pipeline import build_dataset
from orchestrator.data.streams import VAL
from workloads.base import Workload

log = logging.getLogger(__name__)


def eval_sources(cfg: RunSpec, columns: tuple[str, ...]):
    """The sources with a ``val`` split (media sources only when the workload needs frames)."""
    return [s for s in cfg.data.sources if s.val and not ("frames" in columns and s.format in TEXT_FORMATS)]


def build_eval_dataset(cfg: RunSpec, columns: tuple[str, ...], split: str, tracker_name: str):
    """The evaluated split as a Ray dataset (``eval.max_samples`` rows at most), or None when no
    source has it.  Bad clips are counted under ``tracker_name``."""
    sources = eval_sources(cfg, columns) if split == VAL else list(cfg.data.sources)
    if not sources:
        return None
    data_cfg = cfg.data.model_copy(update={"sources": sources})
    ds = build_dataset(data_cfg, split, training=False, columns=columns, seed=cfg.seed, run_name=tracker_name)
    return ds.limit(cfg.eval.max_samples) if cfg.eval.max_samples else ds


def val_tracker(run_name: str) -> str:
    """The bad-clip tracker of a training run's validation passes (apart from the training clips')."""
    return f"{run_name}-val"


def validation_dataset(cfg: RunSpec, workload: Workload, run_name: str) -> dict:
    """``{"val": the dev split}`` for validation during training (every ``eval.every_steps`` steps
    and at the end, on the workers), or {} when no source has a val split or the workload has no
    evaluation."""
    if workload.evaluation is None:
        return {}
    ds = build_eval_dataset(cfg, workload.COLUMNS, VAL, val_tracker(run_name))
    if ds is None:
        log.warning("no data source has a val split: no validation during training")
        return {}
    return {VAL: ds}
