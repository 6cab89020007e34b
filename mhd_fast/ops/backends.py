"""Which backend runs an op: availability, the choice for ``backend="auto"``, and the
launchers of a compiled backend.

``torch`` is the readable reference (``reference.py``) and always runs. ``cpp`` is the C++
extension ``mhd_fast._C`` through the launchers of ``cpp.py``; ``triton`` is the package
``triton/`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Both launcher
modules implement the same functions, the kernel contract the op modules call (see
``distill.py``, ``select.py`` and ``topk.py`` for what each function takes and returns).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "cpp", "triton")

_LAUNCHERS = {"cpp": "mhd_fast.ops.cpp", "triton": "mhd_fast.ops.triton"}
_AVAILABLE: dict[str, str | None] = {"torch": None}  # backend -> None or why it cannot run
_WARNED: set[str] = set()
_MODULES: dict = {}


def _probe(name: str) -> str | None:
    if name == "cpp":
        try:
            from .. import _C  # noqa: F401
        except ImportError as e:
            return f"the C++ extension mhd_fast._C is not built ({e}); reinstall with `pip install -e .`"
        return None
    try:
        import triton  # noqa: F401
        launchers("triton")
    except ImportError as e:
        return f"Triton is not usable ({e}); install it with `pip install triton`"
    return None


def backend_available(name: str) -> str | None:
    """None when the backend can run here, else the reason it cannot (probed once)."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")
    if name not in _AVAILABLE:
        _AVAILABLE[name] = _probe(name)
    return _AVAILABLE[name]


def _warn_fallback(wanted: str, reason: str) -> None:
    if wanted not in _WARNED:  # one warning per process
        _WARNED.add(wanted)
        warnings.warn(f"mhd_fast: backend 'auto' falls back to 'torch': {reason}", RuntimeWarning,
                      stacklevel=4)


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: 'torch', 'cpp' or 'triton'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        wanted = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        if wanted == "torch":
            return "torch"
        reason = backend_available(wanted)
        if reason is not None:
            _warn_fallback(wanted, reason)
            return "torch"
        return wanted
    if backend == "torch":
        return backend
    reason = backend_available(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and not _triton_runs_on(device):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return backend


def launchers(backend: str):
    """The launcher module of a compiled backend ('cpp' or 'triton'), imported on first use."""
    module = _MODULES.get(backend)
    if module is None:
        module = _MODULES[backend] = importlib.import_module(_LAUNCHERS[backend])
    return module


_functorch_level = torch._C._functorch.peek_interpreter_stack


def in_func_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, jacrev, ...): torch.library's autograd
    does not compose with them in this torch, the reference's ops do."""
    return not torch.compiler.is_compiling() and _functorch_level() is not None
