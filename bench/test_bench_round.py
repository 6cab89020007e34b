"""pytest-benchmark suite of one simulator round: ``pytest bench/test_bench_round.py --benchmark-only``.

The batched round against the per-client loop of the same round (bench_round.py prints the
ratio table and checks the memory of 1024 clients); 64 clients, MLP, digits, CPU.
"""
import copy

import pytest

import bench_round
import loop_round
from mhd_fast import simulation, train

_sims = {}


def sim_of(clients: int):
    if clients not in _sims:
        _sims[clients] = simulation.setup(bench_round.make_config(clients, "cpu"))
    return copy.deepcopy(_sims[clients])


@pytest.mark.parametrize("impl", ["batched", "loop"])
@pytest.mark.parametrize("clients", [16, 64])
def test_round(benchmark, clients, impl):
    sim = sim_of(clients)
    if impl == "batched":
        def fn():
            train.train_round(sim, 0)
    else:
        state = loop_round.from_simulation(sim)

        def fn():
            loop_round.loop_round(sim, state, 0)
    fn()  # warm-up
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
