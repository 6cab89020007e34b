"""The vectorized torch reference against the naive per-client loop, and the identities of the method."""
import itertools

import pytest
import torch

import mhd_fast
from mhd_fast.ops import reference
from mhd_fast.ops.naive import distill_loop

from cases import AGGREGATES, GRAPHS, TAUS, make_graph, make_logits


@pytest.mark.parametrize("graph,aggregate,tau", list(itertools.product(GRAPHS, AGGREGATES, TAUS)))
@pytest.mark.parametrize("include_self", [False, True])
def test_reference_matches_naive_loop(graph, aggregate, tau, include_self):
    n, g, b, v = 6, 2, 5, 9
    z = make_logits((n, g, b, v), seed=1)
    t = make_logits((n, g, b, v), seed=2)
    adj = make_graph(graph, n)
    got = mhd_fast.distill_loss(z, t, adj, tau=tau, include_self=include_self,
                                aggregate=aggregate, backend="torch")
    want = distill_loop(z, t, adj, tau=tau, include_self=include_self, aggregate=aggregate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lonely_client_gets_zero_loss_and_gradient():
    n, h1, b, v = 4, 3, 5, 6
    z = make_logits((n, h1, b, v), seed=4).requires_grad_()
    t = make_logits((n, h1, b, v), seed=5)
    adj = make_graph("lonely", n)
    loss = mhd_fast.mhd_loss(z, t, adj, backend="torch")
    assert torch.all(loss[0] == 0) and torch.all(loss[1:] > 0)
    loss.sum().backward()
    assert torch.all(z.grad[0] == 0)
    idx, has = mhd_fast.select_teachers(t, adj, backend="torch")
    assert not has[0] and torch.all(idx[0] == -1)


def test_topk_bucket_gradient_formula():
    """Autograd of the reference equals the bucket formula: τ(q − p) sent, τ q (1 − p_rest/q_rest) unsent."""
    n, g, b, v, k, tau = 3, 1, 4, 7, 3, 2.0
    z = make_logits((n, g, b, v), torch.float64, seed=10).requires_grad_()
    t = make_logits((n, g, b, v), torch.float64, seed=11)
    adj = make_graph("complete", n)
    packet = reference.topk_compress(t, k, tau)
    mhd_fast.distill_loss(z, mhd_fast.TopKLogits(*packet), adj, tau=tau, backend="torch").sum().backward()
    idx, _ = reference.select(reference.packet_stats(packet[0], packet[2])[1], adj, False)
    q = torch.softmax(z.detach() / tau, -1)
    want = torch.empty_like(z)
    for i, gg, bb in itertools.product(range(n), range(g), range(b)):
        j = idx[i, gg, bb]
        sent = packet[1][j, gg, bb]
        p = (packet[0][j, gg, bb] - packet[2][j, gg, bb]).exp()
        qi = q[i, gg, bb]
        p_rest, q_rest = 1 - p.sum(), 1 - qi[sent].sum()
        row = tau * qi * (1 - p_rest / q_rest)
        row[sent] = tau * (qi[sent] - p)
        want[i, gg, bb] = row
    torch.testing.assert_close(z.grad, want, rtol=1e-9, atol=1e-12)


def test_reference_gradcheck_dense():
    z = make_logits((3, 2, 2, 5), torch.float64, seed=12).requires_grad_()
    t = make_logits((3, 2, 2, 5), torch.float64, seed=13)
    adj = make_graph("complete", 3)
    for aggregate in AGGREGATES:
        assert torch.autograd.gradcheck(
            lambda x: mhd_fast.distill_loss(x, t, adj, aggregate=aggregate, backend="torch"), (z,))


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("k", [1, 3, 9])
def test_reference_topk_matches_naive_loop(graph, k):
    from mhd_fast.ops.naive import distill_topk_loop
    n, g, b, v, tau = 6, 2, 5, 9, 2.0
    z = make_logits((n, g, b, v), seed=14)
    packet = mhd_fast.topk_compress(make_logits((n, g, b, v), seed=15), k, tau=tau, backend="torch")
    adj = make_graph(graph, n)
    got = mhd_fast.distill_loss(z, packet, adj, tau=tau, backend="torch")
    want = distill_topk_loop(z, *packet, adj, tau=tau)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
