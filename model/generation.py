"""Batched greedy and beam-search generation for the shared decoder.

Prompts come right padded (as the tokenizer gives them) and are left-aligned here so every row
continues from its last real token; positions follow the mask, so padding does not shift them.
``max_length`` counts generated tokens (after the prompt, [SEP] included); ``min_length`` blocks
[SEP] for the first ``min_length`` tokens (the reference's ``step < min_length``).

With ``use_cache`` (the default) the decoder's cross-attention keys/values are computed once per item
and its self-attention keys/values are kept and extended one token at a time (reordered with the
beams), so a step costs one token's work instead of the whole sequence's; ``use_cache=False`` re-runs
the whole sequence each step and gives the same token ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import SharedDecoder


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, <= max_length] generated ids (no prompt), pad after [SEP]
    scores: torch.Tensor     # [B] sum log-prob (greedy) / length-penalised score (beam)


def left_align(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(mask.long(), dim=1, stable=True)             # pads first, order kept
    ids, mask = ids.gather(1, order), mask.long().gather(1, order)
    return ids.masked_fill(mask == 0, pad), mask


class _Stepper:
    """Next-token log-probabilities, with the key/value cache (default) or by re-running the whole
    sequence every step (``use_cache=False``: the reference path the cache is tested against)."""

    def __init__(self, dec: SharedDecoder, cross, cross_mask, use_cache: bool) -> None:
        self.dec, self.cross, self.cross_mask = dec, cross, cross_mask
        self.cache = dec.init_cache(cross, cross_mask) if use_cache else None

    def expand(self, rows: torch.Tensor) -> None:
        """Row i of the result is row rows[i] of now (beams after the prompt step)."""
        if self.cache is not None:
            self.cache = self.cache.select(rows)
        else:
            self.cross = self.cross.index_select(0, rows)
            self.cross_mask = None if self.cross_mask is None else self.cross_mask.index_select(0, rows)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder_self(rows)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: int, block_eos: bool) -> torch.Tensor:
        """ids/mask [N, L]: the whole sequences; the last ``new`` tokens are not in the cache yet."""
        if self.cache is not None:
            logits = self.dec.step(ids[:, -new:], mask, self.cache)[:, -1]  # [N, V]
        else:
            logits = self.dec(ids, mask, self.cross, self.cross_mask).logits[:, -1]
        logp = logits.float().log_softmax(-1)
        if block_eos:                                                  # below min_length
            logp[:, eos] = float("-inf")
        return logp


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """Wu et al. (GNMT): ((5 + len) / 6) ** alpha; the reference divides beam scores by it (alpha 0.6)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def greedy(dec: SharedDecoder, prompt_ids, prompt_mask, cross, cross_mask, max_length: int,
           eos: int, pad: int, min_length: int = 0, use_cache: bool = True) -> GenerationOutput:
    ids, mask = left_align(prompt_ids, prompt_mask, pad)
    b = ids.shape[0]
    step_fn = _Stepper(dec, cross, cross_mask, use_cache)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    scores = torch.zeros(b, device=ids.device)
    out = []
    new = ids.shape[1]
    for step in range(max_length):
        logp = step_fn(ids, mask, new, eos, step < min_length)        # [B, V]
        tok = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, tok[:, None]).squeeze(1))
        tok = tok.masked_fill(done, pad)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        new = 1
        done |= tok == eos
        if done.all():
            break
    return GenerationOutput(sequences=torch.stack(out, 1), scores=scores)


@torch.no_grad()
def beam_search(dec: SharedDecoder, prompt_ids, prompt_mask, cross, cross_mask, max_length: int,
                eos: int, pad: int, num_beams: int, length_penalty: float = 0.6, min_length: int = 0,
                use_cache: bool = True) -> GenerationOutput:
    """Beam search; hypotheses are ranked by sum log-prob / ``gnmt_length_penalty(len, length_penalty)``
    (len counts generated tokens, [SEP] included); [SEP] is blocked for the first ``min_length`` tokens."""
    k = num_beams
    ids, mask = left_align(prompt_ids, prompt_mask, pad)
    b, dev = ids.shape[0], ids.device
    step_fn = _Stepper(dec, cross, cross_mask, use_cache)
    # the prompt is the same for every beam of an item: run it once per item, then copy K times
    beams = torch.arange(b, device=dev).repeat_interleave(k)          # [B*K]
    beam_scores = torch.full((b, k), float("-inf"), device=dev)
    beam_scores[:, 0] = 0.0                                            # identical beams: keep one
    gen = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b

    def norm(score: float, length: int) -> float:
        return score / gnmt_length_penalty(length, length_penalty)

    for step in range(max_length):
        if step == 0:
            logp = step_fn(ids, mask, ids.shape[1], eos, min_length > 0).index_select(0, beams)  # [B*K, V]
            step_fn.expand(beams)
            ids, mask = ids.index_select(0, beams), mask.index_select(0, beams)
        else:
            logp = step_fn(ids, mask, 1, eos, step < min_length)       # [B*K, V]
        v = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * v)         # [B, K*V]
        top_s, top_i = cand.topk(2 * k, dim=1)                         # [B, 2K]
        new_src, new_tok, new_score = [], [], []
        for bi in range(b):
            keep: list[tuple[float, int, int]] = []
            if not done[bi]:
                for rank, (s, i) in enumerate(zip(top_s[bi].tolist(), top_i[bi].tolist())):
                    src, tok = divmod(i, v)
                    if s == float("-inf"):
                        break
                    if tok == eos:
                        if rank < k:
                            seq = gen[bi * k + src].tolist() + [eos]
                            hyps[bi].append((norm(s, step + 1), seq))
                    else:
                        keep.append((s, src, tok))
                    if len(keep) == k:
                        break
                best_running = keep[0][0] if keep else float("-inf")
                if len(hyps[bi]) >= k or not keep:
                    worst = sorted(h[0] for h in hyps[bi])[-k] if hyps[bi] else float("-inf")
                    done[bi] = not keep or norm(best_running, step + 1) <= worst
            while len(keep) < k:                                       # finished row: dummy beams
                keep.append((float("-inf"), 0, pad))
            for s, src, tok in keep:
                new_src.append(bi * k + src)
                new_tok.append(tok)
                new_score.append(s)
        src = torch.tensor(new_src, device=dev)
        tok = torch.tensor(new_tok, device=dev)
        beam_scores = torch.tensor(new_score, device=dev).view(b, k)
        ids = torch.cat([ids[src], tok[:, None]], 1)
        mask = torch.cat([mask[src], torch.ones_like(tok)[:, None]], 1)
        gen = torch.cat([gen[src], tok[:, None]], 1)
        step_fn.reorder(src)
        if all(done):
            break
    for bi in range(b):                                                # unfinished beams count too
        if not done[bi]:
            for j in range(k):
                s = beam_scores[bi, j].item()
                if s > float("-inf"):
                    hyps[bi].append((norm(s, gen.shape[1]), gen[bi * k + j].tolist()))
    best = [max(h, key=lambda x: x[0]) for h in hyps]
    length = max(len(seq) for _, seq in best)
    seqs = torch.full((b, length), pad, dtype=torch.long, device=dev)
    for bi, (_, seq) in enumerate(best):
        seqs[bi, :len(seq)] = torch.tensor(seq, device=dev)
    return GenerationOutput(sequences=seqs, scores=torch.tensor([s for s, _ in best], device=dev))
