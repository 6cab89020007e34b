"""Shared cases for the op tests: graphs, logits with planted ties, tolerances per dtype; and
a simulation run killed mid-way, for the resume tests.

Every backend's tests draw from here so that they sweep the same cross product.
"""
from __future__ import annotations

import pytest
import torch

GRAPHS = ("complete", "ring", "directed", "lonely", "selfloops")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VOCABS = (1, 2, 10, 41, 1271)
TAUS = (0.5, 1.0, 4.0)
AGGREGATES = ("max_confidence", "mean", "confidence_weighted")

# (rtol, atol) of a loss / lse computed in fp32 from inputs of this dtype, against the reference
# computed from the same inputs: only the summation order differs.
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5),
            torch.float16: (2e-5, 2e-5), torch.float64: (1e-10, 1e-12)}
# (rtol, atol) of a gradient stored in the student's dtype: the final rounding dominates.
GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2e-2, 1e-4),
            torch.float16: (2e-3, 1e-5), torch.float64: (1e-10, 1e-12)}


def make_graph(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """[n, n] bool adjacency; adj[i, j] = i hears j."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n, dtype=torch.bool)
    if name == "complete":
        return ~eye
    if name == "ring":
        i = torch.arange(n)
        adj = torch.zeros(n, n, dtype=torch.bool)
        adj[i, (i + 1) % n] = True
        adj[i, (i - 1) % n] = True
        return adj & ~eye
    if name == "directed":  # one-way random edges, not symmetric
        adj = (torch.rand(n, n, generator=g) < 0.4) & ~eye
        return adj & ~adj.T
    if name == "lonely":  # client 0 hears nobody, and nobody hears it
        adj = (torch.rand(n, n, generator=g) < 0.6) & ~eye
        adj[0, :] = False
        adj[:, 0] = False
        return adj
    if name == "selfloops":  # a full diagonal plus random edges
        return (torch.rand(n, n, generator=g) < 0.5) | eye
    raise ValueError(name)


def make_logits(shape, dtype=torch.float32, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def with_confidence_ties(teacher: torch.Tensor) -> torch.Tensor:
    """Every client sends client 0's predictions: all candidates tie, the lowest index wins."""
    return teacher[:1].expand_as(teacher).clone()


def with_topk_ties(logits: torch.Tensor) -> torch.Tensor:
    """Logits on a coarse grid, so that rows hold many equal values (ties in top-k)."""
    return (logits.float() * 0.7).round().to(logits.dtype)


def opcheck_every_op(backend: str, device: str = "cpu", v: int = 11, k: int = 4) -> None:
    """torch.library.opcheck of every op of ``registry`` with ``backend``: schema, fake tensors,
    autograd registration and AOT dispatch; the distillation ops on the full student with a head
    offset (how mhd_loss calls them), the one-launch dense op with and without the unit gradient."""
    from mhd_fast.ops import reference, registry

    n, h, b = 4, 3, 3
    z = make_logits((n, h, b, v), seed=13).to(device).requires_grad_()
    t = make_logits((n, h - 1, b, v), torch.bfloat16, seed=14).to(device)
    adj = make_graph("ring", n).to(device)
    lse_t, logconf_t = reference.teacher_stats(t, 1.3)
    idx, _ = reference.select(logconf_t, adj, False)
    values, indices, packet_lse = reference.topk_compress(t, k, 1.3)
    indices = indices.int()
    p_lse, p_logconf = reference.packet_stats(values, packet_lse)
    p_idx, _ = reference.select(p_logconf, adj, False)
    grad = torch.rand(n, h - 1, b, device=device)
    zd = z.detach()
    lse_z = torch.logsumexp(zd[:, 1:] / 1.3, -1)
    checks = [(registry.teacher_stats, (t, 1.3, backend)),
              (registry.select, (logconf_t, adj, False, backend)),
              (registry.topk_compress, (t.reshape(-1, v), k, 1.3, backend))]
    for aggregate in AGGREGATES:
        checks += [(registry.distill_fwd, (z, t, lse_t, logconf_t, idx, adj, 1, 1.3, False, aggregate, backend)),
                   (registry.distill_topk_fwd, (z, values, indices, p_lse, p_logconf, p_idx, adj, 1, 1.3,
                                                False, aggregate, backend))]
        if registry.fused_dense(backend):
            checks += [(registry.distill_dense, (z, t, adj, 1, 1.3, False, aggregate, need_grad, backend))
                       for need_grad in (False, True)]
        checks += [(registry.distill_bwd, (grad, zd, t, lse_t, logconf_t, idx, adj, lse_z, 1, 1.3,
                                           False, aggregate, backend))]
        if aggregate != "max_confidence":  # max_confidence packets save a backend-specific statistic
            checks += [(registry.distill_topk_bwd, (grad, zd, values, indices, p_lse, p_logconf,
                                                    p_idx, adj, lse_z, 1, 1.3, False, aggregate,
                                                    backend))]
    for op, args in checks:
        torch.library.opcheck(op, args)


def run_killed_in_round(cfg, monkeypatch, round_index: int) -> None:
    """Run the simulation of ``cfg`` until it dies in round ``round_index`` (train_round raises,
    as a killed process would stop: the checkpoints of the rounds before it are on disk), then
    put train_round back for the resumed run."""
    from mhd_fast import train

    real_round = train.train_round

    def crash(sim, r):
        if r == round_index:
            raise RuntimeError("killed")
        return real_round(sim, r)

    monkeypatch.setattr(train, "train_round", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(cfg)
    monkeypatch.setattr(train, "train_round", real_round)
