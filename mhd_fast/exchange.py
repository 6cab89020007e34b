"""What crosses the graph: predictions on the public batch (and FedAvg's weights) -> what each
client receives, and how many bytes every directed edge carried.

One path for one process and for many: ``exchange`` encodes this process's clients'
predictions into their wire form (dense logits cast to the wire dtype, or top-k packets),
routes them, places what arrived, and counts the bytes. The ``Route`` of a round's graph says
who this process's students hear and how their rows come:

- one process holds every client: the identity route. Its candidates are all N clients, the
  adjacency is the graph itself, and nothing is sent.
- under torchrun a process holds a contiguous block of clients (``distributed.Shard``). Its
  *candidates* are its own clients and every client they hear, in ascending client order;
  the process group's all_to_all brings the wire rows of the others over the graph's cut
  (``distributed.make_cut``), each once however many of its clients hear it, and ``place``
  puts them at their candidate rows. Rows of clients held elsewhere hear nobody.

``mhd_loss`` then reads, for candidate i, only the rows of the candidates j with adj[i, j];
since candidates keep the client order, ties still go to the lowest client index.

Byte accounting (per directed edge j -> i, i.e. adj[i, j], self-loops never sent):
    rows  = heads_sent · B                                     (prediction rows per exchange)
    dense = rows · V · bytes(wire_dtype)
    topk  = rows · (K · bytes(wire_dtype) + K · bytes(index) + 4)   (values, indices, fp32 lse)
    + B · E · bytes(wire_dtype) when embeddings are exchanged (nu_emb > 0).
``dense_edge_bytes`` is always the fp32 dense cost, the baseline a packet is compared with.
Bytes are counted per directed client edge, and per process: what it sent to other processes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import mhd_fast
from mhd_fast.ops import TopKLogits, map_teacher, teacher_fields

from . import distributed as D

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Route:
    """A round's graph seen from one process: whom its students hear, and how their rows come.

    graph    [N, N] bool, the round's graph (graph[i, j]: i hears j)
    shard    the clients this process holds (n of them; one process: all N)
    adj      [M, M] bool, the graph among its M candidates; rows of clients held elsewhere
             are empty
    rows     the candidates that are this process's clients
    send     (parts, what) -> (received, bytes): parts() gives tensors [n, ...] of this
             process's clients (built only when something crosses); received, the same
             parts [M − n, ...] of the other candidates in candidate order; bytes, what this
             process sent to other processes. ``what`` names the transfer in a PeerFailure.
    """

    graph: Tensor
    shard: D.Shard
    adj: Tensor
    rows: slice
    send: Callable[[Callable[[], list[Tensor]], str], tuple[list[Tensor], int]]

    @property
    def clients(self) -> range:
        return self.shard.clients

    @property
    def self_contained(self) -> bool:
        """Every candidate is this process's own, so nothing arrives (always in one process)."""
        return self.adj.shape[0] == self.shard.size

    def edges(self) -> Tensor:
        """[n, N] int64, 1 on the directed edges into this process's clients that carry
        something: self-loops are never sent."""
        own = torch.arange(self.shard.size, device=self.graph.device)
        edges = self.graph[self.shard.start:self.shard.stop].clone()
        edges[own, own + self.shard.start] = False
        return edges.to(torch.int64)


def route(adj: Tensor, shard: D.Shard | None = None) -> Route:
    """The route of graph ``adj`` [N, N] bool for the process that holds ``shard`` (None:
    every client, as a process without a process group holds them). One process: the
    identity route. Several: the process group's all_to_all over the graph's cut (host syncs:
    the cut's sizes)."""
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1] or adj.dtype != torch.bool:
        raise ValueError(f"adj must be a bool [N, N] tensor, got {adj.dtype} {tuple(adj.shape)}")
    n = adj.shape[0]
    shard = shard if shard is not None else D.make_shard(n)
    if shard.num_clients != n:
        raise ValueError(f"adj must be [N, N] for the shard's N = {shard.num_clients} clients, "
                         f"got {tuple(adj.shape)}")
    if shard.world == 1:
        return Route(adj, shard, adj, slice(0, n), _identity)
    cut = D.make_cut(adj, shard)
    return Route(adj, shard, cut.adj, cut.rows,
                 lambda parts, what: D.send_rows(parts(), cut, shard, what))


def _identity(parts, what: str) -> tuple[list[Tensor], int]:
    """One process: every candidate is its own, nothing crosses."""
    return [], 0


@dataclass
class Received:
    """The outcome of one exchange, seen by the process that holds the students.

    teacher     [M, H1, B, V] logits in the wire dtype, or TopKLogits with leading dims [M, H1, B]:
                the rows of the M candidates (one process: M = N, every client)
    emb         [M, B, E] embeddings in the wire dtype, or None when not exchanged
    adj         [M, M] bool, the graph among the candidates (adj[i, j]: i heard j); rows of
                clients held elsewhere are empty
    rows        the candidates that are this process's clients (the students)
    graph       [N, N] bool, the whole graph of the exchange
    cross_rank_bytes  bytes this process sent to other processes (0 in one process)
    edge_bytes  [n, N] int64, bytes that went over each directed edge j -> i into this process's
                n clients (0 off the graph); None for an exchange restored from a checkpoint
                (its bytes were counted when it ran)
    dense_edge_bytes [n, N] int64, what dense fp32 logits would have cost on the same edges
    """

    teacher: Tensor | TopKLogits
    emb: Tensor | None
    adj: Tensor
    rows: slice
    graph: Tensor
    cross_rank_bytes: int = 0
    edge_bytes: Tensor | None = None
    dense_edge_bytes: Tensor | None = None

    @property
    def bytes_sent(self) -> int:
        return int(self.edge_bytes.sum())  # host sync: one scalar per exchange

    @property
    def bytes_dense(self) -> int:
        return int(self.dense_edge_bytes.sum())


def heads_sent(num_heads: int, *, nu_aux: float, nu_main: float) -> list[int]:
    """Heads whose predictions some neighbour needs: heads 0..H1−2 feed the aux heads
    (aux head h learns from head h−1), head 0 feeds the nu_main term."""
    heads = set(range(num_heads - 1)) if nu_aux > 0 and num_heads > 1 else set()
    if nu_main > 0:
        heads.add(0)
    return sorted(heads)


def packet_row_bytes(v: int, k: int, wire_dtype: torch.dtype) -> int:
    """Bytes of one top-k packet row: K values, K indices (int16 if V <= 32767), one fp32 lse."""
    index_bytes = 2 if v <= 32767 else 4
    return k * torch.finfo(wire_dtype).bits // 8 + k * index_bytes + 4


def encode(logits: Tensor, emb: Tensor | None, *, topk: int = 0,
           wire_dtype: torch.dtype = torch.float32, tau: float = 1.0,
           backend: str = "auto") -> tuple[Tensor | TopKLogits, Tensor | None]:
    """Predictions [n, H1, B, V] (and embeddings [n, B, E]) -> their wire form, detached:
    nothing received carries gradient. topk: 0 = dense logits in ``wire_dtype``, else K-class
    packets compressed at temperature ``tau`` (the same τ the loss uses)."""
    v = logits.shape[-1]
    if topk < 0 or topk > v:
        raise ValueError(f"topk must be 0 (dense) or in [1, V = {v}], got {topk}")
    if wire_dtype not in WIRE_DTYPES.values():
        raise ValueError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype}")
    logits = logits.detach()
    if topk:
        teacher = mhd_fast.topk_compress(logits, topk, tau=tau, value_dtype=wire_dtype,
                                         backend=backend)
    else:
        teacher = logits.to(wire_dtype)
    return teacher, emb.detach().to(wire_dtype) if emb is not None else None


def edge_costs(v: int, b: int, num_heads: int, *, topk: int, wire_dtype: torch.dtype,
               emb_dim: int | None) -> tuple[int, int]:
    """(bytes, dense fp32 bytes) over one directed edge per exchange: ``num_heads`` heads of B
    rows of V classes (or K-class packets), plus B embeddings of emb_dim when exchanged."""
    wire_bytes = torch.finfo(wire_dtype).bits // 8
    row_bytes = packet_row_bytes(v, topk, wire_dtype) if topk else v * wire_bytes
    per_edge, dense = num_heads * b * row_bytes, num_heads * b * v * 4
    if emb_dim is not None:
        per_edge += b * emb_dim * wire_bytes
        dense += b * emb_dim * 4
    return per_edge, dense


def exchange(logits: Tensor, emb: Tensor | None, route: Route, *, heads: list[int], topk: int = 0,
             wire_dtype: torch.dtype = torch.float32, tau: float = 1.0,
             backend: str = "auto") -> Received:
    """Send this process's clients' predictions to the clients that hear them: encode, route,
    place, count the bytes.

    logits [n, H1, B, V] (any float dtype; detached here: nothing received carries gradient),
    emb [n, B, E] or None, for the n clients of ``route`` (one process: all N,
    ``route(adj)``); heads: the head indices that are sent (``heads_sent``); topk: 0 = dense
    logits, else K-class packets compressed at temperature ``tau`` (the same τ the loss
    uses); wire_dtype: fp32 / fp16 / bf16. Edge bytes are the rows of the n clients [n, N].
    """
    n, _, b, v = logits.shape
    if n != len(route.clients):
        raise ValueError(f"logits must hold the {len(route.clients)} clients of the route "
                         f"(clients {route.clients.start}..{route.clients.stop - 1}), got {n}")
    teacher, emb = encode(logits, emb, topk=topk, wire_dtype=wire_dtype, tau=tau, backend=backend)
    got = deliver(teacher, emb, route, heads)
    per_edge, dense = edge_costs(v, b, len(heads), topk=topk, wire_dtype=wire_dtype,
                                 emb_dim=emb.shape[2] if emb is not None else None)
    edges = route.edges()
    got.edge_bytes, got.dense_edge_bytes = edges * per_edge, edges * dense
    return got


def deliver(teacher: Tensor | TopKLogits, emb: Tensor | None, route: Route,
            heads: list[int]) -> Received:
    """Wire rows of the route's n clients (``encode``d, all heads) -> what its students
    receive: the rows of its M candidates, without byte counts (``exchange`` adds them; an
    exchange restored from a checkpoint was counted when it ran)."""
    got, sent = route.send(lambda: wire_rows(teacher, emb, heads), "the exchange")
    teacher, emb = place(teacher, emb, got, heads, route)
    return Received(teacher, emb, route.adj, route.rows, route.graph, cross_rank_bytes=sent)


def wire_rows(teacher: Tensor | TopKLogits, emb: Tensor | None, heads: list[int]) -> list[Tensor]:
    """What crosses for each of n clients, as tensors [n, ...]: its heads that somebody reads
    (dense logits, or packet values, indices and lse) and its embeddings."""
    parts = list(teacher_fields(map_teacher(lambda x: x[:, heads], teacher)))
    return parts + [emb] if emb is not None else parts


def place(teacher: Tensor | TopKLogits, emb: Tensor | None, received: list[Tensor],
          heads: list[int], route: Route) -> tuple[Tensor | TopKLogits, Tensor | None]:
    """The [M] candidate rows: this process's own wire rows (all heads) at ``route.rows``, the
    rows received (``wire_rows`` of the other candidates, in candidate order) at the others.
    Heads that were not sent stay zero: no loss reads them. A self-contained process (one
    process) keeps its rows as they are."""
    if route.self_contained:
        return teacher, emb
    got = iter(received)  # in the order of wire_rows: the teacher's fields, then emb
    teacher = map_teacher(lambda own: _at_candidates(own, next(got), route, heads), teacher)
    return teacher, _at_candidates(emb, next(got), route) if emb is not None else None


def _at_candidates(own: Tensor, got: Tensor, route: Route, heads: list[int] | None = None) -> Tensor:
    """[M, ...]: own [n, ...] at the route's rows, got at the other candidates (at dim-1
    indices ``heads`` only when given, zero elsewhere)."""
    rows, m = route.rows, route.adj.shape[0]
    others = torch.cat([torch.arange(rows.start, device=own.device),
                        torch.arange(rows.stop, m, device=own.device)])
    out = own.new_zeros(m, *own.shape[1:])
    out[rows] = own
    if heads is None:
        out[others] = got
    else:
        h = torch.tensor(heads, dtype=torch.int64, device=own.device)
        out[others[:, None], h[None, :]] = got
    return out


def students(z: Tensor, got: Received) -> Tensor:
    """This process's student logits [n, ...] at their candidate rows of ``got`` -> [M, ...],
    zero rows elsewhere (those rows hear nobody: loss 0, no gradient). One process: z itself."""
    m = got.adj.shape[0]
    if got.rows.start == 0 and got.rows.stop == m:
        return z
    return torch.cat([z.new_zeros(got.rows.start, *z.shape[1:]), z,
                      z.new_zeros(m - got.rows.stop, *z.shape[1:])])


def neighbour_mean(x: Tensor, adj: Tensor, *, include_self: bool) -> tuple[Tensor, Tensor]:
    """The mean of x over each client's candidates (adj row, plus itself with include_self):
    the aggregate the nu_emb term pulls a client's embedding towards.

    x [N, ...] -> (mean [N, ...] in x's dtype promoted to fp32, has [N] bool: has a candidate).
    """
    mask = adj.clone()
    mask.fill_diagonal_(include_self)
    w = mask.to(torch.float32)
    count = w.sum(dim=1)
    has = count > 0
    w = w / torch.where(has, count, torch.ones_like(count)).unsqueeze(1)
    mean = torch.einsum("ij,j...->i...", w, x.to(torch.float32))
    return mean, has


# ---- FedAvg: weights over the same route ---------------------------------------------------

def average_weights(params: list[Tensor], route: Route) -> tuple[Tensor, int]:
    """FedAvg's averaging, in place: each client's weights <- the mean over itself and the
    clients it hears. params: this process's stacked weights [n, ...] (one architecture).

    A complete graph (everybody hears everybody) is the plain mean over all N: one all_reduce
    of the processes' sums (nothing to reduce in one process). Any other graph sends the
    weights over the route like predictions. Returns (the bytes per directed edge into this
    process's clients [n, N] int64: every weight over every edge, the bytes this process sent
    to other processes); an all_reduce is counted as a ring's 2 (P − 1) / P of its buffer
    per process (gloo and NCCL pick their own algorithm)."""
    shard, graph = route.shard, route.graph
    n_local, n = shard.size, shard.num_clients
    edge_bytes = route.edges() * sum(p[0].numel() * p.element_size() for p in params)
    heard = int(graph.sum()) - int(graph.diagonal().sum())  # sync: directed edges, no self-loops
    with torch.no_grad():
        if heard == n * (n - 1):
            total = D.all_sum(torch.cat([p.sum(dim=0).reshape(-1) for p in params]), shard,
                              "FedAvg's all_reduce")
            mean = total / n
            for p, m in zip(params, mean.split([p[0].numel() for p in params])):
                p.copy_(m.view(p.shape[1:]).expand_as(p))
            return edge_bytes, (2 * (shard.world - 1) * mean.numel() * mean.element_size()
                                // shard.world)
        own = torch.cat([p.reshape(n_local, -1) for p in params], dim=1)  # [n, P]
        got, sent = route.send(lambda: [own], "FedAvg's weight exchange")
        weights = own if route.self_contained else _at_candidates(own, got[0], route)  # [M, P]
        local = torch.arange(n_local, device=graph.device)
        mix = route.adj[route.rows].clone()
        mix[local, local + route.rows.start] = True       # a client keeps its own weights too
        mix = mix.to(own.dtype)
        new = (mix / mix.sum(dim=1, keepdim=True)) @ weights  # [n, P]
        for p, w in zip(params, new.split([p[0].numel() for p in params], dim=1)):
            p.copy_(w.view(p.shape))
        return edge_bytes, sent
