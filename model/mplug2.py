"""MPlug2: the composer. Builds only the modules of its task (``config.TASKS``) and exposes one
method per step of the paper's data flow: encode_vision, encode_text, universal, fuse, decode /
generate, plus the heads the objectives and workloads use."""
from __future__ import annotations

import torch
from torch import nn

from . import generation
from .config import TASKS, MPlugConfig
from .decoder import DecoderOutput, SharedDecoder
from .fusion import Fusion, FusionOutput
from .heads import Classifier, ContrastiveHeads, MatchingHead, MLMHead
from .hf_loading import from_hf
from .io import load_pretrained, save_pretrained
from .momentum import MOMENTUM_OF, Momentum
from .text import TextEncoder, TextOutput
from .universal import Universal, UniversalOutput
from .vision import DualVisionEncoder, VisionOutput


def _missing(task: str, module: str, method: str) -> ValueError:
    users = sorted(t for t, mods in TASKS.items() if module in mods)
    return ValueError(f"{method} needs the {module!r} module, which task {task!r} does not build "
                      f"(paper Table 2); build the model for one of {users}")


def init_std(fan_in: int) -> float:
    """N(0, fan_in ** -0.5): CLIP's width ** -0.5 scale (its class embedding and attention outputs).

    BERT's fixed N(0, 0.02) only suits ~768-wide layers (there 0.02 * sqrt(768) ~ 0.55 per-layer
    gain). At 64 wide it gives each residual branch ~1/40 of the residual stream: attention is
    uniform and the [CLS] tokens the contrastive and matching heads read come out input-independent
    (cosine 0.9999 across different videos / texts), and from scratch they stay so (ITM at the
    0.636 label-prior entropy, no in-batch alignment). A unit per-layer gain keeps [CLS] informative.
    """
    return fan_in ** -0.5


def _init_weights(module: nn.Module) -> None:
    """BERT-style init for a model built from scratch (Hugging Face weights overwrite it when loaded):
    normal linears, patch convolutions and embeddings with ``init_std`` of their fan-in / width,
    unit LayerNorms; zero-initialised residual outputs (``keep_zero_init``) stay zero."""
    if getattr(module, "keep_zero_init", False):
        return
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=init_std(module.weight[0].numel()))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=init_std(module.embedding_dim))
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MPlug2(nn.Module):
    def __init__(self, config: MPlugConfig, task: str = "pretrain") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; accepted: {sorted(TASKS)}")
        config.validate()
        self.config, self.task = config, task
        mods = self.modules_built = TASKS[task]
        self.vision = DualVisionEncoder(config) if "vision" in mods else None
        self.text = TextEncoder(config) if "text" in mods else None
        self.universal_layers = Universal(config, with_vision="vision" in mods) if "universal" in mods else None
        self.contrastive = ContrastiveHeads(config) if "contrastive" in mods else None
        self.fusion = Fusion(config) if "fusion" in mods else None
        self.matching = MatchingHead(config) if "matching" in mods else None
        self.mlm = MLMHead(config) if "mlm" in mods else None
        self.decoder = SharedDecoder(config) if "decoder" in mods else None
        self.classifier = Classifier(config) if "classifier" in mods else None
        self.apply(_init_weights)  # before the momentum copies are taken
        self.momentum = Momentum(config, self._momentum_sources()) if "momentum" in mods else None

    def _need(self, module: str, method: str) -> nn.Module:
        mod = getattr(self, module if module != "universal" else "universal_layers")
        if mod is None:
            raise _missing(self.task, module, method)
        return mod

    def _momentum_sources(self) -> dict[str, nn.Module]:
        return {k: getattr(self, k) for k in MOMENTUM_OF}

    # -- data flow -----------------------------------------------------------------------------
    def encode_vision(self, frames: torch.Tensor) -> VisionOutput:
        """frames: normalised float [B, T, 3, H, W] (video) or [B, 3, H, W] (image)."""
        return self._need("vision", "encode_vision")(frames)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> TextOutput:
        return self._need("text", "encode_text")(input_ids, attention_mask, token_type_ids)

    def universal(self, vision: VisionOutput | None = None, text: TextOutput | None = None) -> UniversalOutput:
        return self._need("universal", "universal")(vision=vision, text=text)

    def fuse(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, vision_tokens: torch.Tensor,
             vision_mask: torch.Tensor | None = None) -> FusionOutput:
        return self._need("fusion", "fuse")(text_hidden, text_mask, vision_tokens, vision_mask)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cross_states: torch.Tensor,
               cross_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> DecoderOutput:
        """Teacher forcing; ``labels`` = -100 on prompt/pad (see decoder.build_prefix_inputs)."""
        return self._need("decoder", "decode")(input_ids, attention_mask, cross_states, cross_mask, labels)

    @torch.no_grad()
    def generate(self, cross_states: torch.Tensor, cross_mask: torch.Tensor | None = None,
                 prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                 num_beams: int = 1, max_length: int = 20, length_penalty: float = 0.6, min_length: int = 0,
                 use_cache: bool = True) -> generation.GenerationOutput:
        """Greedy (num_beams=1) or beam search. Prompts default to [CLS]; max_length counts new tokens,
        min_length the tokens before [SEP] may end it; beams are ranked with the GNMT length penalty
        ((5 + len) / 6) ** length_penalty. ``use_cache=False`` re-runs the decoder on the whole
        sequence every step (same ids, far slower)."""
        dec = self._need("decoder", "generate")
        if num_beams < 1 or max_length < 1:
            raise ValueError(f"num_beams={num_beams} and max_length={max_length} must both be >= 1")
        if not 0 <= min_length < max_length:
            raise ValueError(f"min_length={min_length} must be in [0, max_length={max_length})")
        cfg = self.config
        if prompt_ids is None:
            prompt_ids = torch.full((cross_states.shape[0], 1), cfg.bos_token_id, device=cross_states.device)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        args = (dec, prompt_ids, prompt_mask, cross_states, cross_mask, max_length, cfg.eos_token_id,
                cfg.pad_token_id)
        if num_beams == 1:
            return generation.greedy(*args, min_length=min_length, use_cache=use_cache)
        return generation.beam_search(*args, num_beams=num_beams, length_penalty=length_penalty,
                                      min_length=min_length, use_cache=use_cache)

    def forward(self, frames: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_type_ids: torch.Tensor | None = None) -> UniversalOutput:
        """Unimodal encoders + universal layers (what retrieval / classification / GLUE consume)."""
        v = self.encode_vision(frames) if frames is not None else None
        t = self.encode_text(text_ids, text_mask, text_type_ids) if text_ids is not None else None
        return self.universal(vision=v, text=t)

    # -- heads -----------------------------------------------------------------------------------
    def vision_embed(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """[B, Nv, Ct] universal visual tokens -> L2-normalised [B, embed_dim] (fp32)."""
        return self._need("contrastive", "vision_embed").vision(vision_tokens)

    def text_embed(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, Ct] universal text -> L2-normalised [B, embed_dim] (fp32)."""
        return self._need("contrastive", "text_embed").text(text_hidden)

    def temperature(self) -> torch.Tensor:
        return self._need("contrastive", "temperature").temperature()

    def itm_logits(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Matching logits [B, 2] (index 1 = match) for aligned (video, text) pairs."""
        head = self._need("matching", "itm_logits")
        return head(self.fuse(text_hidden, text_mask, vision_tokens).cls)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, Ct] -> [B, L, V], tied to the text encoder's word embeddings."""
        head = self._need("mlm", "mlm_logits")
        return head(hidden, self._need("text", "mlm_logits").embeddings.word.weight)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """[B, Ct] pooled features (text [CLS], visual [CLS] or fused [CLS]) -> [B, num_labels]."""
        return self._need("classifier", "classify")(features)

    # -- momentum encoders -----------------------------------------------------------------------
    def momentum_update(self) -> None:
        """EMA of the online unimodal encoders into the fp32 momentum copies: once per optimizer
        step (``contrastive_loss`` calls it per training forward unless ``momentum.update_each_forward``
        was turned off by a loop that calls it after each optimizer step)."""
        self._need("momentum", "momentum_update").update(self._momentum_sources())

    def after_step_buffers(self) -> list[torch.Tensor]:
        """The buffers a forward never changes, only a step of the loop (``Momentum.after_step_buffers``):
        an async checkpoint may copy them while the next forward runs."""
        return self.momentum.after_step_buffers() if self.momentum is not None else []

    def momentum_reset(self) -> None:
        """Copy the online encoders into the momentum encoders (after loading weights)."""
        if self.momentum is not None:
            self.momentum.copy_from(self._momentum_sources())

    @torch.no_grad()
    def momentum_embeds(self, frames: torch.Tensor, text_ids: torch.Tensor,
                        text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum-encoder contrastive embeddings ([B, D], [B, D]) of a batch."""
        enc = self._need("momentum", "momentum_embeds").encoders
        # fp32 momentum weights: computed at the inputs' precision when the online model is bf16/fp16
        low = frames.dtype if frames.dtype in (torch.bfloat16, torch.float16) else None
        with torch.autocast(frames.device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            u = enc["universal_layers"](vision=enc["vision"](frames), text=enc["text"](text_ids, text_mask))
            return enc["contrastive"].vision(u.vision_tokens), enc["contrastive"].text(u.text_hidden)

    # -- persistence (implemented in model/io.py and model/hf_loading.py) -------------------------
    def save_pretrained(self, directory: str) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, task: str | None = None, **overrides) -> "MPlug2":
        return load_pretrained(cls, directory, task, **overrides)

    @classmethod
    def from_hf(cls, config: MPlugConfig, task: str = "pretrain", vision_pretrained: str | None = None,
                text_pretrained: str | None = None):
        return from_hf(cls, config, task, vision_pretrained, text_pretrained)

    def param_counts(self) -> dict[str, int]:
        """Parameters per top-level module (momentum copies included, listed apart: fp32 buffers)."""
        counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in self.named_children()}
        if self.momentum is not None:
            counts["momentum"] = sum(p.numel() for _, mod in self._momentum_sources().items() for p in mod.parameters())
        return counts
