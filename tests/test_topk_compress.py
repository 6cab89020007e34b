"""topk_compress on every backend against the torch reference: exact values and indices (ties
to the lower index, NaN first, −0 = +0), lse to rounding, wire dtypes, strides, bad input."""
from __future__ import annotations

import pytest
import torch

import mhd_fast
from mhd_fast.ops import reference, topk

from cases import (CUDA, DTYPES, INTERPRETER_WARNINGS, LOSS_TOL, TAUS, VOCABS, backend_params, device_of,
                   make_logits, param, with_topk_ties)

pytestmark = INTERPRETER_WARNINGS
COMPILED = backend_params(("cpp", "triton"))
TINY_VOCABS = (1, 2, 10, 41, 300)


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


def _cases() -> list:
    """cpp: every dtype × vocabulary (and 40000, int32 indices) × τ × wire dtype, k on both
    sides of its containers' switch (k <= 8: a sorted array, else a heap). torch and triton:
    every dtype and tiny vocabulary once, with and without ties, three (k, τ), and k = V only up
    to V = 41 in the interpreter (its bitonic network is slow there)."""
    out = []
    for dtype in DTYPES + (torch.float64,):
        for v in VOCABS + (40000,):
            for tau in TAUS + (0.3,):
                for value_dtype in (None, torch.float16, torch.bfloat16):
                    ks = sorted({k for k in (1, 2, 8, 9, max(1, v // 2), v if v < 10000 else 32) if k <= v})
                    out.append(param("cpp", dtype, v, value_dtype, tuple((k, tau) for k in ks), True,
                                     id=f"cpp-{dtype}-{v}-{tau}-{value_dtype}"))
    for i, dtype in enumerate(DTYPES + (torch.float64,)):
        for j, v in enumerate(TINY_VOCABS):
            kts = ((1, 1.0), (min(3, v), 0.7), (v if v <= 41 or CUDA else 7, 2.0))
            for backend in ("torch", "triton"):
                out.append(param(backend, dtype, v, None, kts, bool((i + j) % 2), id=f"{backend}-{dtype}-{v}"))
    return out


@pytest.mark.parametrize("backend,dtype,v,value_dtype,kts,ties", _cases())
def test_topk_compress_matches_reference(backend, dtype, v, value_dtype, kts, ties):
    """Exact values and indices (ties on a coarse grid -> lower index first), close lse; the
    custom op's rows in the accumulation dtype (fp64 for fp64 logits) exact too."""
    rows = 3 if v > 10000 else (20 if backend == "cpp" else 4)
    x = make_logits((2, rows, v), dtype, seed=v + 4)
    if ties:
        x = with_topk_ties(x)
    x = x.to(device_of(backend))
    rtol, atol = (2e-6, 2e-6) if backend == "cpp" else LOSS_TOL[dtype]
    for k, tau in kts:
        want = mhd_fast.topk_compress(x, k, tau=tau, value_dtype=value_dtype, backend="torch")
        got = mhd_fast.topk_compress(x, k, tau=tau, value_dtype=value_dtype, backend=backend)
        assert got.values.dtype == want.values.dtype and got.indices.dtype == want.indices.dtype
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.values, want.values)  # the same IEEE division: bitwise equal
        torch.testing.assert_close(got.lse, want.lse, rtol=rtol, atol=atol)
        if backend != "torch" and value_dtype is None:
            values, indices, lse = topk.compress_rows(x.reshape(-1, v), k, tau, backend)
            want_values, want_indices, want_lse = reference.topk_compress(x.reshape(-1, v), k, tau)
            assert indices.dtype == torch.int32 and torch.equal(indices.long(), want_indices)
            assert torch.equal(values, want_values)
            torch.testing.assert_close(lse, want_lse, rtol=rtol, atol=atol)


def test_topk_compress_ties_go_to_lower_index(backend):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device=device_of(backend))
    values, indices, lse = mhd_fast.topk_compress(x, 3, backend=backend)
    assert indices.tolist() == [[1, 2, 4]]
    assert values.tolist() == [[3.0, 3.0, 3.0]]
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))


@pytest.mark.parametrize("backend", backend_params(("cpp", "torch")))
def test_topk_index_dtype_follows_vocabulary(backend):
    device = device_of(backend)
    assert mhd_fast.topk_compress(torch.randn(2, 32767, device=device), 2, backend=backend).indices.dtype == torch.int16
    assert mhd_fast.topk_compress(torch.randn(2, 32768, device=device), 2, backend=backend).indices.dtype == torch.int32


def test_nan_and_inf_in_topk_compress(backend):
    """NaN ranks first (by index), −inf ties by index; lse NaN for rows with NaN or +inf on the
    compiled backends (torch: +inf), −inf for a row of all −inf."""
    x = make_logits((4, 50), seed=12)
    x[0, 7] = float("nan")
    x[0, 30] = float("nan")
    x[1, 3] = float("inf")
    x[2, :] = float("-inf")
    x[3, 10:] = float("-inf")
    x = x.to(device_of(backend))
    for k in (3, 12):  # the sorted-array and the heap container of the cpp kernel
        want = mhd_fast.topk_compress(x, k, backend="torch")
        got = mhd_fast.topk_compress(x, k, backend=backend)
        assert torch.equal(got.indices, want.indices)
        assert got.indices[0, :2].tolist() == [7, 30]
        assert torch.equal(torch.isnan(got.values), torch.isnan(want.values))
        assert torch.isnan(got.lse[0]) and (torch.isnan(got.lse[1]) or backend == "torch")
        assert got.lse[2] == float("-inf")
        torch.testing.assert_close(got.lse[3], want.lse[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_compress_nan_ranks_first_and_signed_zeros_tie(backend, dtype):
    x = torch.tensor([[1.0, float("nan"), -0.0, 0.0, float("-inf"), float("nan"), 2.0, -0.0]], dtype=dtype,
                     device=device_of(backend))
    values, indices, _ = mhd_fast.topk_compress(x, 8, value_dtype=torch.float32, backend=backend)
    assert indices.tolist() == [[1, 5, 6, 0, 2, 3, 7, 4]]
    assert values[0, :2].isnan().all()
    assert values[0, 2:].tolist() == [2.0, 1.0, 0.0, 0.0, 0.0, float("-inf")]


def test_topk_compress_strided_rows(backend):
    """Rows whose class dim has a stride (a transposed store, every other class) give the bits
    of their contiguous copy; wire dtypes as asked."""
    device = device_of(backend)
    x = make_logits((4, 3, 2, 50), seed=22).to(device)
    view = x[..., ::2]  # rows of 25 classes with column stride 2, still a view after reshape
    got = mhd_fast.topk_compress(view, 7, tau=1.3, value_dtype=torch.float16, backend=backend)
    want = mhd_fast.topk_compress(view.contiguous(), 7, tau=1.3, value_dtype=torch.float16, backend=backend)
    assert got.indices.dtype == torch.int16 and got.values.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    ref = mhd_fast.topk_compress(view, 7, tau=1.3, value_dtype=torch.float16, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got[:2], ref[:2]))
    torch.testing.assert_close(got.lse, ref.lse)
    xt = make_logits((23, 15), seed=9).to(device).T  # [R, V] rows with class stride R
    if backend != "torch":  # the compiled backends read through the strides: the same bits
        got = mhd_fast.topk_compress(xt, 4, tau=0.9, backend=backend)
        want = mhd_fast.topk_compress(xt.contiguous(), 4, tau=0.9, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_topk_compress(backend):
    x = make_logits((12, 10), torch.bfloat16, seed=14).to(device_of(backend))
    torch.library.opcheck(topk.compress_rows, (x, 4, 1.3, backend))


@pytest.mark.parametrize("make_call,argument", [
    (lambda x, be: mhd_fast.topk_compress(x, 0, backend=be), "k"),
    (lambda x, be: mhd_fast.topk_compress(x, 7, backend=be), "k"),
    (lambda x, be: mhd_fast.topk_compress(x, True, backend=be), "k"),
    (lambda x, be: mhd_fast.topk_compress(x, 2, tau=0, backend=be), "tau"),
    (lambda x, be: mhd_fast.topk_compress(x, 2, value_dtype=torch.float64, backend=be), "value_dtype"),
    (lambda x, be: mhd_fast.topk_compress(x.int(), 2, backend=be), "logits"),
    (lambda x, be: mhd_fast.topk_compress(x[..., :0], 1, backend=be), "logits"),
    (lambda x, be: mhd_fast.topk_compress(x[0, 0, 0, 0], 1, backend=be), "logits"),
])
def test_bad_input_raises_value_error_naming_the_argument(backend, make_call, argument):
    x = make_logits((3, 2, 4, 6), seed=1).to(device_of(backend))
    with pytest.raises(ValueError, match=argument):
        make_call(x, backend)
