"""Graphs: shapes, degrees, symmetry, known spectral gaps, seeds, schedules, edge-list files
and the errors of bad graphs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mhd_fast.topology import (GRAPHS, OPTIONS, GraphSchedule, describe, make_graph, make_schedule,
                               mixing_matrix, spectral_gap, validate_adj)

STATIC = [g for g in GRAPHS if g not in ("file", "matching")]


def _degrees(adj):
    return adj.sum(1)


@pytest.mark.parametrize("name", STATIC + ["matching"])
@pytest.mark.parametrize("n", [8, 12, 17])
def test_shape_dtype_no_self_loops_symmetric(name, n):
    opts = {"degree": 3} if name == "regular" and n % 2 == 0 else {"degree": 4}
    adj = make_graph(name, n, seed=1, **opts)
    assert adj.shape == (n, n) and adj.dtype == torch.bool
    assert not adj.diagonal().any()
    assert torch.equal(adj, adj.T)
    assert validate_adj(adj, n) is adj


@pytest.mark.parametrize("n", [2, 5, 16])
def test_complete_ring_kring_star(n):
    assert (_degrees(make_graph("complete", n)) == n - 1).all()
    ring = make_graph("ring", n)
    assert (_degrees(ring) == min(2, n - 1)).all()
    i = torch.arange(n)
    assert ring[i, (i + 1) % n].all() and ring[i, (i - 1) % n].all()
    star = make_graph("star", n)
    assert _degrees(star)[0] == n - 1 and (_degrees(star)[1:] == 1).all() and star[1:, 0].all()
    if n >= 4:
        k2 = make_graph("kring", n, k=2)
        assert (_degrees(k2) == min(4, n - 1)).all()
        assert k2[i, (i + 2) % n].all() and k2[i, (i - 2) % n].all()


def test_kring_reach():
    adj = make_graph("kring", 20, k=3)
    assert (_degrees(adj) == 6).all()
    for d in range(1, 11):
        assert bool(adj[0, d]) == (d <= 3) and bool(adj[0, -d % 20]) == (d <= 3)


def test_islands_are_disjoint_cliques():
    adj = make_graph("islands", 10, islands=3)
    groups = torch.arange(10) * 3 // 10
    same = groups[:, None] == groups[None, :]
    assert torch.equal(adj, same & ~torch.eye(10, dtype=torch.bool))
    assert sorted(torch.bincount(groups).tolist()) == [3, 3, 4]
    assert describe(adj)["components"] == 3


def test_torus_grid_neighbours():
    adj = make_graph("torus", 12)  # 3 x 4
    assert (_degrees(adj) == 4).all()
    # node (r, c) = 0 hears (0, 1), (0, 3), (1, 0), (2, 0)
    assert set(torch.nonzero(adj[0]).flatten().tolist()) == {1, 3, 4, 8}
    assert torch.equal(make_graph("torus", 7), make_graph("ring", 7))  # prime -> ring


def test_exponential_hops():
    adj = make_graph("exponential", 16)
    expected = {(h * s) % 16 for h in (1, 2, 4, 8) for s in (1, -1)}
    assert set(torch.nonzero(adj[0]).flatten().tolist()) == expected
    assert (_degrees(adj) == 7).all()
    assert make_graph("exponential", 1).sum() == 0


@pytest.mark.parametrize("n, d", [(10, 3), (12, 4), (50, 7), (64, 2), (9, 8)])
def test_regular_degree_and_seed(n, d):
    adj = make_graph("regular", n, degree=d, seed=0)
    assert (_degrees(adj) == d).all()
    assert torch.equal(adj, adj.T) and not adj.diagonal().any()
    assert torch.equal(adj, make_graph("regular", n, degree=d, seed=0))
    if d < n - 1:
        assert not torch.equal(adj, make_graph("regular", n, degree=d, seed=1))


def test_regular_is_randomized():
    """The swaps leave the circulant start (i hears i ± 1, i ± 2): distinct graphs over
    seeds, and about 4/29 of the edges join ids within 2, as in a uniform 4-regular graph."""
    graphs = [make_graph("regular", 30, degree=4, seed=s) for s in range(10)]
    assert len({g.numpy().tobytes() for g in graphs}) == 10
    near = make_graph("kring", 30, k=2)
    share = np.mean([(g & near).sum().item() / g.sum().item() for g in graphs])
    assert share < 0.3


def test_erdos_renyi_density_and_seed():
    adj = make_graph("erdos_renyi", 200, p=0.1, seed=0)
    density = adj.sum().item() / (200 * 199)
    assert density == pytest.approx(0.1, abs=0.01)
    assert torch.equal(adj, make_graph("erdos_renyi", 200, p=0.1, seed=0))
    assert not torch.equal(adj, make_graph("erdos_renyi", 200, p=0.1, seed=1))
    assert make_graph("erdos_renyi", 10, p=0.0).sum() == 0
    assert torch.equal(make_graph("erdos_renyi", 10, p=1.0), make_graph("complete", 10))


# ---- spectral gap -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 8, 33])
def test_known_gaps(n):
    assert spectral_gap(make_graph("complete", n)) == pytest.approx(n / (2 * (n - 1)))
    assert spectral_gap(make_graph("ring", n)) == pytest.approx(math.sin(math.pi / n) ** 2)
    assert spectral_gap(make_graph("star", n)) == pytest.approx(0.5 if n > 2 else 1.0)


def test_gap_orders_graphs():
    n = 32
    gaps = {g: spectral_gap(make_graph(g, n, degree=4, seed=0)) for g in
            ("complete", "exponential", "regular", "torus", "kring", "ring")}
    assert gaps["complete"] > gaps["exponential"] > gaps["torus"] > gaps["ring"]
    assert gaps["regular"] > gaps["kring"] > gaps["ring"]  # random beats local at equal degree
    assert spectral_gap(make_graph("islands", n, islands=4)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(make_graph("complete", 1)) == 1.0


def test_gap_matches_dense_eigenvalues_and_handles_lonely_and_directed():
    rng = np.random.default_rng(0)
    a = rng.random((9, 9)) < 0.3
    np.fill_diagonal(a, False)
    a[0, :] = False  # client 0 hears nobody (but others may hear it)
    adj = torch.from_numpy(a)
    w = mixing_matrix(adj)
    assert np.allclose(w.sum(1), 1.0)
    assert w[0, 0] == 1.0  # a lonely client keeps its own value
    mods = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    assert spectral_gap(adj) == pytest.approx(max(0.0, 1 - mods[1]))
    sym = adj | adj.T
    sym[0, :] = sym[:, 0] = False
    w = mixing_matrix(sym)
    mods = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    assert spectral_gap(sym) == pytest.approx(0.0, abs=1e-12)  # client 0 is cut off
    assert spectral_gap(sym) == pytest.approx(max(0.0, 1 - mods[1]), abs=1e-12)
    # self-loops in a user graph do not change the gap
    looped = make_graph("ring", 9) | torch.eye(9, dtype=torch.bool)
    assert spectral_gap(looped) == pytest.approx(spectral_gap(make_graph("ring", 9)))


# ---- schedules ----------------------------------------------------------------------------

def test_static_schedule():
    s = make_schedule("ring", 8)
    assert isinstance(s, GraphSchedule) and s.static
    assert torch.equal(s(0), make_graph("ring", 8)) and s(5) is s(0)
    assert s.spectral_gap(10) == pytest.approx(spectral_gap(s(0)))


@pytest.mark.parametrize("n", [8, 9])
def test_matching_schedule(n):
    s = make_schedule("matching", n, seed=3)
    assert not s.static
    rounds = [s(r) for r in range(6)]
    for adj in rounds:
        deg = _degrees(adj)
        assert torch.equal(adj, adj.T) and not adj.diagonal().any()
        assert (deg <= 1).all() and int((deg == 1).sum()) == n - n % 2  # odd n: one sits out
    assert len({a.numpy().tobytes() for a in rounds}) > 1  # differs per round
    again = make_schedule("matching", n, seed=3)
    assert all(torch.equal(a, again(r)) for r, a in enumerate(rounds))  # repeats per seed
    assert torch.equal(s(4), s(4))  # a round can be asked again (resume)
    assert not torch.equal(s(1), make_schedule("matching", n, seed=4)(1))
    assert spectral_gap(s(0)) == pytest.approx(0.0, abs=1e-12)
    assert s.spectral_gap(30) > 0.2  # the rounds together mix


def test_resampled_random_graph_schedule():
    s = make_schedule("erdos_renyi", 12, seed=0, resample=True, p=0.4)
    assert not s.static
    assert torch.equal(s(0), make_graph("erdos_renyi", 12, p=0.4, seed=0))
    assert not torch.equal(s(1), s(2))
    assert torch.equal(s(2), make_schedule("erdos_renyi", 12, seed=0, resample=True, p=0.4)(2))
    r = make_schedule("regular", 12, seed=0, resample=True, degree=3)
    assert all((_degrees(r(t)) == 3).all() for t in range(4))
    with pytest.raises(ValueError, match="resample"):
        make_schedule("ring", 12, resample=True)


def test_schedule_validates_early():
    with pytest.raises(ValueError, match="degree"):
        make_schedule("regular", 5, degree=3)
    with pytest.raises(ValueError, match="'ring' takes no options, got radius"):
        make_schedule("ring", 5, radius=2)


@pytest.mark.parametrize("name", GRAPHS)
def test_an_option_a_graph_does_not_read_is_refused(name):
    """Each graph reads only its own options: ring with k = 2 would silently be the ring."""
    for option, value in (("k", 2), ("degree", 2), ("p", 0.5), ("islands", 2), ("path", "x")):
        if option in OPTIONS[name]:
            continue
        with pytest.raises(ValueError, match=f"graph '{name}' takes .*got {option}"):
            make_schedule(name, 6, **{option: value})


# ---- describe -----------------------------------------------------------------------------

def test_describe():
    d = describe(make_graph("ring", 10))
    assert d == {"nodes": 10, "edges": 20, "undirected_edges": 10, "directed": False,
                 "degree_min": 2, "degree_mean": 2.0, "degree_max": 2, "components": 1,
                 "spectral_gap": pytest.approx(math.sin(math.pi / 10) ** 2)}
    star = describe(make_graph("star", 6))
    assert (star["degree_min"], star["degree_max"]) == (1, 5)
    directed = torch.zeros(4, 4, dtype=torch.bool)
    directed[0, 1] = directed[1, 2] = True
    d = describe(directed)
    assert d["directed"] and d["edges"] == 2 and "undirected_edges" not in d
    assert d["components"] == 2  # {0, 1, 2} weakly connected, {3} alone
    m = describe(make_schedule("matching", 10, seed=0))
    assert m["static"] is False and m["components"] == 5 and m["mean_spectral_gap"] > 0


# ---- edge-list files ----------------------------------------------------------------------

def test_edge_list_file(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# a path 0-1-2 and an edge 3-4\n0 1\n\n1 2   # trailing comment\n3\t4\n")
    adj = make_graph("file", 5, path=str(path))
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in ((0, 1), (1, 2), (3, 4)):
        expected[i, j] = expected[j, i] = True
    assert torch.equal(adj, expected)
    path.write_text("directed\n0 1\n2 1\n")
    adj = make_graph("file", 3, path=str(path))
    assert adj[0, 1] and adj[2, 1] and not adj[1, 0] and int(adj.sum()) == 2
    assert describe(adj)["directed"]
    path.write_text("# nothing\n")
    assert make_graph("file", 3, path=str(path)).sum() == 0


@pytest.mark.parametrize("text, match", [("0 5\n", r"\[0, 3\]"), ("0 -1\n", r"\[0, 3\]"),
                                         ("0 1 2\n", "two node ids"), ("a b\n", "two node ids"),
                                         ("2 2\n", "self-loop"), ("0 1\ndirected\n", "before")])
def test_edge_list_errors(tmp_path, text, match):
    path = tmp_path / "g.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        make_graph("file", 4, path=str(path))
    assert "path" in str(err.value) and "line" in str(err.value)


def test_edge_list_missing(tmp_path):
    with pytest.raises(ValueError, match="path"):
        make_graph("file", 4)
    with pytest.raises(ValueError, match="cannot read"):
        make_graph("file", 4, path=str(tmp_path / "absent.txt"))


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n, opts, match", [
    ("hypercube", 8, {}, "graph must be one of"),
    ("ring", 0, {}, "clients"),
    ("regular", 8, {"degree": 8}, "degree"),
    ("regular", 7, {"degree": 3}, "even"),
    ("regular", 8, {"degree": 0}, "degree"),
    ("kring", 8, {"k": 5}, "k must be"),
    ("kring", 8, {"k": 0}, "k must be"),
    ("islands", 4, {"islands": 5}, "islands"),
    ("islands", 4, {"islands": 0}, "islands"),
    ("erdos_renyi", 4, {"p": 1.5}, "p must be"),
])
def test_bad_graph_options(name, n, opts, match):
    with pytest.raises(ValueError, match=match):
        make_graph(name, n, **opts)


def test_validate_adj_errors():
    with pytest.raises(ValueError, match="torch.bool"):
        validate_adj(torch.ones(3, 3))
    with pytest.raises(ValueError, match="square"):
        validate_adj(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        validate_adj(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="4 clients"):
        validate_adj(torch.ones(3, 3, dtype=torch.bool), n=4)
    with pytest.raises(ValueError, match="torch.Tensor"):
        validate_adj(np.ones((3, 3), dtype=bool))
