"""Recycled buffers for the large gradients of the CPU backend.

The unit gradient of ``distill_dense`` is as large as the student logits (6.5 MB on the S1
shape, 131 MB at V = 32000) and comes back every step. A fresh tensor of that size is fresh
pages from the kernel: glibc hands large blocks back to the system when they are freed (unless
told otherwise, as ``mhd-fast`` does), and the next step faults every 4 KiB page in again, 260
to 520 faults a call on S1 in the benchmark's loop. The pool keeps a few such buffers and hands
one out again once nothing outside the pool refers to its memory: the storage's use count,
which counts every tensor on it (views, ``.grad``, saved tensors, numpy arrays and DLPack
capsules hold a tensor), has fallen back to the pool's own reference, and no one holds the
storage object.

The kernels write every element of the buffers they are given, so nothing of an earlier call
can show through. Two callers take buffers from here: cpp's ``distill_dense`` (the unit
gradient) and the dZ of the backward custom ops on CPU (``distill._grad_buffer``).
``MHD_FAST_POOL_MIB`` caps what the pool may hold (default 256; 0 turns it off), and
``clear()`` lets it go.

A new buffer of 4 MiB or more starts on a 2 MiB boundary and is offered to the kernel for
transparent huge pages before its first write (Linux, where THP is enabled or on madvise): a
kernel call that walks it right after other work has flushed the caches takes a few hundred
page walks fewer.
"""
from __future__ import annotations

import math
import os
import sys
import threading

import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # smaller outputs come from the allocator's free lists without faults


def _cap_bytes() -> int:
    raw = os.environ.get("MHD_FAST_POOL_MIB", "256")
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"MHD_FAST_POOL_MIB must be a whole number of MiB, got {raw!r}") from None
    if mib < 0:
        raise ValueError(f"MHD_FAST_POOL_MIB must be >= 0, got {mib}")
    return mib << 20


class _Entry:
    """A pooled buffer with what its idleness test reads: its storage object and the storage's
    C pointer (torch keeps one Python object per storage, so the storage object a user holds is
    this one, and shows in its reference count), the bytes the storage holds, and the dtype and
    bytes the buffer serves."""

    __slots__ = ("buf", "storage", "cdata", "held", "dtype", "nbytes")

    def __init__(self, buf: Tensor) -> None:
        self.buf = buf
        self.storage = buf.untyped_storage()
        self.cdata = self.storage._cdata
        self.held = self.storage.nbytes()
        self.dtype = buf.dtype
        self.nbytes = buf.nbytes


def _refs(entry: _Entry) -> tuple[int, int]:
    """(references to the storage from C++: tensors and storage objects; Python references to
    its storage object)."""
    return torch._C._storage_Use_Count(entry.cdata), sys.getrefcount(entry.storage)


with torch._C._DisableFuncTorch():  # a plain tensor even when first imported inside a torch.func transform
    _ALONE = _refs(_Entry(torch.empty(1)))  # a buffer nothing but its entry refers to


def _idle(entry: _Entry) -> bool:
    """Whether only the pool refers to the buffer's memory."""
    return _refs(entry) == _ALONE


class OutputPool:
    """Buffers of the last shapes asked for, handed out again when idle (see the module)."""

    def __init__(self, cap_bytes: int | None = None) -> None:
        self._cap = _cap_bytes() if cap_bytes is None else cap_bytes
        self._entries: list[_Entry] = []  # least recently handed out first
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return sum(e.held for e in self._entries)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialized contiguous CPU tensor of shape and dtype, not shared with any live
        tensor; its memory may be an idle buffer of the pool."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES or nbytes > self._cap:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            entries = self._entries
            for i, e in enumerate(entries):
                if e.nbytes == nbytes and e.dtype == dtype and _idle(e):
                    if i != len(entries) - 1:
                        entries.append(entries.pop(i))
                    return _share(e.buf, shape)
            shape = tuple(int(s) for s in shape)
            entry = _Entry(_fresh(shape, dtype, nbytes))
            # make room: drop idle buffers, least recently used first; if the busy ones fill
            # the cap, this one is not kept
            held = self.held_bytes
            for old in [e for e in entries if _idle(e)]:
                if held + entry.held <= self._cap:
                    break
                entries.remove(old)
                held -= old.held
            if held + entry.held <= self._cap:
                entries.append(entry)
                return _share(entry.buf, shape)
            return entry.buf

    def clear(self) -> None:
        """Let every buffer go (the ones still in use live on with their users)."""
        with self._lock:
            self._entries.clear()


HUGE_PAGE = 2 << 20


def _fresh(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> Tensor:
    """A new contiguous tensor for the pool; from two huge pages on, 2 MiB-aligned on memory
    advised for transparent huge pages before anything touches it (see the module)."""
    try:
        from .. import _C
        advise = _C.advise_huge_pages
    except (ImportError, AttributeError):
        advise = None
    if advise is None or nbytes < 2 * HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty((nbytes + HUGE_PAGE,), dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    advise(raw.data_ptr() + start, (nbytes + HUGE_PAGE - start) // 4096 * 4096)
    return torch.empty((0,), dtype=dtype).set_(raw.untyped_storage(), start // dtype.itemsize, shape)


def _share(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A new tensor (not a view: no _base) on buf's memory, contiguous in shape: buf.detach()
    when the shape is buf's (one op; it shares buf's version counter, which nobody else
    reads once the buffer is idle), else a tensor set onto buf's storage (two)."""
    if buf.shape == shape:
        return buf.detach()
    return torch.empty((0,), dtype=buf.dtype).set_(buf.untyped_storage(), buf.storage_offset(), shape)


POOL = OutputPool()


def clear() -> None:
    """Let the pool's buffers go."""
    POOL.clear()
