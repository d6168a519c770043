"""Backend switches shared by both tracks' fast paths."""

from __future__ import annotations

import torch


def enable_fast_cuda_backends(device: torch.device) -> None:
    """On CUDA: cuDNN picks the fastest algorithm per input shape (``cudnn.benchmark``; grouped and strided
    convolutions gain most) and float32 matmuls/convolutions run on TF32 tensor cores. No-op elsewhere."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
