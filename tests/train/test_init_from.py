"""``--init-from`` never drops weights silently (issue 12, item 7): shape mismatches are an error
unless allowed by ``train.init_allow_mismatch``; ViT position embeddings of another image size are
interpolated bicubically; the tokenizer's vocabulary is checked against the one recorded with an
export; momentum copies missing from an export start equal to their online encoders."""
from __future__ import annotations

import pytest
import torch

from model import MPlug2, MPlugConfig
from orchestrator.config import ConfigError, load_config
from orchestrator.train import weights

POS = "vision.position_embedding.weight"


def _model(task="retrieval", seed=0, **over):
    torch.manual_seed(seed)
    return MPlug2(MPlugConfig.from_preset("tiny", **over), task=task)


class Vocab:
    def __init__(self, tokens):
        self._v = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self._v)


@pytest.fixture
def export(tmp_path):
    src = _model(seed=1)
    out = tmp_path / "export"
    src.save_pretrained(str(out))
    return src, str(out)


def test_position_embeddings_are_interpolated_for_another_image_size(export):
    src, uri = export
    dst = _model(seed=2, image_size=48)  # 32 px / 8 = 4x4 patches -> 48 px = 6x6
    old = src.state_dict()[POS]
    assert dst.state_dict()[POS].shape == (1 + 36, old.shape[1])
    report = weights.load_weights(dst, uri)
    new = dst.state_dict()[POS]
    assert POS in report["interpolated"] and f"momentum.encoders.{POS}" in report["interpolated"]
    assert report["shape_mismatch"] == [] and POS not in report["missing"]
    assert torch.equal(new[0], old[0])  # [CLS] kept
    grid = old[1:].reshape(4, 4, -1)
    # bicubic resize of the 4x4 grid: corners of the 6x6 grid come from the corners' neighbourhood,
    # and the mean over the grid is kept (a fresh init would match neither)
    resized = new[1:].reshape(6, 6, -1)
    assert torch.allclose(resized.mean((0, 1)), grid.mean((0, 1)), atol=0.1 * grid.std().item())
    ref = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(6, 6), mode="bicubic",
                                          align_corners=False)[0].permute(1, 2, 0)
    assert torch.allclose(resized, ref, atol=1e-6)
    # everything else loaded as is
    assert torch.equal(dst.state_dict()["vision.patch_embed.weight"], src.state_dict()["vision.patch_embed.weight"])


def test_interpolation_keeps_a_smooth_field_smooth():
    """A position embedding that is a linear ramp over the grid stays (nearly) the same ramp."""
    g, c = 4, 3
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, g), torch.linspace(-1, 1, g), indexing="ij")
    pos = torch.cat([torch.zeros(1, c), torch.stack([xs, ys, xs + ys], -1).reshape(g * g, c)])
    out = weights.interpolate_pos_embed(pos, 1 + 8 * 8)
    assert out.shape == (65, 3)
    field = out[1:].reshape(8, 8, c)
    assert (field[:, 1:, 0] - field[:, :-1, 0]).min() > 0  # still increasing along x
    assert (field[1:, :, 1] - field[:-1, :, 1]).min() > 0  # and along y
    assert weights.interpolate_pos_embed(pos, 11) is None  # 10 patches: no square grid


def test_shape_mismatch_is_an_error_listing_both_shapes(export):
    _, uri = export
    dst = _model(vocab_size=2100)
    with pytest.raises(weights.InitMismatch) as e:
        weights.load_weights(dst, uri)
    msg = str(e.value)
    assert "text.embeddings.word.weight" in msg and "(2000, 64)" in msg and "(2100, 64)" in msg
    assert "train.init_allow_mismatch" in msg


def test_allowed_mismatches_start_fresh_and_are_reported(export):
    src, uri = export
    dst = _model(vocab_size=2100)
    fresh = dst.state_dict()["text.embeddings.word.weight"].clone()
    report = weights.load_weights(dst, uri, allow_mismatch=["*embeddings.word.*", "mlm.*", "momentum.*word*"])
    assert "text.embeddings.word.weight" in report["shape_mismatch"]
    assert torch.equal(dst.state_dict()["text.embeddings.word.weight"], fresh)
    assert torch.equal(dst.state_dict()["text.embeddings.position.weight"],
                       src.state_dict()["text.embeddings.position.weight"])


def test_allow_mismatch_is_validated():
    with pytest.raises(ConfigError, match="init_allow_mismatch"):
        load_config(None, ["train.init_allow_mismatch=['*']"])
    with pytest.raises(ConfigError, match="init_allow_mismatch"):
        load_config(None, ["train.init_allow_mismatch=['']"])
    cfg = load_config(None, ["train.init_allow_mismatch=['classifier.*']"])
    assert cfg.train.init_allow_mismatch == ["classifier.*"] and cfg.train.init_allow_new_vocab is False


def test_another_vocabulary_of_the_same_size_is_an_error(export):
    src, uri = export
    english = [f"tok{i}" for i in range(2000)]
    chinese = english[:1000] + [chr(0x4E00 + i) for i in range(1000)]
    weights.write_vocab(Vocab(english), uri)
    dst = _model()
    weights.load_weights(_model(), uri, tokenizer=Vocab(english))  # the same vocabulary: fine
    with pytest.raises(weights.InitMismatch, match="another vocabulary") as e:
        weights.load_weights(dst, uri, tokenizer=Vocab(chinese))
    assert "1000 ids differ" in str(e.value) and "tok1000" in str(e.value)
    weights.load_weights(dst, uri, tokenizer=Vocab(chinese), allow_new_vocab=True)


def test_missing_momentum_copies_take_the_online_weights(tmp_path):
    """An export without momentum encoders (a classification fine-tune) into a retrieval model."""
    src = _model(task="classification", seed=3)
    src.save_pretrained(str(tmp_path / "cls"))
    dst = _model(task="retrieval", seed=4)
    report = weights.load_weights(dst, str(tmp_path / "cls"))
    sd = dst.state_dict()
    mom = [k for k in sd if k.startswith("momentum.encoders.")]
    assert mom and set(mom) <= set(report["momentum_copied"])
    assert not any(k.startswith("momentum.encoders.") for k in report["missing"])
    for k in mom:
        assert torch.equal(sd[k], sd[k[len("momentum.encoders."):]]), k
    assert torch.equal(sd["vision.patch_embed.weight"], src.state_dict()["vision.patch_embed.weight"])


def test_momentum_copies_in_the_checkpoint_are_kept(export):
    src, uri = export
    with torch.no_grad():
        for k, v in src.state_dict().items():
            if k.startswith("momentum.encoders."):
                v.add_(1.0)
    src.save_pretrained(uri)
    dst = _model(seed=5)
    report = weights.load_weights(dst, uri)
    assert report.get("momentum_copied", []) == []
    k = "momentum.encoders.vision.patch_embed.weight"
    assert torch.equal(dst.state_dict()[k], src.state_dict()[k])
