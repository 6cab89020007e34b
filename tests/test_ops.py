"""The compiled backends against the torch reference: values, gradients, edge cases, registration.

Every case runs through the public API (``backend=...``) and compares with ``backend="torch"``
on the same inputs (SPEC §2-§3, §7). ``BACKENDS`` lists the backends swept here; the cpp
backend is also swept once per ISA build this CPU runs (``mhd_fast._C.isas()``), so that the
portable fallback is tested next to the AVX2 and AVX-512 builds.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mhd_fast
from mhd_fast.ops import api, reference, registry

from cases import (AGGREGATES, DTYPES, GRAD_TOL, GRAPHS, LOSS_TOL, TAUS, VOCABS, make_graph, make_logits,
                   opcheck_every_op, with_confidence_ties, with_topk_ties)

BACKENDS = ["cpp"]

_unavailable = {b: mhd_fast.backend_available(b) for b in BACKENDS}
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.skipif(_unavailable[b] is not None,
                                                           reason=str(_unavailable[b])))
                  for b in BACKENDS]
needs_cpp = pytest.mark.skipif(mhd_fast.backend_available("cpp") is not None, reason="mhd_fast._C not built")

# (graph, include_self): every graph of cases.py, self-loops with and without include_self.
GRAPH_CASES = [(g, False) for g in GRAPHS] + [("selfloops", True)]


def _isas() -> list[str]:
    if mhd_fast.backend_available("cpp") is not None:
        return []
    from mhd_fast import _C
    return list(_C.isas())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread keeps the many tiny torch ops of the reference off the
    thread pool (a shared CI machine makes every parallel region wait for a time slice). The
    multi-threaded kernel launch is tested in test_results_are_bit_identical_..."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


@pytest.fixture(params=_isas())
def isa(request):
    """Run the cpp kernels on one ISA build, then restore the default (the widest)."""
    from mhd_fast import _C
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(_C.isas()[-1])


# ---- helpers ---------------------------------------------------------------------------------

def _loss_and_grad(z: torch.Tensor, teacher, adj, grad_out: torch.Tensor | None, **kw):
    """(loss, dL/dZ) of mhd_loss with upstream gradient grad_out (shape of the "none" loss)."""
    z = z.detach().clone().requires_grad_()
    loss = mhd_fast.mhd_loss(z, teacher, adj, **kw)
    if grad_out is None:
        return loss.detach(), None
    (g,) = torch.autograd.grad(loss, z, grad_out.to(loss.dtype))
    return loss.detach(), g


def _reference(z, teacher, adj, grad_out, **kw):
    """The torch reference evaluated in fp64 on the same inputs: the truth a fp32 kernel is held
    to. The teacher choice is the one the reference makes at the inputs' own precision, where
    confidences that differ in the 9th digit can round to a tie (lowest client wins)."""
    idx, has = mhd_fast.select_teachers(teacher, adj, tau=kw.get("tau", 1.0),
                                        include_self=kw.get("include_self", False), backend="torch")
    if isinstance(teacher, mhd_fast.TopKLogits):
        teacher = mhd_fast.TopKLogits(teacher.values.double(), teacher.indices, teacher.lse.double())
    else:
        teacher = teacher.double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "select", lambda *args: (idx, has))
        return _loss_and_grad(z.double(), teacher, adj, None if grad_out is None else grad_out.double(),
                              backend="torch", **kw)


def _assert_matches_reference(z, teacher, adj, backend, *, grad=True, seed=0, **kw):
    rows = (z.shape[0], z.shape[1] - 1, z.shape[2])
    grad_out = None
    if grad:
        grad_out = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
        if kw.get("reduction", "none") != "none":
            grad_out = torch.tensor(1.7)
    got_loss, got_grad = _loss_and_grad(z, teacher, adj, grad_out, backend=backend, **kw)
    want_loss, want_grad = _reference(z, teacher, adj, grad_out, **kw)
    assert got_loss.dtype == mhd_fast.mhd_loss(z, teacher, adj, backend="torch", **kw).dtype
    assert got_loss.shape == want_loss.shape
    rtol, atol = LOSS_TOL[z.dtype]
    torch.testing.assert_close(got_loss, want_loss.to(got_loss.dtype), rtol=rtol, atol=atol)
    if grad:
        assert got_grad.dtype == z.dtype and got_grad.shape == z.shape
        rtol, atol = GRAD_TOL[z.dtype]
        torch.testing.assert_close(got_grad, want_grad.to(z.dtype), rtol=rtol, atol=atol)


def _case(dtype, v, graph, n=5, h1=3, b=4, seed=0):
    z = make_logits((n, h1, b, v), dtype, seed=seed)
    t = make_logits((n, h1, b, v), dtype, seed=seed + 1)
    return z, t, make_graph(graph, n, seed=seed)


# ---- the cross product -------------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_grad_match_reference(backend, dtype, v, tau, graph, include_self, aggregate):
    """Dense and top-k teachers, forward and backward with an upstream gradient != 1."""
    z, t, adj = _case(dtype, v, graph, seed=v)
    kw = dict(tau=tau, include_self=include_self, aggregate=aggregate)
    _assert_matches_reference(z, t, adj, backend, **kw)
    packet = mhd_fast.topk_compress(t, max(1, v // 3), tau=tau, value_dtype=dtype, backend="torch")
    _assert_matches_reference(z, packet, adj, backend, **kw)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("v", [2, 41])
def test_every_isa_build_matches_reference(isa, teacher_kind, v):
    """Every ISA build (portable, AVX2, AVX-512) agrees with the reference; V = 41 ends in a
    partial vector on each."""
    for dtype, aggregate, (graph, include_self) in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16), AGGREGATES, GRAPH_CASES):
        z, t, adj = _case(dtype, v, graph, seed=3)
        teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, v // 2 + 1, tau=0.5, backend="torch")
        _assert_matches_reference(z, teacher, adj, "cpp", tau=0.5, include_self=include_self,
                                  aggregate=aggregate)


@pytest.mark.parametrize("v", [1, 2, 10, 100, 5000])
def test_row_lse_within_two_ulp_on_every_isa(isa, v):
    """A row's lse = max + log(sum of exps), the log the kernels' own vector log (one vector
    call for a group of rows): within 2 ulp of fp64 logsumexp (measured: at most 1 ulp) on every
    ISA build, one block (rows kept in groups) and many (V = 5000), and exactly the max for
    V = 1 (log 1 = 0)."""
    t = torch.randn(4, 2, 64, v, generator=torch.Generator().manual_seed(v)) * 4
    lse, logconf = registry.teacher_stats(t, 1.0, "cpp")
    want = torch.logsumexp(t.double(), dim=-1)
    err = (lse.double() - want).abs() / want.abs().clamp(min=1)
    assert float(err.max()) <= 4 * 2.0 ** -24
    if v == 1:
        assert torch.equal(lse, t[..., 0]) and torch.equal(logconf, torch.zeros_like(logconf))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_reductions_match_reference(backend, reduction, aggregate):
    z, t, adj = _case(torch.float32, 10, "directed", n=6, h1=4, b=5)
    _assert_matches_reference(z, t, adj, backend, reduction=reduction, aggregate=aggregate, tau=2.0)
    packet = mhd_fast.topk_compress(t, 4, tau=2.0, backend="torch")
    _assert_matches_reference(z, packet, adj, backend, reduction=reduction, aggregate=aggregate, tau=2.0)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("student_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_mixed_dtypes_match_reference(backend, student_dtype, teacher_dtype):
    """Z and T dtypes are independent; fp64 in either makes the accumulation fp64 (the registry
    contract), else fp32."""
    z = make_logits((4, 3, 5, 17), student_dtype, seed=1)
    t = make_logits((4, 3, 5, 17), teacher_dtype, seed=2)
    adj = make_graph("ring", 4)
    fp64 = torch.float64 in (student_dtype, teacher_dtype)
    for aggregate in AGGREGATES:
        got, got_grad = _loss_and_grad(z, t, adj, torch.ones(4, 2, 5), aggregate=aggregate, backend=backend)
        want, want_grad = _reference(z, t, adj, torch.ones(4, 2, 5), aggregate=aggregate)
        assert got.dtype == (torch.float64 if fp64 else torch.float32) and got_grad.dtype == student_dtype
        tol = 1e-10 if student_dtype == teacher_dtype == torch.float64 else 2e-5  # lse_t keeps T's precision
        torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
        rtol, atol = GRAD_TOL[student_dtype if not fp64 else torch.float32]
        torch.testing.assert_close(got_grad, want_grad.to(student_dtype), rtol=rtol, atol=atol)


# ---- ties, selection, top-k ----------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
def test_confidence_ties_pick_the_lowest_client(backend, graph, include_self, aggregate):
    z, t, adj = _case(torch.float32, 12, graph, n=6)
    t = with_confidence_ties(t)
    want = mhd_fast.select_teachers(t, adj, include_self=include_self, backend="torch")
    got = mhd_fast.select_teachers(t, adj, include_self=include_self, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _assert_matches_reference(z, t, adj, backend, include_self=include_self, aggregate=aggregate)
    packet = mhd_fast.topk_compress(t, 5, backend="torch")
    got = mhd_fast.select_teachers(packet, adj, include_self=include_self, backend=backend)
    assert torch.equal(got[0], want[0])
    _assert_matches_reference(z, packet, adj, backend, include_self=include_self, aggregate=aggregate)


@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
def test_select_teachers_matches_reference(backend, graph, include_self):
    t = make_logits((7, 4, 9, 13), seed=4)
    adj = make_graph(graph, 7, seed=2)
    want = mhd_fast.select_teachers(t, adj, include_self=include_self, tau=0.7, backend="torch")
    got = mhd_fast.select_teachers(t, adj, include_self=include_self, tau=0.7, backend=backend)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cpp
@pytest.mark.parametrize("b", [1, 5, 16, 37])
def test_select_rows_in_vectors_on_every_isa(isa, b):
    """The teacher choice runs a vector of rows at a time (the running best in registers): the
    same choice as the reference for row counts that leave a partial vector, with exact ties
    between candidates (the lowest client wins), NaN confidences (the first NaN wins, as
    torch.argmax) and a client without candidates; the same through the fused dense launch."""
    n, h1, v = 7, 3, 5
    t = make_logits((n, h1, b, v), seed=b)
    t[3] = t[1]  # clients 1 and 3 tie on every row: 1 wins where it is the best
    t[2, :, ::3] = float("nan")  # NaN confidence on every third row of client 2
    t[5, :, 1::4, 0] = float("nan")
    t[6, :, ::2] = t[0, :, ::2] * 4  # the most confident on even rows
    adj = make_graph("lonely", n, seed=3)
    want = mhd_fast.select_teachers(t, adj, tau=0.7, backend="torch")
    got = mhd_fast.select_teachers(t, adj, tau=0.7, backend="cpp")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (want[0] == 2).any() and (want[0] == -1).any()  # the NaN rows and the lonely client show
    z = make_logits((n, h1, b, v), seed=b + 1)
    idx = registry.distill_dense(z, t[:, :-1], adj, 1, 0.7, False, "max_confidence", False, "cpp")[5]
    assert torch.equal(idx, want[0])


@pytest.mark.parametrize("value_dtype", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tau", TAUS + (0.3,))
@pytest.mark.parametrize("v", VOCABS + (40000,))
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_topk_compress_matches_reference(backend, dtype, v, tau, value_dtype):
    """Exact values and indices (ties on a coarse grid -> lower index first), close lse."""
    rows = 3 if v > 10000 else 20
    x = with_topk_ties(make_logits((2, rows, v), dtype, seed=v))
    # k <= 8 and k > 8 take different containers in the cpp kernel (sorted array / heap)
    for k in sorted({k for k in (1, 2, 8, 9, max(1, v // 2), v if v < 10000 else 32) if k <= v}):
        want = mhd_fast.topk_compress(x, k, tau=tau, value_dtype=value_dtype, backend="torch")
        got = mhd_fast.topk_compress(x, k, tau=tau, value_dtype=value_dtype, backend=backend)
        assert got.values.dtype == want.values.dtype and got.indices.dtype == want.indices.dtype
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.values, want.values)
        torch.testing.assert_close(got.lse, want.lse, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("v", [1, 2, 41, 1271])
def test_topk_with_k_equal_v_equals_dense(backend, v, aggregate):
    z, t, adj = _case(torch.float32, v, "directed", n=6)
    dense, dense_grad = _loss_and_grad(z, t, adj, torch.ones(6, 2, 4), tau=1.5, aggregate=aggregate,
                                       backend=backend)
    packet = mhd_fast.topk_compress(t, v, tau=1.5, backend=backend)
    sparse, sparse_grad = _loss_and_grad(z, packet, adj, torch.ones(6, 2, 4), tau=1.5, aggregate=aggregate,
                                         backend=backend)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_gradcheck_fp64_dense_and_topk(backend, aggregate):
    n, h1, b, v = 4, 3, 2, 7
    z = make_logits((n, h1, b, v), torch.float64, seed=5).requires_grad_()
    t = make_logits((n, h1, b, v), torch.float64, seed=6)
    adj = make_graph("lonely", n)

    def dense(z):
        return mhd_fast.mhd_loss(z, t, adj, tau=0.8, aggregate=aggregate, backend=backend)
    assert torch.autograd.gradcheck(dense, (z,))

    # fp64 packets (values and lse in fp64) keep the whole top-k path in fp64.
    t64 = t.double() / 0.8
    values, indices = torch.sort(t64, dim=-1, descending=True, stable=True)
    packet = mhd_fast.TopKLogits(values[..., :3].contiguous(), indices[..., :3].to(torch.int16),
                                 torch.logsumexp(t64, dim=-1))

    def topk(z):
        return mhd_fast.mhd_loss(z, packet, adj, tau=0.8, aggregate=aggregate, backend=backend)
    assert torch.autograd.gradcheck(topk, (z,))


# ---- memory, strides, determinism --------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_inputs_unchanged_after_forward_and_backward(backend, aggregate):
    z, t, adj = _case(torch.bfloat16, 33, "complete")
    packet = mhd_fast.topk_compress(t, 5, backend=backend)
    saved = [x.clone() for x in (z, t, adj, *packet)]
    for teacher in (t, packet):
        zz = z.requires_grad_()
        mhd_fast.mhd_loss(zz, teacher, adj, aggregate=aggregate, backend=backend).sum().backward()
        zz.grad = None
        zz.requires_grad_(False)
    for before, after in zip(saved, (z, t, adj, *packet)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_strided_views_match_contiguous(backend, aggregate):
    """A class dim with stride != 1 (transposed storage), sliced heads and a strided adj."""
    n, h1, b, v = 5, 4, 6, 23
    z_store = make_logits((v, b, h1, n), seed=7)
    t_store = make_logits((v, n, h1, b), seed=8)
    z = z_store.permute(3, 2, 1, 0)          # [N, H1, B, V] views, class stride != 1
    t = t_store.permute(1, 2, 3, 0)
    assert z.stride(-1) != 1 and t.stride(-1) != 1
    adj_store = make_graph("directed", 2 * n)[::2, ::2]
    adj = adj_store.T.contiguous().T           # a column-major adj
    kw = dict(tau=0.9, aggregate=aggregate)
    _assert_matches_reference(z, t, adj, backend, **kw)
    want = mhd_fast.mhd_loss(z.contiguous(), t.contiguous(), adj.contiguous(), backend=backend, **kw)
    assert torch.equal(mhd_fast.mhd_loss(z, t, adj, backend=backend, **kw), want)
    values, indices, lse = mhd_fast.topk_compress(t, 6, tau=0.9, backend="torch")
    packet = mhd_fast.TopKLogits(values.transpose(0, 2).contiguous().transpose(0, 2), indices.mT.contiguous().mT,
                                 lse.permute(2, 1, 0).contiguous().permute(2, 1, 0))
    _assert_matches_reference(z, packet, adj, backend, **kw)
    x = make_logits((v, 3 * n), seed=9).T    # [R, V] rows with class stride R
    got = registry.topk_compress(x, 4, 0.9, backend)
    want = registry.topk_compress(x.contiguous(), 4, 0.9, backend)
    assert all(torch.equal(a, c) for a, c in zip(got, want))


def test_results_are_bit_identical_run_to_run_and_across_thread_counts(backend):
    n, h1, b, v = 8, 3, 64, 300  # enough rows for a multi-threaded launch
    z, t, adj = _case(torch.float32, v, "complete", n=n, h1=h1, b=b)
    packet = mhd_fast.topk_compress(t, 16, backend="torch")
    threads = torch.get_num_threads()

    def run():
        out = []
        for teacher, aggregate in itertools.product((t, packet), AGGREGATES):
            zz = z.clone().requires_grad_()
            loss = mhd_fast.mhd_loss(zz, teacher, adj, aggregate=aggregate, backend=backend)
            (g,) = torch.autograd.grad(loss, zz, torch.ones_like(loss))
            out += [loss, g]
        return out + list(mhd_fast.topk_compress(t, 16, backend=backend))

    try:
        first = run()
        others = []
        for count in (1, max(2, threads), 3, 5):  # odd counts: uneven shares, work taken from others' shares
            torch.set_num_threads(count)
            others.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in others:
        for a, b_ in zip(first, other):
            assert torch.equal(a, b_)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), h1=st.integers(2, 4), b=st.integers(1, 5), v=st.integers(1, 60),
       tau=st.floats(0.2, 5.0), aggregate=st.sampled_from(AGGREGATES), include_self=st.booleans(),
       density=st.floats(0.0, 1.0), k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_hypothesis_shapes_match_reference(n, h1, b, v, tau, aggregate, include_self, density, k_frac, seed):
    if mhd_fast.backend_available("cpp") is not None:
        pytest.skip("mhd_fast._C not built")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, h1, b, v, generator=g) * 3
    t = torch.randn(n, h1, b, v, generator=g) * 3
    adj = torch.rand(n, n, generator=g) < density
    kw = dict(tau=tau, aggregate=aggregate, include_self=include_self)
    for be in BACKENDS:
        _assert_matches_reference(z, t, adj, be, **kw)
        k = 1 + int(k_frac * (v - 1))
        packet = mhd_fast.topk_compress(t, k, tau=tau, backend="torch")
        _assert_matches_reference(z, packet, adj, be, **kw)
        want = mhd_fast.topk_compress(t, k, tau=tau, backend="torch")
        got = mhd_fast.topk_compress(t, k, tau=tau, backend=be)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


# ---- NaN and inf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_nan_and_inf_logits(backend, aggregate):
    """NaN or +inf in a row -> NaN for that row; −inf = masked class; all −inf -> NaN loss; a
    NaN teacher row reaches exactly the clients that hear it."""
    n, h1, b, v = 4, 3, 5, 9
    z = make_logits((n, h1, b, v), seed=10)
    t = make_logits((n, h1, b, v), seed=11)
    z[1, 1, 0, 3] = float("nan")
    z[2, 2, 1, 0] = float("inf")
    z[3, 1, 2, :] = float("-inf")
    z[0, 1, 3, :4] = float("-inf")          # masked classes of a student row
    t[0, 0, 4, 2:] = float("-inf")          # masked classes of a teacher row
    t[2, 1, 3, 5] = float("nan")            # a NaN teacher: its confidence wins the choice
    adj = make_graph("complete", n)
    zz = z.clone().requires_grad_()
    loss = mhd_fast.mhd_loss(zz, t, adj, aggregate=aggregate, backend=backend)
    (grad,) = torch.autograd.grad(loss, zz, torch.ones_like(loss))

    expected_nan = torch.zeros_like(loss, dtype=torch.bool)
    expected_nan[1, 0, 0] = expected_nan[2, 1, 1] = expected_nan[3, 0, 2] = True
    expected_nan[[0, 1, 3], 1, 3] = True    # the listeners of client 2 at (aux head 2, row 3)
    assert torch.equal(torch.isnan(loss), expected_nan)
    assert torch.equal(torch.isnan(grad).any(-1)[:, 1:], expected_nan)
    assert torch.isnan(grad[1, 1, 0]).all()
    assert loss[0, 0, 3] == float("inf")    # teacher mass on classes the student masks
    assert torch.isfinite(grad[0, 1, 3]).all() and (grad[0, 1, 3, :4] < 0).all()

    # Elsewhere the reference agrees. (Its mean / confidence_weighted einsum multiplies the NaN
    # row of a non-candidate by a zero weight and so also marks client 2's own row NaN.)
    want_loss, want_grad = _loss_and_grad(z, t, adj, torch.ones_like(loss), aggregate=aggregate, backend="torch")
    fine = ~torch.isnan(want_loss) & ~expected_nan
    torch.testing.assert_close(loss[fine], want_loss[fine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, 1:][fine], want_grad[:, 1:][fine], rtol=1e-4, atol=1e-6)

    lse, logconf = registry.teacher_stats(t, 1.0, backend)  # documented: NaN / +inf rows -> NaN
    assert torch.isnan(lse[2, 1, 3]) and torch.isnan(logconf[2, 1, 3])
    torch.testing.assert_close(lse[0, 0, 4], torch.logsumexp(t[0, 0, 4], -1))
    row = torch.full((1, 1, 1, 4), float("-inf"))
    lse, logconf = registry.teacher_stats(row, 1.0, backend)
    assert lse.item() == float("-inf") and torch.isnan(logconf).all()


def test_nan_and_inf_in_topk_compress(backend):
    x = make_logits((4, 50), seed=12)
    x[0, 7] = float("nan")
    x[0, 30] = float("nan")
    x[1, 3] = float("inf")
    x[2, :] = float("-inf")
    x[3, 10:] = float("-inf")
    for k in (3, 12):  # the sorted-array and the heap container of the cpp kernel
        want = mhd_fast.topk_compress(x, k, backend="torch")
        got = mhd_fast.topk_compress(x, k, backend=backend)
        assert torch.equal(got.indices, want.indices)        # NaN first, by index; −inf ties by index
        assert got.indices[0, :2].tolist() == [7, 30]
        assert torch.equal(torch.isnan(got.values), torch.isnan(want.values))
        assert torch.isnan(got.lse[0]) and torch.isnan(got.lse[1])
        assert got.lse[2] == float("-inf")
        torch.testing.assert_close(got.lse[3], want.lse[3])


@needs_cpp
@pytest.mark.parametrize("v", range(1, 22))
def test_topk_compress_small_rows_every_k(isa, v):
    """Rows of up to 16 classes always take the cpp kernel's rank path, on every ISA build the
    CPU runs, and rows of up to lanes + 4 contiguous classes go a vector of rows at a time, one
    row a lane (topk_lanes; here rows 0-31 of 40 on AVX-512, the rest by rank): every k against
    the reference, exact, with ties, NaN (above every number, by index), ±inf and −0 = +0; lse
    NaN for a row with NaN or +inf, as documented for the compiled backends; a strided class
    dim (row by row) gives the same bits."""
    x = with_topk_ties(make_logits((40, v), seed=100 + v))
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]
    g = torch.Generator().manual_seed(v)
    for r in range(0, 40, 3):
        cols = torch.randint(0, v, (min(v, 3),), generator=g)
        for c, val in zip(cols.tolist(), specials[r % 5:] + specials[:r % 5]):
            x[r, c] = val
    x[39] = float("-inf")
    wide = torch.full((40, 2 * v), 7.0)
    wide[:, ::2] = x
    for k in range(1, v + 1):
        want = mhd_fast.topk_compress(x, k, tau=0.5, backend="torch")
        got = mhd_fast.topk_compress(x, k, tau=0.5, backend="cpp")
        by_row = mhd_fast.topk_compress(wide[:, ::2], k, tau=0.5, backend="cpp")
        for a, b in zip(got, by_row):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(torch.isnan(got.values), torch.isnan(want.values))
        assert torch.equal(torch.nan_to_num(got.values), torch.nan_to_num(want.values))
        bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)  # lse NaN by design (docs of cpp.py)
        assert torch.isnan(got.lse[bad]).all()
        torch.testing.assert_close(got.lse[~bad], want.lse[~bad], rtol=2e-6, atol=2e-6)


@needs_cpp
@pytest.mark.parametrize("v", [17, 40, 63, 100, 129, 256, 257])
def test_topk_compress_rank_and_offer_paths_agree(isa, v):
    """Rows of up to 256 classes take the rank path when k is large against V (rank_path in
    csrc/kernels.h, by ISA), the offers otherwise: on every ISA build, for k on both sides of
    the switch, the exact reference order with ties, NaN, ±inf and −0 = +0 (257 classes:
    always the offers)."""
    x = with_topk_ties(make_logits((24, v), seed=300 + v))
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]
    g = torch.Generator().manual_seed(v)
    for r in range(0, 24, 2):
        cols = torch.randint(0, v, (3,), generator=g)
        for c, val in zip(cols.tolist(), specials[r % 5:] + specials[:r % 5]):
            x[r, c] = val
    x[5, : v // 2] = x[5, v // 2: 2 * (v // 2)]  # every value twice: ties across vectors
    x[23] = float("-inf")
    for k in sorted(k for k in {1, 2, 3, 5, 8, 9, 16, 21, 32, v // 2, v - 1, v} if k <= v):
        want = mhd_fast.topk_compress(x, k, tau=0.5, backend="torch")
        got = mhd_fast.topk_compress(x, k, tau=0.5, backend="cpp")
        assert torch.equal(got.indices, want.indices), k
        assert torch.equal(torch.isnan(got.values), torch.isnan(want.values))
        assert torch.equal(torch.nan_to_num(got.values), torch.nan_to_num(want.values))
        bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
        assert torch.isnan(got.lse[bad]).all()
        torch.testing.assert_close(got.lse[~bad], want.lse[~bad], rtol=2e-6, atol=2e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [7, 4096, 4097])
def test_cpp_zero_rows_fills_the_heads_and_nothing_else(isa, dtype, v):
    """cpp.zero_ (the heads of a gradient that do not learn): head 0 of a NaN-filled tensor
    becomes +0 and the other heads keep every bit. 64 MiB at V = 4096 fp32 takes the
    non-temporal path (head 0 is 8 MiB, rows 16-byte aligned); V = 4097 and bf16 the memset."""
    from mhd_fast.ops import cpp
    x = torch.full((8, 4, 128, v), float("nan"), dtype=dtype)
    head = x[:, :1]
    assert cpp.zero_(head) is head
    assert torch.equal(x[:, :1], torch.zeros_like(x[:, :1]))
    assert not torch.signbit(x[:, :1]).any()
    assert torch.isnan(x[:, 1:]).all()
    cpp.zero_(x[:, 4:])  # an empty slice: nothing to do


# ---- the one-launch dense loss of cpp ----------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("v", [7, 600])  # one block of the online softmax (terms kept), and two
def test_fused_dense_matches_the_separate_kernels(aggregate, v):
    """cpp's distill_dense (statistics, choice, loss and unit gradient in one launch, tiled over
    rows) against the op chain it replaces: the statistics and the choice bit for bit, the loss
    and the gradient (the backward kernel at grad = 1) to rounding."""
    n, h1, b, tau = 6, 3, 40, 0.7
    z, t, adj = _case(torch.float32, v, "lonely", n=n, h1=h1, b=b)
    t = t[:, :-1]
    loss, lse_z, unit, lse_t, logconf_t, idx = registry.distill_dense(z, t, adj, 1, tau, False, aggregate,
                                                                      True, "cpp")
    want_lse_t, want_logconf_t = registry.teacher_stats(t, tau, "cpp")
    want_idx, _ = registry.select(want_logconf_t, adj, False, "cpp")
    assert torch.equal(lse_t, want_lse_t) and torch.equal(logconf_t, want_logconf_t)
    assert torch.equal(idx, want_idx)
    want_loss, want_lse_z = registry.distill_fwd(z, t, lse_t, logconf_t, idx, adj, 1, tau, False,
                                                 aggregate, "cpp")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_z, want_lse_z, rtol=1e-6, atol=1e-6)
    want_unit = registry.distill_bwd(torch.ones_like(loss), z, t, lse_t, logconf_t, idx, adj, lse_z, 1,
                                     tau, False, aggregate, "cpp")
    torch.testing.assert_close(unit, want_unit, rtol=1e-5, atol=2e-6)  # |q − p| cancels: ulps of q
    assert torch.equal(unit[:, 0], torch.zeros_like(unit[:, 0]))  # head 0 does not learn
    assert torch.equal(unit[0], torch.zeros_like(unit[0]))  # client 0 has no candidate
    nograd = registry.distill_dense(z, t, adj, 1, tau, False, aggregate, False, "cpp")
    assert nograd[2].numel() == 0
    for a, b_ in zip(nograd[:2] + nograd[3:], (loss, lse_z, lse_t, logconf_t, idx)):
        assert torch.equal(a, b_)


@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("v,b", [(1, 7), (7, 7), (16, 7), (100, 7), (512, 7), (1, 37), (2, 37), (10, 37),
                                 (16, 37), (20, 37), (32, 48), (33, 40), (5, 64)])
def test_fused_dense_rows_in_groups_equal_one_row_at_a_time(isa, aggregate, v, b):
    """Rows of one block with contiguous classes run several at a time (rows_lse_kept,
    kl_sweep_rows: eight rows of one vector, V <= lanes, else four), and with V <= lanes + 4 a
    tile's rows go a vector of rows at a time, one row a lane (lanes_lse), for every aggregate;
    a strided class dim takes the one-row path. All give the same bits, on every ISA build, with
    row counts that leave partial groups and tiles, a client without candidates between the
    groups, an inexact τ (division) and rows of NaN, +inf and all −inf."""
    n, h1, tau = 5, 3, 0.7
    z, t, adj = _case(torch.float32, v, "lonely", n=n, h1=h1, b=b, seed=v)
    z[2, 1, 3] = float("nan")
    z[3, 2, 0, 0] = float("inf")
    t[1, 0, 5] = float("-inf")
    t[4, 1, 2, -1] = float("nan")
    z[1, 1, b - 2] = float("-inf")
    t[3, 0, b - 1, 0] = float("inf")
    t = t[:, :-1]
    wide_z = torch.full((n, h1, b, 2 * v), 123.0)
    wide_t = torch.full((n, h1 - 1, b, 2 * v), -55.0)
    wide_z[..., ::2] = z
    wide_t[..., ::2] = t
    zs, ts = wide_z[..., ::2], wide_t[..., ::2]  # the same values, class stride 2
    for need_grad in (True, False):
        grouped = registry.distill_dense(z, t, adj, 1, tau, False, aggregate, need_grad, "cpp")
        one_by_one = registry.distill_dense(zs, ts, adj, 1, tau, False, aggregate, need_grad, "cpp")
        for got, want in zip(grouped, one_by_one):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("v,k,b", [(1, 1, 37), (2, 1, 37), (10, 2, 37), (10, 10, 40), (16, 3, 37), (17, 5, 48),
                                   (20, 20, 37), (5, 2, 64), (10, 2, 7), (21, 4, 37)])
def test_packet_rows_by_lanes_equal_one_row_at_a_time(isa, aggregate, v, k, b):
    """With a packet teacher and rows of up to lanes + 4 contiguous classes, the cpp forward
    and backward take W consecutive rows of a client at a time, one row a lane, each lane
    against its own teacher's packet (max_confidence) or its client's mixture of the
    candidates' packets (mean, confidence_weighted); rows with a class dim of stride 1 but a row
    stride of 2V take the one-row path. Both give the same bits — loss, lse and the gradient
    with a per-row upstream gradient — on every ISA build, with row counts that leave partial
    blocks, a client without candidates, K = V (no rest bucket), an inexact τ and rows of NaN,
    +inf and all −inf; and they match the reference."""
    n, h1, tau = 5, 3, 0.7
    z, t, adj = _case(torch.float32, v, "lonely", n=n, h1=h1, b=b, seed=v + k)
    z[2, 1, 3] = float("nan")
    z[3, 2, 0, 0] = float("inf")
    z[1, 1, b - 2] = float("-inf")
    z[4, 2, 1, -1] = float("-inf")
    packet = mhd_fast.topk_compress(t, k, tau=tau, backend="torch")
    wide = torch.full((n, h1, b, 2 * v), 123.0)
    wide[..., :v] = z
    zs = wide[..., :v]  # the same values, rows 2V apart
    grad_out = make_logits((n, h1 - 1, b), torch.float32, seed=5)

    def loss_and_grad(x):  # not _loss_and_grad: its clone would make zs contiguous
        x = x.detach().requires_grad_()
        loss = mhd_fast.mhd_loss(x, packet, adj, tau=tau, aggregate=aggregate, backend="cpp")
        return loss.detach(), torch.autograd.grad(loss, x, grad_out)[0]
    assert zs.stride(2) == 2 * v
    for a, w in zip(loss_and_grad(z), loss_and_grad(zs)):
        torch.testing.assert_close(a, w, rtol=0, atol=0, equal_nan=True)
    finite = make_logits((n, h1, b, v), torch.float32, seed=v)
    _assert_matches_reference(finite, packet, adj, "cpp", tau=tau, aggregate=aggregate)


@pytest.mark.parametrize("k", [1, 5])
def test_topk_teacher_with_blocks_of_no_sent_class(backend, k):
    """A packet whose sent classes all lie in the first block of 512: the student sweep sums
    the unsent mass of the other blocks without the bitmap of sent classes (the same numbers);
    the rest bucket still matches the reference, forward and backward, with a student whose
    mass sits mostly in the sent classes (q_rest small) and one whose mass sits outside them."""
    n, h1, b, v = 3, 2, 3, 1300
    z, t, adj = _case(torch.float32, v, "complete", n=n, h1=h1, b=b, seed=11)
    t[..., 100:110] += 40.0  # the teacher's top classes, in block 0
    z[0, ..., 100:110] += 12.0  # client 0's student agrees: q_rest small
    packet = mhd_fast.topk_compress(t, k, backend="torch")
    assert int(packet.indices.max()) < 512
    _assert_matches_reference(z, packet, adj, backend, tau=1.0)
    _assert_matches_reference(z, packet, adj, backend, tau=2.0, aggregate="mean")


@needs_cpp
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_topk_teacher_sent_classes_at_every_lane_and_block_edge(isa, tau):
    """The student sweep leaves the sent classes out of the unsent mass through a bitmap read
    a vector of lanes at a time (4, 8 or 16 lanes by ISA): sent classes in the first and last
    lane of vectors and bytes, on both sides of a block edge of 512, in the ragged last vector
    of a row of 1300, and runs of neighbours. Loss and gradient match the reference with a
    student whose mass sits in the sent classes (unsent mass < 1e-6, where 1 − Σ_sent q
    would cancel) and with students whose mass sits elsewhere; at τ = 4 the teacher's rest
    bucket holds 14-25 % of its mass, so the rest term weighs in the loss."""
    sent = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 63, 64, 511, 512, 513, 1023, 1024, 1290, 1296, 1299]
    n, h1, b, v = 3, 2, 4, 1300
    z, t, adj = _case(torch.float32, v, "complete", n=n, h1=h1, b=b, seed=21)
    t[..., sent] += torch.linspace(24.0, 20.0, len(sent))  # distinct: the packet's order is fixed
    z[0, ..., sent] += 80.0  # client 0's student agrees with its teachers
    packet = mhd_fast.topk_compress(t, len(sent), tau=tau, backend="torch")
    assert sorted(packet.indices[0, 0, 0].tolist()) == sent
    _assert_matches_reference(z, packet, adj, "cpp", tau=tau)
    unsent = torch.ones(v, dtype=torch.bool)
    unsent[sent] = False
    q_rest = torch.softmax(z[:, 1:] / tau, dim=-1)[..., unsent].sum(-1)
    p_rest = torch.softmax(t[:, 1:] / tau, dim=-1)[..., unsent].sum(-1)
    assert float(q_rest[0].max()) < 1e-6  # the case that cancels
    assert float(p_rest.min()) > (0.1 if tau == 4.0 else 0.0)

@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_fused_dense_backward_for_every_upstream_gradient(aggregate):
    """The backward scales the unit gradient of the forward: not at all for loss.sum(), in place
    for a scalar or per-row gradient; a gradient with NaN or inf still gives exact zeros to a
    client without candidate, as the reference does; a second backward through a retained graph
    runs the kernel again and gives the same bits. (An infinite upstream gradient gives ±inf,
    g·τ·(q − p), where the reference's softmax backward makes NaN of inf − inf.)"""
    z, t, adj = _case(torch.float32, 13, "lonely", n=5, h1=3, b=6, seed=3)
    rows = (5, 2, 6)
    per_row = torch.rand(rows, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    bad = per_row.clone()
    bad[1, 0, 2] = float("nan")
    bad[0] = float("nan")  # client 0 has no candidate: its gradient stays 0
    for grad_out in (torch.tensor(1.0).expand(rows), torch.tensor(1.7).expand(rows), per_row, bad,
                     torch.tensor(float("nan")).expand(rows)):
        got_loss, got = _loss_and_grad(z, t, adj, grad_out, backend="cpp", aggregate=aggregate)
        want_loss, want = _reference(z, t, adj, grad_out, aggregate=aggregate)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    for reduction in ("sum", "mean"):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, t, adj, aggregate=aggregate, reduction=reduction, backend="cpp")
        (first,) = torch.autograd.grad(loss, zz, retain_graph=True)
        (second,) = torch.autograd.grad(loss, zz)
        assert torch.equal(first, second)
        _, want = _reference(z, t, adj, torch.tensor(1.0), aggregate=aggregate, reduction=reduction)
        torch.testing.assert_close(first, want.float(), rtol=1e-4, atol=1e-6)


def _twin_equals_custom_ops(z, teacher, adj, aggregate, grad_out, twin, monkeypatch):
    """mhd_loss's loss, gradient (upstream grad_out) and no-grad forward at τ = 2, once in plain
    eager mode, which must call the autograd.Function ``twin`` once (through registry's
    _apply_dense or _apply_topk, its apply without the Python wrapper), and once through the
    custom ops: the same bits. Returns the eager mode's three."""
    def run():
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, teacher, adj, aggregate=aggregate, tau=2.0, backend="cpp")
        (g,) = torch.autograd.grad(loss, zz, grad_out)
        with torch.no_grad():
            nograd = mhd_fast.mhd_loss(zz, teacher, adj, aggregate=aggregate, tau=2.0, backend="cpp")
        return loss.detach(), g, nograd

    calls = []
    name = {registry._DenseFused: "_apply_dense", registry._TopKFused: "_apply_topk"}[twin]
    apply = getattr(registry, name)
    monkeypatch.setattr(registry, name, lambda *args: calls.append(1) or apply(*args))
    eager = run()
    assert calls, "plain eager mode should take the twin"
    monkeypatch.setattr(registry, "_plain_eager", lambda *tensors: False)
    op = run()
    assert len(calls) == 1
    for a, b_ in zip(eager, op):
        assert torch.equal(a, b_)
    return eager


@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_topk_eager_twin_equals_the_custom_ops(aggregate, value_dtype, monkeypatch):
    """In plain eager mode a top-k teacher's loss runs select and distill_topk_fwd through their
    launchers and an autograd.Function twin instead of the custom ops; both give the same bits,
    loss, gradient (a full-size buffer, zeros in the main head) and the no-grad forward, with
    a client without candidate; and both match the reference."""
    z, t, adj = _case(torch.float32, 50, "lonely", n=5, h1=3, b=6, seed=8)
    packet = mhd_fast.topk_compress(t, 7, tau=2.0, value_dtype=value_dtype, backend="cpp")
    grad_out = torch.rand(5, 2, 6, generator=torch.Generator().manual_seed(4))
    loss, grad, _ = _twin_equals_custom_ops(z, packet, adj, aggregate, grad_out, registry._TopKFused, monkeypatch)
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    want_loss, want_grad = _reference(z, packet, adj, grad_out, aggregate=aggregate, tau=2.0)
    torch.testing.assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad.float(), rtol=1e-4, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("value_dtype,index_dtype,z_dtype", [
    (torch.float32, torch.int32, torch.float32), (torch.bfloat16, torch.int16, torch.float32),
    (torch.float16, torch.int64, torch.bfloat16), (torch.float32, torch.int16, torch.float64)], ids=str)
def test_topk_packets_in_one_call_equal_the_launchers(aggregate, value_dtype, index_dtype, z_dtype):
    """cpp.distill_topk_packets (the packet's rows, the teacher choice and the loss in one
    call, reading the packet's first G heads through pointers) gives the bits of the three
    steps it replaces: the packet rows by torch (values in the accumulation dtype, int32
    indices, reference.packet_stats), cpp.select and cpp.distill_topk_fwd; with a strided
    packet (every other row of a larger one), a client without candidate, and any dtypes."""
    from mhd_fast.ops import cpp
    z, t, adj = _case(z_dtype, 37, "lonely", n=5, h1=3, b=4, seed=12)
    big = mhd_fast.topk_compress(torch.cat([t, t.flip(-1)], dim=2), 6, tau=1.5, value_dtype=value_dtype,
                                 backend="cpp")
    values, indices, lse = big.values[:, :, ::2], big.indices[:, :, ::2].to(index_dtype), big.lse[:, :, ::2]
    assert not values.is_contiguous()
    groups = z[:, 1:]
    got = cpp.distill_topk_packets(groups, values, indices, lse, adj, 1.5, False, aggregate)
    dt = reference.acc_dtype(groups, values, lse)
    want_rows = registry._packet_rows(values, indices, lse, 2, dt)
    idx, _ = cpp.select(want_rows[3], adj, False)
    want_loss, want_lse_z = cpp.distill_topk_fwd(groups, *want_rows, idx, adj, 1.5, False, aggregate)
    for a, b_ in zip(got, (want_loss, want_lse_z, *want_rows, idx)):
        assert a.dtype == b_.dtype and a.shape == b_.shape
        assert torch.equal(a, b_)
    assert bool((got[0][0] == 0).all())  # client 0 has no candidate


@needs_cpp
def test_topk_packets_in_one_call_check_their_arguments():
    """The one-call packet forward checks what memory safety needs, naming the argument."""
    from mhd_fast.ops import cpp
    z, t, adj = _case(torch.float32, 20, "ring", n=4, h1=3, b=2, seed=2)
    p = mhd_fast.topk_compress(t, 3, backend="cpp")
    groups = z[:, 1:]
    bad = p.indices.clone()
    bad[1, 0, 1, 2] = 20
    with pytest.raises(ValueError, match=r"teacher.indices must lie in \[0, 20\), got 20"):
        cpp.distill_topk_packets(groups, p.values, bad, p.lse, adj, 1.0, False, "max_confidence")
    bad[1, 0, 1, 2] = -1
    with pytest.raises(ValueError, match=r"teacher.indices must lie in \[0, 20\), got -1"):
        cpp.distill_topk_packets(groups, p.values, bad, p.lse, adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="teacher.indices must be int16, int32 or int64"):
        cpp.distill_topk_packets(groups, p.values, p.indices.float(), p.lse, adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="teacher.values must have shape"):
        cpp.distill_topk_packets(groups, p.values[:, :, :1], p.indices, p.lse, adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="teacher.lse must be float32 or float64"):
        cpp.distill_topk_packets(groups, p.values, p.indices, p.lse.half(), adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="adj must have shape"):
        cpp.distill_topk_packets(groups, p.values, p.indices, p.lse, adj[:3, :3], 1.0, False, "mean")


@needs_cpp
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_fused_dense_eager_twin_equals_the_custom_op(aggregate, monkeypatch):
    """In plain eager mode mhd_loss calls distill_dense's autograd.Function twin instead of the
    custom op (no dispatcher round trip); both give the same bits, forward and backward."""
    z, t, adj = _case(torch.float32, 12, "lonely", n=5, h1=4, b=7, seed=5)
    grad_out = torch.rand(5, 3, 7, generator=torch.Generator().manual_seed(2))
    _twin_equals_custom_ops(z, t, adj, aggregate, grad_out, registry._DenseFused, monkeypatch)


@needs_cpp
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_dense_twin_reduces_in_the_extension(reduction, dtype, monkeypatch):
    """The eager twin has the extension sum the loss rows (fp64, fixed order) instead of a torch
    sum: the same value as the rows' torch sum to rounding, the same bits with 1 and 2 threads,
    and the gradient of the custom op's path (which sums with torch) bit for bit, for the 1 of
    backward() and for another upstream gradient."""
    z, t, adj = _case(dtype, 41, "lonely", n=6, h1=4, b=9, seed=4)

    def run(grad_out):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, t, adj, reduction=reduction, tau=2.0, backend="cpp")
        (g,) = torch.autograd.grad(loss, zz, grad_out)
        return loss.detach(), g

    rows = mhd_fast.mhd_loss(z, t, adj, tau=2.0, backend="cpp")
    want = rows.sum() if reduction == "sum" else rows.sum() / rows.numel()
    for grad_out in (torch.tensor(1.0, dtype=rows.dtype), torch.tensor(-0.3, dtype=rows.dtype)):
        twin = run(grad_out)
        assert twin[0].shape == () and twin[0].dtype == rows.dtype
        torch.testing.assert_close(twin[0], want, rtol=1e-6, atol=0)
        with torch.no_grad():  # the forward-only path reduces the same way
            assert torch.equal(mhd_fast.mhd_loss(z, t, adj, reduction=reduction, tau=2.0, backend="cpp"), twin[0])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = run(grad_out)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0], twin[0]) and torch.equal(one[1], twin[1])
        with monkeypatch.context() as m:
            m.setattr(registry, "_plain_eager", lambda *tensors: False)
            op = run(grad_out)
        torch.testing.assert_close(op[0], twin[0], rtol=1e-6, atol=0)
        assert torch.equal(op[1], twin[1])


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_torch_func_transforms_work_on_every_backend(backend, teacher_kind):
    """torch.func.grad, and per-sample gradients by vmap(grad), on every backend: inside a
    transform the compiled backends hand over to the reference (torch.library's autograd does
    not compose with the transforms), so the results are the torch backend's."""
    z, t, adj = _case(torch.float32, 9, "lonely", n=4, h1=3, b=5, seed=8)
    teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, 4, backend="torch")
    batch = make_logits((3, 4, 3, 5, 9), torch.float32, seed=9)

    def loss_of(be):
        return lambda zz: mhd_fast.mhd_loss(zz, teacher, adj, reduction="sum", backend=be)

    assert torch.equal(torch.func.grad(loss_of(backend))(z), torch.func.grad(loss_of("torch"))(z))
    per_sample = torch.vmap(torch.func.grad(loss_of(backend)))(batch)
    assert per_sample.shape == batch.shape
    assert torch.equal(per_sample, torch.vmap(torch.func.grad(loss_of("torch")))(batch))


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_second_order_gradients_match_the_reference(backend, teacher_kind, reduction, path, monkeypatch):
    """A backward with create_graph=True (double backward, gradient penalties) gives a gradient
    that autograd can differentiate again, on every backend and path: the kernels' gradient is
    numbers, so that backward goes through the reference. Checked by a Hessian-vector product
    against the torch backend's, fp64."""
    if path == "custom_op":  # the custom ops' own autograd, as under compile or a tensor mode
        monkeypatch.setattr(registry, "_plain_eager", lambda *tensors: False)
    z, t, adj = _case(torch.float64, 9, "lonely", n=4, h1=3, b=5, seed=7)
    if teacher_kind == "dense":
        teacher = t
    else:  # an fp64 packet (the reference's own compression), so that every path computes in fp64
        values, indices, lse = reference.topk_compress(t.reshape(-1, 9), 4, 1.0)
        teacher = mhd_fast.TopKLogits(values.reshape(4, 3, 5, 4), indices.reshape(4, 3, 5, 4), lse.reshape(4, 3, 5))
    gen = torch.Generator().manual_seed(3)
    weight, direction = torch.rand(4, 2, 5, generator=gen, dtype=torch.float64), torch.randn(z.shape, generator=gen,
                                                                                            dtype=torch.float64)

    def hvp(be):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, teacher, adj, reduction=reduction, backend=be)
        if reduction == "none":
            loss = (loss * weight).sum()
        (g,) = torch.autograd.grad(loss, zz, create_graph=True)
        assert g.requires_grad
        (h,) = torch.autograd.grad((g * direction).sum(), zz)
        return g.detach(), h

    (g, h), (g_ref, h_ref) = hvp(backend), hvp("torch")
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-9)
    assert h.abs().sum() > 0


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_loss_rows_can_be_edited_in_place(backend, teacher_kind):
    """The loss rows of reduction="none" are a tensor of their own on every backend, as torch's
    are: masking or weighting them in place works (no view-of-a-custom-Function error) and the
    gradient follows the edit."""
    z, t, adj = _case(torch.float32, 10, "lonely", n=4, h1=3, b=5, seed=3)
    teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, 3, backend="torch")
    weight = torch.rand(4, 2, 5, generator=torch.Generator().manual_seed(1))

    def run(be):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, teacher, adj, backend=be)
        assert not loss._is_view()
        loss.mul_(weight)
        loss[1] = 0
        loss.sum().backward()
        return loss.detach(), zz.grad

    got, want = run(backend), run("torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert not got[1][1].any()


@needs_cpp
def test_fused_dense_twin_gives_the_teacher_no_gradient():
    """The twin reads the teacher's heads through a pointer, without detach: a teacher that
    requires grad still gets none (as on every path) and the student's gradient is unchanged."""
    z, t, adj = _case(torch.float32, 10, "complete", n=4, h1=3, b=5)
    zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
    loss = mhd_fast.mhd_loss(zz, tt, adj, reduction="sum", backend="cpp")
    loss.backward()
    assert tt.grad is None
    zz2 = z.clone().requires_grad_()
    mhd_fast.mhd_loss(zz2, t, adj, reduction="sum", backend="cpp").backward()
    assert torch.equal(zz.grad, zz2.grad)


@needs_cpp
def test_cpp_distill_dense_checks_the_heads_it_reads_through_pointers():
    """The launcher forms the student's and teacher's head views by pointer arithmetic, so it
    checks their bounds itself, with or without a gradient buffer (whose heads _C checks)."""
    from mhd_fast.ops import cpp
    z, t, adj = _case(torch.float32, 10, "complete", n=4, h1=3, b=5)
    for head_offset, groups in ((1, 3), (3, 1), (-1, 1), (1, 4)):
        for need_grad in (False, True):
            with pytest.raises(ValueError, match="teacher groups"):
                cpp.distill_dense(z, t, adj, head_offset, 1.0, False, "max_confidence", need_grad, groups=groups)
    with pytest.raises(ValueError, match="teacher groups"):
        cpp.distill_dense(z, t[..., 0], adj, 1, 1.0, False, "max_confidence", False, groups=2)
    with pytest.raises(ValueError, match="sum_divisor"):
        mhd_fast._C.distill_dense(cpp._arg("student", z[:, 1:]), cpp._arg("teacher", t[:, :2]), cpp._arg("adj", adj),
                                  1.0, False, 0, 0, 0, 0, 0, 0, 0, 0, [], 3, 1, 1, 8, 0)


@needs_cpp
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("v", [100, 101])
def test_fused_dense_large_gradient_past_the_caches(v, reduction):
    """A gradient of 4 MiB or more goes out by non-temporal stores where its rows start 16-byte
    aligned (V = 100: whole vectors and a 4-lane tail) and by cached stores where they do not
    (V = 101); both against the reference."""
    z, t, adj = _case(torch.float32, v, "lonely", n=16, h1=3, b=220)
    assert z.numel() * 4 >= 4 << 20
    _assert_matches_reference(z, t, adj, "cpp", reduction=reduction)


@needs_cpp
def test_fused_dense_gradient_accumulates_into_grad():
    """backward() twice into .grad (the unit buffer handed to autograd is not reused): 2x once."""
    z, t, adj = _case(torch.float32, 10, "complete", n=4, h1=3, b=5)
    zz = z.clone().requires_grad_()
    mhd_fast.mhd_loss(zz, t, adj, reduction="sum", backend="cpp").backward()
    once = zz.grad.clone()
    mhd_fast.mhd_loss(zz, t, adj, reduction="sum", backend="cpp").backward()
    torch.testing.assert_close(zz.grad, 2 * once)


# ---- registration, compile, backend choice ------------------------------------------------------

def test_opcheck_every_op(backend):
    opcheck_every_op(backend)


def test_torch_compile_fullgraph_forward_and_backward(backend):
    z, t, adj = _case(torch.float32, 10, "ring", n=4)
    packet = mhd_fast.topk_compress(t, 3, backend="torch")

    def f(z, t, packet):
        dense = mhd_fast.mhd_loss(z, t, adj, reduction="mean", backend=backend)
        sparse = mhd_fast.mhd_loss(z, packet, adj, aggregate="mean", reduction="sum", backend=backend)
        return dense + sparse

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = compiled(zc, t, packet)
    want = f(ze, t, packet)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zc.grad, ze.grad, rtol=1e-6, atol=1e-7)


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    assert mhd_fast.resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(api, "backend_available", lambda name: None if name == "torch" else "not built here")
    monkeypatch.setattr(api, "_WARNED", set())
    z, t, adj = _case(torch.float32, 6, "ring", n=3)
    with pytest.warns(RuntimeWarning, match="falls back to 'torch'"):
        loss = mhd_fast.mhd_loss(z, t, adj, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = mhd_fast.mhd_loss(z, t, adj, backend="auto")
    assert torch.equal(loss, again)
    torch.testing.assert_close(loss, mhd_fast.mhd_loss(z, t, adj, backend="torch"))
    with pytest.raises(RuntimeError, match="backend='cpp' is not available"):
        mhd_fast.mhd_loss(z, t, adj, backend="cpp")


def _prints_ok_in_a_fresh_process(code: str) -> None:
    """Runs code in a new interpreter (a first import, a blocked module) and expects "ok"."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_cpp
def test_first_use_inside_a_torch_func_transform():
    """The compiled ops' module imported for the first time inside torch.func.grad (its import
    makes a tensor: it must be a plain one, not the transform's wrapper)."""
    code = (
        "import torch, mhd_fast\n"
        "t = torch.randn(4, 3, 8, 10); z = torch.randn(4, 3, 8, 10); adj = ~torch.eye(4, dtype=torch.bool)\n"
        "f = lambda zz: (zz * mhd_fast.topk_compress(t, 3, backend='cpp').lse.sum()).sum()\n"
        "g = torch.func.grad(f)(z)\n"
        "assert torch.equal(g, torch.full_like(z, float(mhd_fast.topk_compress(t, 3).lse.sum())))\n"
        "print('ok')\n")
    _prints_ok_in_a_fresh_process(code)


def test_import_works_without_the_extension():
    """With mhd_fast._C unimportable, the package imports and 'auto' runs the torch reference."""
    code = (
        "import sys, warnings, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mhd_fast._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, mhd_fast\n"
        "z = torch.randn(3, 2, 4, 5)\n"
        "adj = ~torch.eye(3, dtype=torch.bool)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    loss = mhd_fast.mhd_loss(z, z.flip(0), adj)\n"
        "    mhd_fast.mhd_loss(z, z.flip(0), adj)\n"
        "assert len([x for x in w if 'falls back' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "assert mhd_fast.backend_available('cpp') is not None\n"
        "assert loss.shape == (3, 1, 4)\n"
        "print('ok')\n")
    _prints_ok_in_a_fresh_process(code)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_call,argument", [
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t[:, :, :2], adj, backend="cpp"), "teacher"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z[..., :3], t, adj, backend="cpp"), "teacher"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z[:, :1], t[:, :1], adj, backend="cpp"), "student_logits"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj[:2], backend="cpp"), "adj"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj.int(), backend="cpp"), "adj"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, tau=0.0, backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, tau=-1.0, backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, aggregate="median", backend="cpp"), "aggregate"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, reduction="max", backend="cpp"), "reduction"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, backend="fortran"), "backend"),
    # what the common call's quick acceptance (api._well_formed_dense) must leave to the checks
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, tau=float("nan"), backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, tau=float("inf"), backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, tau=True, backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, aggregate=["mean"], backend="cpp"), "aggregate"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj, reduction={"sum": 1}, backend="cpp"), "reduction"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z.int(), t, adj, backend="cpp"), "student_logits"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t.int(), adj, backend="cpp"), "teacher"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t.to("meta"), adj, backend="cpp"), "teacher"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, t, adj.to("meta"), backend="cpp"), "adj"),
    (lambda z, t, adj: mhd_fast.distill_loss(z[:, :, :0], t[:, :, :0], adj, backend="cpp"), "student_logits"),
    (lambda z, t, adj: mhd_fast.topk_compress(t, 0, backend="cpp"), "k"),
    (lambda z, t, adj: mhd_fast.topk_compress(t, 7, backend="cpp"), "k"),
    (lambda z, t, adj: mhd_fast.topk_compress(t, 2, tau=0, backend="cpp"), "tau"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, mhd_fast.TopKLogits(*_packet(t, values=torch.int32)), adj,
                                         backend="cpp"), "teacher.values"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, mhd_fast.TopKLogits(*_packet(t, indices=torch.float32)), adj,
                                         backend="cpp"), "teacher.indices"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, mhd_fast.TopKLogits(*_packet(t, lse=torch.int64)), adj,
                                         backend="cpp"), "teacher.lse"),
    (lambda z, t, adj: mhd_fast.mhd_loss(z, mhd_fast.TopKLogits(*_packet(t, bad_index=True)), adj,
                                         backend="cpp"), "teacher.indices"),
])
@needs_cpp
def test_bad_input_raises_value_error_naming_the_argument(make_call, argument):
    z, t, adj = _case(torch.float32, 6, "ring", n=3)
    with pytest.raises(ValueError, match=argument.replace(".", r"\.")):
        make_call(z, t, adj)


def _packet(t, values=None, indices=None, lse=None, bad_index=False):
    p = mhd_fast.topk_compress(t, 2, backend="torch")
    v, i, l = p
    if bad_index:
        i = i.clone()
        i[0, 0, 0, 0] = t.shape[-1]
    return (v.to(values) if values else v, i.to(indices) if indices else i, l.to(lse) if lse else l)


@needs_cpp
def test_kernel_launchers_check_what_memory_safety_needs():
    """The custom ops validate indices and shapes themselves (the API skips its host-syncing
    checks under torch.compile), and reject non-CPU tensors."""
    z, t, adj = _case(torch.float32, 6, "ring", n=3)
    ts = t[:, :-1]  # the ops take the full student and head offset 1, as mhd_loss calls them
    lse_t, logconf_t = registry.teacher_stats(ts, 1.0, "cpp")
    idx, _ = registry.select(logconf_t, adj, False, "cpp")
    with pytest.raises(ValueError, match="idx"):
        registry.distill_fwd(z, ts, lse_t, logconf_t, idx + 5, adj, 1, 1.0, False, "max_confidence", "cpp")
    values, indices, plse = registry.topk_compress(ts.reshape(-1, 6), 2, 1.0, "cpp")
    values, indices = values.reshape(3, 2, 4, 2), indices.reshape(3, 2, 4, 2)
    with pytest.raises(ValueError, match="indices"):
        registry.distill_topk_fwd(z, values, indices - 1, plse.reshape(3, 2, 4), logconf_t, idx, adj, 1, 1.0,
                                  False, "max_confidence", "cpp")
    with pytest.raises(ValueError, match="lse_t"):
        registry.distill_fwd(z, ts, lse_t[:, :1], logconf_t, idx, adj, 1, 1.0, False, "max_confidence", "cpp")
    with pytest.raises(ValueError, match="adj"):
        registry.select(logconf_t, adj[:2, :2], False, "cpp")
    with pytest.raises(ValueError, match="aggregate"):
        registry.distill_fwd(z, ts, lse_t, logconf_t, idx, adj, 1, 1.0, False, "mode", "cpp")
    with pytest.raises(ValueError, match="teacher"):
        registry.distill_dense(z, ts[:, :, :2], adj, 1, 1.0, False, "max_confidence", True, "cpp")
    with pytest.raises(ValueError, match="teacher"):  # groups past the student's heads
        registry.distill_dense(z, ts, adj, 2, 1.0, False, "max_confidence", True, "cpp")
    with pytest.raises(ValueError, match="adj"):
        registry.distill_dense(z, ts, adj[:2, :2], 1, 1.0, False, "max_confidence", True, "cpp")
    with pytest.raises(ValueError, match="tau"):
        registry.distill_dense(z, ts, adj, 1, 0.0, False, "max_confidence", True, "cpp")
    with pytest.raises(ValueError, match="aggregate"):
        registry.distill_dense(z, ts, adj, 1, 1.0, False, "mode", True, "cpp")
