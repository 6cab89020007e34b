"""Communication graphs -> bool adjacency ``adj[N, N]`` (``adj[i, j]``: client i hears
client j), their spectral gap, and schedules of graphs over rounds (docs/method.md §5).

Graphs (no self-loops; all symmetric except a ``directed`` edge-list file):

- ``complete``: everyone hears everyone.
- ``ring``: i hears i ± 1 (mod N).
- ``kring``: i hears i ± 1 .. i ± k (mod N), k in [1, N // 2].
- ``star``: client 0 hears everyone, everyone hears client 0.
- ``islands``: ``islands`` disjoint cliques of near-equal size over consecutive clients.
- ``torus``: a 2-D torus R x C (R the largest divisor of N with R <= √N), i hears its four
  grid neighbours with wrap-around; a prime N gives R = 1, i.e. the ring.
- ``exponential``: i hears i ± 2^m (mod N) for 2^m < N.
- ``regular``: a random ``degree``-regular graph: a circulant d-regular graph randomized by
  10 · edges degree-preserving double-edge swaps (a Markov chain whose stationary law is
  uniform over d-regular graphs), so it always terminates. Needs degree < N, N · degree even.
- ``erdos_renyi``: each pair is an edge with probability ``p``.
- ``file``: an edge list at ``path``: one ``i j`` per line (0-based ids < N), ``#`` starts a
  comment, blank lines are skipped. By default each line is an undirected edge; a line
  ``directed`` (before the first edge) makes ``i j`` mean only "i hears j".
- ``matching``: time-varying; in round r a fresh random perfect matching seeded by
  (seed, r), each client hearing only its partner (with odd N one client sits out).
  ``make_graph`` returns round ``round_index`` (default 0).

Spectral gap: 1 − |λ₂| of the lazy random-walk matrix W = (I + D⁻¹A) / 2, with A[i, j] =
adj[i, j] off the diagonal and D the row sums (how many i hears); a client that hears nobody
keeps its own value (its row of D⁻¹A is e_i). λ₂ is the eigenvalue of second-largest modulus
(W has λ₁ = 1). The gap lies in [0, 1]: 0 for a disconnected graph, N / (2(N − 1)) for the
complete graph, sin²(π / N) for the ring. Laziness keeps the gap about connectivity, not
bipartiteness. For a schedule, ``GraphSchedule.spectral_gap(rounds)`` is the gap of the mean
of W over rounds 0 .. rounds − 1 (a random matching's rounds are disconnected, their mean mixes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

GRAPHS = ("complete", "ring", "kring", "star", "islands", "torus", "exponential", "regular",
          "erdos_renyi", "file", "matching")
TIME_VARYING = ("matching",)
RANDOM = ("regular", "erdos_renyi", "matching")

# The options each graph reads; any other option given to it would be ignored, so it is refused.
OPTIONS = {"complete": (), "ring": (), "kring": ("k",), "star": (), "islands": ("islands",),
           "torus": (), "exponential": (), "regular": ("degree",), "erdos_renyi": ("p",),
           "file": ("path",), "matching": ()}


def check_options(name: str, options: dict) -> None:
    """ValueError naming the options that graph ``name`` does not read."""
    takes = OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"graph {name!r} takes " + (f"the options {', '.join(takes)}" if takes
                         else "no options") + f", got {', '.join(map(str, unknown))}")


def make_graph(name: str, n: int, *, seed: int = 0, k: int = 2, degree: int = 4, p: float = 0.3,
               islands: int = 2, path: str | None = None, round_index: int = 0) -> Tensor:
    """[n, n] bool adjacency of graph ``name`` (one of GRAPHS); adj[i, j] = i hears j.

    ``seed`` draws the random graphs (regular, erdos_renyi, matching); ``k`` is kring's reach,
    ``degree`` regular's degree, ``p`` Erdős–Rényi's edge probability, ``islands`` the number
    of cliques, ``path`` the edge-list file, ``round_index`` the round of a time-varying graph.
    """
    if name not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {name!r}")
    _check_int("clients", n, 1)
    nodes = np.arange(n)
    if name == "complete":
        adj = ~np.eye(n, dtype=bool)
    elif name == "ring":
        adj = _circulant(n, [1])
    elif name == "kring":
        _check_int("k", k, 1)
        if k > max(1, n // 2):
            raise ValueError(f"k must be in [1, clients // 2] = [1, {max(1, n // 2)}] for a "
                             f"kring of {n} clients, got {k}")
        adj = _circulant(n, range(1, k + 1))
    elif name == "star":
        adj = np.zeros((n, n), dtype=bool)
        adj[0, 1:] = adj[1:, 0] = True
    elif name == "islands":
        _check_int("islands", islands, 1)
        if islands > n:
            raise ValueError(f"islands must be <= clients ({n}), got {islands}")
        group = nodes * islands // n  # near-equal consecutive blocks
        adj = (group[:, None] == group[None, :]) & ~np.eye(n, dtype=bool)
    elif name == "torus":
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        cols = n // rows
        r, c = nodes // cols, nodes % cols
        adj = np.zeros((n, n), dtype=bool)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            adj[nodes, ((r + dr) % rows) * cols + (c + dc) % cols] = True
        np.fill_diagonal(adj, False)  # a side of length 1 wraps onto the node itself
    elif name == "exponential":
        hops = [1 << m for m in range(max(n - 1, 1).bit_length()) if (1 << m) < n]
        adj = _circulant(n, hops)
    elif name == "regular":
        adj = _random_regular(n, degree, np.random.default_rng(seed))
    elif name == "erdos_renyi":
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        upper = np.triu(np.random.default_rng(seed).random((n, n)) < p, 1)
        adj = upper | upper.T
    elif name == "file":
        adj = read_edge_list(path, n)
    else:
        _check_int("round_index", round_index, 0)
        adj = _matching(n, np.random.default_rng([seed, round_index]))
    return torch.from_numpy(np.ascontiguousarray(adj))


def validate_adj(adj, n: int | None = None) -> Tensor:
    """Check a graph given by the user: a [N, N] bool torch tensor (with N == n when given).

    Returns it unchanged; raises ValueError naming ``graph`` and what was expected otherwise.
    Self-loops are allowed here (the losses ignore them unless ``include_self``).
    """
    if not isinstance(adj, Tensor):
        raise ValueError(f"graph must be a torch.Tensor adjacency [N, N] bool, got "
                         f"{type(adj).__name__}")
    if adj.dtype != torch.bool:
        raise ValueError(f"graph adjacency must have dtype torch.bool, got {adj.dtype}")
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"graph adjacency must be square [N, N], got shape {tuple(adj.shape)}")
    if n is not None and adj.shape[0] != n:
        raise ValueError(f"graph has {adj.shape[0]} nodes but there are {n} clients")
    return adj


def mixing_matrix(adj: Tensor) -> np.ndarray:
    """[N, N] float64 W = (I + D⁻¹A) / 2, the lazy random walk of the module docstring."""
    a = _walk_adjacency(adj)
    return 0.5 * (np.eye(len(a)) + a / a.sum(axis=1, keepdims=True))


def spectral_gap(adj: Tensor) -> float:
    """1 − |λ₂| of the lazy random-walk matrix of ``adj`` (module docstring); 1.0 for N = 1."""
    a = _walk_adjacency(adj)
    if not np.array_equal(a, a.T):
        return _gap(mixing_matrix(adj))
    # symmetric A: W = (I + D⁻¹A)/2 is similar to (I + D^-½ A D^-½)/2, whose eigenvalues are
    # real and come from the stable symmetric solver
    inv_sqrt = 1.0 / np.sqrt(a.sum(axis=1))
    sym = 0.5 * (np.eye(len(a)) + a * inv_sqrt[:, None] * inv_sqrt[None, :])
    return _gap_from_eigenvalues(np.linalg.eigvalsh(sym))


def _walk_adjacency(adj: Tensor) -> np.ndarray:
    """A as float64 without self-loops, except that a client hearing nobody hears itself."""
    a = validate_adj(adj).cpu().numpy().astype(np.float64)
    np.fill_diagonal(a, 0.0)
    lonely = np.flatnonzero(a.sum(axis=1) == 0)
    a[lonely, lonely] = 1.0
    return a


def _gap(w: np.ndarray) -> float:
    # a symmetric W (regular graphs, means of matchings) has real eigenvalues: the stable,
    # faster symmetric solver applies
    symmetric = np.allclose(w, w.T, rtol=0.0, atol=1e-12)
    return _gap_from_eigenvalues(np.linalg.eigvalsh(w) if symmetric else np.linalg.eigvals(w))


def _gap_from_eigenvalues(eigenvalues: np.ndarray) -> float:
    if len(eigenvalues) < 2:
        return 1.0
    mods = np.sort(np.abs(eigenvalues))[::-1]
    return float(min(1.0, max(0.0, 1.0 - mods[1])))


@dataclass
class GraphSchedule:
    """The graph of every round. ``schedule(r)`` -> [N, N] bool adjacency of round r.

    ``static`` graphs return the same tensor each round. ``matching`` (and any random graph
    with ``resample=True``) draws round r's graph from (seed, r): different per round,
    identical for the same seed.
    """

    name: str
    n: int
    seed: int = 0
    options: dict = field(default_factory=dict)
    resample: bool = False

    def __post_init__(self):
        check_options(self.name, self.options)
        if self.resample and self.name not in RANDOM:
            raise ValueError(f"resample needs a random graph {RANDOM}, got graph {self.name!r}")
        # build (and so validate) now, so that a bad option fails before training starts
        self._first = make_graph(self.name, self.n, seed=self.seed, **self.options)

    @property
    def static(self) -> bool:
        return self.name not in TIME_VARYING and not self.resample

    def __call__(self, round: int) -> Tensor:
        if self.static or round == 0:
            return self._first
        seed = self.seed if self.name in TIME_VARYING else int(
            np.random.default_rng([self.seed, round]).integers(2**63))
        return make_graph(self.name, self.n, seed=seed, round_index=round, **self.options)

    def spectral_gap(self, rounds: int = 1) -> float:
        """Gap of the mean mixing matrix over rounds 0 .. rounds − 1 (the graph's own gap when
        static)."""
        _check_int("rounds", rounds, 1)
        if self.static:
            return spectral_gap(self._first)
        w = sum(mixing_matrix(self(r)) for r in range(rounds)) / rounds
        return _gap(w)


def make_schedule(name: str, n: int, *, seed: int = 0, resample: bool = False,
                  **graph_options) -> GraphSchedule:
    """A :class:`GraphSchedule` of graph ``name`` over ``n`` clients; ``graph_options`` are
    those of :func:`make_graph` (k, degree, p, islands, path)."""
    return GraphSchedule(name, n, seed, dict(graph_options), resample)


def describe(graph, rounds: int = 16) -> dict:
    """Summary of a graph (a [N, N] bool tensor or a GraphSchedule) for ``mhd-fast graph``.

    nodes, edges (directed pairs i hears j, i != j), undirected_edges (when symmetric),
    directed, in-degree (how many a client hears) min / mean / max, components (weakly
    connected), spectral_gap. A time-varying schedule describes round 0 and adds
    ``mean_spectral_gap`` over ``rounds`` rounds.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    schedule = graph if isinstance(graph, GraphSchedule) else None
    adj = validate_adj(graph(0) if schedule else graph).cpu()
    a = adj.clone()
    a.fill_diagonal_(False)
    symmetric = bool(torch.equal(a, a.T))
    deg = a.sum(dim=1)
    components = connected_components(csr_matrix(a.numpy()), directed=True,
                                      connection="weak")[0]
    out = {
        "nodes": adj.shape[0],
        "edges": int(a.sum()),
        "directed": not symmetric,
        "degree_min": int(deg.min()),
        "degree_mean": float(deg.float().mean()),
        "degree_max": int(deg.max()),
        "components": int(components),
        "spectral_gap": spectral_gap(adj),
    }
    if symmetric:
        out["undirected_edges"] = out["edges"] // 2
    if schedule is not None:
        out["static"] = schedule.static
        if not schedule.static:
            out["mean_spectral_gap"] = schedule.spectral_gap(rounds)
    return out


def read_edge_list(path: str | None, n: int) -> np.ndarray:
    """[n, n] bool from an edge-list file (format in the module docstring)."""
    if path is None:
        raise ValueError("graph 'file' needs path: an edge-list file with one 'i j' per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"path: cannot read edge-list file {path!r} ({e})") from None
    directed = False
    edges = []
    for lineno, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text in ("directed", "undirected"):
            if edges:
                raise ValueError(f"path {path!r} line {lineno}: {text!r} must come before "
                                 f"the first edge")
            directed = text == "directed"
            continue
        tokens = text.split()
        try:
            i, j = (int(t) for t in tokens)
        except ValueError:
            raise ValueError(f"path {path!r} line {lineno}: expected two node ids 'i j', "
                             f"got {text!r}") from None
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"path {path!r} line {lineno}: node ids must be in [0, {n - 1}] "
                             f"for {n} clients, got {i} {j}")
        if i == j:
            raise ValueError(f"path {path!r} line {lineno}: self-loop {i} {j}; a client hearing "
                             f"itself is the include_self option")
        edges.append((i, j))
    adj = np.zeros((n, n), dtype=bool)
    if edges:
        e = np.array(edges)
        adj[e[:, 0], e[:, 1]] = True
        if not directed:
            adj[e[:, 1], e[:, 0]] = True
    return adj


def _circulant(n: int, offsets) -> np.ndarray:
    """i hears i ± o (mod n) for every offset o."""
    nodes = np.arange(n)
    adj = np.zeros((n, n), dtype=bool)
    for o in offsets:  # a loop over offsets, not nodes
        adj[nodes, (nodes + o) % n] = True
        adj[nodes, (nodes - o) % n] = True
    np.fill_diagonal(adj, False)
    return adj


def _random_regular(n: int, degree: int, rng: np.random.Generator) -> np.ndarray:
    _check_int("degree", degree, 1)
    if degree >= n:
        raise ValueError(f"degree must be < clients ({n}) for a regular graph, got {degree}")
    if n * degree % 2:
        raise ValueError(f"clients x degree must be even for a regular graph, got {n} x {degree}")
    # start: the circulant with offsets 1..d//2, plus the opposite node (n / 2) when d is odd
    adj = _circulant(n, range(1, degree // 2 + 1))
    if degree % 2:
        nodes = np.arange(n)
        adj[nodes, (nodes + n // 2) % n] = True
    edges = np.argwhere(np.triu(adj, 1))
    # double-edge swaps: (a, b), (c, d) -> (a, d), (c, b) when that adds no loop or multi-edge.
    # One swap depends on the previous, hence the loop (over swaps, not clients).
    num_swaps = 10 * len(edges)
    picks = rng.integers(len(edges), size=(num_swaps, 2))
    flips = rng.random(num_swaps) < 0.5
    for (e1, e2), flip in zip(picks, flips):
        a, b = edges[e1]
        c, d = edges[e2] if not flip else edges[e2][::-1]
        if a == d or c == b or adj[a, d] or adj[c, b] or e1 == e2:
            continue
        adj[a, b] = adj[b, a] = adj[c, d] = adj[d, c] = False
        adj[a, d] = adj[d, a] = adj[c, b] = adj[b, c] = True
        edges[e1] = (a, d)
        edges[e2] = (c, b)
    return adj


def _matching(n: int, rng: np.random.Generator) -> np.ndarray:
    perm = rng.permutation(n)
    pairs = perm[: n - n % 2].reshape(-1, 2)  # with odd n the last one sits out
    adj = np.zeros((n, n), dtype=bool)
    adj[pairs[:, 0], pairs[:, 1]] = True
    adj[pairs[:, 1], pairs[:, 0]] = True
    return adj


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
