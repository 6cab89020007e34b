"""mhd_fast: decentralized learning with multi-headed distillation, fused for all clients.

The public API (docs/method.md §7)::

    mhd_fast.select_teachers(teacher_logits, adj, *, tau=1.0, include_self=False)
    mhd_fast.mhd_loss(student_logits, teacher, adj, *, tau=1.0, include_self=False,
                      aggregate="max_confidence", reduction="none", backend="auto")
    mhd_fast.distill_loss(student_logits, teacher, adj, **same_options)
    mhd_fast.topk_compress(logits, k, *, tau=1.0, value_dtype=None)
    mhd_fast.simulate(*, out=None, resume=False, on_round=None, **options) -> metrics dict

Importing the package loads nothing heavy and changes no process-wide state (environment,
threads, RNG): the names load their modules on first use (PEP 562), so a program that sets
OpenMP's or torch's environment after ``import mhd_fast`` still sets it before torch loads.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {name: "ops" for name in ("AGGREGATES", "BACKENDS", "REDUCTIONS", "TopKLogits",
                                  "backend_available", "distill_loss", "mhd_loss",
                                  "resolve_backend", "select_teachers", "topk_compress")}
_LAZY["simulate"] = "api"

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
