"""The CPU backend's internals: every ISA build the CPU runs (portable, AVX2, AVX-512) against
the reference, rows run a vector at a time (groups, lanes) against one row at a time bit for
bit, the one-launch kernels against the separate ones, thread counts, and the launchers'
memory-safety checks. The public contract of each op, on every backend, is in the op's own
test file.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import mhd_fast
from mhd_fast.ops import cpp, distill, reference
from mhd_fast.ops.select import select, teacher_stats

from cases import (AGGREGATES, GRAPH_CASES, assert_matches_reference, make_case, make_graph,
                   make_logits, unavailable, with_topk_ties)

pytestmark = pytest.mark.skipif(unavailable("cpp") is not None, reason="mhd_fast._C not built")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (see test_mhd_loss.py); the threaded launch is tested
    in test_results_are_bit_identical_run_to_run_and_across_thread_counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _isas() -> list[str]:
    if unavailable("cpp") is not None:
        return []
    from mhd_fast import _C
    return list(_C.isas())


@pytest.fixture(params=_isas())
def isa(request):
    """Run the cpp kernels on one ISA build, then restore the default (the widest)."""
    from mhd_fast import _C
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(_C.isas()[-1])


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("v", [2, 41])
def test_every_isa_build_matches_reference(isa, teacher_kind, v):
    """Every ISA build (portable, AVX2, AVX-512) agrees with the reference; V = 41 ends in a
    partial vector on each."""
    for dtype, aggregate, (graph, include_self) in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16), AGGREGATES, GRAPH_CASES):
        z, t, adj = make_case(dtype, v, graph, seed=3)
        teacher = t if teacher_kind == "dense" else mhd_fast.topk_compress(t, v // 2 + 1, tau=0.5, backend="torch")
        assert_matches_reference(z, teacher, adj, "cpp", tau=0.5, include_self=include_self,
                                  aggregate=aggregate)


@pytest.mark.parametrize("v", [1, 2, 10, 100, 5000])
def test_row_lse_within_two_ulp_on_every_isa(isa, v):
    """A row's lse = max + log(sum of exps), the log the kernels' own vector log (one vector
    call for a group of rows): within 2 ulp of fp64 logsumexp (measured: at most 1 ulp) on every
    ISA build, one block (rows kept in groups) and many (V = 5000), and exactly the max for
    V = 1 (log 1 = 0)."""
    t = torch.randn(4, 2, 64, v, generator=torch.Generator().manual_seed(v)) * 4
    lse, logconf = teacher_stats(t, 1.0, "cpp")
    want = torch.logsumexp(t.double(), dim=-1)
    err = (lse.double() - want).abs() / want.abs().clamp(min=1)
    assert float(err.max()) <= 4 * 2.0 ** -24
    if v == 1:
        assert torch.equal(lse, t[..., 0]) and torch.equal(logconf, torch.zeros_like(logconf))


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
    idx = distill.distill_dense(z, t[:, :-1], adj, 1, 0.7, False, "max_confidence", False, "none", "cpp")[5]
    assert torch.equal(idx, want[0])


def test_results_are_bit_identical_run_to_run_and_across_thread_counts():
    n, h1, b, v = 8, 3, 64, 300  # enough rows for a multi-threaded launch
    z, t, adj = make_case(torch.float32, v, "complete", n=n, h1=h1, b=b)
    packet = mhd_fast.topk_compress(t, 16, backend="torch")
    threads = torch.get_num_threads()

    def run():
        out = []
        for teacher, aggregate in itertools.product((t, packet), AGGREGATES):
            zz = z.clone().requires_grad_()
            loss = mhd_fast.mhd_loss(zz, teacher, adj, aggregate=aggregate, backend="cpp")
            (g,) = torch.autograd.grad(loss, zz, torch.ones_like(loss))
            out += [loss, g]
        return out + list(mhd_fast.topk_compress(t, 16, backend="cpp"))

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [7, 4096, 4097])
def test_cpp_zero_rows_fills_the_heads_and_nothing_else(isa, dtype, v):
    """cpp.zero_ (the heads of a gradient that do not learn): head 0 of a NaN-filled tensor
    becomes +0 and the other heads keep every bit. 64 MiB at V = 4096 fp32 takes the
    non-temporal path (head 0 is 8 MiB, rows 16-byte aligned); V = 4097 and bf16 the memset."""
    x = torch.full((8, 4, 128, v), float("nan"), dtype=dtype)
    head = x[:, :1]
    assert cpp.zero_(head) is head
    assert torch.equal(x[:, :1], torch.zeros_like(x[:, :1]))
    assert not torch.signbit(x[:, :1]).any()
    assert torch.isnan(x[:, 1:]).all()
    cpp.zero_(x[:, 4:])  # an empty slice: nothing to do


# ---- the one-launch dense loss of cpp ----------------------------------------------------------

@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("v", [7, 600])  # one block of the online softmax (terms kept), and two
def test_fused_dense_statistics_and_choice_equal_the_separate_ops(aggregate, v):
    """cpp's distill_dense (statistics, choice, loss and unit gradient in one launch, tiled over
    rows) writes the statistics and the choice of the separate ops bit for bit, and zeros in
    the gradient where nothing learns (loss and gradient: against the reference in
    test_mhd_loss)."""
    n, h1, b, tau = 6, 3, 40, 0.7
    z, t, adj = make_case(torch.float32, v, "lonely", n=n, h1=h1, b=b)
    t = t[:, :-1]
    loss, lse_z, unit, lse_t, logconf_t, idx = distill.distill_dense(z, t, adj, 1, tau, False, aggregate, True,
                                                                     "none", "cpp")
    want_lse_t, want_logconf_t = teacher_stats(t, tau, "cpp")
    want_idx, _ = select(want_logconf_t, adj, False, "cpp")
    assert torch.equal(lse_t, want_lse_t) and torch.equal(logconf_t, want_logconf_t)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(lse_z, torch.logsumexp(z[:, 1:] / tau, -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(unit[:, 0], torch.zeros_like(unit[:, 0]))  # head 0 does not learn
    assert torch.equal(unit[0], torch.zeros_like(unit[0]))  # client 0 has no candidate
    nograd = distill.distill_dense(z, t, adj, 1, tau, False, aggregate, False, "none", "cpp")
    assert nograd[2].numel() == 0
    for a, b_ in zip(nograd[:2] + nograd[3:], (loss, lse_z, lse_t, logconf_t, idx)):
        assert torch.equal(a, b_)


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
    z, t, adj = make_case(torch.float32, v, "lonely", n=n, h1=h1, b=b, seed=v)
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
        grouped = distill.distill_dense(z, t, adj, 1, tau, False, aggregate, need_grad, "none", "cpp")
        one_by_one = distill.distill_dense(zs, ts, adj, 1, tau, False, aggregate, need_grad, "none", "cpp")
        for got, want in zip(grouped, one_by_one):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


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
    z, t, adj = make_case(torch.float32, v, "lonely", n=n, h1=h1, b=b, seed=v + k)
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
    assert_matches_reference(finite, packet, adj, "cpp", tau=tau, aggregate=aggregate)


@pytest.mark.parametrize("k", [1, 5])
def test_topk_teacher_with_blocks_of_no_sent_class(k):
    """A packet whose sent classes all lie in the first block of 512: the student sweep sums
    the unsent mass of the other blocks without the bitmap of sent classes (the same numbers);
    the rest bucket still matches the reference, forward and backward, with a student whose
    mass sits mostly in the sent classes (q_rest small) and one whose mass sits outside them."""
    n, h1, b, v = 3, 2, 3, 1300
    z, t, adj = make_case(torch.float32, v, "complete", n=n, h1=h1, b=b, seed=11)
    t[..., 100:110] += 40.0  # the teacher's top classes, in block 0
    z[0, ..., 100:110] += 12.0  # client 0's student agrees: q_rest small
    packet = mhd_fast.topk_compress(t, k, backend="torch")
    assert int(packet.indices.max()) < 512
    assert_matches_reference(z, packet, adj, "cpp", tau=1.0)
    assert_matches_reference(z, packet, adj, "cpp", tau=2.0, aggregate="mean")


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
    z, t, adj = make_case(torch.float32, v, "complete", n=n, h1=h1, b=b, seed=21)
    t[..., sent] += torch.linspace(24.0, 20.0, len(sent))  # distinct: the packet's order is fixed
    z[0, ..., sent] += 80.0  # client 0's student agrees with its teachers
    packet = mhd_fast.topk_compress(t, len(sent), tau=tau, backend="torch")
    assert sorted(packet.indices[0, 0, 0].tolist()) == sent
    assert_matches_reference(z, packet, adj, "cpp", tau=tau)
    unsent = torch.ones(v, dtype=torch.bool)
    unsent[sent] = False
    q_rest = torch.softmax(z[:, 1:] / tau, dim=-1)[..., unsent].sum(-1)
    p_rest = torch.softmax(t[:, 1:] / tau, dim=-1)[..., unsent].sum(-1)
    assert float(q_rest[0].max()) < 1e-6  # the case that cancels
    assert float(p_rest.min()) > (0.1 if tau == 4.0 else 0.0)

@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("value_dtype,index_dtype,z_dtype", [
    (torch.float32, torch.int32, torch.float32), (torch.bfloat16, torch.int16, torch.float32),
    (torch.float16, torch.int64, torch.bfloat16), (torch.float32, torch.int16, torch.float64)], ids=str)
def test_topk_packets_in_one_call_equal_the_launchers(aggregate, value_dtype, index_dtype, z_dtype):
    """cpp.distill_topk_packets (the packet's rows, the teacher choice and the loss in one
    call, reading the packet's first G heads through pointers) gives the bits of the steps it
    replaces: the packet rows by torch (values in the accumulation dtype, int32 indices,
    reference.packet_stats), cpp.select and the loss launch of _C.distill_fwd; with a strided
    packet (every other row of a larger one), a client without candidate, and any dtypes."""
    z, t, adj = make_case(z_dtype, 37, "lonely", n=5, h1=3, b=4, seed=12)
    big = mhd_fast.topk_compress(torch.cat([t, t.flip(-1)], dim=2), 6, tau=1.5, value_dtype=value_dtype,
                                 backend="cpp")
    values, indices, lse = big.values[:, :, ::2], big.indices[:, :, ::2].to(index_dtype), big.lse[:, :, ::2]
    assert not values.is_contiguous()
    loss, rows, ind32, idx = cpp.distill_topk_packets(z, values, indices, lse, adj, 1.5, False, aggregate,
                                                      head_offset=1)
    dt = reference.acc_dtype(z, values, lse)
    want_values, want_indices = values[:, :2].to(dt), indices[:, :2].to(torch.int32)
    want_lse_t, want_logconf_t = reference.packet_stats(want_values, lse[:, :2])
    want_idx, _ = cpp.select(want_logconf_t, adj, False)
    want_loss, want_lse_z = (torch.empty(want_idx.shape, dtype=dt) for _ in range(2))
    cpp._distill(mhd_fast._C.distill_fwd, z[:, 1:], dt, dict(loss=want_loss.data_ptr(), lse_z=want_lse_z.data_ptr()),
                 values=want_values, indices=want_indices, lse_t=want_lse_t, logconf_t=want_logconf_t, idx=want_idx,
                 adj=adj, tau=1.5, include_self=False, aggregate=aggregate)
    for a, b_ in zip((loss, *rows.unbind(0), ind32, idx),
                     (want_loss, want_lse_t, want_logconf_t, want_lse_z, want_indices, want_idx)):
        assert a.dtype == b_.dtype and a.shape == b_.shape
        assert torch.equal(a, b_)
    assert bool((loss[0] == 0).all())  # client 0 has no candidate


def test_topk_packets_in_one_call_check_their_arguments():
    """The one-call packet forward checks what memory safety needs, naming the argument."""
    z, t, adj = make_case(torch.float32, 20, "ring", n=4, h1=3, b=2, seed=2)
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


@pytest.mark.parametrize("k", [1, 2, 3, 20])
@pytest.mark.parametrize("value_dtype,lse_dtype,index_dtype", [
    (torch.float32, torch.float32, torch.int32), (torch.bfloat16, torch.float32, torch.int16),
    (torch.float16, torch.float64, torch.int64), (torch.float64, torch.float32, torch.int32)], ids=str)
def test_packet_check_in_the_extension_finds_what_the_torch_check_finds(isa, k, value_dtype, lse_dtype,
                                                                        index_dtype):
    """The one-pass packet check of the extension (CPU tensors) against the torch check of the
    other devices: the same index range, repeated class and first bad row with its lse and sum,
    on packets with rows of NaN, ±inf lse, a class sent twice and sums past 1, read through the
    strides of a slice of heads; threads take shares of the rows."""
    from mhd_fast.ops.inputs import _packet_faults
    n, h1, b, v = 5, 3, 300, 40
    t = make_logits((n, h1, b, v), seed=k) * 3
    values, indices, lse = mhd_fast.topk_compress(t, k, backend="torch")
    values, lse, indices = values.to(value_dtype), lse.to(lse_dtype), indices.to(index_dtype)
    cases = [(values, indices, lse)]
    bad_lse = lse.clone()
    bad_lse[3, 1, 200] -= 0.5  # sums past 1
    bad_lse[4, 0, 7] -= 0.01 if k > 1 else 0.5
    bad_lse[0, 0, 0] = float("nan")
    bad_lse[0, 0, 1] = float("-inf")
    bad_lse[0, 0, 2] = float("inf")
    cases.append((values, indices, bad_lse))
    nan_values = values.clone()
    nan_values[1, 1, 5] = float("nan")
    cases.append((nan_values, indices, bad_lse))
    if k > 1:
        twice = indices.clone()
        twice[2, 0, 9, -1] = twice[2, 0, 9, 0]
        cases.append((values, twice, lse))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for vals, ind, l in cases:
                for heads in (slice(None), slice(0, 2)):
                    packet = (vals[:, heads], ind[:, heads], l[:, heads])
                    got = cpp.check_packets(*packet)
                    want = _packet_faults(*packet)
                    assert got[:4] == want[:4]
                    if want[3] >= 0:
                        assert got[4] == want[4] or (got[4] != got[4] and want[4] != want[4])
                        assert got[5] == pytest.approx(want[5], rel=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert cpp.check_packets(values, indices, bad_lse)[3] == (3 * h1 + 1) * b + 200  # NaN and ±inf lse pass
    assert cpp.check_packets(values[:, :2], indices[:, :2], bad_lse[:, :2])[3] == (3 * 2 + 1) * b + 200


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_dense_reduces_in_the_extension(reduction, dtype):
    """A reduced dense loss is summed by the extension (fp64, a fixed order) rather than by a
    torch sum of the rows: the same value to rounding, the same bits with 1 and 2 threads and
    without a gradient, and the gradient of the rows' torch sum bit for bit, for the 1 of
    backward() and for another upstream gradient."""
    z, t, adj = make_case(dtype, 41, "lonely", n=6, h1=4, b=9, seed=4)

    def run(grad_out, reduced=True):
        zz = z.clone().requires_grad_()
        loss = mhd_fast.mhd_loss(zz, t, adj, reduction=reduction if reduced else "none", tau=2.0, backend="cpp")
        if not reduced:
            loss = reference.reduce_loss(loss, reduction)
        (g,) = torch.autograd.grad(loss, zz, grad_out)
        return loss.detach(), g

    rows = mhd_fast.mhd_loss(z, t, adj, tau=2.0, backend="cpp")
    want = rows.sum() if reduction == "sum" else rows.sum() / rows.numel()
    for grad_out in (torch.tensor(1.0, dtype=rows.dtype), torch.tensor(-0.3, dtype=rows.dtype)):
        got = run(grad_out)
        assert got[0].shape == () and got[0].dtype == rows.dtype
        torch.testing.assert_close(got[0], want, rtol=1e-6, atol=0)
        with torch.no_grad():
            assert torch.equal(mhd_fast.mhd_loss(z, t, adj, reduction=reduction, tau=2.0, backend="cpp"), got[0])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = run(grad_out)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(two[0], got[0]) and torch.equal(two[1], got[1])
        by_torch = run(grad_out, reduced=False)
        torch.testing.assert_close(by_torch[0], got[0], rtol=1e-6, atol=0)
        assert torch.equal(by_torch[1], got[1])


def test_cpp_distill_dense_checks_the_heads_it_reads_through_pointers():
    """The launcher forms the student's and teacher's head views by pointer arithmetic, so it
    checks their bounds itself, with or without a gradient buffer (whose heads _C checks)."""
    z, t, adj = make_case(torch.float32, 10, "complete", n=4, h1=3, b=5)
    for head_offset, groups in ((1, 3), (3, 1), (-1, 1), (1, 4)):
        for need_grad in (False, True):
            with pytest.raises(ValueError, match="teacher groups"):
                cpp.distill_dense(z, t, adj, head_offset, 1.0, False, "max_confidence", need_grad, groups=groups)
    with pytest.raises(ValueError, match="teacher groups"):
        cpp.distill_dense(z, t[..., 0], adj, 1, 1.0, False, "max_confidence", False, groups=2)
    with pytest.raises(ValueError, match="sum_divisor"):
        mhd_fast._C.distill_dense(cpp._arg("student", z[:, 1:]), cpp._arg("teacher", t[:, :2]), cpp._arg("adj", adj),
                                  1.0, False, 0, 0, 0, 0, 0, 0, 0, 0, [], 3, 1, 1, 8, 0)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("v", [100, 101])
def test_fused_dense_large_gradient_past_the_caches(v, reduction):
    """A gradient of 4 MiB or more goes out by non-temporal stores where its rows start 16-byte
    aligned (V = 100: whole vectors and a 4-lane tail) and by cached stores where they do not
    (V = 101); both against the reference."""
    z, t, adj = make_case(torch.float32, v, "lonely", n=16, h1=3, b=220)
    assert z.numel() * 4 >= 4 << 20
    assert_matches_reference(z, t, adj, "cpp", reduction=reduction)


def test_kernel_launchers_check_what_memory_safety_needs():
    """The custom ops validate indices and shapes themselves (the API skips its host-syncing
    checks under torch.compile), and reject non-CPU tensors."""
    z, t, adj = make_case(torch.float32, 6, "ring", n=3)
    ts = t[:, :-1]  # the ops take the full student and head offset 1, as mhd_loss calls them
    values, indices, plse = mhd_fast.topk_compress(ts, 2, backend="cpp")
    loss, rows, ind32, idx = distill.distill_topk(z, values, indices, plse, adj, 1, 1.0, False, "max_confidence",
                                                  "cpp")
    lse_t, logconf_t, statistic = rows.unbind(0)

    def packet_bwd(idx=idx, lse_t=lse_t, aggregate="max_confidence"):
        return distill.distill_topk_bwd(torch.ones_like(loss), z, values, ind32, lse_t, logconf_t, idx, adj,
                                        statistic, 1, 1.0, False, aggregate, "cpp")
    with pytest.raises(ValueError, match="idx"):
        packet_bwd(idx=idx + 5)
    with pytest.raises(ValueError, match="indices"):
        distill.distill_topk(z, values, indices - 1, plse, adj, 1, 1.0, False, "max_confidence", "cpp")
    with pytest.raises(ValueError, match="lse_t"):
        packet_bwd(lse_t=lse_t[:, :1])
    with pytest.raises(ValueError, match="adj"):
        select(logconf_t, adj[:2, :2], False, "cpp")
    with pytest.raises(ValueError, match="aggregate"):
        packet_bwd(aggregate="mode")
    with pytest.raises(ValueError, match="teacher"):
        distill.distill_dense(z, ts[:, :, :2], adj, 1, 1.0, False, "max_confidence", True, "none", "cpp")
    with pytest.raises(ValueError, match="teacher"):  # fewer teacher heads than learning student heads
        distill.distill_dense(z, ts[:, :1], adj, 1, 1.0, False, "max_confidence", True, "none", "cpp")
    with pytest.raises(ValueError, match="adj"):
        distill.distill_dense(z, ts, adj[:2, :2], 1, 1.0, False, "max_confidence", True, "none", "cpp")
    with pytest.raises(ValueError, match="tau"):
        distill.distill_dense(z, ts, adj, 1, 0.0, False, "max_confidence", True, "none", "cpp")
    with pytest.raises(ValueError, match="aggregate"):
        distill.distill_dense(z, ts, adj, 1, 1.0, False, "mode", True, "none", "cpp")
