"""Batched greedy and beam-search generation for the shared decoder.

Prompts come right padded (as the tokenizer gives them) and are left-aligned here so every row
continues from its last real token; positions follow the mask, so padding does not shift them.
``max_length`` counts generated tokens (after the prompt, [SEP] included).
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


def _next_logprobs(dec: SharedDecoder, ids, mask, cross, cross_mask) -> torch.Tensor:
    logits = dec(ids, mask, cross, cross_mask).logits[:, -1]           # [B, V]
    return logits.float().log_softmax(-1)


@torch.no_grad()
def greedy(dec: SharedDecoder, prompt_ids, prompt_mask, cross, cross_mask, max_length: int,
           eos: int, pad: int) -> GenerationOutput:
    ids, mask = left_align(prompt_ids, prompt_mask, pad)
    b = ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    scores = torch.zeros(b, device=ids.device)
    out = []
    for _ in range(max_length):
        logp = _next_logprobs(dec, ids, mask, cross, cross_mask)      # [B, V]
        tok = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, tok[:, None]).squeeze(1))
        tok = tok.masked_fill(done, pad)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= tok == eos
        if done.all():
            break
    return GenerationOutput(sequences=torch.stack(out, 1), scores=scores)


@torch.no_grad()
def beam_search(dec: SharedDecoder, prompt_ids, prompt_mask, cross, cross_mask, max_length: int,
                eos: int, pad: int, num_beams: int, length_penalty: float = 1.0) -> GenerationOutput:
    k = num_beams
    ids, mask = left_align(prompt_ids, prompt_mask, pad)
    b, dev = ids.shape[0], ids.device
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # [B*K, P]
    cross = cross.repeat_interleave(k, 0)                              # [B*K, Nc, Ct]
    cross_mask = None if cross_mask is None else cross_mask.repeat_interleave(k, 0)
    beam_scores = torch.full((b, k), float("-inf"), device=dev)
    beam_scores[:, 0] = 0.0                                            # identical beams: keep one
    gen = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b

    def norm(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    for step in range(max_length):
        logp = _next_logprobs(dec, ids, mask, cross, cross_mask)      # [B*K, V]
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
