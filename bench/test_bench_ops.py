"""pytest-benchmark suite of the fused ops: ``pytest bench/ --benchmark-only``.

Same shapes, modes and implementations as ``bench_ops.py`` (which prints the ratio table);
compare columns with ``--benchmark-group-by=param:shape,param:mode``.
"""
import pytest
import torch

import bench_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [s for s, v in bench_ops.SHAPES.items() if DEVICE == "cuda" or not v.gpu_only]
_cases = {}


def case(shape: str) -> bench_ops.Case:
    if shape not in _cases:
        _cases[shape] = bench_ops.make_case(bench_ops.SHAPES[shape], DEVICE)
    return _cases[shape]


@pytest.mark.parametrize("impl", bench_ops.IMPLS)
@pytest.mark.parametrize("mode", bench_ops.MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_op(benchmark, shape, mode, impl):
    if mode not in bench_ops.SHAPES[shape].modes:
        pytest.skip(f"{shape} runs {bench_ops.SHAPES[shape].modes}")
    c = case(shape)
    if impl == "fused" and bench_ops.mhd_fast.backend_available(c.fused) is not None:
        pytest.skip(f"backend {c.fused} is not available here")
    fn = bench_ops.runner(c, mode, impl)
    fn()  # warm-up: compilation and first-touch stay out of the figures

    def run():
        fn()
        bench_ops.sync(DEVICE)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
