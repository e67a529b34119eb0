import pytest
import torch

from model import TASKS, MPlug2, MPlugConfig
from model.preprocess import normalize_frames

from .conftest import batch, tiny


def test_unknown_override_names_key_and_accepted():
    with pytest.raises(ValueError, match="bogus.*accepted.*vocab_size"):
        MPlugConfig.from_preset("tiny", bogus=1)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        MPlugConfig.from_preset("huge")
    with pytest.raises(ValueError, match="lt_groups"):
        MPlugConfig.from_preset("tiny", lt_groups=5)


def test_presets_carry_what_the_system_needs():
    for name in ("tiny", "base", "large"):
        c = MPlugConfig.from_preset(name)
        assert c.universal_layers == 2 and c.momentum == 0.995 and c.mlm_prob == 0.15
    assert MPlugConfig.from_preset("tiny", vocab_size=123).vocab_size == 123
    base, large = MPlugConfig.from_preset("base"), MPlugConfig.from_preset("large")
    assert (base.patch_size, base.vision_width, base.text_width, base.fusion_layers) == (16, 768, 768, 3)
    assert (large.patch_size, large.vision_width, large.text_layers, large.fusion_layers) == (14, 1024, 24, 6)
    assert base.decoder_layers == large.decoder_layers == 12 and base.queue_size == 65536


def test_large_is_about_0_9b_parameters():
    with torch.device("meta"):
        m = MPlug2(MPlugConfig.from_preset("large"), "pretrain")
    counts = m.param_counts()
    online = sum(v for k, v in counts.items() if k != "momentum")
    assert 0.85e9 < online < 1.1e9, online


def test_unknown_task_and_missing_module_errors():
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        MPlug2(tiny(), "vqa")
    m = MPlug2(tiny(), "glue")
    assert m.vision is None and m.decoder is None and m.fusion is None
    with pytest.raises(ValueError, match="encode_vision needs the 'vision' module.*task 'glue'"):
        m.encode_vision(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shapes_for_every_task(task):
    cfg = tiny()
    m = MPlug2(cfg, task)
    built = {n for n, mod in m.named_children() if mod is not None}
    expect = {("universal_layers" if x == "universal" else x) for x in TASKS[task]}
    assert built == expect
    frames, ids, mask = batch()
    b, t, n = 2, 4, cfg.num_patches
    mods = TASKS[task]
    u = m(frames=frames if "vision" in mods else None, text_ids=ids if "text" in mods else None, text_mask=mask)
    if "vision" in mods:
        assert u.vision_tokens.shape == (b, 1 + t * n, cfg.text_width)
        assert u.vision_queries.shape == (b, cfg.num_queries, cfg.text_width)
        img = m.universal(vision=m.encode_vision(frames[:, 0]))       # image: [B, 3, H, W]
        assert img.vision_tokens.shape == (b, 1 + n, cfg.text_width)
    if "text" in mods:
        assert u.text_hidden.shape == (b, ids.shape[1], cfg.text_width)
    if "contrastive" in mods:
        e = m.vision_embed(u.vision_tokens)
        assert e.shape == (b, cfg.embed_dim) and torch.allclose(e.norm(dim=-1), torch.ones(b), atol=1e-5)
        assert m.text_embed(u.text_hidden).shape == (b, cfg.embed_dim)
    if "matching" in mods:
        assert m.itm_logits(u.text_hidden, u.text_mask, u.vision_tokens).shape == (b, 2)
    if "fusion" in mods and "text" in mods:
        f = m.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
        assert f.hidden.shape == (b, ids.shape[1], cfg.text_width)
    if "decoder" in mods:
        d = m.decode(ids, mask, u.vision_tokens, labels=ids)
        assert d.logits.shape == (b, ids.shape[1], cfg.vocab_size) and d.loss.ndim == 0
    if "mlm" in mods:
        assert m.mlm_logits(u.text_hidden).shape == (b, ids.shape[1], cfg.vocab_size)
    if "classifier" in mods:
        feats = u.text_hidden[:, 0] if task == "glue" else u.vision_tokens[:, 0]
        assert m.classify(feats).shape == (b, cfg.num_labels)


def test_normalize_frames_layout_and_values():
    x = torch.zeros(2, 3, 8, 6, 3, dtype=torch.uint8)
    x[..., 0] = 255
    y = normalize_frames(x)
    assert y.shape == (2, 3, 3, 8, 6) and y.dtype == torch.float32
    assert torch.allclose(y[:, :, 0], torch.full_like(y[:, :, 0], (1 - 0.48145466) / 0.26862954))
    assert normalize_frames(x[:, 0]).shape == (2, 1, 3, 8, 6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(x.float())


def test_wrong_frame_size_is_a_clear_error():
    m = MPlug2(tiny(), "captioning")
    with pytest.raises(ValueError, match="image_size=32"):
        m.encode_vision(torch.zeros(1, 2, 3, 48, 48))


def test_tiny_forward_backward_is_fast():
    import time
    m = MPlug2(tiny(), "pretrain")
    frames, ids, mask = batch()
    for _ in range(2):
        t0 = time.perf_counter()
        u = m(frames=frames, text_ids=ids, text_mask=mask)
        f = m.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
        loss = m.decode(ids, mask, f.hidden, f.attention_mask, labels=ids).loss + m.vision_embed(u.vision_tokens).sum()
        loss.backward()
        dt = time.perf_counter() - t0
    assert dt < 2.0, dt  # well under a second on an idle core; slack for a shared machine


def test_sdpa_and_plain_attention_agree_and_checkpointing_matches():
    frames, ids, mask = batch()
    torch.manual_seed(1)
    a = MPlug2(tiny(), "videoqa").eval()
    b = MPlug2(tiny(attn_impl="plain"), "videoqa").eval()
    b.load_state_dict(a.state_dict())
    ua, ub = a(frames=frames, text_ids=ids, text_mask=mask), b(frames=frames, text_ids=ids, text_mask=mask)
    assert torch.allclose(ua.vision_tokens, ub.vision_tokens, atol=1e-5)
    assert torch.allclose(ua.text_hidden, ub.text_hidden, atol=1e-5)
    c = MPlug2(tiny(grad_checkpointing=True), "videoqa").train()
    c.load_state_dict(a.state_dict())
    a.train()
    la = a.decode(ids, mask, a(frames=frames, text_ids=ids, text_mask=mask).vision_tokens, labels=ids).loss
    lc = c.decode(ids, mask, c(frames=frames, text_ids=ids, text_mask=mask).vision_tokens, labels=ids).loss
    la.backward(), lc.backward()
    ga, gc = a.vision.blocks[0].fc1.weight.grad, c.vision.blocks[0].fc1.weight.grad
    assert torch.allclose(la, lc) and torch.allclose(ga, gc, atol=1e-6)


def test_bf16_forward_is_finite():
    m = MPlug2(tiny(), "videoqa").to(torch.bfloat16)
    frames, ids, mask = batch()
    u = m(frames=frames.bfloat16(), text_ids=ids, text_mask=mask)
    f = m.fuse(u.text_hidden, u.text_mask, u.vision_tokens)
    d = m.decode(ids, mask, f.hidden, f.attention_mask, labels=ids)
    assert d.logits.dtype == torch.bfloat16 and torch.isfinite(d.loss)
