import torch

from model import MPlug2

from .conftest import tiny


def _moving_square(direction: int, b: int = 4, t: int = 4, size: int = 32) -> torch.Tensor:
    """[B, T, 3, H, W]: a bright square moving right (+1) or left (-1)."""
    x = torch.full((b, t, 3, size, size), -1.0)
    for i in range(b):
        y = 4 + 5 * i
        for f in range(t):
            col = 4 + 6 * f if direction > 0 else 4 + 6 * (t - 1 - f)
            x[i, f, :, y:y + 6, col:col + 6] = 1.0
    return x


def test_fresh_lt_is_identity():
    m = MPlug2(tiny(), "classification").eval()
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        vid = m.encode_vision(clip).frame_hidden                        # [B, T, 1+N, C]
        per_frame = torch.stack([m.encode_vision(clip[:, i]).frame_hidden[:, 0] for i in range(4)], 1)
        rev = m.encode_vision(clip.flip(1)).pooled
    assert torch.allclose(vid, per_frame, atol=1e-6)
    assert torch.allclose(m.encode_vision(clip).pooled, rev, atol=1e-6)  # order not used yet


def test_after_training_time_is_used_and_images_ignore_lt():
    torch.manual_seed(0)
    m = MPlug2(tiny(num_labels=2), "classification")
    right, left = _moving_square(+1), _moving_square(-1)
    frames = torch.cat([right, left])                                   # [8, 4, 3, 32, 32]
    labels = torch.tensor([1] * 4 + [0] * 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(5):
        logits = m.classify(m.universal(vision=m.encode_vision(frames)).vision_tokens[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fwd = m.encode_vision(right).frame_hidden                       # [B, T, 1+N, C]
        rev = m.encode_vision(right.flip(1)).frame_hidden.flip(1)       # same frames, back in order
        print("max |fwd - rev|", (fwd - rev).abs().max().item())
        assert (fwd - rev).abs().max() > 1e-2                           # reversing time changes features
        img_before = m.encode_vision(image).tokens
        for blk in m.vision.blocks:                                     # scramble every LT module
            for p in list(blk.lt_attn.parameters()) + list(blk.lt_ffn.parameters()):
                p.add_(torch.randn_like(p))
        assert torch.equal(m.encode_vision(image).tokens, img_before)   # images bypass LT
        assert not torch.allclose(m.encode_vision(right).frame_hidden, fwd)   # videos do not


def test_lt_groups_configurable():
    m = MPlug2(tiny(lt_groups=4), "captioning")
    conv = m.vision.blocks[0].lt_attn.conv
    assert conv.groups == 4 and conv.kernel_size == (3,)
    default = MPlug2(tiny(), "captioning").vision.blocks[0].lt_attn.conv
    assert default.groups == default.in_channels == 32                  # G = channels (depthwise)
