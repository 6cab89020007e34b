"""Shared cases for the op tests: graphs, logits with planted ties, tolerances per dtype.

Every backend's tests draw from here so that they sweep the same cross product.
"""
from __future__ import annotations

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
