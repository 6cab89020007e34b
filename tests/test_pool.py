"""The gradient pool of the CPU backend (mhd_fast/ops/pool.py): a buffer comes back only when
nothing else refers to its memory, and gradients handed out earlier never change."""
import numpy as np
import pytest
import torch

import mhd_fast
from mhd_fast.ops import pool as pool_mod
from mhd_fast.ops.pool import OutputPool

SHAPE = (4, 3, 128, 256)  # 1.5 MiB of fp32: large enough to be pooled


def test_an_idle_buffer_is_handed_out_again():
    p = OutputPool(cap_bytes=64 << 20)
    a = p.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    assert a.shape == SHAPE and a.is_contiguous() and a._base is None
    del a
    b = p.empty(SHAPE, torch.float32)
    assert b.data_ptr() == ptr
    assert p.held_bytes == b.nbytes


@pytest.mark.parametrize("holder", ["tensor", "view", "storage", "numpy", "saved", "grad"])
def test_a_buffer_still_referred_to_is_not_handed_out(holder):
    p = OutputPool(cap_bytes=64 << 20)
    a = p.empty(SHAPE, torch.float32)
    a.fill_(3.0)
    if holder == "tensor":
        keep = a
    elif holder == "view":
        keep = a[1:, :, :5]
    elif holder == "storage":
        keep = a.untyped_storage()
    elif holder == "numpy":
        keep = a.numpy()
    elif holder == "saved":  # a tensor saved for backward by autograd
        w = torch.ones((), requires_grad=True)
        keep = w * a
    else:
        x = torch.zeros(SHAPE, requires_grad=True)
        x.grad = a
        keep = x
    del a
    b = p.empty(SHAPE, torch.float32)
    b.fill_(-1.0)
    if holder == "numpy":
        assert np.all(keep == 3.0)
    elif holder == "grad":
        assert torch.all(keep.grad == 3.0)
    elif holder == "saved":
        (g,) = torch.autograd.grad(keep.sum(), w)
        assert g.item() == 3.0 * b.numel()
    elif holder == "storage":
        assert torch.all(torch.tensor([], dtype=torch.float32).set_(keep) == 3.0)
    else:
        assert torch.all(keep == 3.0)


def test_small_outputs_and_the_cap():
    p = OutputPool(cap_bytes=4 << 20)
    small = p.empty((10, 10), torch.float32)
    assert p.held_bytes == 0 and small.shape == (10, 10)
    a = p.empty(SHAPE, torch.float32)  # 1.5 MiB: kept
    b = p.empty(SHAPE, torch.float32)  # a is busy: a second one, 3 MiB held
    assert p.held_bytes == 2 * a.nbytes and a.data_ptr() != b.data_ptr()
    c = p.empty(SHAPE, torch.float32)  # both busy, no room: not kept
    assert p.held_bytes == 2 * a.nbytes
    del a
    d = p.empty((2,) + SHAPE[1:], torch.float64)  # same bytes, other dtype: a new buffer, the idle a makes room
    assert p.held_bytes == b.nbytes + d.nbytes
    assert c.shape == SHAPE
    p.clear()
    assert p.held_bytes == 0
    off = OutputPool(cap_bytes=0)
    assert off.empty(SHAPE, torch.float32).shape == SHAPE and off.held_bytes == 0


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MHD_FAST_POOL_MIB", "0")
    assert OutputPool().empty(SHAPE, torch.float32) is not None
    monkeypatch.setenv("MHD_FAST_POOL_MIB", "lots")
    with pytest.raises(ValueError, match="MHD_FAST_POOL_MIB"):
        OutputPool()
    monkeypatch.setenv("MHD_FAST_POOL_MIB", "-1")
    with pytest.raises(ValueError, match="MHD_FAST_POOL_MIB"):
        OutputPool()


@pytest.mark.skipif(mhd_fast.backend_available("cpp") is not None, reason="mhd_fast._C not built")
def test_a_large_buffer_starts_on_a_huge_page_and_comes_back_whole():
    """A buffer of two huge pages or more starts 2 MiB-aligned inside a slightly larger block
    (advised for transparent huge pages where the system has them); it is handed out again at
    its own offset, every byte writable, and counted with its slack against the cap."""
    shape = (2, 3, 256, 1000)  # 5.9 MiB of fp32
    p = OutputPool(cap_bytes=64 << 20)
    a = p.empty(shape, torch.float32)
    assert a.data_ptr() % pool_mod.HUGE_PAGE == 0 and a.shape == shape and a.is_contiguous()
    assert a.untyped_storage().nbytes() == a.nbytes + pool_mod.HUGE_PAGE
    assert p.held_bytes == a.untyped_storage().nbytes()
    a.fill_(1.0)
    ptr, offset = a.data_ptr(), a.storage_offset()
    del a
    b = p.empty(shape, torch.float32)
    assert (b.data_ptr(), b.storage_offset()) == (ptr, offset) and b._base is None
    b.fill_(2.0)
    assert torch.all(b == 2.0)
    small = p.empty((256, 1024), torch.float32)  # 1 MiB: pooled, no alignment asked for
    assert small.untyped_storage().nbytes() == small.nbytes
    with pytest.raises(ValueError, match="page-aligned"):
        mhd_fast._C.advise_huge_pages(ptr + 8, 4096)


@pytest.mark.skipif(mhd_fast.backend_available("cpp") is not None, reason="mhd_fast._C not built")
def test_gradients_handed_out_earlier_never_change():
    """mhd_loss on cpp takes its unit gradient from the pool: a gradient the user
    keeps is not overwritten by the next step, .grad accumulates, and every step's gradient is
    the reference's."""
    g = torch.Generator().manual_seed(0)
    adj = ~torch.eye(SHAPE[0], dtype=torch.bool)
    zs = [(torch.randn(SHAPE, generator=g) * 2).requires_grad_() for _ in range(3)]
    t = torch.randn(SHAPE, generator=g) * 3
    pool_mod.clear()
    kept = []
    for z in zs:
        (grad,) = torch.autograd.grad(mhd_fast.mhd_loss(z, t, adj, reduction="sum", backend="cpp"), z)
        kept.append(grad)
    for z, grad in zip(zs, kept):
        (want,) = torch.autograd.grad(mhd_fast.mhd_loss(z, t, adj, reduction="sum", backend="torch"), z)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=2e-6)
    assert len({k.data_ptr() for k in kept}) == 3  # all alive: three buffers
    ptr = kept[0].data_ptr()
    del kept, grad
    (again,) = torch.autograd.grad(mhd_fast.mhd_loss(zs[0], t, adj, reduction="sum", backend="cpp"), zs[0])
    assert again.data_ptr() == ptr  # idle again: reused
    z = zs[1]
    for _ in range(2):
        mhd_fast.mhd_loss(z, t, adj, reduction="sum", backend="cpp").backward()
    (one,) = torch.autograd.grad(mhd_fast.mhd_loss(z, t, adj, reduction="sum", backend="cpp"), z)
    torch.testing.assert_close(z.grad, 2 * one, rtol=0, atol=0)
    assert z.grad.data_ptr() != one.data_ptr()


@pytest.mark.skipif(mhd_fast.backend_available("cpp") is not None, reason="mhd_fast._C not built")
@pytest.mark.parametrize("teacher_kind", ["topk", "dense"])
def test_pooled_gradients_of_the_custom_ops_never_change(teacher_kind):
    """The backward of the top-k packets takes dZ from the pool, the dense op its unit
    gradient: kept gradients stay as they were, and each one is the reference's."""
    g = torch.Generator().manual_seed(1)
    adj = ~torch.eye(SHAPE[0], dtype=torch.bool)
    t = torch.randn(SHAPE, generator=g) * 3
    teacher = mhd_fast.topk_compress(t, 8, backend="torch") if teacher_kind == "topk" else t
    zs = [(torch.randn(SHAPE, generator=g) * 2).requires_grad_() for _ in range(3)]
    pool_mod.clear()
    kept = [torch.autograd.grad(mhd_fast.mhd_loss(z, teacher, adj, reduction="sum", backend="cpp"), z)[0]
            for z in zs]
    assert len({k.data_ptr() for k in kept}) == 3
    for z, grad in zip(zs, kept):
        (want,) = torch.autograd.grad(mhd_fast.mhd_loss(z, teacher, adj, reduction="sum", backend="torch"), z)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=2e-6)
