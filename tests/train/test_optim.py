"""The optimizer's parameter groups and learning-rate schedule follow the reference (X-PLUG/mPLUG-2)."""
from pathlib import Path

import pytest
import torch

from model import MPlugConfig
from orchestrator.config import load_config
from orchestrator.train.config import TrainConfig
from orchestrator.train.optim import build_optimizer, lr_factor, param_groups
from workloads import pretrain

CONFIGS = Path(__file__).resolve().parents[2] / "workloads" / "configs"


def test_weight_decay_spares_biases_and_1d_parameters_only():
    """As the reference's create_optimizer (timm's rule): matrices decay, latent queries and position
    embeddings included; biases, LayerNorm gains, the class embedding and the temperature do not."""
    model = pretrain.build_model(MPlugConfig.from_preset("tiny"), pretrain.Config())
    groups = param_groups(model, TrainConfig(weight_decay=0.02))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("universal_layers.queries", "vision.position_embedding.weight", "text.embeddings.position.weight",
                 "vision.patch_embed.weight", "text.embeddings.word.weight", "decoder.embeddings.token_type.weight"):
        assert id(named[name]) in decayed, name
    for name in ("vision.class_embedding", "contrastive.temp", "vision.pre_ln.weight", "vision.pre_ln.bias",
                 "mlm.bias", "decoder.head_bias"):
        assert id(named[name]) not in decayed, name


def test_schedule_warms_up_from_a_start_lr_to_each_groups_lr_and_decays_to_an_absolute_floor():
    model = pretrain.build_model(MPlugConfig.from_preset("tiny"), pretrain.Config())
    tcfg = TrainConfig(lr=2e-5, vision_lr=2e-6, warmup_steps=200, warmup_start_lr=1e-6, min_lr=1e-6, max_steps=1000)
    opt, sched = build_optimizer(model, tcfg)
    lrs = {}
    for step in range(1000):
        if step in (0, 199, 200, 999):
            lrs[step] = {g["name"].split("_")[0]: g["lr"] for g in opt.param_groups}
        opt.step()
        sched.step()
    assert lrs[0]["main"] == pytest.approx(1e-6 + (2e-5 - 1e-6) / 200)
    assert lrs[0]["vision"] == pytest.approx(1e-6 + (2e-6 - 1e-6) / 200)
    assert lrs[199] == pytest.approx({"main": 2e-5, "vision": 2e-6})
    assert lrs[999]["main"] == pytest.approx(1e-6, rel=1e-3) and lrs[999]["vision"] == pytest.approx(1e-6, rel=1e-3)
    # defaults: from 0, down to min_lr_ratio of each group's lr
    plain = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, plain) == pytest.approx(0.1) and lr_factor(110, plain) == pytest.approx(0.1)
    assert lr_factor(0, plain, base_lr=1e-4) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["captioning_base", "captioning_large", "videoqa_base", "videoqa_large"])
def test_caption_and_qa_fine_tunes_use_the_references_optimizer(name):
    """--do_two_optim in the reference: vision (CLIP + LT) at lr / 10, betas (0.9, 0.999), a 200-step
    warm-up from 1e-6, cosine down to 1e-6."""
    t = load_config(CONFIGS / f"{name}.yaml").train
    assert (t.lr, t.vision_lr, tuple(t.betas)) == (2e-5, 2e-6, (0.9, 0.999))
    assert (t.warmup_steps, t.warmup_start_lr, t.min_lr) == (200, 1e-6, 1e-6)


def test_build_optimizer_runs_a_step():
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, TrainConfig(lr=0.1, warmup_steps=0, max_steps=4))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
