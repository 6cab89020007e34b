"""Labels -> disjoint index sets, one per client. Pure and seeded (a numpy Generator from
``seed``, never the global RNG), vectorized over samples, and always terminating.

Methods (docs/method.md §4), with V classes and N clients:

- ``skew``: client i has ``primary_classes`` primary classes (a seeded permutation of the
  classes dealt round-robin, so every class is primary for some client when
  N · primary_classes >= V). Its label mix is ``skew`` spread evenly over its primary classes
  plus ``1 - skew`` spread evenly over all V classes. All clients get the same number of
  samples: ``samples_per_client``, or the most the scarcest class allows.
- ``dirichlet``: for every class, proportions over the N clients ~ Dirichlet(alpha · 1_N),
  and the class's samples are split by them (Hsu et al. 2019; FedDF). Small alpha -> each
  class goes to few clients; large alpha -> iid. Client sizes vary.
- ``shards``: every class is cut into class-pure shards (their number proportional to the
  class size), and each client gets ``shards_per_client`` random shards, hence at most that
  many classes (McMahan et al. 2017, with shards that never straddle two classes).
- ``iid``: a seeded random split into near-equal parts.

Every client ends with >= 1 sample: a method that leaves a client empty (only Dirichlet with
small alpha or extreme sizes can) moves one sample to it from the largest clients.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

PARTITIONS = ("skew", "dirichlet", "shards", "iid")


def partition(labels, num_clients: int, *, method: str = "skew", seed: int = 0,
              skew: float = 0.9, primary_classes: int | None = None, alpha: float = 0.5,
              shards_per_client: int = 2, samples_per_client: int | None = None) -> list[Tensor]:
    """Split the samples of ``labels`` ([n] ints >= 0) among ``num_clients`` clients.

    Returns N sorted int64 index tensors into ``labels``: disjoint, each non-empty. Samples no
    client needs are left out (skew sizes clients equally; ``samples_per_client`` caps them).

    ``primary_classes`` (skew) defaults to ceil(V / N), so that the primary classes cover all
    V classes also when there are fewer clients than classes. ``samples_per_client``: the size
    of every client for skew, iid and shards; an upper bound on each client for dirichlet.
    """
    y = _labels_array(labels)
    n = y.size
    _check_int("num_clients", num_clients, 1)
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) exceeds the number of samples ({n}); "
                         f"every client needs at least one")
    if method not in PARTITIONS:
        raise ValueError(f"partition method must be one of {PARTITIONS}, got {method!r}")
    if samples_per_client is not None:
        _check_int("samples_per_client", samples_per_client, 1)
        if method != "dirichlet" and num_clients * samples_per_client > n:
            raise ValueError(f"samples_per_client ({samples_per_client}) x num_clients "
                             f"({num_clients}) exceeds the {n} samples")
    rng = np.random.default_rng(seed)
    num_classes = int(y.max()) + 1

    if method == "iid":
        owner = _iid_owner(n, num_clients, samples_per_client, rng)
    elif method == "skew":
        if not 0.0 <= skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {skew!r}")
        if primary_classes is None:
            primary_classes = math.ceil(num_classes / num_clients)
        _check_int("primary_classes", primary_classes, 1)
        if primary_classes > num_classes:
            raise ValueError(f"primary_classes must be <= the {num_classes} classes, "
                             f"got {primary_classes}")
        target = skew_mix(num_clients, num_classes, skew, primary_classes, seed)
        counts = _integer_counts(target, np.bincount(y, minlength=num_classes),
                                 samples_per_client, rng)
        owner = _deal_counts(y, counts, rng)
    elif method == "dirichlet":
        if not (alpha > 0.0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        owner = _dirichlet_owner(y, num_clients, alpha, samples_per_client, rng)
    else:
        _check_int("shards_per_client", shards_per_client, 1)
        if num_clients * shards_per_client > n:
            raise ValueError(f"shards_per_client ({shards_per_client}) x num_clients "
                             f"({num_clients}) exceeds the {n} samples; every shard needs one")
        owner = _shards_owner(y, num_clients, shards_per_client, rng)

    owner = _fill_empty(owner, num_clients)
    return _split_by_owner(owner, num_clients)


def skew_primary(num_clients: int, num_classes: int, primary_classes: int, seed: int) -> Tensor:
    """[N, primary_classes] int64: the primary classes of each client under ``skew``.

    A seeded permutation of the classes is dealt round-robin, so client i gets entries
    i·m .. i·m + m − 1 (mod V) of it: every class is primary for some client when N·m >= V.
    """
    perm = np.random.default_rng([seed, 1]).permutation(num_classes)
    slots = np.arange(num_clients)[:, None] * primary_classes + np.arange(primary_classes)
    return torch.from_numpy(perm[slots % num_classes])


def skew_mix(num_clients: int, num_classes: int, skew: float, primary_classes: int,
             seed: int) -> np.ndarray:
    """[N, V] float64: the label mix each client aims for under ``skew`` (rows sum to 1)."""
    primary = skew_primary(num_clients, num_classes, primary_classes, seed).numpy()
    mix = np.full((num_clients, num_classes), (1.0 - skew) / num_classes)
    # primary classes are distinct within a row (m <= V consecutive entries of a permutation)
    np.add.at(mix, (np.arange(num_clients)[:, None], primary), skew / primary_classes)
    return mix


def label_histogram(labels, parts, num_classes: int) -> Tensor:
    """[N, V] int64: how many samples of each class client i holds."""
    y = torch.as_tensor(_labels_array(labels))
    sizes = torch.tensor([len(p) for p in parts])
    owner = torch.repeat_interleave(torch.arange(len(parts)), sizes)
    idx = torch.cat([torch.as_tensor(p, dtype=torch.int64).cpu() for p in parts]) if parts else \
        torch.zeros(0, dtype=torch.int64)
    flat = owner * num_classes + y[idx]
    return torch.bincount(flat, minlength=len(parts) * num_classes).view(len(parts), num_classes)


def label_distribution(labels, parts, num_classes: int) -> Tensor:
    """[N, V] float32: client i's training label distribution (rows sum to 1; an empty client's
    row is 0). Private accuracy weights the test set by it (docs/method.md §4)."""
    hist = label_histogram(labels, parts, num_classes).to(torch.float32)
    return hist / hist.sum(dim=1, keepdim=True).clamp(min=1.0)


# ---- methods: each returns owner [n] int64, the client of every sample or -1 ---------------

def _iid_owner(n: int, num_clients: int, per_client: int | None, rng) -> np.ndarray:
    used = n if per_client is None else num_clients * per_client
    perm = rng.permutation(n)[:used]
    owner = np.full(n, -1, dtype=np.int64)
    # near-equal contiguous blocks of the permutation: block sizes differ by at most one
    owner[perm] = np.arange(used) * num_clients // used
    return owner


def _integer_counts(target: np.ndarray, supply: np.ndarray, per_client: int | None,
                    rng) -> np.ndarray:
    """[N, V] int64 counts: row i sums to the client size, column v <= supply[v], each row as
    close to size · target[i] as the supply allows.

    The size is ``per_client`` or the largest the scarcest class supports (at least 1). Rows
    are rounded by largest remainder (ties broken at random, so no class is favoured); a
    column over its supply gives its excess units back, and each such client takes them from
    a class with supply left where it is furthest below its target.
    """
    num_clients, num_classes = target.shape
    demand = target.sum(axis=0)
    if per_client is None:
        with np.errstate(divide="ignore"):
            per_client = max(1, int(np.min(np.where(demand > 0, supply / demand, np.inf))))
    want = target * per_client
    counts = np.floor(want).astype(np.int64)
    short = per_client - counts.sum(axis=1)
    frac = want - counts + rng.random(want.shape) * 1e-9
    rank = np.argsort(np.argsort(-frac, axis=1), axis=1)
    counts += rank < short[:, None]

    need = np.zeros(num_clients, dtype=np.int64)
    for v in np.flatnonzero(counts.sum(axis=0) > supply):  # a loop over classes only
        excess = counts[:, v].sum() - supply[v]
        # take back the units that overshoot their client's target the most: the c-th unit
        # (from the top) of client i overshoots by counts[i, v] - c - want[i, v]
        over = np.repeat(np.arange(num_clients), counts[:, v])
        surplus = counts[over, v] - _ranks(counts[:, v]) - want[over, v]
        take = over[np.argsort(-surplus, kind="stable")[:excess]]
        np.subtract.at(counts[:, v], take, 1)
        np.add.at(need, take, 1)
    spare = supply - counts.sum(axis=0)
    # a loop over moved units only: at most one per client per class from the rounding above
    for i in np.repeat(np.arange(num_clients), need):
        gap = np.where(spare > 0, want[i] - counts[i], -np.inf)
        v = int(np.argmax(gap))
        counts[i, v] += 1
        spare[v] -= 1
    return counts


def _deal_counts(y: np.ndarray, counts: np.ndarray, rng) -> np.ndarray:
    """Give client i ``counts[i, v]`` random samples of class v, disjointly.

    Each class's samples are put in random order; in class v, the first counts[0, v] go to
    client 0, the next counts[1, v] to client 1, and so on; the rest stay unassigned.
    """
    num_clients, num_classes = counts.shape
    rank = _rank_in_group(y, rng.random(y.size))
    # cumulative counts over (class, client), class-major
    flat = np.cumsum(counts.T.reshape(-1))
    demand_start = np.concatenate([[0], flat])[np.arange(num_classes) * num_clients]
    key = demand_start[y] + rank
    slot = np.searchsorted(flat, key, side="right")  # index class * N + client
    assigned = rank < counts.sum(axis=0)[y]
    return np.where(assigned, slot % num_clients, -1)


def _dirichlet_owner(y: np.ndarray, num_clients: int, alpha: float, per_client: int | None,
                     rng) -> np.ndarray:
    num_classes = int(y.max()) + 1
    supply = np.bincount(y, minlength=num_classes)
    props = rng.dirichlet(np.full(num_clients, alpha), size=num_classes)  # [V, N]
    # split each class by its proportions: cumulative cut points, floored (FedLab / flwr)
    cuts = np.floor(np.cumsum(props, axis=1) * supply[:, None]).astype(np.int64)
    cuts[:, -1] = supply  # the last cut is the class size (cumsum may round below 1)
    counts = np.diff(np.concatenate([np.zeros((num_classes, 1), np.int64), cuts], axis=1)).T
    owner = _deal_counts(y, counts, rng)
    if per_client is not None:
        owner = _cap_sizes(owner, num_clients, per_client, rng)
    return owner


def _cap_sizes(owner: np.ndarray, num_clients: int, cap: int, rng) -> np.ndarray:
    """Keep at most ``cap`` random samples of every client."""
    rank = _rank_in_group(owner, rng.random(owner.size))
    return np.where(rank < cap, owner, -1)


def _shards_owner(y: np.ndarray, num_clients: int, per_client: int, rng) -> np.ndarray:
    num_classes = int(y.max()) + 1
    supply = np.bincount(y, minlength=num_classes)
    num_shards = num_clients * per_client
    shards = _apportion(num_shards, supply)
    # within class v (random order), the sample of rank r falls in shard r * shards_v // supply_v
    rank = _rank_in_group(y, rng.random(y.size))
    shard_start = np.concatenate([[0], np.cumsum(shards)[:-1]])
    shard = shard_start[y] + rank * shards[y] // np.maximum(supply[y], 1)
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // per_client
    return np.where(shards[y] > 0, client_of_shard[np.minimum(shard, num_shards - 1)], -1)


def _apportion(total: int, sizes: np.ndarray) -> np.ndarray:
    """Shards per class: ``total`` split proportionally to ``sizes`` by largest remainder, at
    least one for every non-empty class when total allows, never more than the class size."""
    present = sizes > 0
    base = present.astype(np.int64) if total >= present.sum() else np.zeros_like(sizes)
    rest = total - base.sum()
    quota = rest * sizes / sizes.sum()
    out = base + np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    out[order[:total - out.sum()]] += 1
    # a tiny class may get more shards than samples: hand the surplus to classes with room
    surplus = int(np.maximum(out - sizes, 0).sum())
    out = np.minimum(out, sizes)
    for v in np.argsort(out - sizes, kind="stable"):  # a loop over classes, most room first
        add = min(int(sizes[v] - out[v]), surplus)
        out[v] += add
        surplus -= add
    return out


# ---- shared helpers -----------------------------------------------------------------------

def _fill_empty(owner: np.ndarray, num_clients: int) -> np.ndarray:
    """Move one sample to every empty client, unassigned samples first, then from the largest
    clients (never emptying one). Needs num_clients <= n, which partition checks."""
    sizes = np.bincount(owner[owner >= 0], minlength=num_clients)
    empty = np.flatnonzero(sizes == 0)
    if empty.size == 0:
        return owner
    owner = owner.copy()
    free = np.flatnonzero(owner < 0)
    from_free = min(free.size, empty.size)
    owner[free[:from_free]] = empty[:from_free]
    empty = empty[from_free:]
    if empty.size:
        # samples of rank >= 1 within their client can move without emptying it, and the
        # highest ranks sit in the largest clients
        rank = _rank_in_group(owner, np.arange(owner.size))
        movable = np.flatnonzero((owner >= 0) & (rank >= 1))
        donors = movable[np.argsort(-rank[movable], kind="stable")[:empty.size]]
        owner[donors] = empty
    return owner


def _rank_in_group(group: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """[n] int64: the position of each element among the elements of its group, ordered by
    ``tiebreak`` (random numbers give a random order within each group)."""
    order = np.lexsort((tiebreak, group))
    sorted_group = group[order]
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size) - np.searchsorted(sorted_group, sorted_group, side="left")
    return rank


def _ranks(group_sizes: np.ndarray) -> np.ndarray:
    """0, 1, .., size-1 for every group, concatenated: the rank of each element of
    np.repeat(np.arange(G), group_sizes) within its group."""
    starts = np.cumsum(group_sizes) - group_sizes
    return np.arange(group_sizes.sum()) - np.repeat(starts, group_sizes)


def _split_by_owner(owner: np.ndarray, num_clients: int) -> list[Tensor]:
    idx = np.flatnonzero(owner >= 0)
    order = np.argsort(owner[idx], kind="stable")  # stable: indices stay sorted per client
    sizes = np.bincount(owner[idx], minlength=num_clients)
    return list(torch.from_numpy(idx[order]).split(sizes.tolist()))


def _labels_array(labels) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
