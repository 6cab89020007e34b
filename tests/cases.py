"""Shared cases for the op tests: the backends, graphs, logits with planted ties, tolerances
per dtype; and a simulation run killed mid-way, for the resume tests.

Every op's tests draw from here so that every backend sweeps the same cases.
"""
from __future__ import annotations

import os

import pytest
import torch

import mhd_fast
from mhd_fast.ops import reference

CUDA = torch.cuda.is_available()
# Every compiled backend next to the reference. Triton runs on CUDA tensors, or without a GPU
# on CPU tensors through its interpreter (conftest sets TRITON_INTERPRET=1): tiny sizes there.
BACKENDS = ("cpp", "torch", "triton")

GRAPHS = ("complete", "ring", "directed", "lonely", "selfloops")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VOCABS = (1, 2, 10, 41, 1271)
TAUS = (0.5, 1.0, 4.0)
AGGREGATES = ("max_confidence", "mean", "confidence_weighted")
# (graph, include_self): every graph, self-loops with and without include_self.
GRAPH_CASES = [(g, False) for g in GRAPHS] + [("selfloops", True)]

# (rtol, atol) of a loss / lse computed in fp32 from inputs of this dtype, against the reference
# computed from the same inputs: only the summation order differs.
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5),
            torch.float16: (2e-5, 2e-5), torch.float64: (1e-10, 1e-12)}
# (rtol, atol) of a gradient stored in the student's dtype: the final rounding dominates.
GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2e-2, 1e-4),
            torch.float16: (2e-3, 1e-5), torch.float64: (1e-10, 1e-12)}


def unavailable(backend: str) -> str | None:
    """None when the tests can run ``backend`` here, else why not."""
    if backend == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA or TRITON_INTERPRET=1"
    return mhd_fast.backend_available(backend)


def backend_params(backends=BACKENDS) -> list:
    """pytest params of the backends, skipped where one cannot run."""
    return [pytest.param(b, marks=pytest.mark.skipif(unavailable(b) is not None, reason=str(unavailable(b))), id=b)
            for b in backends]


def param(backend: str, *values, id: str | None = None):
    """One case of a parametrization whose first value is the backend, skipped where it cannot run."""
    return pytest.param(backend, *values, id=id, marks=pytest.mark.skipif(unavailable(backend) is not None,
                                                                           reason=str(unavailable(backend))))


def device_of(backend: str) -> str:
    return "cuda" if backend == "triton" and CUDA else "cpu"


# The Triton interpreter evaluates masked lanes too (log2 0, −inf − −inf); numpy warns about them.
INTERPRETER_WARNINGS = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
                        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
                        pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


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


def loss_and_grad(z, teacher, adj, grad_out, head_shift=True, **kw):
    """(loss, dL/dZ) of mhd_loss (distill_loss without head_shift) with upstream gradient grad_out."""
    z = z.detach().clone().requires_grad_()
    loss = (mhd_fast.mhd_loss if head_shift else mhd_fast.distill_loss)(z, teacher, adj, **kw)
    if grad_out is None:
        return loss.detach(), None
    (g,) = torch.autograd.grad(loss, z, grad_out.to(loss.dtype))
    return loss.detach(), g


def reference_loss_and_grad(z, teacher, adj, grad_out, head_shift=True, **kw):
    """The torch reference evaluated in fp64 on the same inputs: the truth a fp32 kernel is held
    to. The teacher choice is the one the reference makes at the inputs' own precision, where
    confidences that differ in the 9th digit can round to a tie (lowest client wins)."""
    shifted = teacher if not head_shift else (
        mhd_fast.TopKLogits(*(x[:, :-1] for x in teacher)) if isinstance(teacher, mhd_fast.TopKLogits)
        else teacher[:, :-1])
    _, logconf = (reference.packet_stats(shifted.values, shifted.lse) if isinstance(shifted, mhd_fast.TopKLogits)
                  else reference.teacher_stats(shifted, kw.get("tau", 1.0)))
    idx, has = reference.select(logconf, adj, kw.get("include_self", False))
    if isinstance(teacher, mhd_fast.TopKLogits):
        teacher = mhd_fast.TopKLogits(teacher.values.double(), teacher.indices, teacher.lse.double())
    else:
        teacher = teacher.double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "select", lambda *args: (idx, has))
        return loss_and_grad(z.double(), teacher, adj, None if grad_out is None else grad_out.double(),
                              head_shift, backend="torch", **kw)


def assert_matches_reference(z, teacher, adj, backend, *, grad=True, seed=0, head_shift=True, **kw):
    rows = (z.shape[0], z.shape[1] - 1 if head_shift else z.shape[1], z.shape[2])
    grad_out = None
    if grad:
        grad_out = (torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5).to(z.device)
        if kw.get("reduction", "none") != "none":
            grad_out = torch.tensor(1.7, device=z.device)
    got_loss, got_grad = loss_and_grad(z, teacher, adj, grad_out, head_shift, backend=backend, **kw)
    want_loss, want_grad = reference_loss_and_grad(z, teacher, adj, grad_out, head_shift, **kw)
    assert got_loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert got_loss.shape == want_loss.shape
    rtol, atol = LOSS_TOL[z.dtype]
    torch.testing.assert_close(got_loss, want_loss.to(got_loss.dtype), rtol=rtol, atol=atol)
    if grad:
        assert got_grad.dtype == z.dtype and got_grad.shape == z.shape
        rtol, atol = GRAD_TOL[z.dtype]
        torch.testing.assert_close(got_grad, want_grad.to(z.dtype), rtol=rtol, atol=atol)


def make_case(dtype, v, graph, n=5, h1=3, b=4, seed=0, backend="cpu"):
    """(student, teacher, adj) of shape [n, h1, b, v] on the backend's device."""
    device = device_of(backend) if backend != "cpu" else "cpu"
    z = make_logits((n, h1, b, v), dtype, seed=seed).to(device)
    t = make_logits((n, h1, b, v), dtype, seed=seed + 1).to(device)
    return z, t, make_graph(graph, n, seed=seed).to(device)


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
