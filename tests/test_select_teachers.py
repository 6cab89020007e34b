"""select_teachers and its custom ops (teacher_stats, select) on every backend against the torch
reference: the choice bit for bit, ties to the lowest client, NaN wins, the diagonal."""
from __future__ import annotations

import pytest
import torch

import mhd_fast
from mhd_fast.ops import reference
from mhd_fast.ops.select import select, teacher_stats

from cases import (DTYPES, GRAPH_CASES, GRAPHS, INTERPRETER_WARNINGS, LOSS_TOL, backend_params, device_of,
                   make_graph, make_logits, with_confidence_ties)

pytestmark = INTERPRETER_WARNINGS
COMPILED = backend_params(("cpp", "triton"))


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
def test_select_teachers_matches_reference(backend, graph, include_self):
    device = device_of(backend)
    t = make_logits((7, 4, 9, 13), seed=4).to(device)
    adj = make_graph(graph, 7, seed=2).to(device)
    want = mhd_fast.select_teachers(t, adj, include_self=include_self, tau=0.7, backend="torch")
    got = mhd_fast.select_teachers(t, adj, include_self=include_self, tau=0.7, backend=backend)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
def test_confidence_ties_pick_the_lowest_client(backend, graph, include_self):
    """Every client sends client 0's predictions: all candidates tie, the lowest wins, for dense
    teachers and packets."""
    device = device_of(backend)
    t = with_confidence_ties(make_logits((6, 3, 4, 12), seed=1)).to(device)
    adj = make_graph(graph, 6).to(device)
    want = mhd_fast.select_teachers(t, adj, include_self=include_self, backend="torch")
    got = mhd_fast.select_teachers(t, adj, include_self=include_self, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    packet = mhd_fast.topk_compress(t, 5, backend="torch")
    got = mhd_fast.select_teachers(packet, adj, include_self=include_self, backend=backend)
    assert torch.equal(got[0], want[0])
    if graph == "complete":
        assert torch.all(want[0][1:] == 0) and torch.all(want[0][0] == 1)


def test_select_teachers_follows_most_confident_neighbour(backend):
    n, h1, b, v = 4, 2, 3, 5
    t = torch.zeros(n, h1, b, v)
    t[2, 0, :, 0] = 5.0  # client 2 is sure of class 0 on every row
    t[3, 0, 1, 1] = 9.0  # client 3 is even surer on row 1
    device = device_of(backend)
    idx, has = mhd_fast.select_teachers(t.to(device), make_graph("complete", n).to(device), backend=backend)
    assert has.all()
    assert idx[0, 0].tolist() == [2, 3, 2]
    assert idx[2, 0].tolist() == [0, 3, 0]  # 2 does not hear itself; 0, 1, 3 tie on rows 0, 2


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_teacher_stats_and_select_ops(backend, graph, include_self, dtype):
    """The custom ops against the reference's functions: lse and logconf to rounding, the
    choice bit for bit."""
    n, g, b, v = 6, 2, 3, 41
    device = device_of(backend)
    t = make_logits((n, g, b, v), dtype, seed=7).to(device)
    lse, logconf = teacher_stats(t, 1.5, backend)
    want_lse, want_logconf = reference.teacher_stats(t, 1.5)
    tol = LOSS_TOL[dtype]
    torch.testing.assert_close(lse, want_lse, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(logconf, want_logconf, rtol=tol[0], atol=tol[1])
    adj = make_graph(graph, n).to(device)
    idx, has = select(want_logconf, adj, include_self, backend)
    want_idx, want_has = reference.select(want_logconf, adj, include_self)
    assert torch.equal(idx, want_idx) and torch.equal(has, want_has)


@pytest.mark.parametrize("backend", COMPILED)
def test_select_nan_wins_and_diagonal_follows_include_self(backend):
    device = device_of(backend)
    logconf = torch.tensor([[[-1.0, -2.0]], [[float("nan"), -3.0]], [[-0.5, float("nan")]]], device=device)
    adj = torch.tensor([[True, True, True], [False, False, False], [True, True, False]], device=device)
    for include_self in (False, True):
        idx, has = select(logconf, adj, include_self, backend)
        want_idx, want_has = reference.select(logconf, adj, include_self)
        assert torch.equal(idx, want_idx) and torch.equal(has, want_has)
    idx, has = select(logconf, adj, False, backend)
    assert idx[0].tolist() == [[1, 2]]  # the first NaN wins, row by row
    assert idx[1].tolist() == [[-1, -1]] and not has[1]  # adj[1, 1] is ignored without include_self
    idx, has = select(logconf, adj, True, backend)
    assert idx[1].tolist() == [[1, 1]] and has[1]  # include_self makes i a candidate of itself


@pytest.mark.parametrize("backend", COMPILED)
def test_teacher_stats_of_nan_inf_and_masked_rows(backend):
    """NaN / +inf rows give NaN statistics (documented for the compiled backends), −inf classes
    are masked, a row of all −inf has lse −inf."""
    device = device_of(backend)
    t = make_logits((4, 3, 5, 9), seed=11)
    t[0, 0, 4, 2:] = float("-inf")
    t[2, 1, 3, 5] = float("nan")
    t[1, 2, 0, 1] = float("inf")
    lse, logconf = teacher_stats(t.to(device), 1.0, backend)
    assert torch.isnan(lse[2, 1, 3]) and torch.isnan(logconf[2, 1, 3])
    assert torch.isnan(lse[1, 2, 0]) and torch.isnan(logconf[1, 2, 0])
    torch.testing.assert_close(lse[0, 0, 4].cpu(), torch.logsumexp(t[0, 0, 4], -1))
    lse, logconf = teacher_stats(torch.full((1, 1, 1, 4), float("-inf"), device=device), 1.0, backend)
    assert lse.item() == float("-inf") and torch.isnan(logconf).all()


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_teacher_stats_and_select(backend):
    device = device_of(backend)
    t = make_logits((4, 2, 3, 10), torch.bfloat16, seed=14).to(device)
    _, logconf = reference.teacher_stats(t, 1.3)
    torch.library.opcheck(teacher_stats, (t, 1.3, backend))
    torch.library.opcheck(select, (logconf, make_graph("ring", 4).to(device), False, backend))


def test_bad_input_raises_value_error_naming_the_argument(backend):
    device = device_of(backend)
    t = make_logits((3, 2, 4, 6), seed=1).to(device)
    adj = make_graph("ring", 3).to(device)
    with pytest.raises(ValueError, match="teacher_logits must have H1 >= 2"):
        mhd_fast.select_teachers(t[:, :1], adj, backend=backend)
    with pytest.raises(ValueError, match="adj"):
        mhd_fast.select_teachers(t, adj[:2, :2], backend=backend)
    with pytest.raises(ValueError, match="tau"):
        mhd_fast.select_teachers(t, adj, tau=-1.0, backend=backend)
    with pytest.raises(ValueError, match="teacher.values must be 4-D"):
        mhd_fast.select_teachers(mhd_fast.TopKLogits(*(x[0] for x in mhd_fast.topk_compress(t, 2))), adj,
                                 backend=backend)
