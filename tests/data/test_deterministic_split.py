"""``data.deterministic``: which clips each training worker gets, in which order, with which frames
and crops, is a function of the seed alone.  Two builds of a training dataset (seeded as one
epoch, as the train loop's are; streamed, or cached by ``materialize()`` as ``data.cache`` does)
are split for 2 workers by the trainer's ``DataConfig`` and read with the loop's seeded local
shuffle; every rank sees the same sample keys and the same pixels both times.  (The cached
datasets are seeded as epoch 0: ``test_cached_training_rows_are_seeded``.)"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import threading
import uuid

import pytest

from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.pipeline import SAMPLE_KEY, build_dataset, iter_worker_batches, process_params
from orchestrator.data.process import _rng
from orchestrator.runtime.ray_train import sharded_data_config

pytestmark = pytest.mark.slow

SRC = SourceConfig(format="youku_retrieval", train=["annotations/youku_retrieval_train.csv"],
                   val=["annotations/youku_retrieval_val.csv"])
WORKERS = 2


def _pass(cfg: DataConfig, cached: bool) -> list[list[tuple[int, str]]]:
    """(sample key, frames digest) per row, in the order each rank reads them."""
    run = f"det-{uuid.uuid4().hex[:8]}"
    # frames sampled by 'rand' and a random crop: both drawn from the seeded per-clip generator
    ds = build_dataset(cfg, "train", training=True, columns=("frames", SAMPLE_KEY), seed=7, run_name=run, epoch=3)
    if cached:  # decoded in the driver's Ray Data execution, before any split
        ds = ds.materialize()
    splits = sharded_data_config(deterministic=True).configure({"train": ds}, WORKERS, None, None)
    out: list[list[tuple[int, str]]] = [[] for _ in range(WORKERS)]

    def read(rank: int) -> None:
        for batch in iter_worker_batches(splits[rank]["train"], 3, "cpu", 1, drop_last=True,
                                         local_shuffle_buffer_size=8, local_shuffle_seed=1000 + rank):
            for key, frames in zip(batch[SAMPLE_KEY].tolist(), batch["frames"]):
                out[rank].append((int(key), hashlib.sha1(frames.numpy().tobytes()).hexdigest()))

    threads = [threading.Thread(target=read, args=(r,)) for r in range(WORKERS)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    return out


@pytest.mark.parametrize("cached", [False, True], ids=["streamed", "cached"])
def test_two_runs_give_each_rank_the_same_clips_order_and_pixels(ray_local, synth_data, cached):
    cfg = DataConfig(root=synth_data, sources=[SRC], num_frames=2, image_size=16, sampling="rand",
                     scale_min=0.3, decode_batch_size=2, decode_cpus=0.5, deterministic=True)
    first, second = _pass(cfg, cached), _pass(cfg, cached)
    keys = [k for rank in first for k, _ in rank]
    assert len(keys) == len(set(keys)) >= 12 and all(first)  # both ranks read, no row twice
    assert abs(len(first[0]) - len(first[1])) <= 3  # equal shards (full batches of 3)
    assert first == second


def test_cached_training_rows_are_seeded():
    """The train loop's cached datasets are decoded once with ``epoch=0``: the crops and frames drawn
    for a clip are then the same in every run; a training pass with no epoch draws afresh."""
    params = process_params(DataConfig(root="unused", num_frames=2, image_size=16), training=True,
                            columns=("frames",), seed=5, run_name=None)
    seeded = dataclasses.replace(params, epoch=0)
    draws = [_rng(seeded, "s3://b/clip.mp4|7").random(4).tolist() for _ in range(2)]
    assert draws[0] == draws[1] == _rng(params, "s3://b/clip.mp4|7", 0).random(4).tolist()
    fresh = [_rng(params, "s3://b/clip.mp4|7").random(4).tolist() for _ in range(2)]
    assert fresh[0] != fresh[1]


def test_the_same_dataset_under_another_root_gives_the_same_order_and_pixels(ray_local, synth_data, tmp_path):
    """Seeds use paths relative to data.root: a fresh clone, or a copy in another bucket, draws the
    same shuffle windows, frames and crops (before, they were seeded by the absolute path, and two
    demos in two folders trained on different batches from the first step)."""
    moved = tmp_path / "elsewhere" / "synth"
    shutil.copytree(synth_data, moved)
    cfgs = [DataConfig(root=root, sources=[SRC], num_frames=2, image_size=16, sampling="rand", scale_min=0.3,
                       decode_batch_size=2, decode_cpus=0.5, deterministic=True) for root in (synth_data, str(moved))]
    here, there = (_pass(cfg, cached=False) for cfg in cfgs)
    assert all(here) and [[d for _, d in rank] for rank in here] == [[d for _, d in rank] for rank in there]
