"""One evaluation pass on the Ray Train workers: each worker evaluates its shard of the split,
the outputs are gathered, the metrics are computed once.

Sharding: the split is cut into uneven streaming shards that hold every row exactly once
(:func:`orchestrator.runtime.ray_train.sharded_data_config`).  Which worker gets which row is up
to Ray Data, so every row carries an ``item_key`` (a digest of its content) and the gathered
per-item records are sorted by it: the metrics of W workers equal those of one worker on the same
data and checkpoint.

Per workload (:attr:`workloads.base.Workload.evaluation`; workloads stay free of Ray and
torch.distributed: they see a model and batches):

* ``"retrieval"`` (retrieval, pre-train: ``EVAL_KIND``): every worker embeds its shard; text and
  clip embeddings (not the clips' visual tokens) are gathered on every worker; each worker
  re-scores the ``k_test`` candidate pairs (``plan_rerank``) whose clip it holds; the pair scores
  are gathered and the score matrices assembled once.
* ``"records"`` (captioning, videoqa, classification, GLUE: ``predict`` + ``metrics_from``): each
  worker predicts its shard, the records are gathered on rank 0, the metrics computed there and
  sent to every rank.
* ``"rows"`` (any other workload: ``evaluate`` only): the rows are gathered on rank 0, which
  evaluates them.

Bad clips are counted per evaluation pass (their own bad-clip tracker) and gated by
``data.max_bad_fraction`` as in training; the metrics say how many items they cover
(``items``, ``bad_items``, ``item_coverage``) so a metric over fewer items than the split is never
mistaken for one over the whole split.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any, Iterable, Iterator

import torch

from orchestrator.config import RunSpec
from orchestrator.data import quality
from orchestrator.data.pipeline import iter_worker_batches
from orchestrator.runtime.model_setup import WorkerModel
from workloads import common
from workloads.base import Workload
from workloads.metrics.retrieval import assemble_scores, plan_rerank, retrieval_metrics

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- communication
class Comm:
    """Object collectives among the evaluating workers (a single process when ``world == 1``).
    Objects travel over gloo on the CPU, also when the training backend is NCCL."""

    def __init__(self, rank: int = 0, world: int = 1, group=None):
        self.rank, self.world, self.group = rank, world, group

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


_GLOO_GROUP = None


def worker_comm() -> Comm:
    """The Comm of this process's default process group (as Ray Train sets it up), or a
    single-process one when there is none."""
    global _GLOO_GROUP
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Comm()
    group = None
    if dist.get_backend() != "gloo":
        if _GLOO_GROUP is None:  # every rank creates it at its first evaluation, in the same order
            _GLOO_GROUP = dist.new_group(backend="gloo")
        group = _GLOO_GROUP
    return Comm(dist.get_rank(), dist.get_world_size(), group)


# --------------------------------------------------------------------------------- items
def item_keys(batch: dict) -> torch.Tensor:
    """int64 [B]: a digest of each row's content (every tensor column).  Identical rows get the same
    key and have identical outputs, so sorting by it is one order for any sharding."""
    names = sorted(k for k, v in batch.items() if torch.is_tensor(v) and v.ndim >= 1)
    if not names:
        raise ValueError("an evaluation batch has no tensor column")
    cols = {k: batch[k].detach().cpu().contiguous() for k in names}
    keys = []
    for i in range(len(cols[names[0]])):
        h = hashlib.blake2b(digest_size=8)
        for k in names:
            h.update(k.encode())
            h.update(cols[k][i].numpy().tobytes())
        keys.append(int.from_bytes(h.digest(), "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64)


class _Counted:
    """Batches with ``item_key`` added, on the model's device with its batch constants; counts the rows."""

    def __init__(self, batches: Iterable[dict], model: WorkerModel):
        self.batches, self.model = batches, model
        self.rows = 0

    def __iter__(self) -> Iterator[dict]:
        for b in self.batches:
            key = item_keys(b)
            self.rows += len(key)
            yield self.model.on_device({**b, "item_key": key})


def _flat(lists: list[list]) -> list:
    return [x for part in lists for x in part]


# --------------------------------------------------------------------------------- evaluation
def evaluate_shard(wm: WorkerModel, batches: Iterable[dict], comm: Comm | None = None, pair_batch: int = 64
                   ) -> tuple[dict[str, float], list[dict]]:
    """This worker's part of one evaluation of ``wm`` (its module as it is: the engine trains the
    same object); every rank of ``comm`` calls it with its shard.

    Returns ``(metrics, predictions)``: the same metrics on every rank (over all ranks' items;
    ``items`` counts them), the predictions table on rank 0 only ([] elsewhere)."""
    comm = comm or Comm()
    workload, model, task_cfg, tokenizer = wm.workload, wm.module, wm.task_cfg, wm.tokenizer
    counted = _Counted(batches, wm)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if workload.evaluation == "retrieval":
                metrics, rows = _retrieval(workload, model, counted, task_cfg, comm, pair_batch)
            elif workload.evaluation == "records":
                records = workload.predict(model, counted, task_cfg, tokenizer=tokenizer)
                gathered = comm.all_gather(records)
                metrics, rows = (workload.metrics_from(_flat(gathered), task_cfg, tokenizer=tokenizer)
                                 if comm.rank == 0 else (None, []))
            else:
                metrics, rows = _gather_rows_then_evaluate(workload, model, counted, task_cfg, tokenizer, comm,
                                                           wm.constants)
    finally:
        model.train(was_training)
    items = sum(comm.all_gather(counted.rows))
    metrics = comm.broadcast({k: float(v) for k, v in metrics.items()} if comm.rank == 0 else None)
    metrics["items"] = float(items)
    return metrics, (rows if comm.rank == 0 else [])


def _retrieval(workload, model, batches, task_cfg, comm: Comm, pair_batch: int):
    opts = workload.retrieval_options(task_cfg)
    texts, clips = common.retrieval_embed(model, batches)
    all_texts = common.sort_records(_flat(comm.all_gather(texts)))
    clip_v: dict[int, torch.Tensor] = {}
    owner: dict[int, int] = {}
    for rank, part in enumerate(comm.all_gather({c: d["v"] for c, d in clips.items()})):
        for c, v in part.items():
            clip_v.setdefault(c, v)
            owner.setdefault(c, rank)          # a clip on several workers is re-scored by the first
    if not all_texts:
        raise ValueError("retrieval evaluation got no rows: the split is empty or every clip was bad")
    sim, text_to_clip, clip_ids = common.retrieval_sim(all_texts, clip_v)
    if not common.can_rerank(model, opts.get("rerank", True)):
        metrics = retrieval_metrics(sim, sim.T, text_to_clip)
    else:
        plan = plan_rerank(sim, opts["k_test"])
        score = opts.get("rerank_score", "logit_plus_sim")
        video_owner = torch.tensor([owner[c] for c in clip_ids])
        mine = (video_owner[plan.video_idx] == comm.rank).nonzero().squeeze(1)
        scores = common.retrieval_score_pairs(model, all_texts, {c: d["tokens"] for c, d in clips.items()}, clip_ids,
                                              plan.text_idx[mine], plan.video_idx[mine],
                                              common.retrieval_text_len(all_texts), pair_batch, score)
        full = torch.full((plan.num_pairs,), float("nan"))
        for idx, sc in comm.all_gather((mine, scores)):
            full[idx] = sc
        t2v, v2t = assemble_scores(sim, plan, full, add_sim=common.rerank_adds_sim(score))
        metrics = retrieval_metrics(t2v, v2t, text_to_clip)
    metrics.update({"num_texts": float(len(all_texts)), "num_clips": float(len(clip_ids))})
    return metrics, []


def _gather_rows_then_evaluate(workload: Workload, model, batches, task_cfg, tokenizer, comm: Comm,
                               consts: dict[str, torch.Tensor]):
    """A workload with only ``evaluate``: its rows are gathered on rank 0 (in item order) and
    evaluated there in batches of the size they came in (``consts``: the batch constants, added
    to every batch once, not gathered)."""
    rows, size = [], 1
    for b in batches:
        n = len(b["item_key"])
        size = max(size, n)
        rows += [{k: v[i].cpu() for k, v in b.items() if k not in consts and torch.is_tensor(v) and v.shape[:1] == (n,)}
                 for i in range(n)]
    gathered = comm.all_gather(rows)
    if comm.rank != 0:
        return None, []
    ordered = sorted(_flat(gathered), key=lambda r: int(r["item_key"]))
    device = next(model.parameters()).device

    def rebatched():
        for s in range(0, len(ordered), size):
            chunk = ordered[s:s + size]
            b = {k: torch.stack([r[k] for r in chunk]).to(device) for k in chunk[0]}
            b.update(consts)
            yield b

    out = workload.evaluate(model, rebatched(), task_cfg, tokenizer=tokenizer)
    metrics, preds = out if isinstance(out, tuple) else (out, [])
    return metrics, preds


def coverage(items: float, tracker_name: str | None) -> dict[str, float]:
    """``bad_items`` skipped in this pass (its bad-clip tracker's count since the previous pass)
    and ``item_coverage`` = items / (items + bad_items): 1.0 only when no item was skipped."""
    bad = 0
    if tracker_name is not None:

        try:
            bad = int(quality.end_epoch_report(tracker_name).get("this_epoch", {}).get("bad", 0))
        except Exception as e:  # no tracker (no Ray): nothing was counted
            log.debug("no bad-clip counts for %s: %s", tracker_name, e)
    total = items + bad
    return {"bad_items": float(bad), "item_coverage": items / total if total else 0.0}


def run_on_shard(model: WorkerModel, run: RunSpec, shard, tracker_name: str | None = None, comm: Comm | None = None):
    """One evaluation pass over this worker's ``shard`` (a Ray ``DataIterator``): batches of
    ``eval.batch_size`` (the last may be short: no row dropped), bad clips gated by
    ``data.max_bad_fraction``; returns ``(metrics with coverage, predictions on rank 0)``."""
    comm = comm or worker_comm()
    batches = iter_worker_batches(shard, batch_size=run.eval.batch_size, device="cpu",
                                  prefetch_batches=run.data.prefetch_batches, drop_last=False,
                                  run_name=tracker_name, max_bad_fraction=run.data.max_bad_fraction)
    metrics, rows = evaluate_shard(model, batches, comm)
    extra = comm.broadcast(coverage(metrics["items"], tracker_name) if comm.rank == 0 else None)
    metrics.update(extra)
    if comm.rank == 0 and extra["item_coverage"] < 1.0:
        log.warning("evaluation covers %d items; %d bad items of the split were skipped (item_coverage=%.4f)",
                    metrics["items"], extra["bad_items"], extra["item_coverage"])
    return metrics, rows


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, zero_stage: int):
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them for the forward passes
    of evaluation (``deepspeed.zero.GatheredParameters``, read-only); a no-op otherwise."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
