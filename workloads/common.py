"""Pieces every workload shares: building the model for a task, preparing frames, and the
contrastive + matching retrieval evaluation (pre-train zero-shot and fine-tuned retrieval)."""
from __future__ import annotations

from typing import Iterable

import torch

from model import MPlug2, build_prefix_inputs, objectives
from model.preprocess import normalize_frames
from workloads.metrics.retrieval import assemble_scores, plan_rerank, retrieval_metrics


def build(task: str, model_cfg, vision_pretrained: str | None = None, text_pretrained: str | None = None) -> MPlug2:
    """The model for ``task`` (Table 2 modules), from Hugging Face weights when given."""
    if vision_pretrained or text_pretrained:
        model, _ = MPlug2.from_hf(model_cfg, task, vision_pretrained=vision_pretrained, text_pretrained=text_pretrained)
        return model
    return MPlug2(model_cfg, task=task)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def pixels_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The batch's ``frames`` (uint8 [B, T, H, W, 3], the data contract) -> the model's input
    pixels: normalised float [B, T, 3, H, W] in the model's dtype, on its device.  ``frames``
    names the uint8 layout only; the normalised tensor is ``pixels`` in the workloads."""
    return normalize_frames(batch["frames"], dtype=model_dtype(model))


POSITIVES = ("clip", "caption")
_HASH_MOD = 2 ** 31 - 1  # a Mersenne prime: int64 products of ids below it never overflow


def caption_ids(text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B] int64, equal exactly for rows whose (masked) token ids are equal
    (a polynomial hash mod 2^31 - 1: the same on every rank and in every process)."""
    h = torch.zeros(text_ids.shape[0], dtype=torch.long, device=text_ids.device)
    for col in (text_ids * text_mask).long().unbind(1):
        h = (h * 1_000_003 + col) % _HASH_MOD
    return h


def positive_ids(batch: dict, positives: str) -> torch.Tensor | None:
    """What makes two rows a positive pair in the contrastive and matching losses: ``clip`` (the
    reference's: the rows show the same clip, ``clip_index``; only the diagonal without it) or
    ``caption`` (the rows carry the same caption text, whichever clip they show: a dataset where many
    clips share one caption, as the synthetic one's 48, would otherwise teach the model to tell
    clips of one caption apart, against their captions).  Also the ids the queue keeps."""
    if positives == "caption":
        return caption_ids(batch["text_ids"], batch["text_mask"])
    if positives != "clip":
        raise ValueError(f"positives={positives!r}; accepted: {POSITIVES}")
    return batch.get("clip_index")


def diagnostics(itc: objectives.ContrastiveOutput, itm: objectives.MatchingOutput | None,
                idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The detached collapse diagnostics a contrastive workload adds to its loss dict (the loop logs
    every key): in-batch retrieval accuracy both ways, the text and video embeddings' mean pairwise
    cosine (``objectives.contrastive_diagnostics``) and the matching head's accuracy (``itm_acc``)."""
    out = objectives.contrastive_diagnostics(itc, idx)
    if itm is not None:
        out["itm_acc"] = itm.accuracy
    return out


def item_ids(batch: dict, seen: int, n: int) -> list[int]:
    """Each row's item id: the batch's ``item_key`` (a stable id the orchestrator adds, so outputs
    gathered from several workers sort into one order), else its position in the stream."""
    key = batch.get("item_key")
    return key.tolist() if key is not None else list(range(seen, seen + n))


def sort_records(records: list[dict]) -> list[dict]:
    """Records (one per item, from one or many workers) in one fixed order: by ``item``.  Equal
    ids only arise for identical input rows, whose records are identical too."""
    return sorted(records, key=lambda r: r["item"])


@torch.no_grad()
def retrieval_embed(model: MPlug2, batches: Iterable[dict], max_samples: int | None = None
                    ) -> tuple[list[dict], dict[int, dict]]:
    """Per text: ``{"item", "clip", "t" [D], "hidden" [L, C], "mask" [L]}``; per clip (by
    ``clip_index``; several captions share one clip): ``{"v" [D], "tokens" [Nv_tok, C]}``.
    Everything on the CPU, embeddings in fp32."""
    model.eval()
    texts: list[dict] = []
    clips: dict[int, dict] = {}
    seen = 0
    for batch in batches:
        u = model(frames=pixels_of(model, batch), text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        v = model.vision_embed(u.vision_tokens).float().cpu()
        t = model.text_embed(u.text_hidden).float().cpu()
        n = len(t)
        clip = batch.get("clip_index")
        clip = clip.tolist() if clip is not None else list(range(seen, seen + n))
        items = item_ids(batch, seen, n)
        hidden, mask, tokens = u.text_hidden.cpu(), u.text_mask.cpu(), u.vision_tokens.cpu()
        for i, c in enumerate(clip):
            if c not in clips:
                clips[c] = {"v": v[i], "tokens": tokens[i]}
            texts.append({"item": items[i], "clip": c, "t": t[i], "hidden": hidden[i], "mask": mask[i]})
        seen += n
        if max_samples and seen >= max_samples:
            break
    return texts, clips


def retrieval_sim(texts: list[dict], clip_v: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(sim [Nt, Nv], text_to_clip [Nt], clip_ids)`` with clips in ``clip_index`` order and texts
    in the given order (:func:`sort_records` order when gathered from several workers)."""
    clip_ids = sorted(clip_v)
    position = {c: i for i, c in enumerate(clip_ids)}
    t = torch.stack([r["t"] for r in texts])
    v = torch.stack([clip_v[c] for c in clip_ids])
    return t @ v.T, torch.tensor([position[r["clip"]] for r in texts]), clip_ids


def retrieval_text_len(texts: list[dict]) -> int:
    """The longest text: pairs are scored on hidden states cut to it (the same for any sharding)."""
    return max(int(r["mask"].sum()) for r in texts)


RERANK_SCORES = ("logit_plus_sim", "margin")


def rerank_adds_sim(rerank_score: str) -> bool:
    """Whether a re-ranked candidate's score adds the contrastive similarity (``logit_plus_sim``)."""
    if rerank_score not in RERANK_SCORES:
        raise ValueError(f"rerank_score={rerank_score!r}; accepted: {RERANK_SCORES}")
    return rerank_score == "logit_plus_sim"


@torch.no_grad()
def retrieval_score_pairs(model: MPlug2, texts: list[dict], clip_tokens: dict[int, torch.Tensor],
                          clip_ids: list[int], text_idx: torch.Tensor, video_idx: torch.Tensor,
                          max_len: int, pair_batch: int = 64, rerank_score: str = "logit_plus_sim") -> torch.Tensor:
    """Matching-head scores of the (text, clip) pairs: [P] fp32.  ``rerank_score``:
    ``logit_plus_sim`` (the reference's: the "match" logit, to which :func:`assemble_scores` adds the
    contrastive similarity) or ``margin`` (the "match" minus the "no match" logit, alone).
    ``clip_tokens`` must hold the universal visual tokens of every clip the pairs name."""
    margin = not rerank_adds_sim(rerank_score)
    device = next(model.parameters()).device
    out = []
    for s in range(0, text_idx.numel(), pair_batch):
        ti, vi = text_idx[s:s + pair_batch].tolist(), video_idx[s:s + pair_batch].tolist()
        th = torch.stack([texts[i]["hidden"][:max_len] for i in ti]).to(device)
        tm = torch.stack([texts[i]["mask"][:max_len] for i in ti]).to(device)
        vt = torch.stack([clip_tokens[clip_ids[i]] for i in vi]).to(device)
        logits = model.itm_logits(th, tm, vt).float()                # [P, 2]
        out.append((logits[:, 1] - logits[:, 0] if margin else logits[:, 1]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def can_rerank(model: MPlug2, rerank: bool = True) -> bool:
    return rerank and "matching" in getattr(model, "modules_built", ())


def embed_for_retrieval(model: MPlug2, batches: Iterable[dict], max_samples: int | None = None) -> dict:
    """Embeddings + universal outputs kept for matching-head re-ranking.

    Returns {"v": [Nv, D], "t": [Nt, D], "v_tokens": list of [Nv_tok, C], "t_hidden"/"t_mask",
    "text_to_clip": [Nt]}: clips de-duplicated by ``clip_index`` (several captions share a clip).
    """
    texts, clips = retrieval_embed(model, batches, max_samples)
    texts = sort_records(texts)
    clip_ids = sorted(clips)
    _, text_to_clip, _ = retrieval_sim(texts, {c: clips[c]["v"] for c in clips})
    return {"v": torch.stack([clips[c]["v"] for c in clip_ids]), "t": torch.stack([r["t"] for r in texts]),
            "v_tokens": [clips[c]["tokens"] for c in clip_ids], "t_hidden": [r["hidden"] for r in texts],
            "t_mask": [r["mask"] for r in texts], "text_to_clip": text_to_clip}


@torch.no_grad()
def retrieval_eval(model: MPlug2, batches: Iterable[dict], k_test: int = 128, rerank: bool = True,
                   max_samples: int | None = None, pair_batch: int = 64,
                   rerank_score: str = "logit_plus_sim") -> dict[str, float]:
    """R@1/5/10, median and mean rank both ways: contrastive top-k, re-scored by the matching head
    (``rerank_score``: see :func:`retrieval_score_pairs`).

    One process; ``orchestrator.evaluation.shard`` runs the same steps sharded over Train workers."""
    texts, clips = retrieval_embed(model, batches, max_samples)
    texts = sort_records(texts)
    sim, text_to_clip, clip_ids = retrieval_sim(texts, {c: clips[c]["v"] for c in clips})
    if not can_rerank(model, rerank):
        return retrieval_metrics(sim, sim.T, text_to_clip)
    plan = plan_rerank(sim, k_test)
    scores = retrieval_score_pairs(model, texts, {c: clips[c]["tokens"] for c in clips}, clip_ids,
                                   plan.text_idx, plan.video_idx, retrieval_text_len(texts), pair_batch, rerank_score)
    t2v, v2t = assemble_scores(sim, plan, scores, add_sim=rerank_adds_sim(rerank_score))
    return retrieval_metrics(t2v, v2t, text_to_clip)


# ------------------------------------------------------------------ generation / text helpers
def need_tokenizer(tokenizer, task: str):
    """Generative evaluations turn ids back into strings; they cannot run without the tokenizer."""
    if tokenizer is None:
        raise ValueError(f"evaluating {task} needs the run's tokenizer (evaluate(..., tokenizer=...)) to "
                         "turn generated ids into strings; orchestrator.evaluation passes it")
    return tokenizer


def decode_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    """[B, L] token ids -> B strings, special tokens (pad, [CLS], [SEP]) dropped."""
    return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


def instruction_constants(tokenizer, task: str, modality: str) -> dict[str, torch.Tensor]:
    """The instruction prompts of ``task``, tokenised once per worker ([1, Lp] each): ``prompt_*`` the
    video one and ``image_prompt_*`` the image one when ``modality`` is "auto" (the batch decides:
    T = 1 is an image); only ``prompt_*`` when a modality is forced."""
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
                       "to every batch (the train loop and orchestrator.evaluation do)")
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
    cfg = model.config
    target_ids, target_mask = drop_leading_bos(target_ids, target_mask, cfg.bos_token_id)
    ids, mask, labels = build_prefix_inputs(prompt_ids, prompt_mask, target_ids, target_mask, cfg.pad_token_id)
    logits = model.decode(ids, mask, cross_states, cross_mask).logits    # [B, L, V]
    logp = logits[:, :-1].float().log_softmax(-1)                       # predicts positions 1..L-1
    nxt = labels[:, 1:]                                                 # [B, L-1]
    scored = nxt != -100
    tok = logp.gather(2, nxt.clamp_min(0)[..., None]).squeeze(2)        # [B, L-1]
    return (tok * scored).sum(1)
