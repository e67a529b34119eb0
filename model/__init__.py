"""mPLUG-2 modular video-language model in plain single-device PyTorch.

No Ray / DeepSpeed / MLflow / torch.distributed here: those wrap the model from outside.

Public API
----------
Config and module selection::

    from model import MPlugConfig, MPlug2, TASKS
    cfg = MPlugConfig.from_preset("tiny", vocab_size=tok_vocab)   # presets: tiny, base, large
    TASKS["retrieval"]  # -> frozenset of module names (paper Table 2)
    # tasks: pretrain, retrieval, videoqa, captioning, classification, glue (images: T = 1)

Building and weights::

    model = MPlug2(cfg, task="retrieval")                          # only that task's modules
    model, report = MPlug2.from_hf(cfg, task, vision_pretrained=dir_or_hub, text_pretrained=dir_or_hub)
    report.loaded / report.missing / report.unexpected / report.mismatched   # key names
    model.save_pretrained(dir)                                     # config.json + model.safetensors
    model = MPlug2.from_pretrained(dir, task=None, **config_overrides)  # model.load_report lists keys

Data flow (typed outputs)::

    from model.preprocess import normalize_frames                  # uint8 [B,T,H,W,3] -> [B,T,3,H,W]
    v = model.encode_vision(frames)            # VisionOutput: frame_hidden [B,T,1+N,Cv], tokens [B,1+T*N,Cv]
    t = model.encode_text(ids, mask, types)    # TextOutput: hidden [B,L,Ct], attention_mask
    u = model.universal(vision=v, text=t)      # UniversalOutput: vision_tokens [B,1+T*N,Ct] = LN(V + out),
                                               #   vision_queries [B,k,Ct], text_hidden [B,L,Ct], text_mask
    u = model(frames=..., text_ids=..., text_mask=...)   # the three steps above at once
    f = model.fuse(u.text_hidden, u.text_mask, u.vision_tokens)      # FusionOutput: hidden [B,L,Ct], cls
    d = model.decode(ids, mask, cross_states, cross_mask, labels)    # DecoderOutput: logits, loss
    g = model.generate(cross_states, cross_mask, prompt_ids, prompt_mask, num_beams=1, max_length=20,
                       length_penalty=0.6, min_length=0, use_cache=True)  # GenerationOutput: sequences, scores
    Cross states: captioning -> u.vision_tokens; QA -> cat([u.vision_tokens, f.hidden], 1)
    (mask: ones, then f.attention_mask). Beams are ranked with the GNMT penalty ((5 + len) / 6) ** 0.6;
    the key/value cache (default) gives the same ids as use_cache=False, far faster.

Heads::

    model.vision_embed(u.vision_tokens) / model.text_embed(u.text_hidden)  # L2-normalised [B, embed_dim]
    model.temperature()                                # learnable temperature, clamped in place
    model.itm_logits(text_hidden, text_mask, vision_tokens)  # [B, 2] matching logits (1 = match)
    model.mlm_logits(hidden)                           # [B, L, V] tied to word embeddings
    model.classify(features)                           # [B, num_labels] from a pooled [B, Ct]
    model.momentum_update() / model.momentum_embeds(frames, ids, mask) / model.momentum_reset()

Objectives (``model.objectives``): ``mlm_loss``, ``contrastive_loss`` (momentum encoder + queue +
clamped temperature + distillation alpha, ramped over the first epoch by ``distill_alpha``; calls
``model.momentum_update()`` itself in train mode unless ``model.momentum.update_each_forward`` is
off, and enqueues through ``model.momentum.gather`` when a distributed loop set one),
``matching_loss`` (hard negatives sampled from the similarity matrix), ``lm_loss``
(prompt-prefixed LM; ``INSTRUCTIONS`` / ``instruction_for(task, modality)``).

The momentum encoders and the queues are fp32 buffers (never optimised, never cast to bf16);
``python -m model --preset NAME [--task TASK]`` prints module parameter counts (large pre-training:
about 1.03B trainable, the reference architecture's ~1.04B less its unused universal-layer FFN copies).

How this code follows the paper and the reference code (X-PLUG/mPLUG-2), and every place it
deliberately does not, with the reason: ``model/README.md`` ("Deviations from the reference").
"""
from .config import MODULES, PRESETS, TASKS, MPlugConfig
from .decoder import DecoderOutput, build_prefix_inputs
from .fusion import FusionOutput
from .generation import GenerationOutput
from .io import LoadReport
from .mplug2 import MPlug2
from .text import TextOutput
from .universal import UniversalOutput
from .vision import VisionOutput

__all__ = ["MODULES", "PRESETS", "TASKS", "MPlugConfig", "MPlug2", "LoadReport", "VisionOutput", "TextOutput",
           "UniversalOutput", "FusionOutput", "DecoderOutput", "GenerationOutput", "build_prefix_inputs"]
