"""Partitions: label histograms of each method, seeds, disjointness, termination on extreme
settings, and the errors of bad options."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mhd_fast.partition import (PARTITIONS, label_distribution, label_histogram, partition,
                                skew_mix, skew_primary)

V = 10


def _balanced(per_class=100, num_classes=V, seed=0):
    y = np.repeat(np.arange(num_classes), per_class)
    return torch.from_numpy(np.random.default_rng(seed).permutation(y))


def _check_parts(parts, n, num_clients):
    assert len(parts) == num_clients
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in parts)
    assert min(len(p) for p in parts) >= 1
    idx = torch.cat(parts)
    assert idx.unique().numel() == idx.numel(), "clients' index sets overlap"
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert all(torch.equal(p, p.sort().values) for p in parts)


@pytest.mark.parametrize("method", PARTITIONS)
def test_seeded_disjoint_nonempty(method):
    y = _balanced()
    parts = partition(y, 8, method=method, seed=5)
    _check_parts(parts, len(y), 8)
    again = partition(y, 8, method=method, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition(y, 8, method=method, seed=6)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))
    # labels may come as a tensor, a numpy array or a list
    as_list = partition(y.tolist(), 8, method=method, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, as_list))


def test_global_rng_untouched():
    y = _balanced()
    torch.manual_seed(0)
    np.random.seed(0)
    before = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    partition(y, 8, method="dirichlet", seed=1)
    partition(y, 8, method="skew", seed=1)
    assert torch.equal(torch.rand(1), before[0]) and np.random.rand() == before[1]


def test_iid_is_balanced():
    y = _balanced(per_class=200)
    parts = partition(y, 10, method="iid", seed=0)
    assert {len(p) for p in parts} == {200}
    assert sum(len(p) for p in parts) == len(y)  # iid uses every sample
    hist = label_histogram(y, parts, V).double()
    # each client's label mix is close to uniform (multivariate hypergeometric, 200 draws)
    assert (hist / 200 - 0.1).abs().max() < 0.1
    dist = label_distribution(y, parts, V)
    assert dist.dtype == torch.float32
    assert torch.allclose(dist.sum(1), torch.ones(10))
    sizes = [len(p) for p in partition(y, 7, method="iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1
    assert {len(p) for p in partition(y, 7, method="iid", samples_per_client=13)} == {13}


@pytest.mark.parametrize("skew", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("num_clients, primary", [(16, 1), (10, 2), (4, None)])
def test_skew_fraction_from_primary_classes(skew, num_clients, primary):
    y = _balanced(per_class=300)
    parts = partition(y, num_clients, method="skew", skew=skew, primary_classes=primary, seed=2)
    _check_parts(parts, len(y), num_clients)
    m = primary if primary is not None else -(-V // num_clients)  # default ceil(V / N)
    prim = skew_primary(num_clients, V, m, seed=2)
    assert prim.shape == (num_clients, m)
    hist = label_histogram(y, parts, V).double()
    sizes = hist.sum(1)
    assert torch.all(sizes == sizes[0]), "skew gives every client the same number of samples"
    in_primary = hist.gather(1, prim).sum(1) / sizes
    expected = skew + (1 - skew) * m / V
    assert torch.allclose(in_primary, torch.full_like(in_primary, expected), atol=1.5 / sizes[0])
    # the rest is spread evenly over all classes: each class gets (1 - s)/V of the samples
    mix = skew_mix(num_clients, V, skew, m, seed=2)
    assert np.allclose(mix.sum(1), 1.0)
    assert np.abs(hist.numpy() / sizes[0].item() - mix).max() <= 1.0 / sizes[0].item() + 1e-9
    if num_clients * m >= V:  # every class is primary for some client
        assert prim.unique().numel() == V


def test_skew_uses_the_scarce_class_fully():
    """Client size is set by the most demanded class: that class is used up."""
    y = _balanced(per_class=300)
    parts = partition(y, 16, method="skew", skew=0.9, primary_classes=1, seed=0)
    hist = label_histogram(y, parts, V)
    assert int(hist.sum(0).max()) >= 300 - 16  # up to rounding, some class is exhausted
    assert (hist.sum(0) <= 300).all()


def test_skew_samples_per_client():
    y = _balanced(per_class=300)
    parts = partition(y, 20, method="skew", samples_per_client=50, seed=0)
    assert {len(p) for p in parts} == {50}
    with pytest.raises(ValueError, match="samples_per_client"):
        partition(y, 20, method="skew", samples_per_client=200)


def test_skew_respects_class_supply_when_unbalanced():
    """A rare class cannot give every client its share: the others fill in, still disjoint."""
    y = torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(1, V).repeat_interleave(100)])
    parts = partition(y, 10, method="skew", skew=0.9, primary_classes=1, seed=0)
    _check_parts(parts, len(y), 10)
    hist = label_histogram(y, parts, V)
    assert int(hist[:, 0].sum()) <= 5
    assert len({len(p) for p in parts}) == 1


def test_dirichlet_concentration_follows_alpha():
    y = _balanced(per_class=500)
    top = {}
    for alpha in (0.05, 1.0, 1000.0):
        parts = partition(y, 20, method="dirichlet", alpha=alpha, seed=0)
        _check_parts(parts, len(y), 20)
        dist = label_distribution(y, parts, V)
        top[alpha] = dist.max(1).values.mean().item()
        assert sum(len(p) for p in parts) == len(y)  # dirichlet hands out every sample
    assert top[0.05] > 0.7  # mostly one class per client
    assert top[1000.0] < 0.2  # nearly uniform
    assert top[0.05] > top[1.0] > top[1000.0]


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 10.0])
def test_dirichlet_class_split_matches_its_law(alpha):
    """Each class is split over the N clients by p ~ Dirichlet(alpha · 1_N), for which
    E[Σ_j p_j²] = (alpha + 1) / (N alpha + 1): check it averaged over 200 classes."""
    num_classes, n_clients = 200, 20
    y = _balanced(per_class=400, num_classes=num_classes)
    parts = partition(y, n_clients, method="dirichlet", alpha=alpha, seed=4)
    _check_parts(parts, len(y), n_clients)
    share = label_histogram(y, parts, num_classes).double() / 400
    herfindahl = (share ** 2).sum(0).mean().item()
    expected = (alpha + 1) / (n_clients * alpha + 1)
    assert herfindahl == pytest.approx(expected, rel=0.15)


def test_dirichlet_samples_per_client_caps_sizes():
    y = _balanced(per_class=500)
    parts = partition(y, 10, method="dirichlet", alpha=0.3, samples_per_client=40, seed=0)
    _check_parts(parts, len(y), 10)
    assert max(len(p) for p in parts) <= 40


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_at_most_k_classes(k):
    y = _balanced(per_class=120)
    parts = partition(y, 20, method="shards", shards_per_client=k, seed=0)
    _check_parts(parts, len(y), 20)
    hist = label_histogram(y, parts, V)
    classes_per_client = (hist > 0).sum(1)
    assert (classes_per_client <= k).all() and (classes_per_client >= 1).all()
    assert sum(len(p) for p in parts) == len(y)
    # shards are equal-sized: 20 * k shards over 1200 samples
    shard = 1200 // (20 * k)
    assert all(len(p) == k * shard for p in parts)
    # over all clients every class is used
    assert (hist.sum(0) == 120).all()


def test_shards_unbalanced_classes_stay_pure():
    y = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(500, dtype=torch.long),
                   torch.full((97,), 2)])
    parts = partition(y, 30, method="shards", shards_per_client=2, seed=0)
    _check_parts(parts, len(y), 30)
    assert ((label_histogram(y, parts, 3) > 0).sum(1) <= 2).all()


@pytest.mark.parametrize("method", PARTITIONS)
def test_terminates_fast_on_extremes(method):
    """alpha = 0.01 with 1000 clients, and as many clients as samples: no retry loop."""
    y = _balanced(per_class=600, seed=1)
    opts = dict(alpha=0.01, skew=1.0, primary_classes=1, shards_per_client=2)
    start = time.perf_counter()
    parts = partition(y, 1000, method=method, seed=0, **opts)
    _check_parts(parts, len(y), 1000)
    few = _balanced(per_class=13, seed=2)
    parts = partition(few, len(few), method=method, seed=0, **{**opts, "shards_per_client": 1})
    _check_parts(parts, len(few), len(few))
    assert all(len(p) == 1 for p in parts)
    # generous bound: the point is that nothing loops per sample or retries
    assert time.perf_counter() - start < 30


def test_dirichlet_tiny_alpha_many_clients_everyone_gets_data():
    y = _balanced(per_class=200)
    parts = partition(y, 1000, method="dirichlet", alpha=0.01, seed=3)
    _check_parts(parts, len(y), 1000)
    assert sum(len(p) for p in parts) == len(y)


def test_label_histogram_counts():
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    parts = [torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])]
    assert torch.equal(label_histogram(y, parts, 4),
                       torch.tensor([[1, 0, 1, 0], [0, 2, 2, 0]]))
    assert torch.allclose(label_distribution(y, parts, 4),
                          torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0.5, 0]]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_clients=0), "num_clients"),
    (dict(num_clients=1001), "num_clients"),
    (dict(method="pathological"), "partition method"),
    (dict(skew=1.5), "skew"),
    (dict(skew=-0.1), "skew"),
    (dict(primary_classes=0), "primary_classes"),
    (dict(primary_classes=11), "primary_classes"),
    (dict(method="dirichlet", alpha=0.0), "alpha"),
    (dict(method="dirichlet", alpha=float("inf")), "alpha"),
    (dict(method="shards", shards_per_client=0), "shards_per_client"),
    (dict(method="shards", num_clients=600, shards_per_client=2), "shards_per_client"),
    (dict(method="iid", samples_per_client=0), "samples_per_client"),
])
def test_bad_options(kwargs, name):
    y = _balanced()
    kwargs = {"num_clients": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        partition(y, kwargs.pop("num_clients"), **kwargs)


@pytest.mark.parametrize("labels, what", [([], "non-empty"), ([[0, 1]], "1-D"),
                                          ([0.5, 1.0], "integers"), ([-1, 0], ">= 0")])
def test_bad_labels(labels, what):
    with pytest.raises(ValueError, match=what):
        partition(np.array(labels), 1)
