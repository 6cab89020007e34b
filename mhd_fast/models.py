"""Batched client models: all clients of one architecture are one set of weights stacked on a
leading client dimension N, so one forward and one backward serve every client.

A model is a trunk (MLP layers, or conv blocks then MLP layers) whose last hidden layer is the
*embedding* [E], followed by H1 = 1 + H linear heads (head 0 = main, heads 1..H = aux) stored
as one [E, H1·V] matrix. Weights are plain tensors in a dict; nothing here owns state.

Shapes: x_private [N, B, *in] (each client its own rows), x_shared [B, *in] (the same rows
for every client: the public batch or the test set; in = (C, H, W) or (D,)) -> logits [N, H1, B, V], embedding
[N, B, E]. The MLP is batched matmul (torch.baddbmm); the CNN's convolutions run as one
grouped convolution or N calls (the ``conv`` option, ``conv.loop_conv``).

Any ``nn.Module`` can be a trunk (``ModuleArch``: ``resnet:N``, ``module:PKG.MOD:FN`` or a
factory): each client's module is drawn from its own seed, their weights and buffers are
stacked (``torch.func.stack_module_state``) and one ``vmap(functional_call)`` runs every
client of the group, or, where convolutions run faster one client at a time
(``conv.loop_conv``), ``functional_call`` runs each client on its slice of the stacked
weights; the heads are the same stacked matrix as above. Random layers (dropout) draw a
different mask per client from a generator seeded by the step (``step_seed``), never from
the caller's global RNG, which is left as it was.

Heterogeneity: ``split_groups`` gives each architecture a contiguous range of clients; each
group is batched on its own and ``forward_groups`` concatenates their outputs on the client
dimension, so the exchange sees one [N, ...] tensor whatever the mix.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.checkpoint import checkpoint

from . import nets
from .conv import batched_net, conv_trunk
from .config import factory_spec

KINDS = ("mlp", "cnn", "resnet", "module")
_RESNET_RE = re.compile(r"^resnet:([0-9]+)(?::(gn|bn))?$")
_MODULE_RE = re.compile(r"^module:([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
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


@dataclass(frozen=True)
class ModuleArch:
    """A trunk built as an ``nn.Module``: ``factory()`` (a user's, no arguments) or, for the
    built-ins, ``factory(*args, in_shape)``; the module maps [B, *in] to an embedding [B, E].
    ``spec`` names it ('resnet:8', 'resnet:20:bn', 'module:PKG.MOD:FN')."""

    spec: str
    factory: Callable = field(repr=False)
    args: tuple = ()
    builtin: bool = False
    kind: str = "module"

    def __str__(self) -> str:
        return self.spec


def _resnet(depth: int, norm: str, in_shape: tuple[int, ...]) -> nn.Module:
    if len(in_shape) != 3:
        raise ValueError(f"a resnet needs image inputs (C, H, W), got input shape {in_shape}")
    return nets.ResNet(depth, in_shape[0], norm)


def _import(name: str):
    """importlib.import_module, with the current folder searched too (as ``python -m`` does);
    sys.path is restored afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def parse_arch(spec, *, option: str = "model") -> Arch | ModuleArch:
    """'mlp:128x64' (hidden widths), 'cnn:16x32-64' (conv channels, then hidden widths),
    'resnet:8' / 'resnet:20:bn' (CIFAR ResNet, GroupNorm or BatchNorm), 'module:PKG.MOD:FN'
    (FN() returns an nn.Module; PKG.MOD importable, the current folder included), or the
    factory itself (a callable)."""
    if callable(spec) and not isinstance(spec, str):
        return ModuleArch(factory_spec(spec), spec)
    text = spec.strip() if isinstance(spec, str) else ""
    if text.startswith("resnet"):
        m = _RESNET_RE.match(text)
        depth = int(m.group(1)) if m else 0
        if m is None or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"{option} {spec!r}: a resnet is 'resnet:DEPTH' or 'resnet:DEPTH:bn' "
                             f"with DEPTH = 6n + 2 >= 8 (8, 14, 20, ...)")
        norm = m.group(2) or "gn"
        return ModuleArch(f"resnet:{depth}" + (":bn" if norm == "bn" else ""), _resnet,
                          (depth, norm), builtin=True, kind="resnet")
    if text.startswith("module"):
        m = _MODULE_RE.match(text)
        if m is None:
            raise ValueError(f"{option} {spec!r}: a module trunk is 'module:PKG.MOD:FN' "
                             f"(FN() returns an nn.Module)")
        try:
            obj = _import(m.group(1))
            for part in m.group(2).split("."):
                obj = getattr(obj, part)
        except Exception as e:  # any error of the user's code while it imports
            raise ValueError(f"{option} {spec}: cannot import {m.group(1)}:{m.group(2)}: "
                             f"{type(e).__name__}: {e}") from None
        if not callable(obj):
            raise ValueError(f"{option} {spec}: {m.group(2)} is not callable (a factory that "
                             f"returns an nn.Module is expected)")
        return ModuleArch(text, obj)
    m = _ARCH_RE.match(text)
    if m is None:
        raise ValueError(f"{option} must look like 'mlp:128x64', 'cnn:16x32-64', 'resnet:8' or "
                         f"'module:PKG.MOD:FN', got {spec!r}")
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
    """Clients [start, stop) share architecture ``arch``; params[name] is [N_g, ...]. A module
    trunk also has ``net`` (one client's module on the meta device: the code that
    functional_call runs) and its stacked buffers (BatchNorm's running statistics).
    loop_conv: the clients run one at a time, not as one batch (``looped``)."""

    arch: Arch | ModuleArch
    start: int
    stop: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    net: nn.Module | None = None
    loop_conv: bool = False

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


# ---- module trunks: built per client, run for all clients by vmap --------------------------

@contextlib.contextmanager
def _rng(device: torch.device, seed: int):
    """The default generator of ``device`` seeded with ``seed`` inside the block, restored
    after it: a factory's init and dropout draw from it, the caller's RNG state is untouched."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else [], device_type="cuda"):
        if cuda:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


def step_seed(train_seed: int, step: int) -> int:
    """The seed of one step's random layers (dropout): a function of the run's train seed and
    the step alone, so a resumed run draws the same masks."""
    digest = hashlib.sha256(f"mhd_fast:dropout:{train_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def chunk_seed(seed: int, first: int) -> int:
    """The seed of the random layers of the chunk of clients starting at client ``first``
    (``forward_group`` with ``chunk``): the step's seed for the first chunk, another one for
    each other chunk, so that chunks do not repeat each other's masks."""
    if first == 0:
        return seed
    digest = hashlib.sha256(f"mhd_fast:chunk:{seed}:{first}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def build_trunk(arch: ModuleArch, in_shape: tuple[int, ...]) -> nn.Module:
    """One client's trunk from the factory (ValueError naming --model when it fails)."""
    try:
        net = arch.factory(*arch.args, in_shape) if arch.builtin else arch.factory()
    except Exception as e:  # any error of the user's factory
        raise ValueError(f"--model {arch.spec}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {arch.spec}: the factory must return a torch.nn.Module, got "
                         f"{type(net).__name__}")
    if not any(True for _ in net.parameters()):
        raise ValueError(f"--model {arch.spec}: the module has no parameters to train")
    return net


@dataclass(frozen=True)
class TrunkInfo:
    """What one client's module trunk is, measured on a probe: weights, embedding size E, and
    per input row the widest layer output and the sum of the layer outputs (floats)."""

    num_params: int
    emb_dim: int
    widest: int
    activations: int


@functools.lru_cache(maxsize=64)
def trunk_info(arch: ModuleArch, in_shape: tuple[int, ...]) -> TrunkInfo:
    """Build one trunk and run 2 zero rows through it in eval mode: checks that it maps
    [B, *in] to [B, E] (ValueError naming --model otherwise) and measures it."""
    with _rng(torch.device("cpu"), 0):
        net = build_trunk(arch, in_shape)
    outs: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.numel() // 2 if isinstance(o, Tensor) else 0))
             for m in net.modules() if next(m.children(), None) is None]
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *in_shape))
    except Exception as e:  # any error of the user's forward
        raise ValueError(f"--model {arch.spec}: the module fails on an input [B, "
                         f"{', '.join(map(str, in_shape))}]: {type(e).__name__}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"--model {arch.spec}: the module must map an input [B, "
                         f"{', '.join(map(str, in_shape))}] to an embedding [B, E], got {got} for B = 2")
    return TrunkInfo(sum(p.numel() for p in net.parameters()), out.shape[1],
                     max([math.prod(in_shape), out.shape[1], *outs]), sum(outs))


def looped(arch: Arch | ModuleArch, net: nn.Module | None, loop: bool) -> bool:
    """Whether a group runs one client at a time: where ``conv.loop_conv`` says so (``loop``)
    and its trunk has convolutions (an MLP stays one batched matmul a layer)."""
    if isinstance(arch, Arch):
        return loop and arch.kind == "cnn"
    return loop and net is not None and any(isinstance(m, nn.modules.conv._ConvNd)
                                            for m in net.modules())


def init_module(arch: ModuleArch, n: int, in_shape: tuple[int, ...], num_classes: int,
                num_heads: int, generator: torch.Generator, rows: range | None = None,
                device: torch.device = torch.device("cpu"), loop_conv: bool = False):
    """Stacked trunk weights and buffers of the ``rows`` of n clients of a module trunk, and
    their heads. Client i's module is built by the factory under the seed i drawn from
    ``generator`` (all n seeds are drawn, then the heads as ``init_params`` draws them), so
    its weights do not depend on which rows are kept. Returns (net, params, buffers): params
    'trunk.NAME' [R, ...] and 'heads.weight' [R, E, H1·V], 'heads.bias' [R, H1·V]; buffers
    NAME [R, ...]; net = conv.batched_net (None when no row is kept), made for running one client
    at a time when ``loop_conv``."""
    rows = range(n) if rows is None else rows
    info = trunk_info(arch, in_shape)
    seeds = torch.randint(0, 2**63 - 1, (n,), generator=generator).tolist()
    trunks = []
    for i in rows:  # a factory builds one module at a time: setup's only loop over clients
        with _rng(torch.device("cpu"), seeds[i]):
            trunks.append(build_trunk(arch, in_shape))
    bound = 1 / math.sqrt(info.emb_dim)
    heads = {"heads.weight": _uniform(n, (info.emb_dim, num_heads * num_classes), bound, generator, rows),
             "heads.bias": _uniform(n, (num_heads * num_classes,), bound, generator, rows)}
    if not trunks:
        return None, {}, {}
    params, buffers = stack_module_state(trunks)
    params = {f"trunk.{k}": p.detach().to(device) for k, p in params.items()}
    params.update({k: p.to(device) for k, p in heads.items()})
    buffers = {k: b.to(device) for k, b in buffers.items()}
    return batched_net(trunks[0], loop_conv, arch.builtin), params, buffers


def _module_trunk(g: Group, x: Tensor, shared: bool, train: bool, seed: int) -> Tensor:
    """Embeddings [N, B, E] of a module group: one vmap over the stacked weights and buffers,
    or (g.loop_conv) one functional_call per client on its slices of them. BatchNorm in train
    mode updates each client's running statistics in place either way."""
    trunk = {k[6:]: p for k, p in g.params.items() if k.startswith("trunk.")}
    g.net.train(train)
    if g.loop_conv:
        with _rng(x.device, seed) if train else contextlib.nullcontext():
            return _looped_trunk(g.net, trunk, g.buffers, x, shared)
    run = vmap(lambda p, b, xi: functional_call(g.net, (p, b), (xi,)),
               in_dims=(0, 0, None if shared else 0), randomness="different")
    if not train:
        return run(trunk, g.buffers, x)
    with _rng(x.device, seed):
        return run(trunk, g.buffers, x)


def _looped_trunk(net: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                  x: Tensor, shared: bool) -> Tensor:
    """The clients one at a time: client i runs ``net`` on the i-th slices of the stacked
    weights and buffers (unbind: one backward node per weight, not N full-size zero-filled
    gradients). Random layers draw client after client from the current generator."""
    ps = {k: p.unbind(0) for k, p in params.items()}
    bs = {k: b.unbind(0) for k, b in buffers.items()}  # views: in-place updates reach the stack
    n = len(next(iter(ps.values())))
    xs = [x] * n if shared else x.unbind(0)
    return torch.stack([functional_call(net, ({k: v[i] for k, v in ps.items()},
                                              {k: v[i] for k, v in bs.items()}), (xs[i],))
                        for i in range(n)])


# ---- the batched forward -------------------------------------------------------------------

def _heads(params: dict[str, Tensor], emb: Tensor, num_heads: int) -> Tensor:
    out = torch.baddbmm(params["heads.bias"].unsqueeze(1), emb, params["heads.weight"])  # [N, B, H1·V]
    return out.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # [N, H1, B, V], a view


def forward(arch: Arch, params: dict[str, Tensor], x: Tensor, *, shared: bool,
            num_heads: int, loop_conv: bool = False) -> tuple[Tensor, Tensor]:
    """Logits [N, H1, B, V] and embedding [N, B, E] of the N clients of one group of a
    built-in mlp / cnn.

    shared=False: x [N, B, *in], client i sees rows x[i]. shared=True: x [B, *in], every
    client sees the same rows (broadcast, never copied N times for the MLP). in = (C, H, W)
    for a cnn, any shape for an mlp (flattened). loop_conv: a cnn's convolutions run as N
    calls (``conv.loop_conv``), else one grouped convolution.
    """
    n = params["heads.weight"].shape[0]
    if arch.kind == "cnn":
        h = conv_trunk(len(arch.channels), params, x, shared, loop_conv)
    elif shared:
        h = x.flatten(1).unsqueeze(0).expand(n, -1, -1)  # [N, B, D], a view
    else:
        h = x.flatten(2)
    for l in range(len(arch.hidden)):
        h = F.relu(torch.baddbmm(params[f"fc{l}.bias"].unsqueeze(1), h, params[f"fc{l}.weight"]))
    return _heads(params, h, num_heads), h


def forward_group(g: Group, x: Tensor, *, shared: bool, num_heads: int, train: bool = True,
                  seed: int = 0, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """forward() of one group of any architecture. A module trunk runs in train mode
    (train=True: BatchNorm batch statistics, dropout with the masks of ``seed``) or eval mode.
    chunk: 0 = all clients at once; 0 < chunk < g.size: ``_chunked``, chunk clients at a time."""
    if 0 < chunk < g.size:
        return _chunked(g, x, shared=shared, num_heads=num_heads, train=train, seed=seed,
                        chunk=chunk)
    if isinstance(g.arch, ModuleArch):
        emb = _module_trunk(g, x, shared, train, seed)
        return _heads(g.params, emb, num_heads), emb
    return forward(g.arch, g.params, x, shared=shared, num_heads=num_heads, loop_conv=g.loop_conv)


def _sub(g: Group, a: int, b: int, buffers: dict[str, Tensor]) -> Group:
    """Clients [a, b) of group g (views of its weights) with ``buffers`` as theirs."""
    return Group(g.arch, 0, b - a, {k: p[a:b] for k, p in g.params.items()}, buffers, g.net,
                 g.loop_conv)


def _chunked(g: Group, x: Tensor, *, shared: bool, num_heads: int, train: bool, seed: int,
             chunk: int) -> tuple[Tensor, Tensor]:
    """forward_group() of g's clients ``chunk`` at a time, outputs concatenated.

    Each client's outputs depend on its own weights and rows alone, so the chunks are
    independent. With autograd on, a chunk runs under activation checkpointing: only its
    inputs and outputs are kept, and the backward runs the chunk's forward again before its
    own backward, so a step holds one chunk's activations instead of every client's. The
    recompute draws the same masks (its seed is explicit: ``chunk_seed``) and runs on a copy
    of the chunk's buffers as they were before the forward: BatchNorm's running statistics
    are updated once, and a module that reads its buffers computes the same thing twice."""
    outs = []
    for a in range(0, g.size, chunk):
        b = min(a + chunk, g.size)
        xa = x if shared else x[a:b]
        opts = dict(shared=shared, num_heads=num_heads, train=train, seed=chunk_seed(seed, a))
        buffers = {k: t[a:b] for k, t in g.buffers.items()}  # views: updated in place
        if not torch.is_grad_enabled():
            outs.append(forward_group(_sub(g, a, b, buffers), xa, **opts))
            continue
        before = {k: t.clone() for k, t in buffers.items()}
        runs = []

        def run(xa, a=a, b=b, buffers=buffers, before=before, runs=runs, opts=opts):
            own = buffers if not runs else {k: t.clone() for k, t in before.items()}
            runs.append(True)
            return forward_group(_sub(g, a, b, own), xa, **opts)

        # RNG state: the chunk seeds its random layers itself, nothing to save and restore
        outs.append(checkpoint(run, xa, use_reentrant=False, preserve_rng_state=False))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def forward_groups(groups: list[Group], x: Tensor, *, shared: bool, num_heads: int,
                   train: bool = True, seed: int = 0,
                   chunk: int = 0) -> tuple[Tensor, Tensor | None]:
    """forward_group() of every group, concatenated on the client dimension -> logits
    [N, H1, B, V] and embeddings [N, B, E] (None when groups differ in E). The loop is over
    architectures, not clients. chunk: clients per chunk of each group (0 = all at once)."""
    outs = [forward_group(g, x if shared else x[g.start:g.stop], shared=shared,
                          num_heads=num_heads, train=train, seed=seed, chunk=chunk)
            for g in groups]
    if len(outs) == 1:
        return outs[0]
    logits = torch.cat([o[0] for o in outs])
    embs = [o[1] for o in outs]
    emb = torch.cat(embs) if len({e.shape[-1] for e in embs}) == 1 else None
    return logits, emb


def emb_dim(arch: Arch | ModuleArch, in_shape: tuple[int, ...]) -> int:
    """The embedding size E of one client of ``arch`` on inputs ``in_shape``."""
    return trunk_info(arch, in_shape).emb_dim if isinstance(arch, ModuleArch) else arch.emb_dim


def activation_floats(arch: Arch | ModuleArch, in_shape: tuple[int, ...], out_features: int) -> int:
    """The widest activation of one client on one row (floats): what bounds the memory of a
    forward over many clients and rows. out_features = H1 · V."""
    if isinstance(arch, ModuleArch):
        return max(trunk_info(arch, in_shape).widest, out_features)
    widest = max(math.prod(in_shape), out_features, *arch.hidden)
    if arch.kind == "cnn":
        _, h, w = in_shape
        for c_out in arch.channels:
            widest = max(widest, c_out * h * w)  # a conv's output, before its pooling
            h, w = h // 2, w // 2
    return widest


def forward_floats(g: Group, in_shape: tuple[int, ...], out_features: int) -> int:
    """Floats per input row that a forward of group g without autograd holds at once: every
    client's widest activation when its clients run as one batch; when they run one at a
    time (g.loop_conv), one client's, plus the outputs (embedding and heads) of all."""
    widest = activation_floats(g.arch, in_shape, out_features)
    if g.loop_conv:
        return widest + g.size * (emb_dim(g.arch, in_shape) + out_features)
    return g.size * widest


def num_params(arch: Arch | ModuleArch, in_shape: tuple[int, ...], num_classes: int,
               num_heads: int) -> int:
    """The weights of one client of ``arch`` (what init_params / init_module draw), counted
    without building the clients: how large a run is, before it is built."""
    if isinstance(arch, ModuleArch):
        info = trunk_info(arch, in_shape)
        return info.num_params + (info.emb_dim + 1) * num_heads * num_classes
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
