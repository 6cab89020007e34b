"""Which backend runs: 'auto' picks cpp on CPU and falls back to the reference with one
warning, an unavailable backend asked for by name is an error, the package imports without
the extension, and the ops work when first used inside a torch.func transform."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import mhd_fast
from mhd_fast.ops import backends

from cases import make_case, unavailable

needs_cpp = pytest.mark.skipif(unavailable("cpp") is not None, reason="mhd_fast._C not built")


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    assert mhd_fast.resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "backend_available", lambda name: None if name == "torch" else "not built here")
    monkeypatch.setattr(backends, "_WARNED", set())
    z, t, adj = make_case(torch.float32, 6, "ring", n=3)
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
    """A compiled op used for the first time inside torch.func.grad (its launcher module is
    imported then: a tensor it made would have to be a plain one, not the transform's wrapper)."""
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
