"""Pre-training / fine-tuning objectives, apart from the modules (they take a model and tensors
and return tensors): MLM, vision-language contrastive (momentum encoder + queue + distillation),
vision-language matching with hard negatives, and the instruction-based LM loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoder import IGNORE, build_prefix_inputs
from .universal import UniversalOutput

# One instruction per task and modality (paper Sec. 3.3). QA uses the question itself as prompt.
INSTRUCTIONS: dict[tuple[str, str], str] = {
    ("captioning", "video"): "what does the video describe?",
    ("captioning", "image"): "what does the image describe?",
    ("pretrain", "video"): "what does the video describe?",
    ("pretrain", "image"): "what does the image describe?",
    ("summarization", "text"): "what does the text summarize?",
}
QUESTION_TASKS = ("videoqa", "qa")


def instruction_for(task: str, modality: str, question: str | None = None) -> str:
    """The decoder prompt for a task/modality; QA tasks return the question."""
    if task in QUESTION_TASKS:
        if not question:
            raise ValueError(f"task {task!r} uses the question as its prompt; pass question=...")
        return question
    try:
        return INSTRUCTIONS[(task, modality)]
    except KeyError:
        raise ValueError(f"no instruction for task={task!r}, modality={modality!r}; accepted: "
                         f"{sorted(INSTRUCTIONS)} or a QA task {QUESTION_TASKS} with a question") from None


# ------------------------------------------------------------------------------------------ MLM
def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
                special_ids: tuple[int, ...], prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real, non-special tokens; of those 80% [MASK], 10% random, 10% kept.

    Returns (masked ids [B, L], labels [B, L] with -100 on unmasked). At least one token per
    row that has any candidate is masked, so the loss is always defined.
    """
    dev = input_ids.device
    cand = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    rand = torch.rand(input_ids.shape, generator=generator, device=dev)
    chosen = cand & (rand < prob)
    first = (cand.long().cumsum(1) == 1) & cand                        # first candidate of each row
    chosen |= first & ~chosen.any(1, keepdim=True)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    roll = torch.rand(input_ids.shape, generator=generator, device=dev)
    ids = input_ids.masked_fill(chosen & (roll < 0.8), mask_token_id)
    rand_tok = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids = torch.where(swap, rand_tok, ids)
    return ids, labels


def mlm_loss(model, text_ids: torch.Tensor, text_mask: torch.Tensor, vision_tokens: torch.Tensor | None = None,
             text_type_ids: torch.Tensor | None = None, mask_prob: float | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask, encode (text encoder + universal, fused with ``vision_tokens`` when given), predict."""
    cfg = model.config
    ids, labels = mask_tokens(text_ids, text_mask, cfg.mask_token_id, cfg.vocab_size,
                              (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id),
                              cfg.mlm_prob if mask_prob is None else mask_prob, generator)
    u = model.universal(text=model.encode_text(ids, text_mask, text_type_ids))
    hidden = u.text_hidden                                             # [B, L, Ct]
    if vision_tokens is not None:
        hidden = model.fuse(hidden, text_mask, vision_tokens).hidden
    logits = model.mlm_logits(hidden)                                  # [B, L, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


# ---------------------------------------------------------------------------------- contrastive
@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor   # [B, B] in-batch vision->text similarity: online video vs momentum text / temp
    sim_t2i: torch.Tensor   # [B, B] online text vs momentum video / temp
    vision_embed: torch.Tensor
    text_embed: torch.Tensor


def distill_alpha(alpha: float, epoch_progress: float | None) -> float:
    """Distillation weight after ``epoch_progress`` epochs of optimizer steps (step / steps_per_epoch):
    ALBEF / mPLUG ramp it up over the first epoch, ``alpha * min(1, step / steps_per_epoch)``; the full
    ``alpha`` when the progress is unknown (evaluation, or no ``train.steps_per_epoch``)."""
    if epoch_progress is None:
        return alpha
    return alpha * min(1.0, float(epoch_progress))


def contrastive_loss(model, u: UniversalOutput, frames: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, idx: torch.Tensor | None = None,
                     alpha: float | None = None) -> ContrastiveOutput:
    """ITC with a momentum encoder, feature queues and momentum distillation (ALBEF / mPLUG-2).

    ``u`` holds the online universal outputs of the batch; ``frames``/``text_ids`` are re-encoded
    by the momentum encoders. ``idx`` [B] marks rows sharing a clip as positives (else only the
    diagonal). In train mode the momentum encoders are updated first and the queue is filled after.
    """
    alpha = model.config.alpha if alpha is None else alpha
    v = model.vision_embed(u.vision_tokens)                            # [B, D]
    t = model.text_embed(u.text_hidden)                                # [B, D]
    temp = model.temperature()
    mom = model.momentum
    b = v.shape[0]
    with torch.no_grad():
        if idx is None:
            targets = torch.cat([torch.eye(b, device=v.device),
                                 torch.zeros(b, mom.vision_queue.shape[1], device=v.device)], 1)  # [B, B+Q]
        else:
            all_idx = torch.cat([idx.view(1, -1), mom.idx_queue], 1)   # [1, B+Q]
            pos = (idx.view(-1, 1) == all_idx).float()
            targets = pos / pos.sum(1, keepdim=True)
        if model.training and mom.update_each_forward:
            model.momentum_update()
        vm, tm = model.momentum_embeds(frames, text_ids, text_mask)   # [B, D] each
        vm_all = torch.cat([vm.T, mom.vision_queue.float()], 1)        # [D, B+Q]
        tm_all = torch.cat([tm.T, mom.text_queue.float()], 1)
        t_i2t = alpha * (vm @ tm_all / temp).softmax(1) + (1 - alpha) * targets
        t_t2i = alpha * (tm @ vm_all / temp).softmax(1) + (1 - alpha) * targets
    sim_i2t = v @ tm_all / temp                                        # [B, B+Q]
    sim_t2i = t @ vm_all / temp
    loss_i2t = -(sim_i2t.log_softmax(1) * t_i2t).sum(1).mean()
    loss_t2i = -(sim_t2i.log_softmax(1) * t_t2i).sum(1).mean()
    if model.training:
        mom.enqueue(vm, tm, idx if idx is not None else torch.full((b,), -100, device=v.device))
    # the matching loss's hard negatives are drawn from online-vs-momentum similarities, as ALBEF / mPLUG
    return ContrastiveOutput(loss=(loss_i2t + loss_t2i) / 2, sim_i2t=sim_i2t[:, :b].detach(),
                             sim_t2i=sim_t2i[:, :b].detach(), vision_embed=v, text_embed=t)


def positive_mask(b: int, idx: torch.Tensor | None, device=None) -> torch.Tensor:
    """[B, B] bool: rows i, j are a positive pair (the diagonal, or the same ``idx``)."""
    if idx is None:
        return torch.eye(b, dtype=torch.bool, device=device)
    return idx.view(-1, 1) == idx.view(1, -1)


@torch.no_grad()
def contrastive_diagnostics(out: ContrastiveOutput, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Detached scalars that show a collapse while it happens (logged at every log step):

    - ``itc_acc_t2v`` / ``itc_acc_v2t``: the share of the batch whose most similar video (text) in the
      batch is a positive (chance about 1/B);
    - ``text_cos`` / ``video_cos``: the mean cosine between the embeddings of two different rows of the
      batch. Near 1, every text (video) maps to about the same point: the tower has collapsed and
      nothing can be retrieved (``orchestrator.console.COLLAPSE_COS`` is the console's warning threshold).
    Empty for a batch of one row."""
    v, t = out.vision_embed.detach().float(), out.text_embed.detach().float()
    b = v.shape[0]
    if b < 2:
        return {}
    pos = positive_mask(b, idx, v.device)
    sim = v @ t.T                                                      # [B videos, B texts]
    rows = torch.arange(b, device=v.device)
    off = ~torch.eye(b, dtype=torch.bool, device=v.device)
    return {"itc_acc_v2t": pos[rows, sim.argmax(1)].float().mean(),
            "itc_acc_t2v": pos[sim.argmax(0), rows].float().mean(),
            "text_cos": (t @ t.T)[off].mean(), "video_cos": (v @ v.T)[off].mean()}


# ------------------------------------------------------------------------------------- matching
def _sample_negatives(sim: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    weights = sim.float().softmax(1).masked_fill(positive, 0.0)        # [B, B]
    empty = weights.sum(1) <= 0                                        # rows where softmax underflowed
    weights[empty] = (~positive[empty]).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [B]


@dataclass
class MatchingOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor  # detached: share of the 3B pairs classified right (always "no match": 2/3)


def matching_loss(model, u: UniversalOutput, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                  idx: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """ITM on (positive, hard-negative text, hard-negative video) triples: the loss (see
    :func:`matching_outputs`)."""
    return matching_outputs(model, u, sim_i2t, sim_t2i, idx, generator).loss


def matching_outputs(model, u: UniversalOutput, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                     idx: torch.Tensor | None = None, generator: torch.Generator | None = None) -> MatchingOutput:
    """ITM on (positive, hard-negative text, hard-negative video) triples, and the head's accuracy.

    Negatives are drawn with probability softmax(similarity) among the non-positives of the batch
    (``ContrastiveOutput.sim_i2t`` / ``sim_t2i``: online vs momentum features, as ALBEF / mPLUG).
    """
    b = sim_i2t.shape[0]
    positive = positive_mask(b, idx, sim_i2t.device)
    if bool(positive.all(1).any()):
        raise ValueError("matching_loss needs at least one negative per row: the batch has a row whose "
                         "every item shares its clip index; use batch size >= 2 with distinct clips")
    with torch.no_grad():
        neg_text = _sample_negatives(sim_i2t, positive, generator)      # for each video, a text
        neg_vision = _sample_negatives(sim_t2i, positive, generator)    # for each text, a video
    th, tm, vt = u.text_hidden, u.text_mask, u.vision_tokens
    text = torch.cat([th, th[neg_text], th], 0)                        # [3B, L, Ct]
    mask = torch.cat([tm, tm[neg_text], tm], 0)
    vision = torch.cat([vt, vt, vt[neg_vision]], 0)                    # [3B, Nv, Ct]
    logits = model.itm_logits(text, mask, vision)                      # [3B, 2]
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return MatchingOutput(F.cross_entropy(logits.float(), labels), accuracy)


# ------------------------------------------------------------------------------------------- LM
def lm_loss(model, cross_states: torch.Tensor, cross_mask: torch.Tensor | None, prompt_ids: torch.Tensor,
            prompt_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Instruction-based LM: decoder input [prompt; target], only the target scored.

    ``prompt_ids`` is the tokenised instruction (``instruction_for``) or question, [CLS]-started;
    ``target_ids`` the answer/caption ending in [SEP] (a leading [CLS] is dropped); cross states are visual tokens (captioning) or fused
    features (QA).
    """
    cfg = model.config
    if target_ids.shape[1] > 1 and bool((target_ids[:, 0] == cfg.bos_token_id).all()):
        target_ids, target_mask = target_ids[:, 1:], target_mask[:, 1:]  # tokenizer's [CLS]: prompt has one
    ids, mask, labels = build_prefix_inputs(prompt_ids, prompt_mask, target_ids, target_mask, cfg.pad_token_id)
    return model.decode(ids, mask, cross_states, cross_mask, labels).loss
