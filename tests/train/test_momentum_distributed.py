"""The momentum encoders and the contrastive queue under the real DeepSpeed engine on 2 gloo CPU
workers (torch.multiprocessing, no Ray): the loop's micro-step, gradient accumulation, bf16."""
import os
import socket

import pytest
import torch

WORLD = 2
B = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, micro: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + micro)
    ids = torch.randint(5, 2000, (B, 12), generator=g)
    ids[:, 0] = 2
    return {"frames": torch.randint(0, 256, (B, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
            "text_ids": ids, "text_mask": torch.ones_like(ids),
            "clip_index": torch.arange(B) + 1000 * rank + 10 * micro}  # distinct clips on every rank


def _engine(tcfg, precision: str, seed: int):
    import deepspeed

    from model import MPlugConfig
    from orchestrator.train.deepspeed_config import build_deepspeed_config
    from orchestrator.train.optim import build_optimizer
    from workloads import pretrain

    torch.manual_seed(seed)
    model = pretrain.build_model(MPlugConfig.from_preset("tiny"), pretrain.Config())
    opt, sched = build_optimizer(model, tcfg)
    ds = build_deepspeed_config(tcfg, WORLD)
    ds["bf16"] = {"enabled": precision == "bf16"}  # TrainConfig refuses bf16 on CPU; DeepSpeed's CPU engine runs it
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds,
                                           dist_init_required=False)
    return engine


def _worker(rank: int, port: int, out: str, precision: str, zero_stage: int) -> None:
    os.environ.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from orchestrator.train.extensions import load_cpu_comm_op, use_locked_build_tools

    use_locked_build_tools()  # DeepSpeed's CPU op built with the ninja the train loop's workers use,
    load_cpu_comm_op()        # under the node's build lock, as they build it
    import deepspeed
    import torch.distributed as dist

    from orchestrator.train import checkpoint, manifest
    from orchestrator.train.config import TrainConfig
    from orchestrator.train.momentum_sync import MomentumSync
    from orchestrator.trainer.loop import micro_step
    from workloads import pretrain

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    accum, micro_batches = 2, 6
    tcfg = TrainConfig(batch_size_per_worker=B, grad_accum_steps=accum, zero_stage=zero_stage, warmup_steps=0,
                       lr=1e-3, max_steps=100)
    engine = _engine(tcfg, precision, seed=0)
    module = engine.module
    sync = MomentumSync(module, WORLD)
    assert sync.active  # momentum_sync.attach: the loop runs the EMA once per optimizer step
    mom = module.momentum
    dtypes = sorted({str(t.dtype) for t in mom.buffers() if t.is_floating_point()})
    online_dtype = str(module.vision.blocks[0].fc1.weight.dtype)
    calls = []
    ema = mom.update
    mom.update = lambda online: (calls.append(engine.global_steps), ema(online))[1]
    task = pretrain.Config()
    ema_err = 0.0
    for i in range(micro_batches):
        last = i == micro_batches - 1
        if last:  # the EMA of the last optimizer step, checked against its fp32 amount
            before = {k: t.detach().clone().double() for k, t in mom.encoders.named_buffers()}
        micro_step(engine, pretrain, _batch(rank, i), task, sync)
        if last:
            online = dict(module.named_parameters())
            for k, t in mom.encoders.named_buffers():
                if k in online:
                    want = before[k] + (1 - mom.m) * (online[k].detach().double() - before[k])
                    ema_err = max(ema_err, float((t.double() - want).abs().max()))
    sd = {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith("momentum.")}
    torch.save({"vision_queue": mom.vision_queue.clone(), "text_queue": mom.text_queue.clone(),
                "idx_queue": mom.idx_queue.clone(), "queue_ptr": mom.queue_ptr.clone(), "calls": calls,
                "steps": engine.global_steps, "dtypes": dtypes, "online_dtype": online_dtype,
                "ema_err": ema_err}, os.path.join(out, f"rank{rank}.pt"))

    # checkpoint -> a fresh engine (other seed) restores the momentum state exactly; the export has it
    ckpt = os.path.join(out, "ckpt")
    checkpoint.save(engine, ckpt, {"step": engine.global_steps}, rank)
    checkpoint.commit(manifest.describe_files(ckpt), ckpt, {"step": engine.global_steps}, None, None, rank,
                      WORLD)  # the completion marker, once every rank saved (issue 17, item 4)
    exported = os.path.join(out, "export")
    checkpoint.export(engine, zero_stage, exported, rank)
    fresh = _engine(tcfg, precision, seed=1)
    checkpoint.load(fresh, ckpt)
    restored = {k: v for k, v in fresh.module.state_dict().items() if k.startswith("momentum.")}
    torch.save({"restored_equal": sorted(k for k in sd if torch.equal(sd[k], restored[k])),
                "keys": sorted(sd), "live": sd if rank == 0 else None},
               os.path.join(out, f"restore{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("precision,zero_stage", [("bf16", 1), ("bf16", 2), ("fp32", 0)])
def test_two_workers_share_one_queue_and_ema_once_per_optimizer_step(tmp_path, precision, zero_stage):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from orchestrator.train.weights import state_dict_from

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), precision, zero_stage), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(WORLD)]
    # 6 micro-batches, accumulation 2: 3 optimizer steps, one EMA after each
    assert r[0]["steps"] == 3 and r[0]["calls"] == [1, 2, 3] and r[1]["calls"] == [1, 2, 3]
    # every rank holds the same global queue, with the rows of every rank
    for k in ("vision_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert torch.equal(r[0][k], r[1][k]), k
    assert int(r[0]["queue_ptr"]) == 6 * B * WORLD
    ids = set(r[0]["idx_queue"][0].tolist())
    want = {int(c) for rank in range(WORLD) for i in range(6) for c in _batch(rank, i)["clip_index"]}
    assert want <= ids
    # bf16 engine: the online weights are bf16, the momentum state stays fp32 and moves by the fp32 EMA
    assert r[0]["online_dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    assert r[0]["dtypes"] == ["torch.float32"]
    assert r[0]["ema_err"] < 1e-6, r[0]["ema_err"]
    # resume restores the momentum state exactly, the export carries it
    for i in range(WORLD):
        back = torch.load(tmp_path / f"restore{i}.pt")
        assert back["restored_equal"] == back["keys"] and len(back["keys"]) > 100
    live = torch.load(tmp_path / "restore0.pt")["live"]
    exported = load_file(tmp_path / "export" / "model.safetensors")
    consolidated = state_dict_from(str(tmp_path / "ckpt"))  # what --init-from a checkpoint reads
    for k, v in live.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
        assert torch.equal(consolidated[k], v), k
