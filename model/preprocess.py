"""Frame normalisation on the caller's device (the train worker calls it on its GPU/CPU)."""
from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] (or [B, H, W, 3]) -> ``dtype`` [B, T, 3, H, W] with CLIP mean/std.

    Works on whatever device ``frames`` lives on; images come back with T = 1.
    """
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (decoded RGB), got {frames.dtype}")
    if frames.dim() == 4:
        frames = frames.unsqueeze(1)                                   # [B, H, W, 3] -> [B, 1, H, W, 3]
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, T, H, W, 3] or [B, H, W, 3], got {tuple(frames.shape)}")
    x = frames.permute(0, 1, 4, 2, 3).float().div_(255.0)              # [B, T, 3, H, W]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)
