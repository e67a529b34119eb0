"""A short training of the real model on real decoded clips that shows whether it learns motion.

:func:`direction_probe` writes small synthetic H.264 clips in memory (``synth.render_frames`` +
``synth.encode_h264``), feeds them through the data plane's own batch function
(``orchestrator.data.process.process_batch``: decord decode, frame sampling, the training / evaluation
transform) and its collate (``pipeline._ContractCollate``), and trains the tiny model's
``classification`` workload (vision + universal layers + classifier, the title left out) to name the
direction the shape moves: left, right, up or down.  A clip's direction is visible only from the
order of its frames ("left" is "right" played backwards), so

- a model without the local temporal module sees a bag of frames and cannot pass 50% (the motion's
  axis at best);
- frames reversed or shuffled anywhere on the way (sampling, decoding, transform, batching) teach it
  the wrong direction or none.

It scores two held-out sets: clips through the data plane's evaluation path (``middle`` sampling,
``data.eval_transform``), and the same clips' frames taken straight from the renderer, the ground
truth no data-plane fault touches.  ``tests/workloads/test_learning.py`` asserts both;
``benchmarks/learning_faults.py`` injects each fault and prints what the probe then measures.
"""
from __future__ import annotations

import dataclasses
import io
import random
import time

import numpy as np
import torch

from model import MPlugConfig
from orchestrator.data import augment, pipeline
from orchestrator.data.decode import DecodeSpec
from orchestrator.data.process import EMPTY_ROW, ProcessParams, process_batch
from orchestrator.devtools.synth import COLORS, DIRECTIONS, SHAPES, ClipMeta, ClipSpec, encode_h264, render_frames
from orchestrator.train.config import TrainConfig
from orchestrator.train.optim import build_optimizer
from workloads import classification

# Small clips decode fast; the shape is a third to a half of the frame's height so that a 32 px
# model sees it whole.
SPEC = ClipSpec(width=64, height=48, fps=8, seconds=2.0, gop=8, shape_min=1 / 3, shape_max=1 / 2)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    train_clips: int = 192         # balanced over the four directions
    val_clips: int = 48
    epochs: int = 3                # decoded passes over the training clips (fresh frames and crops each)
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    frames: int = 4
    image_size: int = 32
    scale_min: float = 0.8
    lt_enabled: bool = True
    seed: int = 0


def _clips(n: int, seed: int) -> list[tuple[ClipMeta, bytes, np.ndarray]]:
    """(meta, H.264 bytes, the rendered frames) of ``n`` clips, directions in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        meta = ClipMeta(f"p{seed}_{i}", f"p{seed}_{i}.mp4", rng.choice(list(COLORS)), rng.choice(SHAPES),
                        DIRECTIONS[i % len(DIRECTIONS)], SPEC.seconds)
        frames = render_frames(meta, SPEC, random.Random(seed * 1_000_003 + i))
        out.append((meta, encode_h264(frames, SPEC.fps, SPEC.gop), frames))
    return out


def _params(cfg: ProbeConfig, training: bool, epoch: int | None) -> ProcessParams:
    return ProcessParams(
        columns=("frames", "label"), decode=DecodeSpec(num_frames=cfg.frames, sampling="rand" if training else "middle"),
        frames_out=cfg.frames, image_size=cfg.image_size, training=training, scale_min=cfg.scale_min, hflip=False,
        tokenizer="unused", max_text_len=8, max_answer_len=4, seed=cfg.seed, run_name=None, max_bad_fraction=0.0,
        bad_check_min_seen=1, epoch=epoch)


def _decoded(clips, params: ProcessParams) -> dict[str, np.ndarray]:
    """The data plane's batch function over the clips (their bytes inline, as shard members come)."""
    rows = [{**EMPTY_ROW, "media_uri": f"mem://{m.file}", "media_bytes": data, "modality": "video", "id": m.video_id,
             "label": DIRECTIONS.index(m.direction)} for m, data, _ in clips]
    out = process_batch({k: np.array([r[k] for r in rows], dtype=object) for k in EMPTY_ROW}, params)
    if len(out["frames"]) != len(clips):
        raise RuntimeError(f"the data plane dropped {len(clips) - len(out['frames'])} of {len(clips)} probe clips")
    return out


def _collate(batch: dict[str, np.ndarray]) -> dict:
    return pipeline._ContractCollate()(batch)


def _all_frames(data: bytes) -> np.ndarray:
    """Every frame of an H.264 clip, in the order PyAV's decoder presents them (none of the data
    plane's code: no seeking, no sampling)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _truth(clips, cfg: ProbeConfig) -> np.ndarray:
    """uint8 [N, T, S, S, 3]: each clip's frames at the segment middles, decoded whole and in order
    apart from the data plane (the same codec, so no other difference), the whole frame resized."""
    out = []
    for _, data, _ in clips:
        frames = _all_frames(data)
        idx = [int((i + 0.5) * len(frames) / cfg.frames) for i in range(cfg.frames)]  # segment middles
        out.append(augment.resize_frames(frames[idx], cfg.image_size))
    return np.stack(out)


def direction_probe(cfg: ProbeConfig = ProbeConfig(), log=None) -> dict:
    """Train and score; returns ``{"data_plane": %, "truth": %, "train": %, "steps", "cpu_s", ...}``
    (direction accuracy on the held-out clips through the data plane, on their rendered frames, and on
    the last training batches)."""
    t0 = time.process_time()
    train, val = _clips(cfg.train_clips, 1000 + cfg.seed), _clips(cfg.val_clips, 2000 + cfg.seed)
    passes = [_collate(_decoded(train, _params(cfg, True, e))) for e in range(cfg.epochs)]
    frames = torch.cat([p["frames"] for p in passes])                  # uint8 [E*N, T, S, S, 3]
    labels = torch.cat([p["label"] for p in passes])
    val_plane = _collate(_decoded(val, _params(cfg, False, None)))
    val_truth = torch.from_numpy(_truth(val, cfg))
    val_labels = torch.tensor([DIRECTIONS.index(m.direction) for m, _, _ in val])
    data_s = time.process_time() - t0

    task = classification.Config(use_title=False, label_names=list(DIRECTIONS), topk=[1])
    torch.manual_seed(cfg.seed)
    model = classification.build_model(MPlugConfig.from_preset("tiny", num_labels=len(DIRECTIONS),
                                                               image_size=cfg.image_size, lt_enabled=cfg.lt_enabled),
                                       task).train()
    opt, sched = build_optimizer(model, TrainConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps))
    g = torch.Generator().manual_seed(cfg.seed)
    right = seen = 0
    for step in range(cfg.steps):
        rows = torch.randint(len(labels), (cfg.batch_size,), generator=g)
        batch = {"frames": frames[rows], "label": labels[rows]}
        logits = classification.logits_of(model, batch, task)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= cfg.steps - 50:
            right += int((logits.argmax(1) == batch["label"]).sum())
            seen += len(rows)
        if log is not None and (step + 1) % 100 == 0:
            log(f"probe step {step + 1}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        def acc(x: torch.Tensor) -> float:
            pred = classification.logits_of(model, {"frames": x}, task).argmax(1)
            return 100.0 * float((pred == val_labels).float().mean())

        scores = {"data_plane": acc(val_plane["frames"]), "truth": acc(val_truth)}
    return {**scores, "train": 100.0 * right / max(seen, 1), "steps": cfg.steps, "chance": 100.0 / len(DIRECTIONS),
            "order_blind_ceiling": 50.0, "data_cpu_s": data_s, "cpu_s": time.process_time() - t0,
            "lt_enabled": cfg.lt_enabled, "seed": cfg.seed, "val_clips": cfg.val_clips}
