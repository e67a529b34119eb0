"""Starting weights from Hugging Face: CLIP vision -> dual-vision encoder, BERT -> text encoder,
universal layers (last S BERT layers), BERT's pre-trained MLM head (transform + bias: the MLM head
and the decoder's LM head) and warm starts for the decoder / fusion self-attention+FFN.

``vision_pretrained`` / ``text_pretrained`` are local directories or hub names; both go through
transformers' ``from_pretrained``. The checkpoint's architecture must match the MPlugConfig
(the error lists the fields to set). Fresh modules (LT, queries, cross-attention, heads) are
listed as missing; checkpoint weights with no destination as unexpected.
"""
from __future__ import annotations

import re

import torch

from .config import MPlugConfig
from .io import LoadReport

VISION_TYPES = ("clip_vision_model", "clip")
TEXT_TYPES = ("bert",)

VISION_RULES = [
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.patch_embedding\.", "patch_embed."),
    (r"^embeddings\.position_embedding\.", "position_embedding."),
    (r"^pre_layrnorm\.", "pre_ln."),
    (r"^post_layernorm\.", "post_ln."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.q."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.k."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.v."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.o."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.ln1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.ln2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.fc2."),
]
BERT_EMBED_RULES = [
    (r"^embeddings\.word_embeddings\.", "word."),
    (r"^embeddings\.position_embeddings\.", "position."),
    (r"^embeddings\.token_type_embeddings\.", "token_type."),
    (r"^embeddings\.LayerNorm\.", "ln."),
]
BERT_LAYER_RULES = [  # relative to encoder.layer.<i>.
    (r"^attention\.self\.query\.", "self_attn.q."),
    (r"^attention\.self\.key\.", "self_attn.k."),
    (r"^attention\.self\.value\.", "self_attn.v."),
    (r"^attention\.output\.dense\.", "self_attn.o."),
    (r"^attention\.output\.LayerNorm\.", "self_ln."),
    (r"^intermediate\.dense\.", "fc1."),
    (r"^output\.dense\.", "fc2."),
    (r"^output\.LayerNorm\.", "ffn_ln."),
]

# cls.predictions.* -> (MLM head, decoder LM head); both are BERT's LMPredictionHead
MLM_HEAD_RULES = [
    (r"^cls\.predictions\.transform\.dense\.(weight|bias)$", (r"dense.\1", r"head_dense.\1")),
    (r"^cls\.predictions\.transform\.LayerNorm\.(weight|bias)$", (r"ln.\1", r"head_ln.\1")),
    (r"^cls\.predictions\.bias$", ("bias", "head_bias")),
]


def _apply(rules, key: str):
    for pat, rep in rules:
        if re.search(pat, key):
            if isinstance(rep, tuple):
                return tuple(re.sub(pat, r, key) for r in rep)
            return re.sub(pat, rep, key)
    return None


def _check_arch(kind: str, path: str, pairs: list[tuple[str, object, str, object]]) -> None:
    bad = [(hf, hv, ours, ov) for hf, hv, ours, ov in pairs if hv != ov]
    if bad:
        lines = "; ".join(f"{hf}={hv!r} in the checkpoint vs {ours}={ov!r}" for hf, hv, ours, ov in bad)
        fix = ", ".join(f"{ours}={hv!r}" for _, hv, ours, _ in bad)
        raise ValueError(f"{kind} checkpoint {path!r} does not match the model config: {lines}. "
                         f"Set {fix} (model overrides) or pick the matching preset.")


def load_hf_vision(path: str, cfg: MPlugConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (hf state dict, {our key under vision.: hf key})."""
    from transformers import AutoConfig, CLIPVisionModel

    mt = AutoConfig.from_pretrained(path).model_type
    if mt not in VISION_TYPES:
        raise ValueError(f"vision_pretrained={path!r} is a {mt!r} checkpoint; expected a CLIP vision checkpoint "
                         f"(CLIPVisionModel or CLIPModel, model_type one of {VISION_TYPES})")
    hf = CLIPVisionModel.from_pretrained(path)
    c = hf.config
    _check_arch("CLIP vision", path, [
        ("hidden_size", c.hidden_size, "vision_width", cfg.vision_width),
        ("num_hidden_layers", c.num_hidden_layers, "vision_layers", cfg.vision_layers),
        ("num_attention_heads", c.num_attention_heads, "vision_heads", cfg.vision_heads),
        ("intermediate_size", c.intermediate_size, "vision_intermediate", cfg.vision_intermediate),
        ("image_size", c.image_size, "image_size", cfg.image_size),
        ("patch_size", c.patch_size, "patch_size", cfg.patch_size),
        ("hidden_act", c.hidden_act, "vision_act", cfg.vision_act),
        ("layer_norm_eps", c.layer_norm_eps, "vision_ln_eps", cfg.vision_ln_eps),
    ])
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    mapping = {}
    for k in state:
        ours = _apply(VISION_RULES, k)
        if ours is not None:
            mapping["vision." + ours] = k
    return state, mapping


def load_hf_text(path: str, cfg: MPlugConfig, built: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (hf state dict, {our key: hf key}) for text encoder, universal, decoder and fusion warm starts."""
    from transformers import AutoConfig, BertForMaskedLM

    mt = AutoConfig.from_pretrained(path).model_type
    if mt not in TEXT_TYPES:
        raise ValueError(f"text_pretrained={path!r} is a {mt!r} checkpoint; expected a BERT checkpoint "
                         f"(BertModel / BertForMaskedLM, model_type one of {TEXT_TYPES})")
    # BertForMaskedLM: the pre-trained MLM head (transform + bias) comes too when the checkpoint has it
    # (hub BERTs do: BertForPreTraining); a bare BertModel checkpoint leaves it freshly initialised.
    hf, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    fresh = set(info.get("missing_keys", ()))
    c = hf.config
    _check_arch("BERT", path, [
        ("hidden_size", c.hidden_size, "text_width", cfg.text_width),
        ("num_hidden_layers", c.num_hidden_layers, "text_layers", cfg.text_layers),
        ("num_attention_heads", c.num_attention_heads, "text_heads", cfg.text_heads),
        ("intermediate_size", c.intermediate_size, "text_intermediate", cfg.text_intermediate),
        ("vocab_size", c.vocab_size, "vocab_size", cfg.vocab_size),
        ("max_position_embeddings", c.max_position_embeddings, "max_text_len", cfg.max_text_len),
        ("type_vocab_size", c.type_vocab_size, "type_vocab_size", cfg.type_vocab_size),
        ("hidden_act", c.hidden_act, "text_act", cfg.text_act),
        ("layer_norm_eps", c.layer_norm_eps, "text_ln_eps", cfg.text_ln_eps),
    ])
    tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # = word embeddings / bias
    state = {k.removeprefix("bert."): v for k, v in hf.state_dict().items() if k not in fresh and k not in tied}
    m, n_layers = cfg.text_encoder_layers, cfg.text_layers
    mapping = {}
    for k in state:
        head = _apply(MLM_HEAD_RULES, k)
        if head is not None:                                       # MLM head and the decoder's LM head
            if "mlm" in built:
                mapping["mlm." + head[0]] = k
            if "decoder" in built:
                mapping["decoder." + head[1]] = k
            continue
        emb = _apply(BERT_EMBED_RULES, k)
        if emb is not None:
            if "text" in built:
                mapping["text.embeddings." + emb] = k
            if "decoder" in built:
                mapping["decoder.embeddings." + emb] = k
            continue
        hit = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", k)
        rel = _apply(BERT_LAYER_RULES, hit.group(2)) if hit else None
        if rel is None:
            continue
        i = int(hit.group(1))
        if i < m and "text" in built:
            mapping[f"text.layers.{i}.{rel}"] = k
        if i >= m and "universal" in built:
            mapping[f"universal_layers.layers.{i - m}.shared.{rel}"] = k
        if "decoder" in built and i < cfg.decoder_layers:          # decoder layer j <- BERT layer j
            mapping[f"decoder.layers.{i}.{rel}"] = k
        j = i - (n_layers - cfg.fusion_layers)                         # fusion <- last BERT layers
        if "fusion" in built and 0 <= j < cfg.fusion_layers:
            mapping[f"fusion.layers.{j}.{rel}"] = k
    return state, mapping


@torch.no_grad()
def from_hf(cls, config: MPlugConfig, task: str, vision_pretrained: str | None, text_pretrained: str | None):
    model = cls(config, task)
    built = set(model.modules_built)
    own = model.state_dict()
    report = LoadReport()
    sources = []
    if vision_pretrained is not None:
        if "vision" not in built:
            raise ValueError(f"vision_pretrained was given but task {task!r} builds no vision encoder")
        sources.append(load_hf_vision(vision_pretrained, config))
    if text_pretrained is not None:
        sources.append(load_hf_text(text_pretrained, config, built))
    filled: set[str] = set()
    for state, mapping in sources:
        used = set()
        for ours, theirs in mapping.items():
            src = state[theirs]
            if own[ours].shape != src.shape:
                raise ValueError(f"{ours}: shape {tuple(own[ours].shape)} but checkpoint {theirs} is {tuple(src.shape)}")
            own[ours].copy_(src)
            filled.add(ours)
            used.add(theirs)
        report.unexpected.extend(sorted(set(state) - used))
    model.momentum_reset()
    report.loaded = sorted(filled)
    report.missing = sorted(k for k in own if k not in filled and not k.startswith("momentum."))
    return model, report
