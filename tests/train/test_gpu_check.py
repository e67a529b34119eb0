"""``benchmarks/gpu_check.py``: the one command for a GPU machine.  Its ``--cpu`` mode runs the
same path at tiny size (synthetic clips, a pre-train that checkpoints, a resumed run, validation
on the worker) and must print every figure, each measured; its FLOPs per sample must agree with a
count made here.  The GPU-only parts (the peak table, the worker's peak memory) are checked on
their own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"check", "mode", "device", "date", "preset", "precision", "zero_stage", "workers", "batch_per_worker",
          "frames", "image_size", "text_len", "steps", "resume_steps", "warmup_steps_excluded", "samples_per_s",
          "data_wait_frac", "flops_per_sample", "flops_counted", "achieved_flops_per_s", "peak_flops_per_s", "mfu",
          "peak_gpu_mem_gib", "checkpoint_save_s", "checkpoint_gib", "resume_s", "resumed_from_step", "final_step",
          "eval_items", "eval_s", "eval_items_per_s", "wall_s", "within_budget", "budget_s", "notes"}


def _direct_flops_per_sample(data: str, n: int = 4) -> float:
    """One forward and backward of the tiny pre-train loss on ``n`` samples, counted here."""
    from torch.utils.flop_counter import FlopCounterMode

    from orchestrator.config import load_config
    from orchestrator.runtime.model_setup import load_run_tokenizer, model_config_for
    from workloads import pretrain

    cfg = load_config(REPO / "workloads/configs/pretrain_tiny.yaml", [f"data.root={data}"])
    tok = load_run_tokenizer(cfg)
    task_cfg = pretrain.Config.model_validate(cfg.task)
    model_cfg = model_config_for(cfg, tok)
    model_cfg.attn_impl = "plain"  # the counter has no formula for the CPU's SDPA kernel
    model = pretrain.build_model(model_cfg, task_cfg).train()
    texts = [f"a {c} square moves {d}" for c, d in (("red", "left"), ("red", "up"), ("blue", "left"), ("blue", "up"))]
    enc = tok(texts[:n], padding="max_length", max_length=cfg.data.max_text_len, truncation=True, return_tensors="pt")
    size = cfg.data.image_size
    batch = {"frames": torch.randint(0, 255, (n, cfg.data.num_frames, size, size, 3), dtype=torch.uint8),
             "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"], "clip_index": torch.arange(n),
             **pretrain.batch_constants(tok, task_cfg)}
    with FlopCounterMode(display=False) as counter:
        pretrain.loss(model, batch, task_cfg)["loss"].backward()
    return counter.get_total_flops() / n


@pytest.mark.slow
def test_cpu_mode_prints_every_figure_measured(ray_local, tmp_path, capsys):
    out = gpu_check.main(["--cpu", "--work-dir", str(tmp_path)])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"check": "gpu_check"')]
    assert len(printed) == 1 and json.loads(printed[0]) == json.loads(json.dumps(out))
    assert FIELDS <= set(out), FIELDS - set(out)
    assert out["mode"] == "cpu" and out["preset"] == "tiny" and out["precision"] == "fp32" and out["zero_stage"] == 2
    steps = out["steps"]
    assert 0 < out["samples_per_s"] < 1e4 and 0 <= out["data_wait_frac"] <= 1
    assert out["checkpoint_save_s"] > 0 and out["checkpoint_gib"] > 0                 # the first run's last step saved
    assert out["resumed_from_step"] == steps and out["resume_s"] > 0                  # the second run resumed from it
    assert out["final_step"] == steps + out["resume_steps"]
    assert out["eval_items"] == 8 and out["eval_s"] > 0                              # every held-out clip
    assert out["eval_items_per_s"] == pytest.approx(out["eval_items"] / out["eval_s"])
    assert out["flops_per_sample"] == pytest.approx(_direct_flops_per_sample(str(tmp_path / "synth")), rel=0.02)
    assert out["achieved_flops_per_s"] == pytest.approx(out["flops_per_sample"] * out["samples_per_s"])
    # on a CPU there is no peak to divide by and no GPU memory: null, each with its reason
    assert out["mfu"] is None and out["peak_gpu_mem_gib"] is None
    assert {"mfu", "peak_gpu_mem_gib"} <= set(out["notes"])
    assert all(v > 0 for v in out["wall_s"].values()) and out["within_budget"]


def test_peak_table_names_cards_and_refuses_unknown_ones():
    peak = gpu_check.peak_flops
    assert peak("NVIDIA H100 80GB HBM3") == (989.4e12, None)
    assert peak("NVIDIA H100 PCIe") == (756e12, None)
    assert peak("NVIDIA H200") == (989.4e12, None)
    assert peak("NVIDIA A100-SXM4-80GB") == (312e12, None)
    for unknown in ("NVIDIA H100 NVL", "Tesla T4"):
        value, why = peak(unknown)
        assert value is None and unknown in why


def test_the_loop_logs_peak_gpu_memory_only_where_cuda_was_used(monkeypatch):
    from orchestrator.train.metrics import device_memory

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert device_memory() == {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    assert device_memory() == {"peak_mem_gib": 3.0}
