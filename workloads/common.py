"""Pieces every workload shares: building the model for a task, preparing frames, and the
contrastive + matching retrieval evaluation (pre-train zero-shot and fine-tuned retrieval)."""
from __future__ import annotations

from typing import Iterable

import torch

from model import MPlug2
from model.preprocess import normalize_frames


def build(task: str, model_cfg, vision_pretrained: str | None = None, text_pretrained: str | None = None) -> MPlug2:
    """The model for ``task`` (Table 2 modules), from Hugging Face weights when given."""
    if vision_pretrained or text_pretrained:
        model, _ = MPlug2.from_hf(model_cfg, task, vision_pretrained=vision_pretrained, text_pretrained=text_pretrained)
        return model
    return MPlug2(model_cfg, task=task)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def frames_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> normalised [B, T, 3, H, W] in the model's dtype, on its device."""
    return normalize_frames(batch["frames"], dtype=model_dtype(model))


@torch.no_grad()
def embed_for_retrieval(model: MPlug2, batches: Iterable[dict], max_samples: int | None = None) -> dict:
    """Embeddings + universal outputs kept for matching-head re-ranking.

    Returns {"v": [Nv, D], "t": [Nt, D], "v_tokens": list of [Nv_tok, C], "t_hidden"/"t_mask",
    "text_to_clip": [Nt]}: clips de-duplicated by ``clip_index`` (several captions share a clip).
    """
    model.eval()
    v_by_clip: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    t_emb, t_hidden, t_mask, t_clip = [], [], [], []
    seen = 0
    for batch in batches:
        u = model(frames=frames_of(model, batch), text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        v = model.vision_embed(u.vision_tokens)
        t = model.text_embed(u.text_hidden)
        clip = batch.get("clip_index")
        clip = clip.tolist() if clip is not None else list(range(seen, seen + len(t)))
        for i, c in enumerate(clip):
            if c not in v_by_clip:
                v_by_clip[c] = (v[i].float().cpu(), u.vision_tokens[i].cpu())
        t_emb.append(t.float().cpu())
        t_hidden.extend(u.text_hidden.cpu())
        t_mask.extend(u.text_mask.cpu())
        t_clip.extend(clip)
        seen += len(t)
        if max_samples and seen >= max_samples:
            break
    clips = sorted(v_by_clip)
    position = {c: i for i, c in enumerate(clips)}
    return {
        "v": torch.stack([v_by_clip[c][0] for c in clips]), "t": torch.cat(t_emb),
        "v_tokens": [v_by_clip[c][1] for c in clips], "t_hidden": t_hidden, "t_mask": t_mask,
        "text_to_clip": torch.tensor([position[c] for c in t_clip]),
    }


@torch.no_grad()
def retrieval_eval(model: MPlug2, batches: Iterable[dict], k_test: int = 128, rerank: bool = True,
                   max_samples: int | None = None, pair_batch: int = 64) -> dict[str, float]:
    """R@1/5/10, median and mean rank both ways: contrastive top-k, re-scored by the matching head."""
    from workloads.metrics.retrieval import rerank_topk, retrieval_metrics  # noqa: PLC0415

    e = embed_for_retrieval(model, batches, max_samples)
    sim = e["t"] @ e["v"].T                                           # [Nt, Nv]
    if not rerank or "matching" not in model.modules_built:
        return retrieval_metrics(sim, sim.T, e["text_to_clip"])
    device = next(model.parameters()).device
    lengths = [int(m.sum()) for m in e["t_mask"]]
    max_len = max(lengths)

    def score_pairs(ti: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        th = torch.stack([e["t_hidden"][i][:max_len] for i in ti.tolist()]).to(device)
        tm = torch.stack([e["t_mask"][i][:max_len] for i in ti.tolist()]).to(device)
        vt = torch.stack([e["v_tokens"][i] for i in vi.tolist()]).to(device)
        logits = model.itm_logits(th, tm, vt).float()                # [P, 2]
        return (logits[:, 1] - logits[:, 0]).cpu()

    t2v, v2t = rerank_topk(sim, k_test, score_pairs, batch_size=pair_batch)
    return retrieval_metrics(t2v, v2t, e["text_to_clip"])


# ------------------------------------------------------------------ generation / text helpers
def need_tokenizer(tokenizer, task: str):
    """Generative evaluations turn ids back into strings; they cannot run without the tokenizer."""
    if tokenizer is None:
        raise ValueError(f"evaluating {task} needs the run's tokenizer (evaluate(..., tokenizer=...)) to "
                         "turn generated ids into strings; orchestrator.evaluate passes it")
    return tokenizer


def decode_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    """[B, L] token ids -> B strings, special tokens (pad, [CLS], [SEP]) dropped."""
    return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


def instruction_constants(tokenizer, task: str, modality: str) -> dict[str, torch.Tensor]:
    """The instruction prompts of ``task``, tokenised once per worker ([1, Lp] each): ``prompt_*`` the
    video one and ``image_prompt_*`` the image one when ``modality`` is "auto" (the batch decides:
    T = 1 is an image); only ``prompt_*`` when a modality is forced."""
    from model import objectives  # noqa: PLC0415

    def enc(mod: str) -> tuple[torch.Tensor, torch.Tensor]:
        e = tokenizer(objectives.instruction_for(task, mod), return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    ids, mask = enc("video" if modality == "auto" else modality)
    out = {"prompt_ids": ids, "prompt_mask": mask}
    if modality == "auto":
        out["image_prompt_ids"], out["image_prompt_mask"] = enc("image")
    return out


def is_image_batch(batch: dict) -> bool:
    """uint8 frames [B, T, H, W, 3] with T = 1 (or [B, H, W, 3]): images."""
    frames = batch.get("frames")
    return frames is not None and (frames.dim() == 4 or frames.shape[1] == 1)


def expand_prompt(batch: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch constant ``prompt_ids``/``prompt_mask`` [1, Lp] -> [B, Lp]; the image instruction
    (``image_prompt_*``) for an image batch (T = 1) when the constants carry one. KeyError names the fix."""
    if "prompt_ids" not in batch:
        raise KeyError("the batch has no 'prompt_ids': add the workload's batch_constants(tokenizer, task_cfg) "
                       "to every batch (the train loop and orchestrator.evaluate do)")
    key = "image_prompt" if "image_prompt_ids" in batch and is_image_batch(batch) else "prompt"
    return batch[f"{key}_ids"].expand(b, -1), batch[f"{key}_mask"].expand(b, -1)


def drop_leading_bos(ids: torch.Tensor, mask: torch.Tensor, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets tokenised with a leading [CLS] lose it (the prompt already starts with one)."""
    if ids.shape[1] > 1 and bool((ids[:, 0] == bos).all()):
        return ids[:, 1:], mask[:, 1:]
    return ids, mask


def sequence_logprob(model: MPlug2, cross_states: torch.Tensor, cross_mask: torch.Tensor | None,
                     prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, target_ids: torch.Tensor,
                     target_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target token | prompt, earlier target tokens, cross states) per row: [B] fp32.

    Rows are scored exactly as the LM loss trains them (``build_prefix_inputs``: [prompt; target],
    only the target's tokens counted, its final [SEP] included)."""
    from model import build_prefix_inputs  # noqa: PLC0415

    cfg = model.config
    target_ids, target_mask = drop_leading_bos(target_ids, target_mask, cfg.bos_token_id)
    ids, mask, labels = build_prefix_inputs(prompt_ids, prompt_mask, target_ids, target_mask, cfg.pad_token_id)
    logits = model.decode(ids, mask, cross_states, cross_mask).logits    # [B, L, V]
    logp = logits[:, :-1].float().log_softmax(-1)                       # predicts positions 1..L-1
    nxt = labels[:, 1:]                                                 # [B, L-1]
    scored = nxt != -100
    tok = logp.gather(2, nxt.clamp_min(0)[..., None]).squeeze(2)        # [B, L-1]
    return (tok * scored).sum(1)
