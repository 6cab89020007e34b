"""How the convolutions of N clients run: one grouped convolution (groups = N, what vmap
makes of a batched conv2d) or each client's own chain of small convolutions (``loop_conv``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import CONV_MODES


def loop_conv(mode: str, device: torch.device) -> bool:
    """Whether a group's convolutional clients run one client at a time (True) or as one
    grouped convolution per layer (False). mode: the ``conv`` option; auto loops on the CPU,
    where N calls measured 1.4-2.7x faster than the grouped kernel for every layer of
    ``bench/bench_conv.py`` (fwd + bwd, 64 clients x 96 rows, 1 and 2 threads,
    bench/results/conv_cpu.csv), and runs the grouped kernel on GPUs (one launch, not N)."""
    if mode not in CONV_MODES:
        raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}, got {mode!r}")
    return device.type == "cpu" if mode == "auto" else mode == "loop"


class ChannelsLastConv2d(nn.Conv2d):
    """nn.Conv2d whose 4-D output is channels-last, so the layers after it (the next
    convolutions, pooling, BatchNorm) run their faster channels-last CPU kernels; the values
    are those of nn.Conv2d up to rounding."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
