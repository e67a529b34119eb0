"""Learning is proven, not assumed: a short training of the real model on real decoded clips must
learn the direction a shape moves, which only frame order shows.

``orchestrator.devtools.learning_probe.direction_probe`` encodes synthetic H.264 clips, decodes them
through the data plane's batch function and collate (sampling, decord, transforms), trains the tiny
``classification`` workload for 400 steps and scores held-out clips two ways: through the data
plane's evaluation path, and decoded whole and in order apart from it (the ground truth).  An
order-blind model cannot pass 50% (the motion's axis); frames reversed or shuffled anywhere in the
data path, or the local temporal module off, fail the test (``benchmarks/learning_faults.py`` injects
each and prints the figures).  About 40 CPU-seconds on one thread.
"""
from __future__ import annotations

import pytest
import torch

from orchestrator.devtools.learning_probe import ProbeConfig, direction_probe

PASS = 85.0  # % direction accuracy on the 48 held-out clips (chance 25, order-blind at most 50)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is as fast on one thread, and leaves the other core alone
    yield
    torch.set_num_threads(n)


def test_the_model_learns_motion_from_frames_in_order(one_thread):
    r = direction_probe(ProbeConfig(seed=0))
    assert r["truth"] >= PASS and r["data_plane"] >= PASS, r
