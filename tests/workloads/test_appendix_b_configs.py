"""The shipped _base / _large configs carry the paper's Appendix B schedules (and the reference's
generation settings)."""
import math
from pathlib import Path

import pytest

from orchestrator.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "workloads" / "configs"


def _global_batch(c):
    return c.train.batch_size_per_worker * c.train.num_workers * c.train.grad_accum_steps


@pytest.mark.parametrize("name", ["retrieval_base", "retrieval_large"])
def test_retrieval_is_10_epochs_at_batch_192_and_lr_2e5(name):
    c = load_config(CONFIGS / f"{name}.yaml")
    assert _global_batch(c) == 192 and c.train.lr == 2e-5
    assert c.train.steps_per_epoch == math.ceil(180_000 / 192)            # MSR-VTT 9k pairs
    assert c.train.max_steps == 10 * c.train.steps_per_epoch


@pytest.mark.parametrize("name,batch", [("pretrain_base", 1024), ("pretrain_large", 512)])
def test_pretraining_is_30_epochs_over_the_mixed_corpus(name, batch):
    c = load_config(CONFIGS / f"{name}.yaml")
    assert _global_batch(c) == batch
    assert c.train.max_steps == math.ceil(30 * 17_636_000 / batch)
    assert c.train.steps_per_epoch == math.ceil(17_636_000 / batch)
    formats = [s.format for s in c.data.sources]
    assert "webvid_wds" in formats and "coco_captions" in formats and formats.count("cc3m_wds") == 4


def test_generation_settings_are_the_reference_ones():
    from workloads import captioning, videoqa
    cap, qa = captioning.Config(), videoqa.Config()
    assert (cap.num_beams, cap.max_length, cap.min_length, cap.length_penalty) == (5, 25, 4, 0.6)
    assert (qa.num_beams, qa.max_length, qa.min_length, qa.length_penalty) == (5, 10, 1, 0.6)
    for name in ("captioning_base", "videoqa_base", "classification_base", "glue_base"):
        assert load_config(CONFIGS / f"{name}.yaml").train.steps_per_epoch is None
