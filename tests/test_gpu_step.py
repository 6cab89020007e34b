"""The simulator's local step on a GPU: no host sync inside a step (checked with
torch.cuda.set_sync_debug_mode("error")), and what lets it run without one: packets the
simulator made itself skip the host-read check of their contents. --compile trains the same
weights as eager (CPU, and CUDA with CUDA graphs)."""
from __future__ import annotations

import pytest
import torch

import mhd_fast
from mhd_fast import config as C
from mhd_fast import exchange as ex
from mhd_fast import models
from mhd_fast import evaluation, simulation, train
from mhd_fast.ops.inputs import trusted_packets

from cases import make_graph, make_logits

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def tiny_config(device: str, **extra) -> C.Config:
    return C.load(None, {"dataset": "digits", "clients": 6, "model": ["mlp:32x16"], "heads": 2, "batch_size": 8,
                         "public_batch_size": 16, "steps_per_round": 2, "rounds": 2, "progress": False,
                         "checkpoint": False, "device": device, **extra})


def test_trusted_packets_skip_only_the_content_check():
    """A packet with a class sent twice is refused, except inside trusted_packets(); a packet of
    the wrong shape is refused inside it too."""
    z = make_logits((3, 2, 4, 6), seed=1)
    adj = make_graph("complete", 3)
    values, indices, lse = mhd_fast.topk_compress(make_logits((3, 2, 4, 6), seed=2), 2, backend="torch")
    indices = indices.clone()
    indices[..., 1] = indices[..., 0]
    bad = mhd_fast.TopKLogits(values, indices, lse)
    with pytest.raises(ValueError, match="distinct classes"):
        mhd_fast.mhd_loss(z, bad, adj, backend="torch")
    with trusted_packets():
        mhd_fast.mhd_loss(z, bad, adj, backend="torch")
        with pytest.raises(ValueError, match="teacher.lse must have shape"):
            mhd_fast.mhd_loss(z, mhd_fast.TopKLogits(values, indices, lse[:, :1]), adj, backend="torch")
    with pytest.raises(ValueError, match="distinct classes"):
        mhd_fast.mhd_loss(z, bad, adj, backend="torch")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extra", [{}, {"topk": 3, "wire_dtype": "bfloat16"}, {"aggregate": "mean"},
                                   {"nu_main": 0.5, "nu_emb": 0.1, "exchange_every": 2}],
                         ids=["dense", "topk", "mean", "main-emb-stale"])
def test_local_step_makes_no_host_sync(extra):
    sim = simulation.setup(tiny_config("cuda", **extra))
    adj = sim.schedule(0).to(sim.device)
    route = ex.route(adj, sim.shard)
    train.local_step(sim, adj, route)  # first launches: kernels compile, allocations grow
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train.local_step(sim, adj, route)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not bool(train.nonfinite(sim).any())


def _two_rounds(cfg: C.Config):
    sim = simulation.setup(cfg)
    for r in range(2):
        train.train_round(sim, r)
    return [p.detach().cpu() for p in models.parameters(sim.groups)], evaluation.evaluate(sim)


def _assert_compile_matches_eager(device: str, **extra):
    eager_w, eager_m = _two_rounds(tiny_config(device, **extra))
    comp_w, comp_m = _two_rounds(tiny_config(device, compile=True, **extra))
    for a, b in zip(eager_w, comp_w):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_m[:2], comp_m[:2]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0.02)  # accuracies: one test row in 50
    assert abs(comp_m[2] - eager_m[2]) <= 0.02


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_matches_eager_on_cpu():
    """--compile (torch.compile of a step's forward, exchange and losses) trains the same
    weights as eager, dense and top-k: about a minute of compilation on a CPU."""
    _assert_compile_matches_eager("cpu", topk=3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extra", [{}, {"topk": 3}, {"nu_main": 0.5, "exchange_every": 2}],
                         ids=["dense", "topk", "stale-exchange"])
def test_compile_matches_eager_on_cuda(extra):
    """CUDA graphs (mode reduce-overhead) with a fresh exchange every step; default mode with
    a stale one."""
    _assert_compile_matches_eager("cuda", **extra)
