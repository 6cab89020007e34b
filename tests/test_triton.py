"""The Triton backend against the torch reference.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), with tiny shapes: the cross product of the CPU backend's tests in
miniature, plus ``torch.library.opcheck`` of every op and ``torch.compile(fullgraph=True)``
with backward. Tests marked ``gpu`` run only on CUDA: the cross product at real vocabularies
(up to 50257) and fp64 gradcheck over several column tiles.
"""
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

import mhd_fast  # noqa: E402
from mhd_fast.ops import reference, registry, triton_backend  # noqa: E402

from cases import (AGGREGATES, GRAD_TOL, GRAPHS, LOSS_TOL, TAUS, make_graph, make_logits, opcheck_every_op,  # noqa: E402
                   with_confidence_ties, with_topk_ties)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TINY_VOCABS = (1, 2, 10, 41, 300)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

pytestmark = [
    pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA or TRITON_INTERPRET=1"),
    # The interpreter evaluates masked lanes too (log2 0, −inf − −inf); numpy warns about them.
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _on(x):
    return x.to(DEVICE)


def loss_and_grad(z, teacher, adj, backend, upstream=None, head_shift=True, **opts):
    """(loss [N, G, B], dloss/dz · upstream) of mhd_loss (or distill_loss) on one backend."""
    z = z.detach().clone().requires_grad_()
    fn = mhd_fast.mhd_loss if head_shift else mhd_fast.distill_loss
    loss = fn(z, teacher, adj, backend=backend, **opts)
    if upstream is None:
        upstream = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, z, upstream)
    return loss.detach(), grad


def assert_matches_reference(z, teacher, adj, seed=0, head_shift=True, **opts):
    """Loss and gradient (with a random upstream gradient) of triton equal the reference.

    Against packets the reference is evaluated in fp64: in fp32 it computes q_rest = 1 − Σ q_k,
    which cancels when the sent classes hold nearly all of the student's mass, while the
    kernels sum the unsent classes directly and stay within the tolerance of the exact value."""
    rows = (z.shape[0], z.shape[1] - 1 if head_shift else z.shape[1], z.shape[2])
    upstream = _on(torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5)
    got, got_grad = loss_and_grad(z, teacher, adj, "triton", upstream, head_shift, **opts)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got_grad.dtype == z.dtype and got_grad.shape == z.shape
    if isinstance(teacher, mhd_fast.TopKLogits):
        teacher = mhd_fast.TopKLogits(teacher.values.double(), teacher.indices, teacher.lse.double())
        want, want_grad = loss_and_grad(z.double(), teacher, adj, "torch", upstream.double(),
                                        head_shift, **opts)
        got, got_grad = got.double(), got_grad.double()
    else:
        want, want_grad = loss_and_grad(z, teacher, adj, "torch", upstream, head_shift, **opts)
    torch.testing.assert_close(got, want, rtol=LOSS_TOL[z.dtype][0], atol=LOSS_TOL[z.dtype][1])
    torch.testing.assert_close(got_grad, want_grad, rtol=GRAD_TOL[z.dtype][0],
                               atol=GRAD_TOL[z.dtype][1])


def _cases(vocabs, *extra):
    """Every graph × aggregate × vocabulary, with dtype, τ and include_self cycling through
    their values so that each appears with every graph and aggregate."""
    out = []
    for i, (graph, aggregate, v) in enumerate(itertools.product(GRAPHS, AGGREGATES, vocabs)):
        out.append((graph, aggregate, v, DTYPES[i % 3], TAUS[(i // 3) % 3], bool(i % 2),
                    *(e[i % len(e)] for e in extra)))
    return out


# ---- dense teacher -------------------------------------------------------------------------

@pytest.mark.parametrize("graph,aggregate,v,dtype,tau,include_self", _cases(TINY_VOCABS))
def test_dense_matches_reference(graph, aggregate, v, dtype, tau, include_self):
    n, h1, b = 5, 3, 3
    z = _on(make_logits((n, h1, b, v), dtype, seed=v))
    t = _on(make_logits((n, h1, b, v), dtype, seed=v + 1))
    assert_matches_reference(z, t, _on(make_graph(graph, n)), tau=tau, include_self=include_self,
                             aggregate=aggregate)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_dense_mixed_dtypes_and_strides(aggregate):
    """Z and T of different dtypes, Z strided in V (a transposed view), T a head slice."""
    n, h1, b, v = 4, 3, 5, 41
    z = _on(make_logits((n, h1, v, b), torch.bfloat16, seed=3)).transpose(2, 3)
    t = _on(make_logits((n, h1 + 1, b, v), torch.float32, seed=4))[:, 1:]
    assert z.stride(3) != 1 and not t.is_contiguous()
    assert_matches_reference(z, t, _on(make_graph("complete", n)), aggregate=aggregate, tau=2.0)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_confidence_ties_pick_lowest_client(aggregate):
    n, h1, b, v = 5, 3, 4, 10
    t = _on(with_confidence_ties(make_logits((n, h1, b, v), seed=5)))
    adj = _on(make_graph("complete", n))
    idx, has = mhd_fast.select_teachers(t, adj, backend="triton")
    want_idx, want_has = mhd_fast.select_teachers(t, adj, backend="torch")
    assert torch.equal(idx, want_idx) and torch.equal(has, want_has)
    assert torch.all(idx[1:] == 0) and torch.all(idx[0] == 1)
    assert_matches_reference(_on(make_logits((n, h1, b, v), seed=6)), t, adj, aggregate=aggregate)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_teacher_stats_and_select(graph, include_self, dtype):
    n, g, b, v = 6, 2, 3, 41
    t = _on(make_logits((n, g, b, v), dtype, seed=7))
    lse, logconf = registry.teacher_stats(t, 1.5, "triton")
    want_lse, want_logconf = reference.teacher_stats(t, 1.5)
    tol = LOSS_TOL[dtype]
    torch.testing.assert_close(lse, want_lse, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(logconf, want_logconf, rtol=tol[0], atol=tol[1])
    adj = _on(make_graph(graph, n))
    idx, has = registry.select(want_logconf, adj, include_self, "triton")
    want_idx, want_has = reference.select(want_logconf, adj, include_self)
    assert torch.equal(idx, want_idx) and torch.equal(has, want_has)


def test_select_nan_wins_and_diagonal_follows_include_self():
    logconf = _on(torch.tensor([[[-1.0, -2.0]], [[float("nan"), -3.0]], [[-0.5, float("nan")]]]))
    adj = _on(torch.tensor([[True, True, True], [False, False, False], [True, True, False]]))
    for include_self in (False, True):
        idx, has = registry.select(logconf, adj, include_self, "triton")
        want_idx, want_has = reference.select(logconf, adj, include_self)
        assert torch.equal(idx, want_idx) and torch.equal(has, want_has)
    idx, has = registry.select(logconf, adj, False, "triton")
    assert idx[0].tolist() == [[1, 2]]  # the first NaN wins, row by row
    assert idx[1].tolist() == [[-1, -1]] and not has[1]  # adj[1, 1] is ignored without include_self
    idx, has = registry.select(logconf, adj, True, "triton")
    assert idx[1].tolist() == [[1, 1]] and has[1]  # include_self makes i a candidate of itself


def test_lonely_client_gets_zero_loss_and_gradient_even_with_nan():
    n, h1, b, v = 4, 3, 5, 10
    z = make_logits((n, h1, b, v), seed=8)
    z[0, 1, 2, 3] = float("nan")  # client 0 has no candidate: its NaN must not leak
    adj = _on(make_graph("lonely", n))
    for teacher in (_on(make_logits((n, h1, b, v), seed=9)),
                    mhd_fast.topk_compress(_on(make_logits((n, h1, b, v), seed=9)), 3, backend="torch")):
        for aggregate in AGGREGATES:
            loss, grad = loss_and_grad(_on(z), teacher, adj, "triton", aggregate=aggregate)
            assert torch.all(loss[0] == 0) and torch.all(grad[0] == 0)
            assert torch.all(loss[1:] > 0)


def test_nan_teacher_gives_nan_loss_to_the_clients_that_hear_it():
    n, h1, b, v = 3, 2, 2, 10
    z = _on(make_logits((n, h1, b, v), seed=10))
    t = make_logits((n, h1, b, v), seed=11)
    t[1, 0, 0, 4] = float("nan")  # its NaN confidence wins the selection of clients 0 and 2
    t = _on(t)
    adj = _on(make_graph("complete", n))
    for aggregate in AGGREGATES:
        loss, _ = loss_and_grad(z, t, adj, "triton", aggregate=aggregate)
        assert loss[0, 0, 0].isnan() and loss[2, 0, 0].isnan()
        # Client 1 does not hear itself: its loss stays finite. (The reference's mean /
        # confidence_weighted einsum gives NaN here too, from 0·NaN of a non-candidate.)
        assert not loss[1].isnan().any() and not loss[:, :, 1].isnan().any()


def test_inputs_unchanged_fresh_gradient_and_deterministic():
    n, h1, b, v = 4, 3, 3, 41
    z = _on(make_logits((n, h1, b, v), seed=12))
    t = _on(make_logits((n, h1, b, v), seed=13))
    adj = _on(make_graph("directed", n))
    packet = mhd_fast.topk_compress(t, 5, backend="torch")
    saved = [x.clone() for x in (z, t, adj, *packet)]
    for teacher in (t, packet):
        for aggregate in AGGREGATES:
            first = loss_and_grad(z, teacher, adj, "triton", aggregate=aggregate)
            second = loss_and_grad(z, teacher, adj, "triton", aggregate=aggregate)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
            assert first[1].is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(saved, (z, t, adj, *packet)))


# ---- top-k packets -------------------------------------------------------------------------

@pytest.mark.parametrize("graph,aggregate,v,dtype,tau,include_self,k",
                         _cases((2, 10, 41), ("one", "some", "all")))
def test_topk_matches_reference(graph, aggregate, v, dtype, tau, include_self, k):
    n, h1, b = 5, 3, 3
    k = {"one": 1, "some": min(3, v), "all": v}[k]
    z = _on(make_logits((n, h1, b, v), dtype, seed=v + 2))
    t = _on(make_logits((n, h1, b, v), dtype, seed=v + 3))
    packet = mhd_fast.topk_compress(t, k, tau=tau, value_dtype=torch.bfloat16 if k == 1 else None,
                                    backend="torch")
    assert_matches_reference(z, packet, _on(make_graph(graph, n)), tau=tau,
                             include_self=include_self, aggregate=aggregate)


def test_topk_sent_classes_on_bitmask_word_edges():
    """Sent classes at the edges of the forward's 32-class bitmask words (31, 32, 63, ...) and
    of its column tiles (V = 300 > one 256-class word group)."""
    n, h1, b, v = 3, 2, 2, 300
    t = make_logits((n, h1, b, v), seed=30)
    t[..., [0, 31, 32, 63, 64, 255, 256, 299]] += 20.0  # these are the top 8 of every row
    packet = mhd_fast.topk_compress(_on(t), 8, backend="torch")
    assert set(packet.indices[0, 0, 0].tolist()) == {0, 31, 32, 63, 64, 255, 256, 299}
    z = _on(make_logits((n, h1, b, v), seed=31))
    for aggregate in AGGREGATES:
        assert_matches_reference(z, packet, _on(make_graph("complete", n)), aggregate=aggregate)


def test_topk_converged_student_keeps_precision():
    """A student that agrees with its teacher puts almost all its mass on the sent classes:
    q_rest is tiny, and the loss and gradient must still match the exact (fp64) values."""
    n, h1, b, v, k = 4, 2, 3, 64, 4
    t = _on(with_confidence_ties(make_logits((n, h1, b, v), seed=32)))  # all teachers agree
    z = torch.stack([t[:, 1], t[:, 0] * 3.0], dim=1)  # the aux head: a sharper copy of head 0
    packet = mhd_fast.topk_compress(t, k, tau=0.5, backend="torch")
    adj = _on(make_graph("complete", n))
    idx, _ = mhd_fast.select_teachers(packet, adj, backend="torch")  # [N, 1, B]
    sent = packet.indices[idx[:, 0], 0, torch.arange(b, device=idx.device)].long()  # [N, B, K]
    q_sent = torch.softmax(z[:, 1].double() / 0.5, -1).gather(-1, sent).sum(-1)
    assert (1 - q_sent < 1e-4).any()  # the regime where 1 − Σ q_k cancels in fp32
    assert_matches_reference(z, packet, adj, tau=0.5)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_topk_with_k_equal_v_equals_dense(aggregate):
    n, h1, b, v = 5, 3, 4, 10
    z = _on(make_logits((n, h1, b, v), seed=14))
    t = _on(make_logits((n, h1, b, v), seed=15))
    adj = _on(make_graph("directed", n))
    packet = mhd_fast.topk_compress(t, v, tau=1.5, backend="triton")
    dense = loss_and_grad(z, t, adj, "triton", tau=1.5, aggregate=aggregate)
    sparse = loss_and_grad(z, packet, adj, "triton", tau=1.5, aggregate=aggregate)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-5, atol=1e-6)


def test_topk_strided_packets_and_student():
    """The packet and the student as views (head slices, a transposed student)."""
    n, h1, b, v, k = 4, 3, 5, 41, 4
    z = _on(make_logits((n, h1, v, b), seed=16)).transpose(2, 3)
    big = mhd_fast.topk_compress(_on(make_logits((n, h1 + 1, b, v), seed=17)), k, backend="torch")
    packet = mhd_fast.TopKLogits(*(x[:, 1:] for x in big))
    assert not packet.values.is_contiguous()
    for aggregate in AGGREGATES:
        assert_matches_reference(z, packet, _on(make_graph("ring", n)), aggregate=aggregate)


def test_distill_loss_without_head_shift():
    n, g, b, v = 4, 2, 3, 10
    z = _on(make_logits((n, g, b, v), seed=18))
    t = _on(make_logits((n, g, b, v), seed=19))
    adj = _on(make_graph("complete", n))
    for teacher in (t, mhd_fast.topk_compress(t, 3, backend="torch")):
        assert_matches_reference(z, teacher, adj, head_shift=False, tau=0.5)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("packet", [False, True])
def test_gradcheck_fp64(aggregate, packet):
    n, g, b, v = 3, 1, 2, 5
    z = _on(make_logits((n, g, b, v), torch.float64, seed=20)).requires_grad_()
    t = _on(make_logits((n, g, b, v), torch.float64, seed=21))
    teacher = mhd_fast.TopKLogits(*reference.topk_compress(t, 2, 2.0)) if packet else t
    adj = _on(make_graph("complete", n))
    assert torch.autograd.gradcheck(
        lambda x: mhd_fast.distill_loss(x, teacher, adj, tau=2.0, aggregate=aggregate,
                                        backend="triton"), (z,))


# ---- top-k compression ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,v,ties", [
    (dtype, v, bool((i + j) % 2))
    for i, dtype in enumerate(DTYPES + (torch.float64,)) for j, v in enumerate(TINY_VOCABS)])
def test_topk_compress_matches_reference(dtype, v, ties):
    x = make_logits((3, 2, 4, v), dtype, seed=v + 4)
    if ties:
        x = with_topk_ties(x)
    x = _on(x)
    # k = V sorts the whole row: kept to V <= 41, the bitonic network is slow in the interpreter
    for k, tau in ((1, 1.0), (min(3, v), 0.7), (v if v <= 41 or CUDA else 7, 2.0)):
        values, indices, lse = registry.topk_compress(x.reshape(-1, v), k, tau, "triton")
        want_values, want_indices, want_lse = reference.topk_compress(x.reshape(-1, v), k, tau)
        assert indices.dtype == torch.int32
        assert torch.equal(indices.long(), want_indices)
        assert torch.equal(values, want_values)  # the same IEEE division: bitwise equal
        tol = LOSS_TOL[dtype]
        torch.testing.assert_close(lse, want_lse, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_compress_nan_ranks_first_and_signed_zeros_tie(dtype):
    x = _on(torch.tensor([[1.0, float("nan"), -0.0, 0.0, float("-inf"), float("nan"), 2.0, -0.0]],
                         dtype=dtype))
    values, indices, _ = registry.topk_compress(x, 8, 1.0, "triton")
    _, want_indices, _ = reference.topk_compress(x, 8, 1.0)
    assert indices.tolist() == [[1, 5, 6, 0, 2, 3, 7, 4]] == want_indices.tolist()
    assert values[0, :2].isnan().all()
    assert values[0, 2:].tolist() == [2.0, 1.0, 0.0, 0.0, 0.0, float("-inf")]


def test_topk_compress_strided_rows_and_public_api():
    x = _on(make_logits((4, 3, 2, 50), seed=22))
    view = x[..., ::2]  # rows of 25 classes with column stride 2, still a view after reshape
    got = mhd_fast.topk_compress(view, 7, tau=1.3, value_dtype=torch.float16, backend="triton")
    want = mhd_fast.topk_compress(view, 7, tau=1.3, value_dtype=torch.float16, backend="torch")
    assert got.indices.dtype == torch.int16 and got.values.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    torch.testing.assert_close(got.lse, want.lse)


# ---- errors --------------------------------------------------------------------------------

def test_backend_errors_name_the_argument():
    z = _on(make_logits((3, 2, 2, 5), seed=23))
    lse, logconf = registry.teacher_stats(z, 1.0, "triton")
    adj = _on(make_graph("complete", 3))
    idx, _ = registry.select(logconf, adj, False, "triton")
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        triton_backend.distill_fwd(z, z[:, :1], lse, logconf, idx, adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="idx must be int64"):
        triton_backend.distill_fwd(z, z, lse, logconf, idx.int(), adj, 1.0, False, "mean")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        triton_backend.distill_fwd(z, z, lse, logconf, idx, adj, 1.0, False, "median")
    with pytest.raises(ValueError, match="adj must be a bool tensor"):
        triton_backend.select(logconf, adj.int(), False)
    with pytest.raises(ValueError, match="lse_t must have shape"):
        triton_backend.distill_fwd(z, z, lse[:1], logconf, idx, adj, 1.0, False, "mean")
    values = _on(torch.zeros(3, 2, 2, 6))
    with pytest.raises(ValueError, match="values must be"):
        triton_backend.distill_topk_fwd(z, values, values.int(), lse, logconf, idx, adj, 1.0,
                                        False, "mean")
    with pytest.raises(ValueError, match="k must be an integer"):
        triton_backend.topk_compress(z.reshape(-1, 5), 6, 1.0)


# ---- torch.library and torch.compile -------------------------------------------------------

def test_opcheck_every_op():
    """Every op with backend="triton" (tiny shapes, so it runs in the interpreter too)."""
    opcheck_every_op("triton", "cuda" if CUDA else "cpu", v=300 if CUDA else 10, k=8)


# ---- GPU: full sizes and fp64 gradcheck over several column tiles --------------------------

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
    assert_matches_reference(z, teacher, make_graph(graph, n).cuda(), tau=2.0, aggregate=aggregate)


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
            lambda x: mhd_fast.distill_loss(x, teacher, adj, tau=0.5, aggregate=aggregate,
                                            backend="triton"), (z,), fast_mode=True)


@pytest.mark.parametrize("packet", [False, True])
def test_torch_compile_fullgraph_with_backward(packet):
    """torch.compile(fullgraph=True) of a step calling mhd_loss(backend="triton") with backward
    equals the eager step (tiny shapes in the interpreter, larger on CUDA)."""
    n, h1, b, v = (6, 3, 8, 1000) if CUDA else (4, 3, 4, 50)
    z = _on(make_logits((n, h1, b, v), torch.bfloat16, seed=28))
    t = _on(make_logits((n, h1, b, v), torch.bfloat16, seed=29))
    teacher = (mhd_fast.topk_compress(t, 16, value_dtype=torch.bfloat16, backend="triton")
               if packet else t)
    adj = _on(make_graph("complete", n))

    def step(x):
        return mhd_fast.mhd_loss(x, teacher, adj, tau=2.0, reduction="mean", backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    x1 = z.clone().requires_grad_()
    x2 = z.clone().requires_grad_()
    loss = compiled(x1)
    loss.backward()
    want = step(x2)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad)
    ref = mhd_fast.mhd_loss(z, teacher, adj, tau=2.0, reduction="mean", backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
