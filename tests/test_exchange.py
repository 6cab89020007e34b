"""The exchange: wire forms (dense in a wire dtype, top-k packets), bytes per directed edge,
and the neighbour mean of embeddings."""
import pytest
import torch

import mhd_fast
from mhd_fast import distributed as D
from mhd_fast.exchange import (Received, Route, encode, exchange, heads_sent, neighbour_mean,
                               packet_row_bytes, route, wire_rows)
from mhd_fast.ops import TopKLogits, map_teacher, teacher_fields

from cases import make_graph, make_logits

N, H1, B, V = 5, 3, 4, 7


def test_dense_bytes_per_directed_edge():
    z = make_logits((N, H1, B, V))
    adj = make_graph("directed", N)
    got = exchange(z, None, route(adj), heads=[0, 1])
    per_edge = 2 * B * V * 4  # two heads sent, B rows, V fp32 logits
    want = adj.to(torch.int64) * per_edge
    assert torch.equal(got.edge_bytes, want)
    assert torch.equal(got.dense_edge_bytes, want)
    assert got.bytes_sent == int(adj.sum()) * per_edge
    assert torch.equal(got.teacher, z) and got.adj is adj


def test_self_loops_are_never_sent():
    adj = make_graph("selfloops", N)
    got = exchange(make_logits((N, H1, B, V)), None, route(adj), heads=[0])
    assert torch.all(got.edge_bytes.diagonal() == 0)
    assert got.bytes_sent == int((adj & ~torch.eye(N, dtype=torch.bool)).sum()) * B * V * 4


@pytest.mark.parametrize("wire,value_bytes", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_topk_packets_and_their_bytes(wire, value_bytes):
    z = make_logits((N, H1, B, V))
    adj = make_graph("complete", N)
    got = exchange(z, None, route(adj), heads=[0, 1], topk=3, wire_dtype=wire, tau=2.0)
    assert isinstance(got.teacher, TopKLogits)
    assert got.teacher.values.dtype == wire and got.teacher.indices.dtype == torch.int16
    want = mhd_fast.topk_compress(z, 3, tau=2.0, value_dtype=wire, backend="torch")
    torch.testing.assert_close(got.teacher.values.float(), want.values.float())
    row = 3 * value_bytes + 3 * 2 + 4  # K values, K int16 indices, one fp32 lse
    assert packet_row_bytes(V, 3, wire) == row
    assert torch.equal(got.edge_bytes, adj.to(torch.int64) * 2 * B * row)
    assert torch.equal(got.dense_edge_bytes, adj.to(torch.int64) * 2 * B * V * 4)
    assert got.bytes_sent < got.bytes_dense


def test_wide_vocab_packets_use_int32_indices():
    assert packet_row_bytes(40000, 2, torch.float32) == 2 * 4 + 2 * 4 + 4


def test_dense_wire_dtype_rounds_what_crosses():
    z = make_logits((N, H1, B, V))
    got = exchange(z, None, route(make_graph("ring", N)), heads=[0], wire_dtype=torch.float16)
    assert got.teacher.dtype == torch.float16
    assert got.bytes_sent == int(make_graph("ring", N).sum()) * B * V * 2


def test_received_carries_no_gradient():
    z = make_logits((N, H1, B, V)).requires_grad_()
    emb = torch.randn(N, B, 6, requires_grad=True)
    got = exchange(z, emb, route(make_graph("complete", N)), heads=[0], topk=2)
    assert not got.teacher.values.requires_grad and not got.emb.requires_grad


def test_full_topk_teaches_like_dense_logits():
    z = make_logits((N, H1, B, V), seed=1)
    t = make_logits((N, H1, B, V), seed=2)
    adj = make_graph("ring", N)
    dense = exchange(t, None, route(adj), heads=[0, 1])
    packets = exchange(t, None, route(adj), heads=[0, 1], topk=V)
    a = mhd_fast.mhd_loss(z, dense.teacher, adj, backend="torch")
    b = mhd_fast.mhd_loss(z, packets.teacher, adj, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_embedding_bytes_are_counted():
    emb = torch.randn(N, B, 6)
    adj = make_graph("complete", N)
    got = exchange(make_logits((N, H1, B, V)), emb, route(adj), heads=[0], wire_dtype=torch.bfloat16)
    assert got.emb.dtype == torch.bfloat16
    assert got.bytes_sent == int(adj.sum()) * (B * V * 2 + B * 6 * 2)
    assert got.bytes_dense == int(adj.sum()) * (B * V * 4 + B * 6 * 4)


def test_heads_sent():
    assert heads_sent(4, nu_aux=1.0, nu_main=0.0) == [0, 1, 2]  # head 3 teaches nobody
    assert heads_sent(4, nu_aux=1.0, nu_main=0.5) == [0, 1, 2]
    assert heads_sent(1, nu_aux=0.0, nu_main=1.0) == [0]
    assert heads_sent(3, nu_aux=0.0, nu_main=0.0) == []


@pytest.mark.parametrize("topk", [-1, V + 1])
def test_bad_topk(topk):
    with pytest.raises(ValueError, match="topk"):
        exchange(make_logits((N, H1, B, V)), None, route(make_graph("ring", N)), heads=[0],
                 topk=topk)


def test_bad_adjacency():
    with pytest.raises(ValueError, match="adj must be a bool"):
        route(torch.ones(N, N))
    with pytest.raises(ValueError, match="adj must be a bool"):
        route(torch.ones(N, N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="adj must be \\[N, N\\] for the shard's N = 6"):
        route(make_graph("ring", N), D.make_shard(N + 1, 0, 2))
    with pytest.raises(ValueError, match="logits must hold the 6 clients of the route"):
        exchange(make_logits((N, H1, B, V)), None, route(make_graph("ring", N + 1)), heads=[0])


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("graph", ["ring", "directed", "lonely", "selfloops"])
def test_neighbour_mean_matches_a_loop(graph, include_self):
    x = torch.randn(N, B, 3)
    adj = make_graph(graph, N)
    mean, has = neighbour_mean(x, adj, include_self=include_self)
    for i in range(N):
        cands = [j for j in range(N) if (j == i and include_self) or (j != i and adj[i, j])]
        assert bool(has[i]) == bool(cands)
        want = torch.stack([x[j] for j in cands]).mean(0) if cands else torch.zeros(B, 3)
        torch.testing.assert_close(mean[i], want)


def test_received_is_plain_data():
    got = exchange(make_logits((N, H1, B, V)), None, route(make_graph("ring", N)), heads=[0])
    assert isinstance(got, Received) and got.emb is None


def test_map_applies_to_every_field_of_a_packet_and_to_dense_logits():
    z = make_logits((N, H1, B, V))
    packet = mhd_fast.topk_compress(z, 3, backend="torch")
    picked = packet.map(lambda x: x[1:3, :1])
    assert isinstance(picked, TopKLogits)
    for got, field in zip(picked, packet):
        assert torch.equal(got, field[1:3, :1])
    assert torch.equal(map_teacher(lambda x: x[1:3, :1], z), z[1:3, :1])
    assert teacher_fields(packet) == tuple(packet) and teacher_fields(z) == (z,)


@pytest.mark.parametrize("topk,emb_dim", [(0, None), (3, 6)])
def test_a_shard_receives_the_rows_of_its_candidates(topk, emb_dim):
    """The route of a process holding clients 2..3 of 6, its process group played by a send
    that hands over the other candidates' wire rows: every candidate's rows of the heads sent,
    its own at all heads, and the byte rows of its clients."""
    n = 6
    adj = make_graph("ring", n)
    z = make_logits((n, H1, B, V))
    emb = torch.randn(n, B, emb_dim) if emb_dim else None
    shard = D.make_shard(n, 1, 3)
    cut = D.make_cut(adj, shard)
    need = adj[shard.start:shard.stop].any(0)
    need[shard.start:shard.stop] = True
    candidates = need.nonzero().squeeze(1)
    others = candidates[(candidates < shard.start) | (candidates >= shard.stop)]
    teacher, emb_wire = encode(z, emb, topk=topk, tau=2.0)
    heads = [0, 1]
    whole = wire_rows(teacher, emb_wire, heads)

    def send(parts, what):
        assert [p.shape[0] for p in parts()] == [shard.size] * len(whole)
        return [w[others] for w in whole], 123

    shard_route = Route(adj, shard, cut.adj, cut.rows, send)
    got = exchange(z[shard.start:shard.stop], emb[shard.start:shard.stop] if emb_dim else None,
                   shard_route, heads=heads, topk=topk, tau=2.0)
    one = exchange(z, emb, route(adj), heads=heads, topk=topk, tau=2.0)
    assert got.adj is cut.adj and got.rows == cut.rows and got.cross_rank_bytes == 123
    assert torch.equal(got.edge_bytes, one.edge_bytes[shard.start:shard.stop])
    want = map_teacher(lambda x: x[candidates], one.teacher)
    elsewhere = torch.ones(len(candidates), dtype=torch.bool)
    elsewhere[cut.rows] = False
    for g, w in zip(teacher_fields(got.teacher), teacher_fields(want)):
        assert torch.equal(g[:, heads], w[:, heads])    # every candidate's heads sent
        assert torch.equal(g[cut.rows], w[cut.rows])    # its own clients at all heads
        assert not g[elsewhere, 2:].any()               # the head not sent stays zero
    if emb_dim:
        assert torch.equal(got.emb, one.emb[candidates])
