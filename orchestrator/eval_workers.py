"""Evaluation on the Ray Train workers: each worker evaluates its shard of the split, the outputs
are gathered, the metrics are computed once.

Used by the ``evaluate`` verb (an evaluation-only ``TorchTrainer``), by validation during
training (every ``eval.every_steps`` optimizer steps and at the end, see :class:`Validator`) and
so by a sweep trial's dev score.  The driver only plans (the dataset, the scaling config) and
collects; every model forward runs on a worker, on its GPU when ``train.use_gpu``.

Sharding: the split is cut by :class:`ShardedEvalDataConfig` into uneven streaming shards that
hold every row exactly once (Ray Train's own split is equal-sized and drops the remainder).
Which worker gets which row is up to Ray Data, so every row carries an ``item_key`` (a digest of
its content) and the gathered per-item records are sorted by it: the metrics of W workers equal
those of one worker on the same data and checkpoint.

Per workload (workloads stay free of Ray and torch.distributed; they see a model and batches):

* retrieval / pre-train (``EVAL_KIND = "retrieval"``): every worker embeds its shard; text and clip
  embeddings (not the clips' visual tokens) are gathered on every worker; each worker re-scores the
  ``k_test`` candidate pairs (``plan_rerank``) whose clip it holds; the pair scores are gathered
  and the score matrices assembled once.
* captioning / videoqa / classification / GLUE (``predict`` + ``metrics_from``): each worker
  predicts its shard, the records are gathered on rank 0, the metrics computed there and sent to
  every rank.
* any other workload (only ``evaluate``): the rows are gathered on rank 0, which evaluates them.

Bad clips are counted per evaluation pass (their own bad-clip tracker) and gated by
``data.max_bad_fraction`` as in training; the metrics say how many items they cover
(``items``, ``bad_items``, ``item_coverage``) so a metric over fewer items than the split is never
mistaken for one over the whole split.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from typing import Any, Iterable, Iterator

import torch

from orchestrator.config import RunSpec
from orchestrator.data import quality
from orchestrator.data.formats import TEXT_FORMATS
from orchestrator.data.pipeline import build_dataset, iter_worker_batches
from orchestrator.train.model_setup import load_model_for_eval, load_run_tokenizer
from workloads import common
from workloads.metrics.retrieval import assemble_scores, plan_rerank, retrieval_metrics

log = logging.getLogger(__name__)

EVAL_DATASET = "val"  # the Train dataset name of the evaluated split
COVERAGE_KEYS = ("items", "bad_items", "item_coverage")


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
    """Batches with ``item_key`` added, moved to the device, constants added; counts the rows."""

    def __init__(self, batches: Iterable[dict], device, constants: dict[str, torch.Tensor] | None):
        self.batches, self.device, self.constants = batches, device, constants or {}
        self.rows = 0

    def __iter__(self) -> Iterator[dict]:
        for b in self.batches:
            key = item_keys(b)
            self.rows += len(key)
            b = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}
            b["item_key"] = key.to(self.device)
            b.update(self.constants)
            yield b


def _flat(lists: list[list]) -> list:
    return [x for part in lists for x in part]


# --------------------------------------------------------------------------------- evaluation
def evaluate_shard(workload, model: torch.nn.Module, batches: Iterable[dict], task_cfg, tokenizer=None,
                   comm: Comm | None = None, device=None, constants: dict[str, torch.Tensor] | None = None,
                   pair_batch: int = 64) -> tuple[dict[str, float], list[dict]]:
    """This worker's part of one evaluation; every rank of ``comm`` calls it with its shard.

    Returns ``(metrics, predictions)``: the same metrics on every rank (over all ranks' items;
    ``items`` counts them), the predictions table on rank 0 only ([] elsewhere)."""
    comm = comm or Comm()
    device = device if device is not None else next(model.parameters()).device
    counted = _Counted(batches, device, constants)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if getattr(workload, "EVAL_KIND", None) == "retrieval":
                metrics, rows = _retrieval(workload, model, counted, task_cfg, comm, pair_batch)
            elif hasattr(workload, "predict") and hasattr(workload, "metrics_from"):
                records = workload.predict(model, counted, task_cfg, tokenizer=tokenizer)
                gathered = comm.all_gather(records)
                metrics, rows = (workload.metrics_from(_flat(gathered), task_cfg, tokenizer=tokenizer)
                                 if comm.rank == 0 else (None, []))
            else:
                metrics, rows = _gather_rows_then_evaluate(workload, model, counted, task_cfg, tokenizer, comm)
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


def _gather_rows_then_evaluate(workload, model, batches, task_cfg, tokenizer, comm: Comm):
    """A workload with only ``evaluate``: its rows are gathered on rank 0 (in item order) and
    evaluated there in batches of the size they came in."""
    rows, size = [], 1
    consts = dict(getattr(batches, "constants", None) or {})
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


# --------------------------------------------------------------------------------- data
def sharded_eval_data_config(deterministic: bool = False):
    """A ``ray.train.DataConfig`` that splits the ``val`` dataset into uneven shards holding every
    row exactly once (other datasets as Ray Train splits them: equal shards).

    ``deterministic`` (``data.deterministic``): the other datasets run with Ray Data's
    ``preserve_order``, which also turns off the splitter's locality hints, so which rows reach
    which worker, in which order, is a function of the dataset alone (not of task timing)."""
    import ray.data
    import ray.train

    options = None
    if deterministic:  # a copy of the current options (constructing them anew warns of a deprecated field)
        options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
        options.preserve_order = True

    class ShardedEvalDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != EVAL_DATASET}
            out = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest
                   else [{} for _ in range(world_size)])
            if EVAL_DATASET in datasets:
                ds = datasets[EVAL_DATASET]
                if ds.name is None:
                    ds.set_name(EVAL_DATASET)
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][EVAL_DATASET] = split
            return out

    return ShardedEvalDataConfig(execution_options=options, enable_shard_locality=not deterministic)


def eval_sources(cfg, columns: tuple[str, ...]):
    """The sources with a ``val`` split (media sources only when the workload needs frames)."""
    return [s for s in cfg.data.sources if s.val and not ("frames" in columns and s.format in TEXT_FORMATS)]


def build_eval_dataset(cfg, columns: tuple[str, ...], split: str, tracker_name: str):
    """The evaluated split as a Ray dataset (``eval.max_samples`` rows at most), or None when no
    source has it.  Bad clips are counted under ``tracker_name``."""
    sources = eval_sources(cfg, columns) if split == "val" else list(cfg.data.sources)
    if not sources:
        return None
    data_cfg = cfg.data.model_copy(update={"sources": sources})
    ds = build_dataset(data_cfg, split, training=False, columns=columns, seed=cfg.seed, run_name=tracker_name)
    return ds.limit(cfg.eval.max_samples) if cfg.eval.max_samples else ds


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


def run_on_shard(workload, model, task_cfg, run, *, shard, device, constants=None, tokenizer=None,
                 tracker_name: str | None = None, comm: Comm | None = None):
    """One evaluation pass over this worker's ``shard`` (a Ray ``DataIterator``): batches of
    ``eval.batch_size`` (the last may be short: no row dropped), bad clips gated by
    ``data.max_bad_fraction``; returns ``(metrics with coverage, predictions on rank 0)``."""
    comm = comm or worker_comm()
    batches = iter_worker_batches(shard, batch_size=run.eval.batch_size, device="cpu",
                                  prefetch_batches=run.data.prefetch_batches, drop_last=False,
                                  run_name=tracker_name, max_bad_fraction=run.data.max_bad_fraction)
    metrics, rows = evaluate_shard(workload, model, batches, task_cfg, tokenizer=tokenizer, comm=comm,
                                   device=device, constants=constants)
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


# --------------------------------------------------------------------------------- in training
class Validator:
    """Validation during training, called from the train loop: ``due(step)`` every
    ``eval.every_steps`` optimizer steps and at ``train.max_steps``; ``run(engine, step)`` evaluates
    the ``val`` shard on every worker and returns ``{"eval/<metric>": value}`` (identical on every
    rank), or {} when not due or when the run has no ``val`` dataset."""

    def __init__(self, run, workload, task_cfg, device, constants=None, enabled: bool = False,
                 tracker_name: str | None = None):
        self.run_cfg, self.workload, self.task_cfg, self.device = run, workload, task_cfg, device
        self.constants = constants or {}
        self.enabled = enabled and hasattr(workload, "evaluate")  # enabled: the run has a ``val`` dataset
        self.tracker_name = tracker_name
        self.every = run.eval.every_steps
        self.max_steps = run.train.max_steps
        self._tokenizer = None
        self._done_step = -1

    def due(self, step: int) -> bool:
        return self.enabled and step != self._done_step and (
            (self.every > 0 and step % self.every == 0) or step >= self.max_steps)

    def _tok(self):
        if self._tokenizer is None and getattr(self.workload, "USES_MODEL_CONFIG", True):

            self._tokenizer = load_run_tokenizer(self.run_cfg)
        return self._tokenizer

    def run(self, engine, step: int) -> dict[str, float]:
        if not self.due(step):
            return {}
        import ray.train

        self._done_step = step
        module = engine.module
        with full_parameters(module, self.run_cfg.train.zero_stage):
            metrics, _ = run_on_shard(self.workload, module, self.task_cfg, self.run_cfg,
                                      shard=ray.train.get_dataset_shard(EVAL_DATASET), device=self.device,
                                      constants=self.constants, tokenizer=self._tok(),
                                      tracker_name=self.tracker_name)
        return {f"eval/{k}": v for k, v in metrics.items()}


# --------------------------------------------------------------------------------- the verb
def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """The ``evaluate`` verb's Train function: load the checkpoint on this worker's device,
    evaluate its shard; rank 0 reports the metrics with the predictions as a checkpoint file."""
    import json
    import os
    import tempfile

    import ray.train
    import ray.train.torch

    run = RunSpec.model_validate(config["run"])
    device = ray.train.torch.get_device()
    tokenizer = load_run_tokenizer(run)
    workload, task_cfg, model = load_model_for_eval(run, config["checkpoint_uri"], tokenizer, device,
                                                    model_config=config.get("model_config"))
    constants = {}
    if hasattr(workload, "batch_constants"):
        constants = {k: v.to(device) for k, v in workload.batch_constants(tokenizer, task_cfg).items()}
    comm = worker_comm()
    metrics, rows = run_on_shard(workload, model, task_cfg, run, shard=ray.train.get_dataset_shard(EVAL_DATASET),
                                 device=device, constants=constants, tokenizer=tokenizer,
                                 tracker_name=config.get("tracker_name"), comm=comm)
    if comm.rank == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "predictions.json"), "w", encoding="utf-8") as f:
                json.dump(rows, f, default=str)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
