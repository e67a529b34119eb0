"""Resize and crop decoded frames to ``size x size``: one crop for every frame of a clip.

- training: random resized crop (area fraction in ``[scale_min, 1]``, aspect ratio in [3/4, 4/3];
  after 10 tries the whole frame, or its centre at the nearest allowed aspect ratio, as torchvision's
  ``RandomResizedCrop``) and a horizontal flip with probability 1/2;
- evaluation (``data.eval_transform``): ``resize``, the whole frame resized to ``size x size`` (the
  reference's ``video_test_transform`` and the paper), or ``center_crop``, the shorter side resized
  to ``size`` and the centre square kept (a 16:9 frame loses 44% of its width).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3] (bilinear, antialiased)."""
    if frames.shape[1:3] == (h, w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W]
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous().numpy()  # [T, h, w, 3]


def random_resized_crop_box(height: int, width: int, scale_min: float, rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale_min``-1 of the area (10 tries, then centre)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # torchvision's fallback: the whole frame when its aspect ratio is allowed, else the centre at the
    # nearest allowed ratio (a centre square would cut a quarter off each side of a 4:3 frame)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(frames: np.ndarray, size: int, scale_min: float, hflip: bool,
                    rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3], the same random crop/flip for every frame."""
    top, left, h, w = random_resized_crop_box(frames.shape[1], frames.shape[2], scale_min, rng)
    out = _resize(frames[:, top:top + h, left:left + w], size, size)
    if hflip and rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return out


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: the whole frame resized (aspect not kept), as the
    reference's ``video_test_transform`` (``Resize((224, 224))``) does."""
    return np.ascontiguousarray(_resize(frames, size, size))


EVAL_TRANSFORMS = ("resize", "center_crop")


def eval_transform(frames: np.ndarray, size: int, mode: str = "center_crop") -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: the whole frame resized (``resize``) or the
    shorter side to ``size`` and the centre square (``center_crop``)."""
    if mode == "resize":
        return resize_frames(frames, size)
    if mode != "center_crop":
        raise ValueError(f"eval transform {mode!r}; accepted: {EVAL_TRANSFORMS}")
    height, width = frames.shape[1:3]
    scale = size / min(height, width)
    h, w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = _resize(frames, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(resized[:, top:top + size, left:left + size])
