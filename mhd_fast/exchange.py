"""What crosses the graph: predictions on the public batch -> what each client receives, and
how many bytes every directed edge carried.

The simulator keeps every client in one process, so "receiving" means: the predictions of all
clients in their wire form (dense logits cast to the wire dtype, or top-k packets, SPEC §3),
together with the adjacency that says who hears whom; ``mhd_loss`` then reads, for client i,
only the rows of the clients j with adj[i, j]. A distributed run replaces ``exchange`` with a
function of the same signature that gathers neighbours' rows over torch.distributed.

Byte accounting (per directed edge j -> i, i.e. adj[i, j], self-loops never sent):
    rows  = heads_sent · B                                     (prediction rows per exchange)
    dense = rows · V · bytes(wire_dtype)
    topk  = rows · (K · bytes(wire_dtype) + K · bytes(index) + 4)   (values, indices, fp32 lse)
    + B · E · bytes(wire_dtype) when embeddings are exchanged (nu_emb > 0).
``dense_edge_bytes`` is always the fp32 dense cost, the baseline a packet is compared with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import mhd_fast
from mhd_fast.ops.api import TopKLogits

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Received:
    """The outcome of one exchange.

    teacher     [N, H1, B, V] logits in the wire dtype, or TopKLogits with leading dims [N, H1, B]
    emb         [N, B, E] embeddings in the wire dtype, or None when not exchanged
    adj         [N, N] bool, the graph the exchange ran on (adj[i, j]: i heard j)
    edge_bytes  [N, N] int64, bytes that went over each directed edge (0 off the graph)
    dense_edge_bytes [N, N] int64, what dense fp32 logits would have cost on the same edges
    """

    teacher: Tensor | TopKLogits
    emb: Tensor | None
    adj: Tensor
    edge_bytes: Tensor
    dense_edge_bytes: Tensor

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


def exchange(logits: Tensor, emb: Tensor | None, adj: Tensor, *, heads: list[int], topk: int = 0,
             wire_dtype: torch.dtype = torch.float32, tau: float = 1.0,
             backend: str = "auto") -> Received:
    """Send every client's predictions to the clients that hear it.

    logits [N, H1, B, V] (any float dtype; detached here: nothing received carries gradient),
    emb [N, B, E] or None, adj [N, N] bool, heads: the head indices that are sent (for the
    byte count; ``heads_sent``), topk: 0 = dense logits, else K-class packets compressed at
    temperature ``tau`` (the same τ the loss uses), wire_dtype: fp32 / fp16 / bf16.
    """
    n, h1, b, v = logits.shape
    if topk < 0 or topk > v:
        raise ValueError(f"topk must be 0 (dense) or in [1, V = {v}], got {topk}")
    if wire_dtype not in WIRE_DTYPES.values():
        raise ValueError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype}")
    if tuple(adj.shape) != (n, n) or adj.dtype != torch.bool:
        raise ValueError(f"adj must be a bool [N, N] = [{n}, {n}] tensor, got {adj.dtype} "
                         f"{tuple(adj.shape)}")
    logits = logits.detach()
    wire_bytes = torch.finfo(wire_dtype).bits // 8
    if topk:
        teacher = mhd_fast.topk_compress(logits, topk, tau=tau, value_dtype=wire_dtype,
                                         backend=backend)
        row_bytes = packet_row_bytes(v, topk, wire_dtype)
    else:
        teacher = logits.to(wire_dtype)
        row_bytes = v * wire_bytes
    per_edge = len(heads) * b * row_bytes
    dense_per_edge = len(heads) * b * v * 4
    if emb is not None:
        emb = emb.detach().to(wire_dtype)
        per_edge += emb.shape[1] * emb.shape[2] * wire_bytes
        dense_per_edge += emb.shape[1] * emb.shape[2] * 4
    edges = adj & ~torch.eye(n, dtype=torch.bool, device=adj.device)
    edges = edges.to(torch.int64)
    return Received(teacher, emb, adj, edges * per_edge, edges * dense_per_edge)


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
