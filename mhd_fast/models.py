"""Batched client models: all clients of one architecture are one set of weights stacked on a
leading client dimension N, so one forward and one backward serve every client.

A model is a trunk (MLP layers, or conv blocks then MLP layers) whose last hidden layer is the
*embedding* [E], followed by H1 = 1 + H linear heads (head 0 = main, heads 1..H = aux) stored
as one [E, H1·V] matrix. Weights are plain tensors in a dict; nothing here owns state.

Shapes: x_private [N, B, *in] (each client its own rows), x_shared [B, *in] (the same rows
for every client: the public batch or the test set; in = (C, H, W) or (D,)) -> logits [N, H1, B, V], embedding
[N, B, E]. The MLP is batched matmul (torch.baddbmm); the CNN is grouped convolution
(groups = N), so no Python loop runs over clients.

Heterogeneity: ``split_groups`` gives each architecture a contiguous range of clients; each
group is batched on its own and ``forward_groups`` concatenates their outputs on the client
dimension, so the exchange sees one [N, ...] tensor whatever the mix.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("mlp", "cnn")
_ARCH_RE = re.compile(r"^(mlp|cnn):([0-9x]+)(?:-([0-9x]+))?$")


@dataclass(frozen=True)
class Arch:
    """One client architecture. mlp: ``hidden`` widths; cnn: 3x3 conv blocks with ``channels``
    (each conv + ReLU + 2x2 max-pool), then ``hidden`` widths. The last hidden width is the
    embedding size E."""

    kind: str
    hidden: tuple[int, ...]
    channels: tuple[int, ...] = ()

    @property
    def emb_dim(self) -> int:
        return self.hidden[-1]

    def __str__(self) -> str:
        widths = "x".join(map(str, self.hidden))
        if self.kind == "cnn":
            return f"cnn:{'x'.join(map(str, self.channels))}-{widths}"
        return f"mlp:{widths}"


def parse_arch(spec: str, *, option: str = "model") -> Arch:
    """'mlp:128x64' (hidden widths) or 'cnn:16x32-64' (conv channels, then hidden widths)."""
    m = _ARCH_RE.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"{option} must look like 'mlp:128x64' or 'cnn:16x32-64', got {spec!r}")
    kind, first, second = m.groups()
    try:
        a = tuple(int(w) for w in first.split("x"))
        b = tuple(int(w) for w in second.split("x")) if second else ()
    except ValueError:
        raise ValueError(f"{option} widths must be positive integers joined by 'x', got {spec!r}") from None
    if kind == "mlp" and second:
        raise ValueError(f"{option}: an mlp takes hidden widths only ('mlp:128x64'), got {spec!r}")
    if kind == "cnn" and not second:
        raise ValueError(f"{option}: a cnn needs channels and hidden widths ('cnn:16x32-64'), got {spec!r}")
    channels, hidden = (a, b) if kind == "cnn" else ((), a)
    if any(w < 1 for w in channels + hidden):
        raise ValueError(f"{option} widths must be >= 1, got {spec!r}")
    return Arch(kind, hidden, channels)


@dataclass
class Group:
    """Clients [start, stop) share architecture ``arch``; params[name] is [N_g, ...]."""

    arch: Arch
    start: int
    stop: int
    params: dict[str, Tensor]

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_groups(num_clients: int, archs: list[Arch]) -> list[tuple[Arch, int, int]]:
    """Contiguous client ranges, as equal as possible, one per architecture (first groups
    take the remainder)."""
    if len(archs) > num_clients:
        raise ValueError(f"model: {len(archs)} architectures need at least as many clients, "
                         f"got clients = {num_clients}")
    base, extra = divmod(num_clients, len(archs))
    out, start = [], 0
    for g, arch in enumerate(archs):
        stop = start + base + (g < extra)
        out.append((arch, start, stop))
        start = stop
    return out


# Floats drawn at once while initialising: bounds the temporary memory of many clients.
_DRAW_FLOATS = 2**22


def _uniform(n: int, shape: tuple[int, ...], bound: float, generator: torch.Generator,
             rows: range) -> Tensor:
    """U(±bound) weights [len(rows), *shape] of clients ``rows`` out of n drawn in order.

    Every client's draw is made, so client i gets the same numbers whichever rows are kept
    (a process of a sharded run keeps its own); draws go in chunks of clients, which the CPU
    generator fills exactly as one draw of all n."""
    out = torch.empty(len(rows), *shape)
    chunk = max(1, _DRAW_FLOATS // max(1, math.prod(shape)))
    buf = torch.empty(min(chunk, n), *shape)
    for c0 in range(0, n, chunk):  # chunks of clients, not one client at a time
        u = torch.rand(min(chunk, n - c0), *shape, generator=generator, out=buf[:n - c0])
        lo, hi = max(c0, rows.start), min(c0 + len(u), rows.stop)
        if lo < hi:
            out[lo - rows.start:hi - rows.start] = u[lo - c0:hi - c0]
    return (out * 2 - 1) * bound


def init_params(arch: Arch, n: int, in_shape: tuple[int, ...], num_classes: int,
                num_heads: int, generator: torch.Generator,
                rows: range | None = None) -> dict[str, Tensor]:
    """Stacked weights of n clients, each drawn like torch.nn's default init
    (U(±1/sqrt(fan_in)) for weights and biases), in a fixed order from ``generator``.

    in_shape = (C, H, W) (a cnn needs it), or any shape an mlp flattens; num_heads = H1
    (main + aux); rows: the clients kept (default all): all n are drawn, so the kept rows
    hold what a draw of all n gives them and the generator ends in the same state.
    Returns fp32 CPU tensors with R = len(rows):
    conv{l}.weight [R, C_out, C_in, 3, 3], conv{l}.bias [R, C_out], fc{l}.weight [R, in, out],
    fc{l}.bias [R, out], heads.weight [R, E, H1·V], heads.bias [R, H1·V].
    """
    if arch.kind == "cnn" and len(in_shape) != 3:
        raise ValueError(f"model: a cnn needs image inputs (C, H, W), got input shape {in_shape}")
    rows = range(n) if rows is None else rows
    if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
        raise ValueError(f"rows must be a contiguous range inside [0, {n}), got {rows}")
    params: dict[str, Tensor] = {}
    fan_in = math.prod(in_shape)
    if arch.kind == "cnn":
        c, h, w = in_shape
    for l, c_out in enumerate(arch.channels):
        bound = 1 / math.sqrt(c * 9)
        params[f"conv{l}.weight"] = _uniform(n, (c_out, c, 3, 3), bound, generator, rows)
        params[f"conv{l}.bias"] = _uniform(n, (c_out,), bound, generator, rows)
        c, h, w = c_out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"model: {len(arch.channels)} conv blocks halve an input of "
                             f"{in_shape[1]}x{in_shape[2]} below 1x1; use fewer channels entries")
        fan_in = c * h * w
    for l, width in enumerate(arch.hidden):
        bound = 1 / math.sqrt(fan_in)
        params[f"fc{l}.weight"] = _uniform(n, (fan_in, width), bound, generator, rows)
        params[f"fc{l}.bias"] = _uniform(n, (width,), bound, generator, rows)
        fan_in = width
    bound = 1 / math.sqrt(fan_in)
    params["heads.weight"] = _uniform(n, (fan_in, num_heads * num_classes), bound, generator, rows)
    params["heads.bias"] = _uniform(n, (num_heads * num_classes,), bound, generator, rows)
    return params


def _conv_trunk(arch: Arch, params: dict[str, Tensor], x: Tensor, n: int) -> Tensor:
    """x [B, N·C, H, W] (client-major channels) -> features [N, B, F] by grouped convolution."""
    for l in range(len(arch.channels)):
        w = params[f"conv{l}.weight"]  # [N, C_out, C_in, 3, 3]
        x = F.conv2d(x, w.reshape(-1, *w.shape[2:]), params[f"conv{l}.bias"].reshape(-1),
                     padding=1, groups=n)
        x = F.max_pool2d(F.relu(x), 2)
    b = x.shape[0]
    return x.reshape(b, n, -1).transpose(0, 1)


def forward(arch: Arch, params: dict[str, Tensor], x: Tensor, *, shared: bool,
            num_heads: int) -> tuple[Tensor, Tensor]:
    """Logits [N, H1, B, V] and embedding [N, B, E] of the N clients of one group.

    shared=False: x [N, B, *in], client i sees rows x[i]. shared=True: x [B, *in], every
    client sees the same rows (broadcast, never copied N times for the MLP). in = (C, H, W)
    for a cnn, any shape for an mlp (flattened).
    """
    n = params["heads.weight"].shape[0]
    if arch.kind == "cnn":
        if shared:
            b, c = x.shape[:2]
            x = x.repeat(1, n, 1, 1)  # [B, N·C, H, W]: grouped conv needs every client's copy
        else:
            b, c = x.shape[1:3]
            x = x.transpose(0, 1).reshape(b, n * c, *x.shape[3:])
        h = _conv_trunk(arch, params, x, n)
    else:
        if shared:
            h = x.flatten(1).unsqueeze(0).expand(n, -1, -1)  # [N, B, D], a view
        else:
            h = x.flatten(2)
    for l in range(len(arch.hidden)):
        h = F.relu(torch.baddbmm(params[f"fc{l}.bias"].unsqueeze(1), h, params[f"fc{l}.weight"]))
    emb = h
    out = torch.baddbmm(params["heads.bias"].unsqueeze(1), emb, params["heads.weight"])  # [N, B, H1·V]
    logits = out.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # [N, H1, B, V], a view
    return logits, emb


def forward_groups(groups: list[Group], x: Tensor, *, shared: bool,
                   num_heads: int) -> tuple[Tensor, Tensor | None]:
    """forward() of every group, concatenated on the client dimension -> logits [N, H1, B, V]
    and embeddings [N, B, E] (None when groups differ in E). The loop is over architectures,
    not clients."""
    outs = [forward(g.arch, g.params, x if shared else x[g.start:g.stop], shared=shared,
                    num_heads=num_heads) for g in groups]
    if len(outs) == 1:
        return outs[0]
    logits = torch.cat([o[0] for o in outs])
    embs = [o[1] for o in outs]
    emb = torch.cat(embs) if len({e.shape[-1] for e in embs}) == 1 else None
    return logits, emb


def activation_floats(arch: Arch, in_shape: tuple[int, ...], out_features: int) -> int:
    """The widest activation of one client on one row (floats): what bounds the memory of a
    forward over many clients and rows. out_features = H1 · V."""
    widest = max(math.prod(in_shape), out_features, *arch.hidden)
    if arch.kind == "cnn":
        c, h, w = in_shape
        for c_out in arch.channels:
            widest = max(widest, c_out * h * w)  # a conv's output, before its pooling
            c, h, w = c_out, h // 2, w // 2
    return widest


def num_params(arch: Arch, in_shape: tuple[int, ...], num_classes: int, num_heads: int) -> int:
    """The weights of one client of ``arch`` (what init_params draws), counted without
    allocating them: how large a run is, before it is built."""
    total, fan_in = 0, math.prod(in_shape)
    if arch.kind == "cnn":
        c, h, w = in_shape
        for c_out in arch.channels:
            total += c_out * c * 9 + c_out
            c, h, w = c_out, h // 2, w // 2
        fan_in = c * h * w
    for width in arch.hidden:
        total += fan_in * width + width
        fan_in = width
    return total + (fan_in + 1) * num_heads * num_classes


def parameters(groups: list[Group]) -> list[Tensor]:
    """Every stacked tensor of every group, in a fixed order (the optimizer's order)."""
    return [p for g in groups for p in g.params.values()]


def num_params_per_client(groups: list[Group]) -> list[int]:
    """Parameter count of one client of each group."""
    return [sum(p[0].numel() for p in g.params.values()) for g in groups]
