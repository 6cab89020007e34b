"""mhd_loss and distill_loss on every backend against the torch reference: values, gradients,
edge cases, bad input, registration, compile and transforms.

Each case runs through the public API (``backend=...``) and compares with the reference
evaluated in fp64 on the same inputs. The cpp backend sweeps the whole cross product; torch
and triton (in the interpreter without a GPU) a cyclic sample of it at tiny sizes. Tests
marked ``gpu`` run triton at real vocabularies on CUDA. The CPU kernels' internals (ISA builds,
rows by lanes) are in test_cpu_kernels.py.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mhd_fast
from mhd_fast.ops import MAX_TAU, distill, reference

from cases import (AGGREGATES, CUDA, DTYPES, GRAD_TOL, GRAPH_CASES, GRAPHS, INTERPRETER_WARNINGS, TAUS, VOCABS,
                   assert_matches_reference, backend_params, device_of, loss_and_grad, make_case, make_graph,
                   make_logits, param, reference_loss_and_grad, unavailable, with_confidence_ties)

pytestmark = INTERPRETER_WARNINGS
TINY_VOCABS = (1, 2, 10, 41, 300)
COMPILED = backend_params(("cpp", "triton"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread keeps the many tiny torch ops of the reference off the
    thread pool (a shared CI machine makes every parallel region wait for a time slice). The
    multi-threaded launch is tested in test_cpu_kernels.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


# ---- helpers ---------------------------------------------------------------------------------

def _packet(t, k, tau=1.0, value_dtype=None):
    return mhd_fast.topk_compress(t, k, tau=tau, value_dtype=value_dtype, backend="torch")


# ---- the cross product -------------------------------------------------------------------------

def _cross_product() -> list:
    """cpp: every dtype × vocabulary × τ × graph × aggregate, against a dense teacher and a
    packet of V/3 classes. torch and triton: every graph × aggregate × vocabulary once, dtype,
    τ, include_self and K cycling so that each value meets every graph and aggregate."""
    out = []
    for dtype, v, tau, (graph, include_self), aggregate in itertools.product(DTYPES, VOCABS, TAUS, GRAPH_CASES,
                                                                             AGGREGATES):
        for kind in ("dense", "topk"):
            out.append(param("cpp", kind, dtype, v, tau, graph, include_self, aggregate, max(1, v // 3), dtype))
    cases = itertools.product(GRAPHS, AGGREGATES, TINY_VOCABS)
    for i, (graph, aggregate, v) in enumerate(cases):
        dtype, tau, include_self = DTYPES[i % 3], TAUS[(i // 3) % 3], bool(i % 2)
        for backend in ("torch", "triton"):
            out.append(param(backend, "dense", dtype, v, tau, graph, include_self, aggregate, 0, None))
            if v <= 41:  # the packet kernels' bitmask is slow in the interpreter at V = 300
                k = (1, min(3, v), v)[i % 3]
                out.append(param(backend, "topk", dtype, v, tau, graph, include_self, aggregate, k,
                                 torch.bfloat16 if k == 1 else None))
    return out


@pytest.mark.parametrize("backend,teacher_kind,dtype,v,tau,graph,include_self,aggregate,k,value_dtype",
                         _cross_product())
def test_loss_and_grad_match_reference(backend, teacher_kind, dtype, v, tau, graph, include_self, aggregate, k,
                                       value_dtype):
    """Dense and top-k teachers, forward and backward with an upstream gradient != 1."""
    z, t, adj = make_case(dtype, v, graph, n=5, h1=3, b=4 if backend == "cpp" else 3, seed=v, backend=backend)
    teacher = t if teacher_kind == "dense" else _packet(t, k, tau, value_dtype)
    assert_matches_reference(z, teacher, adj, backend, tau=tau, include_self=include_self, aggregate=aggregate)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_reductions_match_reference(backend, reduction, aggregate):
    z, t, adj = make_case(torch.float32, 10, "directed", n=6, h1=4, b=5, backend=backend)
    assert_matches_reference(z, t, adj, backend, reduction=reduction, aggregate=aggregate, tau=2.0)
    assert_matches_reference(z, _packet(t, 4, 2.0), adj, backend, reduction=reduction, aggregate=aggregate, tau=2.0)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("student_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_mixed_dtypes_match_reference(backend, student_dtype, teacher_dtype):
    """Z and T dtypes are independent; fp64 in either makes the accumulation fp64, else fp32."""
    device = device_of(backend)
    z = make_logits((4, 3, 5, 17), student_dtype, seed=1).to(device)
    t = make_logits((4, 3, 5, 17), teacher_dtype, seed=2).to(device)
    adj = make_graph("ring", 4).to(device)
    fp64 = torch.float64 in (student_dtype, teacher_dtype)
    ones = torch.ones(4, 2, 5, device=device)
    for aggregate in AGGREGATES:
        got, got_grad = loss_and_grad(z, t, adj, ones, aggregate=aggregate, backend=backend)
        want, want_grad = reference_loss_and_grad(z, t, adj, ones, aggregate=aggregate)
        assert got.dtype == (torch.float64 if fp64 else torch.float32) and got_grad.dtype == student_dtype
        tol = 1e-10 if student_dtype == teacher_dtype == torch.float64 else 2e-5  # lse_t keeps T's precision
        torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
        rtol, atol = GRAD_TOL[student_dtype if not fp64 else torch.float32]
        torch.testing.assert_close(got_grad, want_grad.to(student_dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("graph,include_self", GRAPH_CASES)
def test_confidence_ties_match_reference(backend, graph, include_self, aggregate):
    """All candidates tie in confidence (the lowest client wins, select_teachers' tests): the
    loss follows that choice, dense and packet."""
    z, t, adj = make_case(torch.float32, 12, graph, n=6, backend=backend)
    t = with_confidence_ties(t)
    assert_matches_reference(z, t, adj, backend, include_self=include_self, aggregate=aggregate)
    assert_matches_reference(z, _packet(t, 5), adj, backend, include_self=include_self, aggregate=aggregate)


def _vocabs(backend):
    return [1, 2, 41, 1271] if backend == "cpp" else [10]


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("backend,v", [param(b, v) for b in ("cpp", "torch", "triton") for v in _vocabs(b)])
def test_topk_with_k_equal_v_equals_dense(backend, v, aggregate):
    z, t, adj = make_case(torch.float32, v, "directed", n=6, backend=backend)
    ones = torch.ones(6, 2, 4, device=z.device)
    dense, dense_grad = loss_and_grad(z, t, adj, ones, tau=1.5, aggregate=aggregate, backend=backend)
    packet = mhd_fast.topk_compress(t, v, tau=1.5, backend=backend)
    sparse, sparse_grad = loss_and_grad(z, packet, adj, ones, tau=1.5, aggregate=aggregate, backend=backend)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_gradcheck_fp64_dense_and_topk(backend, aggregate):
    n, h1, b, v = (4, 3, 2, 7) if backend != "triton" else (3, 2, 2, 5)
    device = device_of(backend)
    z = make_logits((n, h1, b, v), torch.float64, seed=5).to(device).requires_grad_()
    t = make_logits((n, h1, b, v), torch.float64, seed=6).to(device)
    adj = make_graph("lonely" if backend != "triton" else "complete", n).to(device)

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


def test_distill_loss_without_head_shift(backend):
    z, t, adj = make_case(torch.float32, 10, "complete", n=4, h1=2, b=3, seed=18, backend=backend)
    for teacher in (t, _packet(t, 3, 0.5)):
        assert_matches_reference(z, teacher, adj, backend, head_shift=False, tau=0.5)


def test_mhd_loss_is_distill_loss_of_the_shifted_heads(backend):
    z, t, adj = make_case(torch.float32, 8, "ring", n=5, h1=4, b=3, seed=6, backend=backend)
    for teacher in (t, _packet(t, 3, 2.0)):
        shifted = (mhd_fast.TopKLogits(*(x[:, :-1] for x in teacher)) if isinstance(teacher, mhd_fast.TopKLogits)
                   else teacher[:, :-1])
        a = mhd_fast.mhd_loss(z, teacher, adj, tau=2.0, backend=backend)
        b = mhd_fast.distill_loss(z[:, 1:], shifted, adj, tau=2.0, backend=backend)
        assert torch.equal(a, b)


# ---- packets: the rest bucket's precision -----------------------------------------------------

def test_topk_sent_classes_on_bitmask_word_edges(backend):
    """Sent classes at the edges of 32-class words (31, 32, 63, ...) and of 256-class tiles
    (V = 300), where the kernels build their bitmaps of sent classes."""
    n, h1, b, v = 3, 2, 2, 300
    t = make_logits((n, h1, b, v), seed=30)
    t[..., [0, 31, 32, 63, 64, 255, 256, 299]] += 20.0  # these are the top 8 of every row
    device = device_of(backend)
    packet = _packet(t.to(device), 8)
    assert set(packet.indices[0, 0, 0].tolist()) == {0, 31, 32, 63, 64, 255, 256, 299}
    z = make_logits((n, h1, b, v), seed=31).to(device)
    for aggregate in AGGREGATES:
        assert_matches_reference(z, packet, make_graph("complete", n).to(device), backend, aggregate=aggregate)


def test_topk_converged_student_keeps_precision(backend):
    """A student that agrees with its teacher puts almost all its mass on the sent classes:
    q_rest is tiny, and the loss and gradient must still match the exact (fp64) values."""
    n, h1, b, v, k = 4, 2, 3, 64, 4
    device = device_of(backend)
    t = with_confidence_ties(make_logits((n, h1, b, v), seed=32)).to(device)  # all teachers agree
    z = torch.stack([t[:, 1], t[:, 0] * 3.0], dim=1)  # the aux head: a sharper copy of head 0
    packet = _packet(t, k, 0.5)
    adj = make_graph("complete", n).to(device)
    idx, _ = mhd_fast.select_teachers(packet, adj, backend="torch")  # [N, 1, B]
    sent = packet.indices[idx[:, 0], 0, torch.arange(b, device=idx.device)].long()  # [N, B, K]
    q_sent = torch.softmax(z[:, 1].double() / 0.5, -1).gather(-1, sent).sum(-1)
    assert (1 - q_sent < 1e-4).any()  # the regime where 1 − Σ q_k cancels in fp32
    assert_matches_reference(z, packet, adj, backend, tau=0.5)


# ---- memory, strides, determinism --------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_inputs_unchanged_and_results_deterministic(backend, aggregate):
    """Inputs are never written; two calls give the same bits; the gradient is a fresh tensor."""
    z, t, adj = make_case(torch.bfloat16, 33, "complete", backend=backend)
    packet = mhd_fast.topk_compress(t, 5, backend=backend)
    saved = [x.clone() for x in (z, t, adj, *packet)]
    for teacher in (t, packet):
        first = loss_and_grad(z, teacher, adj, torch.ones(5, 2, 4, device=z.device), aggregate=aggregate,
                               backend=backend)
        second = loss_and_grad(z, teacher, adj, torch.ones(5, 2, 4, device=z.device), aggregate=aggregate,
                                backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert first[1].is_contiguous() and first[1].data_ptr() != second[1].data_ptr()
    for before, after in zip(saved, (z, t, adj, *packet)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_strided_views_match_contiguous(backend, aggregate):
    """A class dim with stride != 1 (transposed storage), sliced heads, a strided adj, a packet
    of views; and a bf16 student against an fp32 teacher."""
    n, h1, b, v = 5, 4, 6, 23
    device = device_of(backend)
    z = make_logits((v, b, h1, n), seed=7).to(device).permute(3, 2, 1, 0)  # [N, H1, B, V] views, class stride != 1
    t = make_logits((v, n, h1, b), seed=8).to(device).permute(1, 2, 3, 0)
    assert z.stride(-1) != 1 and t.stride(-1) != 1
    adj = make_graph("directed", 2 * n)[::2, ::2].T.contiguous().T.to(device)  # a column-major adj
    kw = dict(tau=0.9, aggregate=aggregate)
    assert_matches_reference(z, t, adj, backend, **kw)
    if backend != "torch":  # the compiled backends read through the strides: the same bits
        want = mhd_fast.mhd_loss(z.contiguous(), t.contiguous(), adj.contiguous(), backend=backend, **kw)
        assert torch.equal(mhd_fast.mhd_loss(z, t, adj, backend=backend, **kw), want)
    values, indices, lse = _packet(t, 6, 0.9)
    packet = mhd_fast.TopKLogits(values.transpose(0, 2).contiguous().transpose(0, 2), indices.mT.contiguous().mT,
                                 lse.permute(2, 1, 0).contiguous().permute(2, 1, 0))
    assert_matches_reference(z, packet, adj, backend, **kw)
    big = _packet(make_logits((n, h1 + 1, b, v), seed=17).to(device), 4)
    sliced = mhd_fast.TopKLogits(*(x[:, 1:] for x in big))  # head slices of a larger packet
    assert not sliced.values.is_contiguous()
    assert_matches_reference(z, sliced, adj, backend, **kw)
    zb = make_logits((n, h1, v, b), torch.bfloat16, seed=3).to(device).transpose(2, 3)
    tf = make_logits((n, h1 + 1, b, v), torch.float32, seed=4).to(device)[:, 1:]
    assert_matches_reference(zb, tf, adj, backend, aggregate=aggregate, tau=2.0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), h1=st.integers(2, 4), b=st.integers(1, 5), v=st.integers(1, 60),
       tau=st.floats(0.2, 5.0), aggregate=st.sampled_from(AGGREGATES), include_self=st.booleans(),
       density=st.floats(0.0, 1.0), k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_hypothesis_shapes_match_reference(n, h1, b, v, tau, aggregate, include_self, density, k_frac, seed):
    """Random shapes, graphs and options on cpp (the interpreter is too slow for triton here)."""
    if unavailable("cpp") is not None:
        pytest.skip("mhd_fast._C not built")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, h1, b, v, generator=g) * 3
    t = torch.randn(n, h1, b, v, generator=g) * 3
    adj = torch.rand(n, n, generator=g) < density
    kw = dict(tau=tau, aggregate=aggregate, include_self=include_self)
    assert_matches_reference(z, t, adj, "cpp", **kw)
    k = 1 + int(k_frac * (v - 1))
    assert_matches_reference(z, _packet(t, k, tau), adj, "cpp", **kw)
    want = mhd_fast.topk_compress(t, k, tau=tau, backend="torch")
    got = mhd_fast.topk_compress(t, k, tau=tau, backend="cpp")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


# ---- NaN and inf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_nan_and_inf_logits(backend, aggregate):
    """NaN or +inf in a row -> NaN for that row; −inf = masked class; all −inf -> NaN loss; a
    NaN teacher row reaches exactly the clients that hear it, on every backend; the reference's
    numbers elsewhere."""
    n, h1, b, v = 4, 3, 5, 9
    z = make_logits((n, h1, b, v), seed=10)
    t = make_logits((n, h1, b, v), seed=11)
    z[1, 1, 0, 3] = float("nan")
    z[2, 2, 1, 0] = float("inf")
    z[3, 1, 2, :] = float("-inf")
    z[0, 1, 3, :4] = float("-inf")          # masked classes of a student row
    t[0, 0, 4, 2:] = float("-inf")          # masked classes of a teacher row
    t[2, 1, 3, 5] = float("nan")            # a NaN teacher: its confidence wins the choice
    device = device_of(backend)
    z, t, adj = z.to(device), t.to(device), make_graph("complete", n).to(device)
    loss, grad = loss_and_grad(z, t, adj, torch.ones(n, h1 - 1, b, device=device), aggregate=aggregate,
                                backend=backend)

    expected_nan = torch.zeros_like(loss, dtype=torch.bool)
    expected_nan[1, 0, 0] = expected_nan[2, 1, 1] = expected_nan[3, 0, 2] = True
    expected_nan[[0, 1, 3], 1, 3] = True    # the listeners of client 2 at (aux head 2, row 3)
    assert torch.equal(torch.isnan(loss), expected_nan)
    assert torch.equal(torch.isnan(grad).any(-1)[:, 1:], expected_nan)
    assert torch.isnan(grad[1, 1, 0]).all()
    assert loss[0, 0, 3] == float("inf")    # teacher mass on classes the student masks
    assert torch.isfinite(grad[0, 1, 3]).all() and (grad[0, 1, 3, :4] < 0).all()

    want_loss, want_grad = loss_and_grad(z, t, adj, torch.ones_like(loss), aggregate=aggregate, backend="torch")
    assert torch.equal(torch.isnan(want_loss), expected_nan)
    fine = ~expected_nan & torch.isfinite(want_loss)
    torch.testing.assert_close(loss[fine], want_loss[fine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, 1:][fine], want_grad[:, 1:][fine], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_nan_teacher_reaches_only_the_clients_that_hear_it(backend, aggregate):
    """Clients 0 and 1 hear each other, client 2 hears nobody and nobody hears it: its NaN
    logits leave clients 0 and 1 finite on every backend, the reference included (whose mean
    of the candidates multiplied client 2's NaN by the zero weight of a non-candidate);
    client 1's NaN reaches client 0 at that row only."""
    n, h1, b, v = 3, 2, 2, 10
    device = device_of(backend)
    z = make_logits((n, h1, b, v), seed=10).to(device)
    t = make_logits((n, h1, b, v), seed=11)
    t[2, 0, 0, 1] = float("nan")
    t = t.to(device)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[0, 1] = adj[1, 0] = True
    adj = adj.to(device)
    for teacher in (t, mhd_fast.topk_compress(t, 3, backend="torch")):
        loss, grad = loss_and_grad(z, teacher, adj, torch.ones(n, 1, b, device=device), aggregate=aggregate,
                                    backend=backend)
        assert torch.isfinite(loss[:2]).all() and torch.isfinite(grad[:2]).all()
        assert torch.equal(loss[2], torch.zeros_like(loss[2])) and not grad[2].any()
    t_heard = t.clone()
    t_heard[1, 0, 0, 4] = float("nan")  # client 1's NaN reaches client 0, which hears it, at row 0 only
    loss, _ = loss_and_grad(z, t_heard, adj, None, aggregate=aggregate, backend=backend)
    assert loss[0, 0, 0].isnan() and not loss[0, 0, 1].isnan() and not loss[1].isnan().any()


def test_lonely_client_gets_zero_loss_and_gradient_even_with_nan(backend):
    n, h1, b, v = 4, 3, 5, 10
    device = device_of(backend)
    z = make_logits((n, h1, b, v), seed=8)
    z[0, 1, 2, 3] = float("nan")  # client 0 has no candidate: its NaN must not leak
    z = z.to(device)
    adj = make_graph("lonely", n).to(device)
    t = make_logits((n, h1, b, v), seed=9).to(device)
    for teacher in (t, _packet(t, 3)):
        for aggregate in AGGREGATES:
            loss, grad = loss_and_grad(z, teacher, adj, torch.ones(n, h1 - 1, b, device=device),
                                        aggregate=aggregate, backend=backend)
            assert torch.all(loss[0] == 0) and torch.all(grad[0] == 0)
            assert torch.all(loss[1:] > 0)


# ---- autograd: upstream gradients, second order, transforms ------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_backward_for_every_upstream_gradient(backend, aggregate):
    """The gradient for loss.sum(), a scalar, a per-row and a NaN upstream gradient: a NaN
    still gives exact zeros to a client without candidate, as the reference does; a second
    backward through a retained graph gives the same bits."""
    z, t, adj = make_case(torch.float32, 13, "lonely", n=5, h1=3, b=6, seed=3, backend=backend)
    rows = (5, 2, 6)
    per_row = (torch.rand(rows, generator=torch.Generator().manual_seed(1)) * 2 - 0.5).to(z.device)
    bad = per_row.clone()
    bad[1, 0, 2] = float("nan")
    bad[0] = float("nan")  # client 0 has no candidate: its gradient stays 0
    one, scalar, nan = (torch.tensor(x, device=z.device).expand(rows) for x in (1.0, 1.7, float("nan")))
    for grad_out in (one, scalar, per_row, bad, nan):
        got_loss, got = loss_and_grad(z, t, adj, grad_out, backend=backend, aggregate=aggregate)
        want_loss, want = reference_loss_and_grad(z, t, adj, grad_out, aggregate=aggregate)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    for reduction in ("sum", "mean"):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, t, adj, aggregate=aggregate, reduction=reduction, backend=backend)
        (first,) = torch.autograd.grad(loss, zz, retain_graph=True)
        (second,) = torch.autograd.grad(loss, zz)
        assert torch.equal(first, second)
        _, want = reference_loss_and_grad(z, t, adj, torch.tensor(1.0, device=z.device), aggregate=aggregate,
                                          reduction=reduction)
        torch.testing.assert_close(first, want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_no_grad_forward_equals_the_forward_with_grad(backend, teacher_kind):
    """Under no_grad (no unit gradient written) the loss has the bits of the one with a
    gradient, for every reduction."""
    z, t, adj = make_case(torch.float32, 50, "lonely", n=5, h1=3, b=6, seed=8, backend=backend)
    teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, 7, tau=2.0, backend=backend)
    for reduction in ("none", "sum", "mean"):
        for aggregate in AGGREGATES:
            kw = dict(aggregate=aggregate, tau=2.0, reduction=reduction, backend=backend)
            with_grad = mhd_fast.mhd_loss(z.clone().requires_grad_(), teacher, adj, **kw)
            with torch.no_grad():
                assert torch.equal(mhd_fast.mhd_loss(z, teacher, adj, **kw), with_grad.detach())


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_torch_func_transforms_work_on_every_backend(backend, teacher_kind):
    """torch.func.grad, and per-sample gradients by vmap(grad): inside a transform the compiled
    backends hand over to the reference (torch.library's autograd does not compose with the
    transforms), so the results are the torch backend's."""
    z, t, adj = make_case(torch.float32, 9, "lonely", n=4, h1=3, b=5, seed=8, backend=backend)
    teacher = t if teacher_kind == "dense" else _packet(t, 4)
    batch = make_logits((3, 4, 3, 5, 9), torch.float32, seed=9).to(z.device)

    def loss_of(be):
        return lambda zz: mhd_fast.mhd_loss(zz, teacher, adj, reduction="sum", backend=be)

    assert torch.equal(torch.func.grad(loss_of(backend))(z), torch.func.grad(loss_of("torch"))(z))
    per_sample = torch.vmap(torch.func.grad(loss_of(backend)))(batch)
    assert per_sample.shape == batch.shape
    assert torch.equal(per_sample, torch.vmap(torch.func.grad(loss_of("torch")))(batch))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_second_order_gradients_match_the_reference(backend, teacher_kind, reduction):
    """A backward with create_graph=True (double backward, gradient penalties) gives a gradient
    that autograd can differentiate again: the kernels' gradient is numbers, so that backward
    goes through the reference. Checked by a Hessian-vector product against the torch
    backend's, fp64."""
    z, t, adj = make_case(torch.float64, 9, "lonely", n=4, h1=3, b=5, seed=7, backend=backend)
    if teacher_kind == "dense":
        teacher = t
    else:  # an fp64 packet (the reference's own compression), so that every path computes in fp64
        values, indices, lse = reference.topk_compress(t.reshape(-1, 9), 4, 1.0)
        teacher = mhd_fast.TopKLogits(values.reshape(4, 3, 5, 4), indices.reshape(4, 3, 5, 4), lse.reshape(4, 3, 5))
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(4, 2, 5, generator=gen, dtype=torch.float64).to(z.device)
    direction = torch.randn(z.shape, generator=gen, dtype=torch.float64).to(z.device)

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
    z, t, adj = make_case(torch.float32, 10, "lonely", n=4, h1=3, b=5, seed=3, backend=backend)
    teacher = t if teacher_kind == "dense" else _packet(t, 3)
    weight = torch.rand(4, 2, 5, generator=torch.Generator().manual_seed(1)).to(z.device)

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


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_teacher_gets_no_gradient_and_grad_accumulates(backend, teacher_kind):
    """A teacher that requires grad gets none and leaves the student's gradient as it is;
    backward() twice accumulates 2x into .grad (a gradient handed to autograd is not reused)."""
    z, t, adj = make_case(torch.float32, 10, "complete", n=4, h1=3, b=5, backend=backend)
    zz = z.clone().requires_grad_()
    if teacher_kind == "dense":
        tt = t.clone().requires_grad_()
        mhd_fast.mhd_loss(zz, tt, adj, reduction="sum", backend=backend).backward()
        assert tt.grad is None
        want = zz.grad.clone()
        zz.grad = None
    teacher = t if teacher_kind == "dense" else _packet(t, 3)
    mhd_fast.mhd_loss(zz, teacher, adj, reduction="sum", backend=backend).backward()
    once = zz.grad.clone()
    if teacher_kind == "dense":
        assert torch.equal(once, want)
    mhd_fast.mhd_loss(zz, teacher, adj, reduction="sum", backend=backend).backward()
    torch.testing.assert_close(zz.grad, 2 * once)


# ---- registration and compile ---------------------------------------------------------------

@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_every_distill_op(backend):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of the
    distillation ops, on the full student with a head offset as mhd_loss calls them; the
    one-launch dense op with and without the unit gradient, for every reduction."""
    n, h, b, v, k = 4, 3, 3, 10, 4
    device = device_of(backend)
    z = make_logits((n, h, b, v), seed=13).to(device).requires_grad_()
    t = make_logits((n, h - 1, b, v), torch.bfloat16, seed=14).to(device)
    adj = make_graph("ring", n).to(device)
    packet = _packet(t, k, 1.3, torch.bfloat16)
    rows = distill.distill_topk(z.detach(), *packet, adj, 1, 1.3, False, "max_confidence", backend)
    grad = torch.rand(n, h - 1, b, device=device)
    zd = z.detach()
    lse_z = torch.logsumexp(zd[:, 1:] / 1.3, -1)
    checks = []
    for aggregate in AGGREGATES:
        checks += [(distill.distill_topk, (z, *packet, adj, 1, 1.3, False, aggregate, backend))]
        # (not mean with the unit gradient: its backward scales the op's unit output in place,
        # which callers never read again but opcheck compares after the backward)
        checks += [(distill.distill_dense, (z, t, adj, 1, 1.3, False, aggregate, need_grad, reduction, backend))
                   for need_grad in (False, True) for reduction in ("none", "sum", "mean")
                   if not (need_grad and reduction == "mean")]
        if aggregate != "max_confidence":  # max_confidence packets save a backend-specific statistic
            checks += [(distill.distill_topk_bwd, (grad, zd, packet.values, rows[2], *rows[1].unbind(0)[:2],
                                                   rows[3], adj, lse_z, 1, 1.3, False, aggregate, backend))]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_torch_compile_fullgraph_forward_and_backward(backend, teacher_kind):
    """torch.compile(fullgraph=True) of a step calling mhd_loss with backward equals the eager
    step."""
    n, h1, b, v = (6, 3, 8, 1000) if CUDA and backend == "triton" else (4, 3, 4, 50)
    z, t, adj = make_case(torch.bfloat16 if backend == "triton" else torch.float32, v, "complete", n=n, h1=h1, b=b,
                      seed=28, backend=backend)
    teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, 16, value_dtype=torch.bfloat16,
                                                                       backend=backend)

    def f(x):
        dense = mhd_fast.mhd_loss(x, teacher, adj, tau=2.0, reduction="mean", backend=backend)
        mixed = mhd_fast.mhd_loss(x, teacher, adj, tau=2.0, aggregate="mean", reduction="sum", backend=backend)
        return dense + mixed

    compiled = torch.compile(f, fullgraph=True)
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = compiled(zc)
    want = f(ze)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zc.grad, ze.grad, rtol=1e-6, atol=1e-7)


# ---- bad input -------------------------------------------------------------------------------------

def _bad_packet(t, values=None, indices=None, lse=None, bad_index=False):
    v, i, l = _packet(t, 2)
    if bad_index:
        i = i.clone()
        i[0, 0, 0, 0] = t.shape[-1]
    return mhd_fast.TopKLogits(v.to(values) if values else v, i.to(indices) if indices else i,
                               l.to(lse) if lse else l)


@pytest.mark.parametrize("make_call,argument", [
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t[:, :, :2], adj, backend=be), "teacher"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z[..., :3], t, adj, backend=be), "teacher"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z[:, :1], t[:, :1], adj, backend=be), "student_logits"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj[:2], backend=be), "adj"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj.int(), backend=be), "adj"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, tau=0.0, backend=be), "tau"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, tau=-1.0, backend=be), "tau"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, aggregate="median", backend=be), "aggregate"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, reduction="max", backend=be), "reduction"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, backend="fortran"), "backend"),
    # what the common call's quick acceptance (distill._well_formed_dense) must leave to the checks
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, tau=float("nan"), backend=be), "tau"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, tau=float("inf"), backend=be), "tau"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, tau=True, backend=be), "tau"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, aggregate=["mean"], backend=be), "aggregate"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj, reduction={"sum": 1}, backend=be), "reduction"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z.int(), t, adj, backend=be), "student_logits"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t.int(), adj, backend=be), "teacher"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t.to("meta"), adj, backend=be), "teacher"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, t, adj.to("meta"), backend=be), "adj"),
    (lambda z, t, adj, be: mhd_fast.distill_loss(z[:, :, :0], t[:, :, :0], adj, backend=be), "student_logits"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, _bad_packet(t, values=torch.int32), adj, backend=be),
     "teacher.values"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, _bad_packet(t, indices=torch.float32), adj, backend=be),
     "teacher.indices"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, _bad_packet(t, lse=torch.int64), adj, backend=be), "teacher.lse"),
    (lambda z, t, adj, be: mhd_fast.mhd_loss(z, _bad_packet(t, bad_index=True), adj, backend=be), "teacher.indices"),
])
def test_bad_input_raises_value_error_naming_the_argument(backend, make_call, argument):
    z, t, adj = make_case(torch.float32, 6, "ring", n=3, backend=backend)
    with pytest.raises(ValueError, match=argument.replace(".", r"\.")):
        make_call(z, t, adj, backend)


def test_tau_is_any_real_number_in_range(backend):
    """τ may be a numpy scalar (np.float32 from a config or a sweep grid, np.int64): the same
    loss as the Python float; a tensor is refused with a hint (reading it would sync the host)."""
    z, t, adj = make_case(torch.float32, 10, "ring", n=4, backend=backend)
    packet = _packet(t, 3, 2.0)
    want = mhd_fast.mhd_loss(z, t, adj, tau=2.0, backend=backend)
    for tau in (np.float32(2.0), np.float64(2.0), np.int64(2), 2):
        assert torch.equal(mhd_fast.mhd_loss(z, t, adj, tau=tau, backend=backend), want)
        mhd_fast.mhd_loss(z, packet, adj, tau=tau, backend=backend)
        mhd_fast.select_teachers(t, adj, tau=tau, backend=backend)
        mhd_fast.topk_compress(t, 3, tau=tau, backend=backend)
    for tau in (np.float32("nan"), np.float64("inf"), np.float32(0.0), np.bool_(True), torch.tensor(2.0), "2"):
        with pytest.raises(ValueError, match="tau must be"):
            mhd_fast.mhd_loss(z, t, adj, tau=tau, backend=backend)
    with pytest.raises(ValueError, match=r"pass float\(tau\)"):
        mhd_fast.topk_compress(t, 3, tau=torch.tensor(2.0), backend=backend)


def test_tau_range_is_where_the_fp32_loss_is_accurate(backend):
    """τ up to MAX_TAU = 100: the fp32 loss stays within 5e-3 of the fp64 one on every backend
    (its error grows as τ², 10 % at 1000). Past it, at τ ≥ 2e19 too (where τ² overflows and cpp
    gave NaN, torch inf), every op raises a ValueError naming tau."""
    z, t, adj = make_case(torch.float32, 10, "complete", n=6, h1=3, b=8, backend=backend)
    for tau in (1.0, 30.0, MAX_TAU):
        packet = _packet(t, 3, tau)
        for teacher in (t, packet):
            got = mhd_fast.mhd_loss(z, teacher, adj, tau=tau, backend=backend)
            want, _ = reference_loss_and_grad(z, teacher, adj, None, tau=tau)
            torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=1e-3)
    for tau in (MAX_TAU * 1.01, 1e3, 2e19, 1e300):
        with pytest.raises(ValueError, match=r"tau must be a real number in \(0, 100\]"):
            mhd_fast.mhd_loss(z, t, adj, tau=tau, backend=backend)
        with pytest.raises(ValueError, match="tau"):
            mhd_fast.select_teachers(t, adj, tau=tau, backend=backend)
        with pytest.raises(ValueError, match="tau"):
            mhd_fast.topk_compress(t, 3, tau=tau, backend=backend)


@pytest.mark.parametrize("fault", ["repeated class", "lse too low"])
def test_hand_built_packets_without_a_distribution_are_rejected(backend, fault):
    """A packet that sends a class twice, or whose lse lies below the logsumexp of its values
    (sent probabilities summing past 1), raises a ValueError naming the field, on every op
    that reads it; the backends would otherwise each read it their own way."""
    z, t, adj = make_case(torch.float32, 10, "complete", n=4, backend=backend)
    values, indices, lse = _packet(t, 3)
    if fault == "repeated class":
        indices = indices.clone()
        indices[1, 0, 2, 2] = indices[1, 0, 2, 0]
        argument = "teacher.indices must hold K distinct classes"
    else:
        lse = lse.clone()
        lse[2, 1, 0] = values[2, 1, 0].logsumexp(-1) - 0.1
        argument = "teacher.lse must be at least the logsumexp"
    packet = mhd_fast.TopKLogits(values, indices, lse)
    with pytest.raises(ValueError, match=argument):
        mhd_fast.mhd_loss(z, packet, adj, backend=backend)
    with pytest.raises(ValueError, match=argument):
        mhd_fast.distill_loss(z, packet, adj, backend=backend)
    with pytest.raises(ValueError, match=argument):
        mhd_fast.select_teachers(packet, adj, backend=backend)


def test_packet_heads_nobody_reads_may_be_left_zero(backend):
    """The exchange leaves the heads it does not send zero (indices all 0, lse 0): mhd_loss and
    select_teachers read heads 0..H1−2 only, distill_loss on head 0 only, and check only those."""
    z, t, adj = make_case(torch.float32, 10, "complete", n=4, backend=backend)
    values, indices, lse = (x.clone() for x in _packet(t, 3))
    for x in (values, indices, lse):
        x[:, -1] = 0
    packet = mhd_fast.TopKLogits(values, indices, lse)
    mhd_fast.mhd_loss(z, packet, adj, backend=backend)
    mhd_fast.select_teachers(packet, adj, backend=backend)
    mhd_fast.distill_loss(z[:, :1], mhd_fast.TopKLogits(*(x[:, :1] for x in packet)), adj, backend=backend)
    with pytest.raises(ValueError, match="teacher.indices must hold K distinct classes"):
        mhd_fast.distill_loss(z, packet, adj, backend=backend)


def test_packets_of_topk_compress_are_accepted_in_every_wire_dtype(backend):
    """topk_compress's own packets pass those checks in every wire dtype, with values rounded
    up past lse (large logits, k = V) and rows of NaN, +inf and all −inf."""
    device = device_of(backend)
    adj = make_graph("complete", 4).to(device)
    z = make_logits((4, 2, 5, 12), seed=1).to(device)
    t = make_logits((4, 2, 5, 12), seed=2, scale=300.0)
    t[0, 0, 0, 3] = float("nan")
    t[1, 0, 1, 4] = float("inf")
    t[2, 1, 2] = float("-inf")
    t = t.to(device)
    for value_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for tau in (0.1, 1.0, 10.0):
            for k in (1, 2, 5, 12):
                packet = mhd_fast.topk_compress(t, k, tau=tau, value_dtype=value_dtype, backend=backend)
                mhd_fast.mhd_loss(z, packet, adj, tau=tau, backend=backend)
                mhd_fast.select_teachers(packet, adj, tau=tau, backend=backend)


# ---- GPU: full sizes and fp64 gradcheck over several column tiles --------------------------

needs_cuda = pytest.mark.skipif(not CUDA or unavailable("triton") is not None, reason="needs CUDA and Triton")


@pytest.mark.parametrize("v", [1271, 32000, 50257])
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("graph", ["complete", "lonely"])
@pytest.mark.gpu
@needs_cuda
def test_gpu_full_cross_product(v, aggregate, dtype, teacher_kind, graph):
    n, h1, b = 6, 3, 4
    z = make_logits((n, h1, b, v), dtype, seed=v).cuda()
    t = make_logits((n, h1, b, v), dtype, seed=v + 1).cuda()
    teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, 32, tau=2.0)
    if teacher_kind == "topk":
        topk_ref = mhd_fast.topk_compress(t, 32, tau=2.0, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(teacher[:2], topk_ref[:2]))
    assert_matches_reference(z, teacher, make_graph(graph, n).cuda(), "triton", tau=2.0, aggregate=aggregate)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.gpu
@needs_cuda
def test_gpu_gradcheck_fp64_large_v(aggregate):
    n, g, b, v = 3, 2, 2, 4099  # more than one column tile
    z = make_logits((n, g, b, v), torch.float64, seed=24).cuda().requires_grad_()
    t = make_logits((n, g, b, v), torch.float64, seed=25).cuda()
    adj = make_graph("directed", n).cuda()
    for teacher in (t, mhd_fast.TopKLogits(*reference.topk_compress(t, 16, 0.5))):
        assert torch.autograd.gradcheck(
            lambda x: mhd_fast.distill_loss(x, teacher, adj, tau=0.5, aggregate=aggregate, backend="triton"),
            (z,), fast_mode=True)
