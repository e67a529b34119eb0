"""The step-time stall of a checkpoint on CPU: synchronous vs asynchronous upload, tiny and base.

One local Ray, one Ray Train worker (``TorchTrainer``, gloo) per preset, a real DeepSpeed engine
(fp32, ZeRO 0 or ``--zero-stage``, AdamW: the engine's files carry the weights and both Adam moments) around the
mPLUG-2 pre-training model of the preset; a step is forward + backward + optimizer step of the
pre-training objective on two synthetic samples (``benchmarks/model_step.py``'s step), then the
momentum encoders' EMA (``MomentumSync``) and the checkpointer's ``poll``, as the train loop does.  The same worker, with the same engine, measures
``--rounds`` saves per mode, alternating ``sync``, ``async`` and ``async_on_step`` (async with its
host copies made on the step, as before they were deferred; its own checkpointer and host buffers)
(``orchestrator.train.checkpoint``: the code the loop runs, reporting to Ray Train and writing the
completion marker), into a local storage folder (``--storage``; Ray Train's run folder).

Per save: the stall, the time the training thread spends in the checkpoint's code: the save call,
plus, for async, the time the next optimizer update waited for the state's host copy
(``copy_wait_s``: the upload thread makes it while the next forward and backward run) and the
step-boundary polls until the commit (``poll_s``: the commit's marker and report run there).  Also
``step_delta_s``: the time of the step that takes the save minus the median of the ``--plain`` steps
before it, plus the copy wait (the stall as the step times show it, with their jitter: tens of
milliseconds at tiny); for async the rest of the extra time of the steps after it until its commit
(``overlap_s``: the background upload shares the CPU with training), the time from the save to its
commit, and the part of the save call spent taking the state (``state_copy_s``: the snapshot on the
step path).
Before the rounds the async checkpointer is prepared as the train loop prepares it at its first
step (``Checkpointer.prepare``: its host buffers allocated in the upload thread; printed: the part
on the step path and when the buffers were ready); ``--no-prepare`` leaves the allocation to the
first async save.  Checkpoints of earlier rounds are deleted between rounds (outside the timed steps).  The last
line is a JSON object with every figure and, per preset, ``async_over_sync`` (median async stall
/ median sync stall; the target is 0.10 or less) and ``async_on_step_over_sync``; per async mode,
``steps_cost_s``: the stall plus what the upload added to the steps until the commit.

    python benchmarks/checkpoint_stall.py [--presets tiny base] [--rounds 3] [--rounds-tiny 6] [--plain 5]
                                          [--storage DIR] [--frames 1] [--image-size 224] [--no-prepare] [--zero-stage 0]
                                          [--modes sync async async_on_step]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

MODES = ("sync", "async", "async_on_step")  # async_on_step: its host copies on the step (not deferred)


def worker(config: dict) -> None:
    """The Ray Train worker: build the engine, then measure each round's saves."""
    import deepspeed
    import torch

    from benchmarks.model_step import make_batch, pretrain_step
    from model import MPlug2, MPlugConfig
    from orchestrator.train import upload
    from orchestrator.train.checkpoint import Checkpointer
    from orchestrator.train.config import TrainConfig
    from orchestrator.train.deepspeed_config import build_deepspeed_config
    from orchestrator.train.extensions import load_cpu_comm_op, use_locked_build_tools
    from orchestrator.train.momentum_sync import MomentumSync
    from orchestrator.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = MPlugConfig.from_preset(config["preset"], image_size=config["image_size"])
    model = MPlug2(cfg, "pretrain").train()
    tcfg = TrainConfig(num_workers=1, batch_size_per_worker=1, warmup_steps=0, lr=1e-5, max_steps=10 ** 6,
                       zero_stage=config["zero_stage"])
    optimizer, scheduler = build_optimizer(model, tcfg)
    use_locked_build_tools()
    load_cpu_comm_op()
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(tcfg, 1), dist_init_required=False)
    frames, ids, mask = make_batch(cfg, 2, config["frames"], length=16)  # 2: matching draws a negative
    momentum = MomentumSync(engine.module, 1)  # as the loop runs it: the EMA after each optimizer step
    copy_s = [0.0]  # async: the part of the save spent copying the state into host memory
    hold = upload.DeferredWrites.save

    def timed_hold(self, state_dict, path):
        t0 = time.perf_counter()
        try:
            return hold(self, state_dict, path)
        finally:
            copy_s[0] += time.perf_counter() - t0

    upload.DeferredWrites.save = timed_hold
    run_dir = config["run_dir"]
    modes = config["modes"]
    savers = {m: Checkpointer(engine, [], run_dir=run_dir, rank=0, world=1, upload=m.split("_")[0],
                              defer_copies=m == "async") for m in modes}

    def step(saver) -> float:
        t0 = time.perf_counter()
        engine.backward(pretrain_step(engine.module, frames, ids, mask))
        engine.step()
        momentum.after_micro_batch(True)
        saver.poll()
        return time.perf_counter() - t0

    def clear_old(keep: str) -> None:
        for p in Path(run_dir).glob("checkpoint_step_*"):
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)

    for _ in range(2):  # warm-up: the optimizer's state exists from here on
        step(savers["sync"])
    # what the train loop does at its first step: the async saves' host buffers, allocated ahead in
    # the upload thread (--no-prepare: the first async save allocates them on the step path)
    t0 = time.perf_counter()
    prepare_s = savers["async"].prepare() if config["prepare"] else 0.0
    ready = savers["async"].uploads.buffers.ready
    if ready is not None:
        ready.result()
    if config["prepare"] and "async_on_step" in savers:  # its own buffers (each checkpointer holds a copy), not timed
        savers["async_on_step"].prepare()
        savers["async_on_step"].uploads.buffers.ready.result()
    buffers_s = time.perf_counter() - t0
    rows = []
    for r in range(config["rounds"]):
        for mode in modes:
            saver = savers[mode]
            plain = [step(saver) for _ in range(config["plain"])]
            t0 = time.perf_counter()
            engine.backward(pretrain_step(engine.module, frames, ids, mask))
            engine.step()
            saver.poll()
            saved_at, saved, copy_s[0], waited = time.perf_counter(), engine.global_steps, 0.0, saver.copy_wait_s
            saver.save(saved, {"step": saved}, {"loss": 0.0})
            save_s = time.perf_counter() - saved_at
            took = time.perf_counter() - t0
            after, committed, poll_s = [], None, 0.0
            while saver.uploads is not None and saver.uploads.pending is not None:
                t1 = time.perf_counter()
                engine.backward(pretrain_step(engine.module, frames, ids, mask))
                engine.step()
                momentum.after_micro_batch(True)
                t2 = time.perf_counter()
                committed = saver.poll()
                poll_s += time.perf_counter() - t2
                after.append(time.perf_counter() - t1)
            base = statistics.median(plain)
            copy_wait = saver.copy_wait_s - waited  # the next update's wait for the deferred host copies
            row = {"round": r, "mode": mode, "step_s": base, "save_step_s": took, "save_call_s": save_s,
                   "state_copy_s": copy_s[0], "copy_wait_s": copy_wait, "poll_s": poll_s,
                   "stall_s": save_s + copy_wait + poll_s, "step_delta_s": took - base + copy_wait,
                   "steps_until_commit": len(after),
                   "overlap_s": sum(a - base for a in after) - copy_wait,
                   "commit_after_s": (time.perf_counter() - committed.started) if committed else 0.0}
            kept = Path(run_dir) / f"checkpoint_step_{saved:08d}"
            row["checkpoint_bytes"] = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
            rows.append(row)
            print(json.dumps({"preset": config["preset"], **row}), flush=True)
            clear_old(keep=kept.name)
    size = max(r["checkpoint_bytes"] for r in rows)
    breakdown = save_breakdown(engine) if size < 2**30 else None  # a second copy of the state: small only
    for saver in savers.values():
        saver.close()
    Path(config["out"]).write_text(json.dumps({"rows": rows, "checkpoint_bytes": size, "prepare_s": prepare_s,
                                               "buffers_ready_s": buffers_s, "breakdown": breakdown,
                                               "params": sum(p.numel() for p in engine.module.parameters())}))


def save_breakdown(engine, repeats: int = 5) -> dict:
    """Where an async save call's time goes, on the live engine: DeepSpeed's own save path (with a
    checkpoint engine that keeps what it is asked to write and writes nothing), the tensors of that
    state (count, bytes), one ``copy_`` of each into buffers that exist, the snapshot of the whole
    state into reused host buffers with its copies made at once (``upload.snapshot``: what
    ``async_on_step`` takes on the step), and an async save's own split (``DeferredWrites.around``
    with ``defer``, DeepSpeed's save path included: the step path; then ``copy``, the module and
    optimizer states' walk and the copies, in the upload thread).  Medians of ``repeats``.  It holds
    a second copy of the state: small presets only."""
    import torch

    from orchestrator.train.checkpoint import Checkpointer, save
    from orchestrator.train.upload import DeferredWrites, HostBuffers, copy_all, snapshot

    class Capture:
        def __init__(self, inner):
            self.inner, self.states = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def save(self, state_dict, path):
            self.states.append(state_dict)

    inner, cap, took = engine.checkpoint_engine, Capture(engine.checkpoint_engine), []
    engine.checkpoint_engine = cap
    try:
        for _ in range(repeats):
            cap.states = []
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                save(engine, d, {}, 0)
                took.append(time.perf_counter() - t0)
    finally:
        engine.checkpoint_engine = inner
    tensors: list = []

    def leaves(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                leaves(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                leaves(v)

    leaves(cap.states)
    dst = [t.detach().clone() for t in tensors]
    copies, snaps, step_path, thread, buffers, held = [], [], [], [], HostBuffers(), HostBuffers()
    eager = Checkpointer(engine, [], run_dir=None)._forward_buffers()  # as an async save passes them
    for _ in range(repeats + 1):  # the first allocates the buffers: not counted
        t0 = time.perf_counter()
        for a, b in zip(dst, tensors):
            a.copy_(b)
        copies.append(time.perf_counter() - t0)
        buffers.start(False)
        t0 = time.perf_counter()
        snapshot(cap.states, buffers)
        snaps.append(time.perf_counter() - t0)
        copy_all(buffers.finish())
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            deferred = DeferredWrites.around(engine, lambda: save(engine, d, {}, 0), held, defer=True, eager=eager)
            step_path.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            deferred.copy()
            thread.append(time.perf_counter() - t0)
    return {"deepspeed_save_path_s": statistics.median(took), "tensors": len(tensors),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "copy_each_tensor_s": statistics.median(copies[1:]), "snapshot_s": statistics.median(snaps[1:]),
            "deferred_step_path_s": statistics.median(step_path[1:]),
            "deferred_upload_thread_s": statistics.median(thread[1:])}


def measure(preset: str, args, storage_root: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    name = f"stall-{preset}"
    config = {"preset": preset, "prepare": not args.no_prepare, "modes": ["sync", "async", *(
                  m for m in args.modes if m not in ("sync", "async"))], "zero_stage": args.zero_stage, "rounds": args.rounds_tiny if preset == "tiny" else args.rounds, "plain": args.plain, "frames": args.frames,
              "image_size": args.image_size, "run_dir": os.path.join(storage_root, name),
              "out": os.path.join(storage_root, f"{name}.json")}
    trainer = TorchTrainer(worker, train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=name, storage_path=storage_root,
                                                          worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}))
    trainer.fit()
    out = json.loads(Path(config["out"]).read_text())
    rows = out["rows"]
    def med(key: str, mode: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    out_rows = {"params": out["params"], "checkpoint_bytes": out["checkpoint_bytes"], "rows": rows,
                "prepare_s": out["prepare_s"], "buffers_ready_s": out["buffers_ready_s"], "breakdown": out["breakdown"],
                "step_s": statistics.median(r["step_s"] for r in rows)}
    for m in config["modes"]:
        out_rows.update({f"{m}_stall_s": med("stall_s", m), f"{m}_save_call_s": med("save_call_s", m),
                         f"{m}_step_delta_s": med("step_delta_s", m)})
        if m != "sync":
            out_rows.update({f"{m}_{k}": med(k, m) for k in ("overlap_s", "commit_after_s", "state_copy_s", "copy_wait_s",
                                                             "poll_s")})
            # what the checkpoint costs the steps in all: the stall and what the upload added until the commit
            out_rows[f"{m}_steps_cost_s"] = statistics.median(r["step_delta_s"] + r["overlap_s"] for r in rows
                                                              if r["mode"] == m)
    out_rows["async_over_sync"] = out_rows["async_stall_s"] / out_rows["sync_stall_s"]
    out_rows["async_over_sync_step_delta"] = out_rows["async_step_delta_s"] / out_rows["sync_step_delta_s"]
    if "async_on_step" in config["modes"]:
        out_rows["async_on_step_over_sync"] = out_rows["async_on_step_stall_s"] / out_rows["sync_stall_s"]
    return out_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--rounds", type=int, default=3, help="saves per mode (sync, async and async_on_step alternate)")
    ap.add_argument("--rounds-tiny", type=int, default=6, help="--rounds for tiny (its saves take milliseconds)")
    ap.add_argument("--plain", type=int, default=5, help="steps without a save before each save (the baseline)")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=0,
                    help="DeepSpeed's ZeRO stage of the engine (default 0; pretrain_base.yaml trains with 1)")
    ap.add_argument("--no-prepare", action="store_true",
                    help="no Checkpointer.prepare at the start: the first async save allocates its host buffers")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="the modes to alternate (sync and async always; async_on_step by default: a second host copy)")
    ap.add_argument("--storage", default=None, help="the storage folder (default: a temporary one, removed after)")
    args = ap.parse_args(argv)

    import ray

    from orchestrator.ray_env import ensure_ray

    root = args.storage or tempfile.mkdtemp(prefix="ckpt-stall-")
    ensure_ray()
    result: dict = {"storage": "local folder", "frames": args.frames, "image_size": args.image_size,
                    "zero_stage": args.zero_stage,
                    "rounds": args.rounds, "rounds_tiny": args.rounds_tiny, "plain_steps": args.plain, "target_async_over_sync": 0.10}
    try:
        for preset in args.presets:
            r = measure(preset, args, root)
            result[preset] = r
            print(f"{preset}: {r['params']:,} params, checkpoint {r['checkpoint_bytes'] / 2**20:,.1f} MiB, "
                  f"step {r['step_s']:.2f} s; stall sync {r['sync_stall_s']:.3f} s, async {r['async_stall_s']:.4f} s "
                  f"(async/sync {r['async_over_sync']:.3f}; as the step times show it: sync {r['sync_step_delta_s']:.3f} "
                  f"s, async {r['async_step_delta_s']:.3f} s); async: commit {r['async_commit_after_s']:.2f} s after "
                  f"the save, {r['async_overlap_s']:.2f} s added to the steps until then; the save call itself: "
                  f"sync {r['sync_save_call_s']:.3f} s, async {r['async_save_call_s']:.3f} s (of which taking the state "
                  f"{r['async_state_copy_s']:.4f} s; the next update waited {r['async_copy_wait_s']:.4f} s for its copy; "
                  f"the polls until the commit {r['async_poll_s']:.4f} s); prepare at the first step: {r['prepare_s']:.3f} s on the "
                  f"step, buffers ready {r['buffers_ready_s']:.2f} s after it", flush=True)
            if "async_on_step_over_sync" in r:
                print(f"{preset}: async with its host copies on the step instead: stall {r['async_on_step_stall_s']:.3f} s "
                      f"(over sync {r['async_on_step_over_sync']:.3f}), {r['async_on_step_overlap_s']:.2f} s added to the "
                      f"steps until its commit; what a checkpoint costs the steps in all (stall + added), deferred / on "
                      f"the step: {r['async_steps_cost_s']:.3f} / {r['async_on_step_steps_cost_s']:.3f} s", flush=True)
            if r["breakdown"]:
                b = r["breakdown"]
                print(f"{preset}: the async save call's parts: DeepSpeed's save path {b['deepspeed_save_path_s'] * 1e3:.1f} ms, "
                      f"the snapshot of its {b['tensors']:,} tensors ({b['tensor_bytes'] / 2**20:.1f} MiB) "
                      f"{b['snapshot_s'] * 1e3:.1f} ms with its copies at once (a copy_ of each tensor alone "
                      f"{b['copy_each_tensor_s'] * 1e3:.1f} ms); as an async save takes it: "
                      f"{b['deferred_step_path_s'] * 1e3:.1f} ms on the step path (DeepSpeed's save path included), "
                      f"then {b['deferred_upload_thread_s'] * 1e3:.1f} ms in the upload thread (the module and "
                      f"optimizer states' walk and the copies)", flush=True)
    finally:
        ray.shutdown()
        if args.storage is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({**result, "async_over_sync": {p: result[p]["async_over_sync"] for p in args.presets},
                      "async_on_step_over_sync": {p: result[p].get("async_on_step_over_sync") for p in args.presets}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
