"""How many Triton launches one mhd_loss call makes: the dense loss is one launch forward
(statistics, choice, loss and unit gradient) and one backward that only scales; a packet
teacher is one launch forward. Counted by wrapping every kernel of the Triton package, so the
test holds on a GPU and, without one, in the interpreter."""
from __future__ import annotations

import collections

import pytest
import torch

import mhd_fast
from mhd_fast.ops import backends, distill

from cases import AGGREGATES, INTERPRETER_WARNINGS, device_of, make_graph, make_logits, unavailable

pytestmark = [*INTERPRETER_WARNINGS,
              pytest.mark.skipif(unavailable("triton") is not None, reason=str(unavailable("triton")))]

KERNEL_MODULES = ("dense", "distill", "distill_topk", "select", "stats", "topk")


class _Counted:
    """A jitted kernel whose launches (kernel[grid](...)) are counted by name."""

    def __init__(self, name, kernel, counts):
        self.name, self.kernel, self.counts = name, kernel, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)
        return counted


@pytest.fixture
def launches(monkeypatch):
    """A Counter of kernel name -> launches since the fixture started (or since cleared)."""
    import importlib
    counts = collections.Counter()
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"mhd_fast.ops.triton.{mod_name}")
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                monkeypatch.setattr(mod, name, _Counted(name, obj, counts))
    backends.launchers("triton")
    return counts


def _case(aggregate_seed=0, n=4, h1=3, b=3, v=12):
    device = device_of("triton")
    z = make_logits((n, h1, b, v), torch.float32, seed=40 + aggregate_seed).to(device).requires_grad_()
    t = make_logits((n, h1, b, v), torch.float32, seed=41 + aggregate_seed).to(device)
    return z, t, make_graph("ring", n).to(device)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_dense_loss_is_one_launch_and_its_backward_one_more(launches, aggregate, reduction):
    z, t, adj = _case()
    with torch.no_grad():
        mhd_fast.mhd_loss(z, t, adj, aggregate=aggregate, reduction=reduction, backend="triton")
    assert launches == {"_distill_dense_kernel": 1}
    launches.clear()
    loss = mhd_fast.mhd_loss(z, t, adj, aggregate=aggregate, reduction=reduction, backend="triton")
    assert launches == {"_distill_dense_kernel": 1}
    launches.clear()
    (loss if reduction != "none" else loss.sum()).backward()
    assert launches == {"_scale_unit_kernel": 1}
    want = mhd_fast.mhd_loss(z, t, adj, aggregate=aggregate, reduction=reduction, backend="torch")
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_packet_loss_is_one_launch(launches, aggregate):
    z, t, adj = _case()
    packet = mhd_fast.topk_compress(t, 3, backend="torch")
    loss = mhd_fast.mhd_loss(z, packet, adj, aggregate=aggregate, reduction="sum", backend="triton")
    assert launches == {"_distill_topk_fwd_kernel": 1}
    launches.clear()
    loss.backward()
    want_bwd = ({"_distill_topk_bwd_kernel": 1} if aggregate == "max_confidence"
                else {"_expand_packets_kernel": 1, "_distill_bwd_kernel": 1})
    assert launches == want_bwd
    want = mhd_fast.mhd_loss(z, packet, adj, aggregate=aggregate, reduction="sum", backend="torch")
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-5, atol=2e-5)


def test_scaling_launch_keeps_ones_and_zeros_exact(launches):
    """The backward's one launch: an upstream gradient of 1 leaves the unit gradient as the
    forward wrote it, 2 doubles it exactly, and a client without candidate keeps exact zeros
    even under a NaN gradient."""
    z, t, adj = _case()
    adj[0] = False  # client 0 hears nobody
    unit, idx = distill.distill_dense(z.detach(), t[:, :-1], adj, 1, 1.0, False, "max_confidence", True, "sum",
                                      "triton")[2::3]
    first = unit.clone()
    scale = backends.launchers("triton").scale_unit
    assert scale(unit, torch.ones((), device=unit.device), idx, 1) is unit
    assert torch.equal(unit, first)
    grad = torch.full(idx.shape, 2.0, device=unit.device)
    grad[0, 0, 0] = float("nan")
    scale(unit, grad, idx, 1)
    assert torch.equal(unit[1:], 2 * first[1:]) and torch.equal(unit[0], torch.zeros_like(unit[0]))
    assert first[1:, 1:].abs().sum() > 0 and torch.equal(first[:, :1], torch.zeros_like(first[:, :1]))
    assert launches == {"_distill_dense_kernel": 1, "_scale_unit_kernel": 2}


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_clients_split_over_programs_still_one_launch(launches, aggregate):
    """More clients than a chunk holds and few rows: the students of a block are split over
    several programs (each computing all teacher statistics); still one launch, and the
    reference's loss and gradient."""
    from mhd_fast.ops.triton import dense
    n, v = 130, 3
    cn, bb, splits = dense._dense_tiles(n, 1, 1, v)[:3]
    assert splits > 1 and cn < n
    device = device_of("triton")
    z = make_logits((n, 2, 1, v), seed=50).to(device).requires_grad_()
    t = make_logits((n, 2, 1, v), seed=51).to(device)
    adj = make_graph("directed", n).to(device)
    loss = mhd_fast.mhd_loss(z, t, adj, aggregate=aggregate, reduction="mean", backend="triton")
    loss.backward()
    assert launches == {"_distill_dense_kernel": 1, "_scale_unit_kernel": 1}
    zr = z.detach().clone().requires_grad_()
    want = mhd_fast.mhd_loss(zr, t, adj, aggregate=aggregate, reduction="mean", backend="torch")
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-7)
