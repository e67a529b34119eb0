"""Universal layers against the reference code's vision path (X-PLUG/mPLUG-2 ``v_module``): the
latents run layers 1..S-1, the last layer swaps roles (visual tokens self-attend, cross-attend to the
latents, FFN) and the result is LN(V + out). The reference is rebuilt here from Hugging Face
``BertLayer``s (self-attention + cross-attention + FFN, all post-LN), sharing our weights."""
import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from model import MPlug2, MPlugConfig

from .conftest import batch, tiny


def _hf_layer(cfg, ours) -> BertLayer:
    hf_cfg = BertConfig(hidden_size=cfg.text_width, num_attention_heads=cfg.text_heads,
                        intermediate_size=cfg.text_intermediate, hidden_act=cfg.text_act,
                        layer_norm_eps=cfg.text_ln_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        is_decoder=True, add_cross_attention=True)
    hf = BertLayer(hf_cfg).eval()
    sh = ours.shared
    pairs = {
        hf.attention.self.query: sh.self_attn.q, hf.attention.self.key: sh.self_attn.k,
        hf.attention.self.value: sh.self_attn.v, hf.attention.output.dense: sh.self_attn.o,
        hf.attention.output.LayerNorm: sh.self_ln,
        hf.crossattention.self.query: ours.vision_cross.q, hf.crossattention.self.key: ours.vision_cross.k,
        hf.crossattention.self.value: ours.vision_cross.v, hf.crossattention.output.dense: ours.vision_cross.o,
        hf.crossattention.output.LayerNorm: ours.vision_cross_ln,
        hf.intermediate.dense: sh.fc1, hf.output.dense: sh.fc2, hf.output.LayerNorm: sh.ffn_ln,
    }
    with torch.no_grad():
        for dst, src in pairs.items():
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return hf


def _run(hf: BertLayer, x, other):
    out = hf(x, attention_mask=None, encoder_hidden_states=other)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_vision_path_matches_reference_role_swap(layers):
    cfg = tiny(universal_layers=layers)
    m = MPlug2(cfg, "captioning").eval()
    uni = m.universal_layers
    frames, _, _ = batch(b=2, t=2)
    with torch.no_grad():
        v = m.encode_vision(frames)
        u = m.universal(vision=v)
        hf = [_hf_layer(cfg, layer) for layer in uni.layers]
        vt = v.tokens                                                  # widths match: no projection
        q = uni.queries.expand(2, -1, -1)
        for layer in hf[:-1]:
            q = _run(layer, q, vt)                                     # latents read the visual tokens
        out = _run(hf[-1], vt, q)                                      # visual tokens read the latents
        ref = uni.vision_ln(vt + out)
    assert u.vision_tokens.shape == vt.shape
    assert (u.vision_tokens - ref).abs().max() < 1e-5
    assert (u.vision_queries - q).abs().max() < 1e-5


def test_no_projection_when_widths_match_and_universal_acts_at_init():
    for preset in ("tiny", "base", "large"):
        cfg = MPlugConfig.from_preset(preset)
        assert cfg.vision_width == cfg.text_width
    m = MPlug2(tiny(), "captioning")
    assert m.universal_layers.vision_proj is None                     # CLIP features reach the LN directly
    names = [n for n, _ in m.universal_layers.named_parameters()]
    assert not any("combine" in n for n in names)
    # widths differ: the reference's linear + LayerNorm
    assert MPlug2(tiny(vision_width=32, vision_heads=4), "captioning").universal_layers.vision_proj is not None
    # at initialisation the output depends on the queries and on every shared layer (old code: a
    # zero-initialised combine made the queries' gradient zero and the output a linear map of V)
    frames, _, _ = batch(b=2, t=2)
    v = m.universal(vision=m.encode_vision(frames)).vision_tokens
    v.square().sum().backward()
    uni = m.universal_layers
    assert uni.queries.grad.abs().sum() > 0
    assert uni.layers[-1].shared.fc1.weight.grad.abs().sum() > 0


def test_text_path_is_plain_bert_layers():
    m = MPlug2(tiny(), "glue").eval()
    _, ids, mask = batch()
    with torch.no_grad():
        t = m.encode_text(ids, mask)
        u = m.universal(text=t)
        w = t.hidden
        for layer in m.universal_layers.layers:
            w = layer.shared(w, mask=mask.bool()[:, None, None, :])
    assert torch.equal(u.text_hidden, w)
