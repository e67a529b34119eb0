import pytest
import torch
from transformers import BertModel, CLIPVisionModel

from model import MPlug2

from .conftest import tiny


def _cfg(tiny_hf, **kw):
    return tiny(vocab_size=tiny_hf.vocab_size, **kw)


def test_vision_equals_hf_clip_and_lt_is_identity(tiny_hf):
    model, report = MPlug2.from_hf(_cfg(tiny_hf), "retrieval", vision_pretrained=tiny_hf.clip)
    model.eval()
    hf = CLIPVisionModel.from_pretrained(tiny_hf.clip).eval()
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=img)
        out = model.encode_vision(img)                                  # image path, LT bypassed
        vid = model.encode_vision(torch.stack([img, img.flip(-1)], 1))  # fresh LT: per-frame identity
        ref2 = hf(pixel_values=img.flip(-1))
    assert (out.frame_hidden[:, 0] - ref.last_hidden_state).abs().max() < 1e-5
    assert (out.pooled - ref.pooler_output).abs().max() < 1e-5
    assert (vid.frame_hidden[:, 0] - ref.last_hidden_state).abs().max() < 1e-5
    assert (vid.frame_hidden[:, 1] - ref2.last_hidden_state).abs().max() < 1e-5
    assert "vision.blocks.0.lt_attn.up.weight" in report.missing
    assert "vision.blocks.0.attn.q.weight" in report.loaded and "vision.post_ln.weight" in report.loaded
    assert not any(k.startswith("vision.") and ".lt_" not in k for k in report.missing)
    # the momentum copy starts from the loaded weights
    assert torch.equal(model.momentum.encoders["vision"].blocks[0].attn.q.weight, model.vision.blocks[0].attn.q.weight)


@pytest.mark.parametrize("task", ["glue", "pretrain"])
def test_text_equals_hf_bert(tiny_hf, task):
    model, report = MPlug2.from_hf(_cfg(tiny_hf), task, text_pretrained=tiny_hf.bert)
    model.eval()
    hf = BertModel.from_pretrained(tiny_hf.bert, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny_hf.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[2, 6:] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        u = model.universal(text=model.encode_text(ids, mask, types))
    real = mask.bool()
    assert (u.text_hidden[real] - ref[real]).abs().max() < 1e-5
    assert "universal_layers.layers.1.shared.fc2.weight" in report.loaded
    assert "text.layers.0.self_attn.q.weight" in report.loaded
    if task == "pretrain":
        assert "decoder.layers.0.self_attn.q.weight" in report.loaded      # decoder warm start
        assert "decoder.layers.0.cross_attn.q.weight" in report.missing
        assert "universal_layers.queries" in report.missing


def test_captioning_loads_universal_from_bert_without_text_encoder(tiny_hf):
    model, report = MPlug2.from_hf(_cfg(tiny_hf), "captioning", vision_pretrained=tiny_hf.clip,
                                   text_pretrained=tiny_hf.bert)
    assert model.text is None
    assert "universal_layers.layers.0.shared.self_attn.q.weight" in report.loaded
    assert "encoder.layer.0.attention.self.query.weight" not in report.unexpected  # decoder used it
    assert not any(k.startswith("text.") for k in report.loaded)


def test_wrong_kind_and_mismatched_checkpoints_are_clear_errors(tiny_hf):
    cfg = _cfg(tiny_hf)
    with pytest.raises(ValueError, match="is a 'bert' checkpoint; expected a CLIP vision"):
        MPlug2.from_hf(cfg, "retrieval", vision_pretrained=tiny_hf.bert)
    with pytest.raises(ValueError, match="expected a BERT checkpoint"):
        MPlug2.from_hf(cfg, "retrieval", text_pretrained=tiny_hf.clip)
    with pytest.raises(ValueError, match=r"hidden_size=64 in the checkpoint vs text_width=128.*Set text_width=64"):
        MPlug2.from_hf(_cfg(tiny_hf, text_width=128), "glue", text_pretrained=tiny_hf.bert)
    with pytest.raises(ValueError, match="builds no vision encoder"):
        MPlug2.from_hf(cfg, "glue", vision_pretrained=tiny_hf.clip)


def test_bert_mlm_head_is_loaded_when_the_checkpoint_has_it(tiny_hf, tmp_path):
    """A hub BERT carries its pre-trained MLM head (cls.predictions: transform + bias); it becomes the
    MLM head and the decoder's LM head, so MLM logits equal BertForMaskedLM's."""
    from transformers import BertForMaskedLM
    torch.manual_seed(0)
    hf = BertForMaskedLM.from_pretrained(tiny_hf.bert).eval()
    with torch.no_grad():                                              # a "trained" head: not the init
        hf.cls.predictions.bias.normal_()
        hf.cls.predictions.transform.LayerNorm.weight.normal_()
    hf.save_pretrained(tmp_path / "bert_mlm")
    model, report = MPlug2.from_hf(_cfg(tiny_hf), "pretrain", text_pretrained=str(tmp_path / "bert_mlm"))
    model.eval()
    for k in ("mlm.dense.weight", "mlm.ln.weight", "mlm.bias", "decoder.head_dense.weight", "decoder.head_ln.bias",
              "decoder.head_bias"):
        assert k in report.loaded, k
    assert torch.equal(model.mlm.bias, hf.cls.predictions.bias)
    assert torch.equal(model.decoder.head_bias, hf.cls.predictions.bias)
    ids = torch.randint(5, tiny_hf.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model.mlm_logits(model.universal(text=model.encode_text(ids, mask)).text_hidden)
    assert (ours - ref).abs().max() < 1e-4
    # a bare BertModel checkpoint (no head): the head stays fresh and is reported missing
    _, bare = MPlug2.from_hf(_cfg(tiny_hf), "pretrain", text_pretrained=tiny_hf.bert)
    assert "mlm.bias" in bare.missing and "mlm.dense.weight" in bare.missing


def test_decoder_keeps_berts_token_type_embedding(tiny_hf):
    """The reference's BERT decoder adds the token-type-0 embedding to every token (before, the shared
    decoder had none): it is loaded from BERT and changes the decoder's input."""
    from transformers import BertModel
    model, report = MPlug2.from_hf(_cfg(tiny_hf), "captioning", text_pretrained=tiny_hf.bert)
    assert "decoder.embeddings.token_type.weight" in report.loaded
    hf = BertModel.from_pretrained(tiny_hf.bert)
    assert torch.equal(model.decoder.embeddings.token_type.weight, hf.embeddings.token_type_embeddings.weight)
    ids = torch.tensor([[2, 10, 11, 3]])
    emb = model.decoder.embeddings.eval()
    with torch.no_grad():
        with_type = emb(ids)
        emb.token_type.weight.zero_()
        assert not torch.allclose(with_type, emb(ids))
