"""How the convolutions of N clients run: one grouped convolution (groups = N, what vmap
makes of a batched conv2d) or each client's own chain of small convolutions (``loop_conv``);
the built-in cnn's conv blocks (``conv_trunk``) and the module that runs a module trunk
(``batched_net``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def loop_conv(mode: str, device: torch.device) -> bool:
    """Whether a group's convolutional clients run one client at a time (True) or as one
    grouped convolution per layer (False). mode: the ``conv`` option; auto loops on the CPU,
    where N calls measured 1.4-2.7x faster than the grouped kernel for every layer of
    ``bench/bench_conv.py`` (fwd + bwd, 64 clients x 96 rows, 1 and 2 threads,
    bench/results/conv_cpu.csv), and runs the grouped kernel on GPUs (one launch, not N).
    mode is one of config.CONV_MODES (``config.validate`` checks it)."""
    return device.type == "cpu" if mode == "auto" else mode == "loop"


class ChannelsLastConv2d(nn.Conv2d):
    """nn.Conv2d whose 4-D output is channels-last, so the layers after it (the next
    convolutions, pooling, BatchNorm) run their faster channels-last CPU kernels; the values
    are those of nn.Conv2d up to rounding."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


def batched_net(net: nn.Module, loop: bool, builtin: bool) -> nn.Module:
    """The module functional_call runs for all clients: on the meta device (the stacked
    weights replace its own). A built-in net run one client at a time (``loop``) has its
    Conv2d layers give channels-last outputs (``ChannelsLastConv2d``), unless it has a
    GroupNorm: per client of resnet:8 on 28x28 (fwd + bwd, 96 rows, CPU) channels-last took
    0.66x the time with BatchNorm, but GroupNorm's CPU kernels are ~5x slower in it. A
    user's module runs in its own layout (its ``view`` calls may need contiguous tensors)."""
    net = copy.deepcopy(net).to("meta")
    if loop and builtin and not any(isinstance(m, nn.GroupNorm) for m in net.modules()):
        for m in net.modules():
            if type(m) is nn.Conv2d:
                m.__class__ = ChannelsLastConv2d
    return net


def conv_trunk(blocks: int, params: dict[str, Tensor], x: Tensor, shared: bool,
               loop: bool) -> Tensor:
    """The conv blocks of N built-in cnn clients (conv 3x3 + ReLU + 2x2 max-pool, weights
    ``conv{l}.weight`` [N, C_out, C_in, 3, 3] and ``conv{l}.bias`` [N, C_out]): x [N, B, C, H,
    W] (shared: [B, C, H, W]) -> features [N, B, F].

    loop: each client's conv blocks run as its own chain of small tensors, which stay in
    cache, in channels-last (measured 1.7-1.9x faster than NCHW for cnn:16x32 on 28x28).
    Else one grouped convolution per layer: the activations stay [B, N·C, H, W], its layout
    (client i's channels at i·C ..), so no layer copies them to another and back."""
    n = params["conv0.weight"].shape[0]
    layers = [(params[f"conv{l}.weight"], params[f"conv{l}.bias"]) for l in range(blocks)]
    # relu(max) = max(relu), gradients too: the relu runs on the pooled, 4x smaller tensor
    if loop:
        # unbind: one backward node per weight, not a zero-filled full-size gradient per client
        each = [(w.unbind(0), b.unbind(0)) for w, b in layers]
        xs = [x] * n if shared else x.unbind(0)
        feats = []
        for i in range(n):
            h = xs[i]
            for l, (w, b) in enumerate(each):
                h = F.conv2d(h, w[i], b[i], padding=1)
                if l == 0:  # channels-last from here on: the CPU's max-pool is 4-8x faster in it
                    h = h.contiguous(memory_format=torch.channels_last)
                h = F.relu(F.max_pool2d(h, 2))
            feats.append(h.flatten(1))
        return torch.stack(feats)
    w0, b0 = layers[0]
    if shared:  # the same rows for all: one convolution with every client's filters
        h = F.conv2d(x, w0.flatten(0, 1), b0.flatten(), padding=1)
    else:
        h = F.conv2d(x.transpose(0, 1).flatten(1, 2), w0.flatten(0, 1), b0.flatten(), padding=1,
                     groups=n)
    h = F.relu(F.max_pool2d(h, 2))
    for w, b in layers[1:]:
        h = F.relu(F.max_pool2d(F.conv2d(h, w.flatten(0, 1), b.flatten(), padding=1, groups=n), 2))
    return h.unflatten(1, (n, -1)).flatten(2).transpose(0, 1)  # [N, B, C·H·W]
