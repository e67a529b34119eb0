"""Async checkpoints of a real DeepSpeed engine (one process, gloo on CPU) whose host copies are
deferred to the upload thread: each run saves at step 2 and trains step 3 at once, while the upload
thread's copies are held back half a second; the checkpoint must hold step 2's weights, optimizer
state and forward-changed buffer.  ZeRO-3 saves copy at once (its forward gathers and releases the
parameters' data).

Run by ``make_ds_checkpoints.py`` (one DeepSpeed start for both; it puts the repository on the path): ``main(OUT_DIR, RESULTS)`` writes
one JSON line per (ZeRO stage, precision) into RESULTS."""
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import ray.train
import torch

from orchestrator.train import checkpoint, upload

HELD_S = 0.5
MADE: list[tuple[int, bool]] = []  # (copies, made in the upload thread) per copy_all


def leaves(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj.detach().float().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in leaves(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in leaves(v)]
    return []


class Counted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)
        self.register_buffer("seen", torch.zeros(4))  # the forward changes it, as a queue is

    def forward(self, x):
        self.seen += 1
        return self.b(torch.relu(self.a(x))).sum()


def run(out: Path, stage: int, bf16: bool) -> dict:
    torch.manual_seed(0)
    m = Counted()
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "bf16": {"enabled": bf16}}
    eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    x = torch.randn(2, 16, dtype=torch.bfloat16 if bf16 else torch.float32)

    def step():
        eng.backward(eng(x))
        eng.step()

    run_dir = str(out / f"z{stage}-{'bf16' if bf16 else 'fp32'}")
    saver = checkpoint.Checkpointer(eng, [], run_dir=run_dir, rank=0, world=1)
    step()
    saver.prepare()
    saver.uploads.buffers.ready.result()
    step()
    at_save = {k: v.detach().float().clone() for k, v in m.state_dict().items()}
    optimizer_at_save = leaves(eng.optimizer.state_dict())
    MADE.clear()
    saver.save(2, {"step": 2}, {})
    copied_on_step = sum(n for n, upload_thread in MADE if not upload_thread)  # copy_all on this thread
    step()  # at once: its forward changes the buffer, its update the weights
    moved = any(not torch.equal(at_save[k], v.detach().float()) for k, v in m.state_dict().items() if k != "seen")
    saver.drain()
    saver.close()
    deferred = copied_on_step == 0 and sum(n for n, upload_thread in MADE if upload_thread) > 0
    folder = Path(run_dir, "checkpoint_step_00000002", "ds")
    states = torch.load(next(folder.glob("*model_states.pt")), weights_only=False)
    optim = next(folder.glob("*optim_states.pt"), None)
    saved_optimizer = (torch.load(optim, weights_only=False)["optimizer_state_dict"] if optim is not None
                       else states["optimizer"])
    same = {"module": all(torch.equal(states["module"][k].float(), at_save[k]) for k in at_save),
            "optimizer": [torch.equal(a, b) for a, b in zip(leaves(saved_optimizer), optimizer_at_save)]}
    return {"stage": stage, "bf16": bf16, "deferred": deferred, "moved_after": moved,
            "module_is_step_2": same["module"], "optimizer_tensors": len(optimizer_at_save),
            "optimizer_is_step_2": len(same["optimizer"]) == len(optimizer_at_save) and all(same["optimizer"]),
            "copy_wait_s": saver.copy_wait_s}


def main(out: str, results: str) -> None:
    ctx = SimpleNamespace(experiment_fs_path=out, storage_filesystem=None)
    ray.train.get_context = lambda: SimpleNamespace(get_storage=lambda: ctx)
    ray.train.report = lambda *a, **k: None  # the commit's report: no Ray Train here
    copy_all = upload.copy_all

    def held(pending):  # the upload thread's copies come late: the next step must wait for them
        MADE.append((len(pending), threading.current_thread().name.startswith("checkpoint-upload")))
        time.sleep(HELD_S)
        copy_all(pending)

    upload.copy_all = held
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        with open(results, "w") as f:
            for stage, bf16 in ((0, False), (1, True), (2, False), (3, False)):
                f.write(json.dumps(run(Path(out), stage, bf16)) + "\n")
    finally:
        upload.copy_all = copy_all
