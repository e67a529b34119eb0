"""One command for a GPU machine: ``base`` pre-training in bf16 through the real stack, one JSON line.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py            # 1 CUDA GPU: base, bf16, ZeRO-2
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py --cpu      # the same path on CPU, tiny, fp32

Everything is local (no hub, no network): synthetic H.264 clips and their tokenizer are written to a
temporary folder, the model starts from random weights (``model.*_pretrained`` off; on the GPU with
BERT-base's vocabulary size, 30,522, whatever the synthetic tokenizer holds), MLflow is a SQLite
file beside them.  Then, on a local Ray with one Ray Train worker (``run_training``, the driver the
``train`` verb runs), fed by the Ray Data plane from the clips as written:

1. a pre-train of ``--steps`` optimizer steps, logging every ``--log-every``; the first window
   (start-up, the data plane's first batches, the allocator's warm-up) is left out of the
   throughput; a checkpoint at the last step (``checkpoint_s``) and validation on the held-out clips;
2. the same run name again with ``--resume-steps`` more steps: it resumes from that checkpoint
   (``resume_s``: download, verify, load on the worker), trains, and validates at its end: the
   evaluation throughput is that validation's items over its wall time (``eval_s``) on the one worker.

Model FLOPs per sample are counted, not estimated: ``torch.utils.flop_counter`` over one forward and
backward of the workload's loss (momentum encoders' forward included) on a batch of
``--flop-batch`` at the run's shape, in this process on the CPU with plain attention (the same
matmuls as SDPA; the counter has no formula for PyTorch's CPU flash kernel).  MFU = FLOPs per sample x
steady samples/s / the card's dense bf16 peak (:data:`PEAK_BF16`, by CUDA device name; an unknown card
or the CPU gives null and says why).  Peak GPU memory is the worker's ``peak_mem_gib`` (the loop logs
it on CUDA workers).  The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peak by what the CUDA device name contains, first match wins (NVIDIA's
# datasheets).  NVL variants run at other clocks: not in the table, so their MFU is null.
PEAK_BF16: tuple[tuple[str, float | None], ...] = (
    ("NVL", None),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),   # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU rehearsal; everything else is one path."""

    config: str               # workloads/configs/<config>
    use_gpu: bool
    precision: str
    image_size: int
    batch: int
    steps: int
    log_every: int
    resume_steps: int
    val_clips: int
    eval_batch: int
    cpus_per_worker: float
    clip: tuple[int, int, float]  # synthetic clips: width, height, seconds (8 fps)
    vocab_size: int | None        # the model's vocabulary (None: the synthetic tokenizer's)


MODES = {
    "gpu": Mode(config="pretrain_base.yaml", use_gpu=True, precision="bf16", image_size=224, batch=32,
                steps=60, log_every=10, resume_steps=10, val_clips=512, eval_batch=64, cpus_per_worker=2,
                clip=(256, 192, 2.0), vocab_size=30522),
    "cpu": Mode(config="pretrain_tiny.yaml", use_gpu=False, precision="fp32", image_size=32, batch=8,
                steps=6, log_every=2, resume_steps=2, val_clips=8, eval_batch=8, cpus_per_worker=1,
                clip=(96, 64, 2.0), vocab_size=None),
}


def peak_flops(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 FLOP/s of the card, None) or (None, why there is none)."""
    for key, peak in PEAK_BF16:
        if key in device_name:
            if peak is None:
                break
            return peak, None
    return None, f"no dense bf16 peak for {device_name!r} in benchmarks/gpu_check.py PEAK_BF16"


def overrides(mode: Mode, data: str, work: str, args) -> list[str]:
    """The run config: the mode's recipe on the synthetic clips, one worker, nothing from the hub."""
    steps = args.steps
    return [
        f"name=gpu-check-{args.tag}", f"data.root={data}", "data.tokenizer=null", f"storage={work}/store",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        "data.sources=[{format: youku_pretrain, train: [annotations/youku_pretrain_train.csv], "
        "val: [annotations/youku_pretrain_val.csv], media: videos}]",
        f"data.image_size={mode.image_size}", "data.cache=false", "data.cache_frames=null", "data.group_pattern=null",
        "model.vision_pretrained=null", "model.text_pretrained=null",
        *([f"model.overrides.vocab_size={mode.vocab_size}"] if mode.vocab_size else []),
        "train.num_workers=1", f"train.use_gpu={str(mode.use_gpu).lower()}", f"train.precision={mode.precision}",
        f"train.zero_stage={args.zero_stage}", f"train.cpus_per_worker={mode.cpus_per_worker}",
        f"train.batch_size_per_worker={args.batch}", f"train.max_steps={steps}",
        f"train.log_every={args.log_every}", f"train.checkpoint_every={steps}",
        f"eval.batch_size={mode.eval_batch}", *args.set]


def flops_per_sample(cfg, tokenizer, n: int) -> float:
    """Model FLOPs of one sample: forward and backward of the workload's loss on ``n`` samples at the
    run's shape (frames, image size, padded text length), counted on the CPU, divided by ``n``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_throughput import make_batches
    from orchestrator.runtime.model_setup import model_config_for
    from workloads.base import load_workload

    workload = load_workload(cfg.workload)
    task_cfg = workload.Config.model_validate(cfg.task)
    model_cfg = dataclasses.replace(model_config_for(cfg, tokenizer), attn_impl="plain")
    torch.manual_seed(0)
    model = workload.build_model(model_cfg, task_cfg).train()
    batch = make_batches(tokenizer, 1, n, cfg.data.num_frames, cfg.data.image_size,
                         max_length=cfg.data.max_text_len)[0]
    batch.update(workload.batch_constants(tokenizer, task_cfg))
    with FlopCounterMode(display=False) as counter:
        workload.loss(model, batch, task_cfg)["loss"].backward()
    return counter.get_total_flops() / n


def history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from orchestrator.tracking.mlflow_run import client

    return sorted((m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key))


def steady(tracking_uri: str, run_id: str, first: int, last: int) -> tuple[float, float]:
    """(samples/s, data-wait fraction) over the logging windows ending in (first, last]: every window
    holds the same samples, so the rate is their harmonic mean."""
    rates = [v for s, v in history(tracking_uri, run_id, "samples_per_s") if first < s <= last]
    waits = [v for s, v in history(tracking_uri, run_id, "data_wait_frac") if first < s <= last]
    if not rates:
        raise RuntimeError(f"no samples_per_s logged after step {first}: raise --steps above --log-every")
    return len(rates) / sum(1 / r for r in rates), sum(waits) / len(waits)


def device_name(use_gpu: bool) -> str:
    if use_gpu:
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model} ({os.cpu_count()} logical cores)".replace("  ", " ")


def dir_gib(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**30


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the same path on CPU: tiny preset, fp32, a few steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the first run (gpu 60, cpu 6)")
    p.add_argument("--resume-steps", type=int, default=None, help="steps after the resume (gpu 10, cpu 2)")
    p.add_argument("--batch", type=int, default=None, help="samples per step on the one worker (gpu 32, cpu 8)")
    p.add_argument("--log-every", type=int, default=None,
                   help="logging window in steps; the first window is warm-up (gpu 10, cpu 2)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--flop-batch", type=int, default=2, help="samples in the FLOP count (its total / this)")
    p.add_argument("--work-dir", default=None, help="where clips, checkpoints and MLflow go (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--tag", default="run", help="run name suffix (a rerun of a tag in the same --work-dir resumes)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the wall time this check should stay within")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override; repeatable")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    mode = MODES["cpu" if args.cpu else "gpu"]
    for name in ("steps", "resume_steps", "batch", "log_every"):  # the mode's sizes unless given
        if getattr(args, name) is None:
            setattr(args, name, getattr(mode, name))
    if args.steps % args.log_every or args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps} must be a multiple of --log-every {args.log_every} and at least twice it "
                "(the first window is warm-up)")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if mode.use_gpu else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if mode.use_gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here: run with --cpu for the CPU rehearsal")
    from orchestrator.console import configure_logging

    configure_logging(False)  # the runs' progress lines on stderr
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        out = run_check(args, mode, work, t_start)
    finally:
        if not args.work_dir:  # base's checkpoints are several GB each
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return out


def run_check(args, mode: Mode, work: str, t_start: float) -> dict:
    """Synthesize the clips, count the FLOPs, train, resume and validate; every figure."""
    from orchestrator.config import load_config
    from orchestrator.devtools.synth import ClipSpec, generate
    from orchestrator.ray_env import ensure_ray
    from orchestrator.runtime.model_setup import load_run_tokenizer
    from orchestrator.train.deepspeed_config import resolve_precision
    from orchestrator.trainer.driver import run_training

    wall: dict[str, float] = {}
    data = os.path.join(work, "synth")
    base = REPO / "workloads" / "configs" / mode.config
    over = overrides(mode, data, work, args)
    cfg = load_config(base, over)  # a bad --set fails here, before anything is written
    if not os.path.exists(os.path.join(data, "manifest.json")):
        import ray

        t0 = time.perf_counter()
        n = math.ceil(1.1 * (args.steps + args.resume_steps) * args.batch) + mode.val_clips  # both runs in one epoch
        w, h, seconds = mode.clip
        generate(data, n=n, seed=0, spec=ClipSpec(width=w, height=h, fps=8, seconds=seconds, gop=16),
                 val_fraction=mode.val_clips / n, log=lambda *_: None,
                 workers=1 if ray.is_initialized() else min(16, os.cpu_count() or 1))  # no fork under Ray
        wall["synth_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fps = flops_per_sample(cfg, load_run_tokenizer(cfg), args.flop_batch)
    wall["flop_count_s"] = time.perf_counter() - t0

    ensure_ray()
    t0 = time.perf_counter()
    first = run_training(cfg)
    wall["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = run_training(load_config(base, over + [f"train.max_steps={args.steps + args.resume_steps}"]))
    wall["resume_run_s"] = time.perf_counter() - t0

    uri, run_id = first.tracking_uri, first.mlflow_run_id
    rate, wait = steady(uri, run_id, args.log_every, args.steps)
    saves = dict(history(uri, run_id, "checkpoint_s"))
    resumes = dict(history(uri, run_id, "resume_s"))
    peak_mem = [v for _, v in history(uri, run_id, "peak_mem_gib")]
    name = device_name(mode.use_gpu)
    peak, why_no_peak = peak_flops(name) if mode.use_gpu else (None, "CPU: no peak FLOP/s table for CPUs")
    items, eval_s = second.metrics.get("eval/items"), second.metrics.get("eval_s")
    ckpt = first.checkpoint_uri
    wall["total_s"] = time.perf_counter() - t_start
    notes = {
        "mfu": why_no_peak,
        "peak_gpu_mem_gib": None if peak_mem else "no CUDA on the worker (the loop logs peak_mem_gib on GPU workers)",
        "resume_s": "the checkpoint's download, verification and load on the worker",
        "eval_items_per_s": "validation on the held-out clips at the resumed run's last step, one worker, "
                            "decoding included",
    }
    return {
        "check": "gpu_check", "mode": "cpu" if args.cpu else "gpu", "device": name,
        "date": datetime.date.today().isoformat(), "preset": cfg.model.preset,
        "precision": resolve_precision(cfg.train), "zero_stage": cfg.train.zero_stage, "workers": 1,
        "batch_per_worker": args.batch, "frames": cfg.data.num_frames, "image_size": cfg.data.image_size,
        "text_len": cfg.data.max_text_len, "steps": args.steps, "resume_steps": args.resume_steps,
        "warmup_steps_excluded": args.log_every,
        "samples_per_s": rate, "data_wait_frac": wait,
        "flops_per_sample": fps,
        "flops_counted": (f"forward + backward of the {cfg.workload} loss (momentum encoders' forward included), "
                          f"torch.utils.flop_counter on {args.flop_batch} samples / {args.flop_batch}"),
        "achieved_flops_per_s": fps * rate, "peak_flops_per_s": peak, "mfu": fps * rate / peak if peak else None,
        "peak_gpu_mem_gib": max(peak_mem) if peak_mem else None,
        "checkpoint_save_s": saves.get(args.steps),
        "checkpoint_gib": dir_gib(ckpt) if ckpt and os.path.isdir(ckpt) else None,
        "resume_s": resumes.get(args.steps), "resumed_from_step": next(iter(resumes), None),
        "final_step": second.metrics.get("step"),
        "eval_items": items, "eval_s": eval_s, "eval_items_per_s": items / eval_s if items and eval_s else None,
        "wall_s": wall, "within_budget": wall["total_s"] <= args.budget_s, "budget_s": args.budget_s,
        "notes": {k: v for k, v in notes.items() if v},
        "work_dir": work if args.work_dir else None,
    }


if __name__ == "__main__":
    main()
