"""Evaluation sharded over workers (orchestrator.evaluation.shard) gives the metrics of one worker.

Two gloo processes (torch.multiprocessing, no Ray) each evaluate an uneven, interleaved shard of
the same rows in batches of another size and order than the single-process reference; the
metrics must be identical (exact: the model is deterministic on the CPU).  Retrieval re-scores
with k_test below the number of clips, so the candidate plan, the split of the pairs by clip owner
and the assembly all matter; a clip's captions sit on both workers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

N_ROWS = 11
CAPTIONS = ["a red circle moves left", "a blue square moves up", "the circle goes left", "a green triangle moves down",
            "a dog runs", "two cats sit", "a man talks", "the red ball", "a yellow car", "rain on a window",
            "a bird sings"]


def _setup(task: str, tok_dir: str):
    from transformers import AutoTokenizer

    from model import MPlugConfig
    from orchestrator.runtime.model_setup import tokenizer_overrides
    from workloads.base import load_workload

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    wl = load_workload(task)
    if task == "retrieval":
        cfg = wl.Config(k_test=3)
    elif task == "captioning":
        cfg = wl.Config(num_beams=2, max_length=6, with_meteor=False)
    else:
        cfg = wl.Config(glue_task="mrpc")
    over = tokenizer_overrides(tok)
    if task == "glue":
        over["num_labels"] = 2
    torch.manual_seed(0)
    model = wl.build_model(MPlugConfig.from_preset("tiny", **over), cfg).eval()
    consts = wl.batch_constants(tok, cfg) if wl.batch_constants is not None else {}
    return tok, wl, cfg, model, consts


def _rows(task: str, tok) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    e = tok(CAPTIONS[:N_ROWS], padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    clip = [0, 1, 0, 2, 3, 1, 4, 5, 2, 5, 0]                       # several captions per clip
    clip_frames = torch.randint(0, 256, (6, 2, 32, 32, 3), dtype=torch.uint8, generator=g)
    rows = []
    for i in range(N_ROWS):
        if task == "glue":
            rows.append({"text_ids": e["input_ids"][i], "text_mask": e["attention_mask"][i],
                         "text_type_ids": torch.zeros(10, dtype=torch.int64), "label": torch.tensor(i % 2)})
        elif task == "retrieval":
            rows.append({"frames": clip_frames[clip[i]], "text_ids": e["input_ids"][i],
                         "text_mask": e["attention_mask"][i], "clip_index": torch.tensor(clip[i])})
        else:
            rows.append({"frames": clip_frames[clip[i]], "answer_ids": e["input_ids"][i],
                         "answer_mask": e["attention_mask"][i], "clip_index": torch.tensor(clip[i])})
    return rows


def _batches(rows: list[dict], size: int) -> list[dict]:
    return [{k: torch.stack([r[k] for r in rows[s:s + size]]) for k in rows[0]} for s in range(0, len(rows), size)]


def _worker(rank: int, world: int, port: int, task: str, tok_dir: str, out: str) -> None:
    import torch.distributed as dist

    from orchestrator.evaluation.shard import evaluate_shard, worker_comm
    from orchestrator.runtime.model_setup import WorkerModel

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    tok, wl, cfg, model, consts = _setup(task, tok_dir)
    rows = _rows(task, tok)
    if world == 1:
        mine, size = rows[::-1], 3                                  # another order, another batch size
    else:
        mine, size = [r for i, r in enumerate(rows) if (i % 3 == 0) == (rank == 0)], 2   # 4 and 7 rows
    metrics, preds = evaluate_shard(WorkerModel(wl, cfg, model, tok, consts), _batches(mine, size), comm=worker_comm())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "preds": preds}, default=str))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, task: str, tok_dir: str, out: Path) -> list[dict]:
    out.mkdir()
    if world == 1:
        _worker(0, 1, 0, task, tok_dir, str(out))
    else:
        mp.start_processes(_worker, args=(world, free_port(), task, tok_dir, str(out)), nprocs=world,
                           start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("task", ["retrieval", "captioning", "glue"])
def test_two_workers_give_the_metrics_of_one(task, tiny_hf, tmp_path):
    one = _run(1, task, tiny_hf.tokenizer, tmp_path / "one")
    two = _run(2, task, tiny_hf.tokenizer, tmp_path / "two")
    assert one[0]["metrics"]["items"] == N_ROWS
    assert two[0]["metrics"] == one[0]["metrics"]                   # exact, every key
    assert two[1]["metrics"] == one[0]["metrics"]                   # the same metrics on every rank
    assert two[1]["preds"] == [] and two[0]["preds"] == one[0]["preds"]   # one order, on rank 0
    if task == "retrieval":
        assert one[0]["metrics"]["num_clips"] == 6 and one[0]["metrics"]["num_texts"] == N_ROWS


def test_item_keys_are_content_digests():
    from orchestrator.evaluation.shard import item_keys

    b = {"text_ids": torch.tensor([[1, 2], [3, 4], [1, 2]]), "label": torch.tensor([0, 1, 0]), "note": "x"}
    k = item_keys(b)
    assert k.dtype == torch.int64 and k[0] == k[2] and k[0] != k[1]
    assert item_keys({"text_ids": b["text_ids"][1:], "label": b["label"][1:]}).tolist() == k[1:].tolist()


def test_validation_is_due_every_n_steps_and_at_the_end():
    """The schedule decides when validation runs (the validator only runs it)."""
    from orchestrator.train.schedule import StepSchedule

    def schedule(validate_every):  # eval.every_steps, or None: the run has no val dataset
        return StepSchedule(max_steps=10, log_every=100, checkpoint_every=100, preemption_check_every=100,
                            validate_every=validate_every)

    v = schedule(4)
    assert [s for s in range(1, 11) if v.at(s).validate] == [4, 8, 10]
    assert not schedule(None).at(4).validate  # no val dataset: never
    assert [s for s in range(1, 11) if schedule(0).at(s).validate] == [10]
