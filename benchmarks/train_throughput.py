"""Training throughput: a plain single-process PyTorch loop vs this Ray Train + DeepSpeed stack with
one worker, on the same pre-train batches; then the same stack fed by the Ray Data plane, for its
data-wait fraction: once reading the clips as generated, once reading shards written by
``shard --transcode`` (short side just above the crop, a keyframe every 4 frames, no B-frames).  Prints the overhead ratio (target <= 1.10x) and data-wait (target <= 5%).

The run fed by transcoded shards trains with the config's ``train.num_workers`` (``--fed-workers``;
tiny: 2 gloo workers of one thread each, which is how training on CPUs uses the cores the decoders
leave: one single-threaded trainer cannot, and a second torch thread costs more CPU per sample than
it saves here).  For that run it also measures what one sample costs in CPU: training it (the plain loop's
CPU seconds) and feeding it (the machine's busy CPU seconds while the data plane alone iterates the
same dataset: decode tasks, Ray's processes and the iterator), and from those the least data wait
any overlap could reach on this machine's cores with the trainer at its solo pace
(``data_wait_floor``): a step lasts at least the training alone and at least all the work over the
cores.

    .venv/bin/python benchmarks/train_throughput.py                      # tiny on CPU
    .venv/bin/python benchmarks/train_throughput.py --presets tiny base --image-size 224 --gpu

Last line: a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_batches(tokenizer, n_batches: int, batch: int, frames: int, size: int, seed: int = 0, max_length: int = 16):
    """Pre-train batches as the data plane yields them: random uint8 frames, captions padded to
    ``max_length`` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    texts = [f"a red square moves {d}" for d in ("left", "right", "up", "down")]
    out = []
    for i in range(n_batches):
        enc = tokenizer([texts[(i + j) % 4] for j in range(batch)], padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        out.append({"frames": torch.randint(0, 255, (batch, frames, size, size, 3), dtype=torch.uint8, generator=g),
                    "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"],
                    "clip_index": torch.arange(i * batch, (i + 1) * batch)})
    return out


def plain_loop(cfg, model_cfg, batches, warmup: int, device) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of model + AdamW + the workload's losses, one process, no
    Ray, no DeepSpeed."""
    import torch

    from orchestrator.train.optim import build_optimizer
    from workloads import pretrain

    torch.manual_seed(0)
    # like for like: a Ray worker with cpus_per_worker CPUs runs torch with that many threads
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    task_cfg = pretrain.Config.model_validate(cfg.task)
    model = pretrain.build_model(model_cfg, task_cfg).to(device).train()
    opt, sched = build_optimizer(model, cfg.train)
    consts = {k: v.to(device) for k, v in batches[0].get("_consts", {}).items()}
    t0, seen = None, 0
    for i, b in enumerate(batches):
        if i == warmup:
            t0, c0, seen = time.perf_counter(), time.process_time(), 0
        b = {k: v.to(device) for k, v in b.items() if not k.startswith("_")} | consts
        loss = pretrain.loss(model, b, task_cfg)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        seen += len(b["text_ids"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0), (time.process_time() - c0) / seen


def pipeline_core_s_per_sample(cfg, batch: int, samples: int) -> dict:
    """The data plane alone (no training): build the run's training dataset and iterate it in this
    process as a worker would, for ``samples`` samples after the first batch (Ray Data's start-up is
    left out); the machine's busy CPU seconds over that window per sample are what feeding one sample
    costs: decode tasks, Ray's own processes and the iterator together."""
    import psutil

    from orchestrator.data.pipeline import build_dataset, iter_worker_batches
    from workloads import pretrain

    def busy() -> float:
        c = psutil.cpu_times()
        return c.user + c.system + c.nice + c.irq + c.softirq

    ds = build_dataset(cfg.data, "train", True, pretrain.COLUMNS, seed=cfg.seed, run_name=f"bench-feed-{time.time_ns()}")
    n, start = 0, None
    while n < samples:
        before = n
        for b in iter_worker_batches(ds, batch, "cpu", cfg.data.prefetch_batches):
            if start is None:
                start = (busy(), time.perf_counter())
                continue
            n += len(b["frames"])
            if n >= samples:
                break
        if n == before and start is not None:
            raise RuntimeError("the data plane yielded no batch in a whole pass")
    core_s, wall = busy() - start[0], time.perf_counter() - start[1]
    return {"core_s_per_sample": core_s / n, "samples_per_s": n / wall, "samples": n}


def data_wait_floor(cores: int, train_wall_s: float, train_core_s: float, feed_core_s: float) -> float:
    """The least data-wait fraction any overlap can reach while one trainer keeps its solo pace
    (``train_wall_s`` per sample, using ``train_core_s`` CPU seconds) and the data plane
    (``feed_core_s`` per sample) shares ``cores`` with it: a step takes at least the training alone
    and at least the total work over the cores.  A trainer slowed by the decoders on its cores waits a
    smaller share of a longer step, so a measured fraction can sit below this floor while its
    samples/s sits far below ``cores / (train_core_s + feed_core_s)``."""
    step = max(train_wall_s, (train_core_s + feed_core_s) / cores)
    return 1.0 - train_wall_s / step


def ray_stack(cfg, datasets, steps: int, log_every: int, history: tuple[str, ...] = (), workers: int = 1) -> dict:
    """The real driver: TorchTrainer, one DeepSpeed engine, checkpoints off until the end.  With
    ``history``, the run is tracked (a throwaway MLflow store) and those metrics' histories come back
    under ``history`` (e.g. ``data/first_batch_s``: one point per pass)."""
    from orchestrator.trainer.driver import run_training

    with tempfile.TemporaryDirectory() as tmp:
        tracking = {"enabled": False} if not history else {"enabled": True, "uri": f"sqlite:///{tmp}/mlflow.db"}
        cfg = cfg.model_copy(update={"storage": tmp, "name": f"bench-{time.time_ns()}",
                                     "tracking": cfg.tracking.model_copy(update=tracking),
                                     "train": cfg.train.model_copy(update={
                                         "max_steps": steps, "log_every": log_every, "checkpoint_every": 10**6,
                                         "num_workers": workers, "warmup_steps": 1})})
        out = run_training(cfg, datasets=datasets)
        metrics = dict(out.metrics)
        if history:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking["uri"])
            metrics["history"] = {k: [(m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, k)]
                                  for k in history}
    return metrics


def transcoded_shards(cfg, data: str, size: int) -> str:
    """``shard --transcode`` of the run's training annotations; returns the shard folder."""
    from orchestrator.data.shards import write_shards
    from orchestrator.data.sources import read_rows
    from orchestrator.data.transcode import TranscodeSpec
    from orchestrator.data.video import decode_short_side

    out = os.path.join(data, f"shards-tc-{size}")
    if not os.path.exists(os.path.join(out, "index.json")):
        src = cfg.data.sources[0]
        rows = read_rows(src, data, "train")
        write_shards(rows, out, max_samples=16,
                     transcode=TranscodeSpec(short_side=decode_short_side(size, cfg.data.scale_min), gop=4))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's image size")
    p.add_argument("--steps", type=int, default=120,
                   help="steps per run; the first fifth is warm-up and the figure is the last window")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--data-clips", type=int, default=None,
                   help="synthetic clips for the data-plane run (default: steps x batch, so the measured window "
                        "stays inside one epoch, as it does on a corpus, instead of paying Ray Data's per-pass "
                        "start-up every few steps)")
    p.add_argument("--no-transcoded", action="store_true", help="skip the run fed by transcoded shards")
    p.add_argument("--tc-epochs", type=int, default=3,
                   help="passes the run fed by transcoded shards makes over its clips (data.limit), so that the "
                        "wait for each later pass's first batch is measured (default 3)")
    p.add_argument("--fed-workers", type=int, default=None,
                   help="Ray Train workers of the run fed by transcoded shards (default: the config's train.num_workers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. data.decode_concurrency=1); repeatable")
    args = p.parse_args(argv)
    args.data_clips = args.data_clips or args.steps * args.batch

    import ray
    import torch
    from run_fixed_cost import Sampler  # CPU of this process and every process it starts, by kind

    from orchestrator.config import load_config
    from orchestrator.devtools import synth
    from orchestrator.runtime.model_setup import model_config_for
    from workloads import pretrain

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}})
    device = torch.device("cuda" if args.gpu else "cpu")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synth")
        synth.generate(data, n=args.data_clips, seed=0, log=lambda *_: None,
                       spec=synth.ClipSpec(width=160, height=120, fps=8, seconds=3.0, gop=16))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
        for preset in args.presets:
            size = args.image_size or (32 if preset == "tiny" else 224)
            over = [f"model.preset={preset}", f"data.root={data}", f"data.image_size={size}",
                    f"data.num_frames={args.frames}", f"train.batch_size_per_worker={args.batch}",
                    f"train.use_gpu={str(args.gpu).lower()}", "data.cache=false", "data.cache_frames=null", *args.set]
            if args.image_size:  # the model's patch grid follows the frames
                over.append(f"model.overrides={{image_size: {size}}}")
            cfg = load_config(REPO / "workloads/configs/pretrain_tiny.yaml", over)
            model_cfg = model_config_for(cfg, tok)
            batches = make_batches(tok, args.steps, args.batch, args.frames, size)
            consts = pretrain.batch_constants(tok, pretrain.Config.model_validate(cfg.task))
            batches[0]["_consts"] = consts
            warm = max(2, args.steps // 5)  # steps excluded from the timing (start-up, allocator warm-up)
            plain, plain_core_s = plain_loop(cfg, model_cfg, batches, warm, device)
            rows = [{k: v[j].numpy() for k, v in b.items() if not k.startswith("_")}
                    for b in batches for j in range(args.batch)]
            # the last report covers the steps after the final multiple of `warm`: steady state
            m = ray_stack(cfg, {"train": ray.data.from_items(rows)}, steps=args.steps, log_every=warm)
            fed = ray_stack(cfg, None, steps=args.steps, log_every=warm)
            fed_tc = None
            if not args.no_transcoded:
                shards = transcoded_shards(cfg, data, size)
                tc_cfg = load_config(REPO / "workloads/configs/pretrain_tiny.yaml", over + [
                    f"data.sources=[{{format: wds, train: [{shards}], val: [{shards}]}}]"])
                feed = pipeline_core_s_per_sample(tc_cfg, args.batch, args.steps * args.batch // 2)
                per_pass = max(args.batch, args.steps * args.batch // max(1, args.tc_epochs))
                tc_run_cfg = load_config(REPO / "workloads/configs/pretrain_tiny.yaml", over + [
                    f"data.sources=[{{format: wds, train: [{shards}], val: [{shards}]}}]", f"data.limit={per_pass}"])
                meter = Sampler(every=0.5)
                meter.start()
                fed_workers = args.fed_workers or cfg.train.num_workers
                fed_tc = ray_stack(tc_run_cfg, None, steps=args.steps, log_every=warm,
                                   history=("data/first_batch_s", "samples_per_s", "data_wait_frac"),
                                   workers=fed_workers)
                tc_wall, tc_cpu = meter.stop()
                cores = os.cpu_count() or 1
                floor = data_wait_floor(cores, 1 / plain, plain_core_s, feed["core_s_per_sample"])
                budget = cores / (plain_core_s + feed["core_s_per_sample"])
            results[preset] = {
                "plain_samples_per_s": plain, "ray_ds_samples_per_s": m["samples_per_s"],
                "overhead_ratio": plain / m["samples_per_s"], "ray_ds_data_wait_frac_inmemory": m["data_wait_frac"],
                "data_plane_samples_per_s": fed["samples_per_s"], "data_plane_wait_frac": fed["data_wait_frac"],
            }
            if fed_tc is not None:
                results[preset].update(data_plane_transcoded_samples_per_s=fed_tc["samples_per_s"], fed_workers=fed_workers,
                                       data_plane_transcoded_wait_frac=fed_tc["data_wait_frac"],
                                       plain_core_s_per_sample=plain_core_s,
                                       feed_transcoded_core_s_per_sample=feed["core_s_per_sample"],
                                       feed_transcoded_alone_samples_per_s=feed["samples_per_s"],
                                       cores=cores, data_wait_floor_transcoded=floor,
                                       cpu_budget_samples_per_s=budget,
                                       fed_share_of_budget=fed_tc["samples_per_s"] / budget,
                                       first_batch_s_per_pass=[round(v, 3) for _, v in
                                                               fed_tc["history"]["data/first_batch_s"]],
                                       fed_run_wall_s=tc_wall, fed_run_core_s_by_process={
                                           k: round(v, 1) for k, v in sorted(tc_cpu.items(), key=lambda kv: -kv[1])},
                                       fed_run_idle_core_s=round(max(0.0, cores * tc_wall - sum(tc_cpu.values())), 1))
            r = results[preset]
            print(f"{preset}: plain {r['plain_samples_per_s']:.2f} samples/s | Ray Train + DeepSpeed {r['ray_ds_samples_per_s']:.2f} "
                  f"(overhead {r['overhead_ratio']:.2f}x, target <= 1.10x) | fed by Ray Data {r['data_plane_samples_per_s']:.2f}, "
                  f"data wait {100 * r['data_plane_wait_frac']:.1f}% (target <= 5%)", flush=True)
            if fed_tc is not None:
                print(f"{preset}: fed by transcoded shards ({r['fed_workers']} worker(s)) "
                      f"{r['data_plane_transcoded_samples_per_s']:.2f} samples/s, "
                      f"data wait {100 * r['data_plane_transcoded_wait_frac']:.1f}% (target <= 5%)", flush=True)
                print(f"{preset}: CPU per sample: training {r['plain_core_s_per_sample'] * 1e3:.1f} ms "
                      f"({1e3 / r['plain_samples_per_s']:.1f} ms wall), feeding it from transcoded shards "
                      f"{r['feed_transcoded_core_s_per_sample'] * 1e3:.1f} ms (data plane alone: "
                      f"{r['feed_transcoded_alone_samples_per_s']:.1f} samples/s); on {cores} cores, with the trainer at "
                      f"its solo pace, no overlap brings data wait under {100 * r['data_wait_floor_transcoded']:.1f}%",
                      flush=True)
                print(f"{preset}: CPU budget on {cores} cores: {r['cpu_budget_samples_per_s']:.1f} samples/s "
                      f"(cores / (training + feeding) per sample); the fed run reached "
                      f"{r['data_plane_transcoded_samples_per_s']:.2f} = {100 * r['fed_share_of_budget']:.0f}% of it "
                      f"(target >= 80%); its {r['fed_run_wall_s']:.0f} s x {cores} cores went to "
                      f"{r['fed_run_core_s_by_process']} core-s, idle {r['fed_run_idle_core_s']} (start-up included); "
                      f"first batch of each pass {r['first_batch_s_per_pass']} s (target <= 0.3 s after the first)",
                      flush=True)
    ray.shutdown()
    print(json.dumps({"batch": args.batch, "frames": args.frames, "steps": args.steps, "device": device.type,
                      "overrides": args.set,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
