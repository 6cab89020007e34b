"""Convolutions of N clients at once: each client's own 2-D convolution, run the way
measured fastest on the device (N calls, or one grouped convolution with groups = N), for the
built-in cnn and, under vmap, for the Conv2d layers of module trunks (``LoopConv2d``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoopConv2d(nn.Conv2d):
    """nn.Conv2d whose batched call (under vmap) runs ``conv_clients``."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return _ClientConv.apply(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return _ClientConv.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _ClientConv(torch.autograd.Function):
    """F.conv2d whose vmap over clients is ``conv_clients`` instead of vmap's grouped
    convolution. Outside vmap it is F.conv2d (backward: aten's convolution_backward)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, *ctx.opts = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.opts
        if isinstance(padding, str):  # 'same' / 'valid': aten takes the numbers
            padding = ([(d * (k - 1)) // 2 for d, k in zip(dilation, weight.shape[2:])]
                       if padding == "same" else [0, 0])
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride),
            list(padding), list(dilation), False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
        n = info.batch_size
        xd, wd, bd = in_dims[:3]
        x = x.movedim(xd, 0) if xd is not None else x
        weight = weight.movedim(wd, 0) if wd is not None else weight.expand(n, *weight.shape)
        if bias is not None:
            bias = bias.movedim(bd, 0) if bd is not None else bias.expand(n, *bias.shape)
        return conv_clients(x, weight, bias, shared=xd is None, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, loop=True), 0


def loop_conv(device: torch.device, in_per_group: int) -> bool:
    """Whether the N clients' convolutions of a layer run as N conv2d calls rather than one
    grouped convolution (groups = N·g). Measured on a 2-core CPU (fwd + bwd, 64 clients x 96
    rows, bench/results/conv_cpu.csv): looping wins only where each group has one input
    channel (1 -> 16 on 28x28: 11x faster); from 16 input channels on the grouped kernel wins
    by 3-6x. GPUs run the grouped kernel."""
    return device.type == "cpu" and in_per_group == 1


def conv_clients(x: Tensor, weight: Tensor, bias: Tensor | None, *, shared: bool,
                 stride=1, padding=0, dilation=1, groups: int = 1,
                 loop: bool | None = None) -> Tensor:
    """Each client's own 2-D convolution: x [N, B, C, H, W] (shared: [B, C, H, W], the same
    rows for all), weight [N, C_out, C/groups, k, k], bias [N, C_out] or None ->
    [N, B, C_out, H', W']. loop=None picks by ``loop_conv``: N calls of conv2d or one grouped
    convolution."""
    n = weight.shape[0]
    if shared and groups == 1:  # the same rows for all: one convolution with every client's filters
        out = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                       stride, padding, dilation)
        return out.unflatten(1, (n, -1)).transpose(0, 1)
    if loop is None:
        loop = loop_conv(x.device, weight.shape[2])
    if loop:  # the looped kernel: N convolutions of one client each
        return torch.stack([F.conv2d(x if shared else x[i], weight[i],
                                     None if bias is None else bias[i],
                                     stride, padding, dilation, groups) for i in range(n)])
    if shared:
        b, c = x.shape[:2]
        x = x.repeat(1, n, 1, 1)  # [B, N·C, H, W]: grouped conv needs every client's copy
    else:
        b, c = x.shape[1:3]
        x = x.transpose(0, 1).reshape(b, n * c, *x.shape[3:])
    out = F.conv2d(x, weight.reshape(-1, *weight.shape[2:]),
                   None if bias is None else bias.reshape(-1), stride, padding, dilation, groups * n)
    return out.view(b, n, -1, *out.shape[2:]).transpose(0, 1)
