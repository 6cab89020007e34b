"""Past one process, the process-group plumbing: the shards of a run's clients, joining the
group, the collectives and their failures.

    torchrun --standalone --nproc-per-node P -m mhd_fast run ...            one node
    torchrun --nnodes M --node-rank R --nproc-per-node P --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m mhd_fast run ...                    M nodes

A run launched by torchrun (WORLD_SIZE > 1 in the environment) joins the process group (gloo on
CPU, NCCL on CUDA with the LOCAL_RANK-th GPU) and holds one contiguous block of clients
(``shard_bounds``: balanced, the first ranks take the remainder): their batched models, data
rows and optimizer state. The numbers do not depend on the number of ranks: every rank draws
the run's random streams (weights, batches) for all clients and keeps its clients' rows, and a
client's loss reads only the rows it receives.

What crosses follows the graph's cut (``make_cut``). The *candidates* of a rank are its own
clients and every client one of them hears, in ascending client order. Rank s sends rank r, in
one all_to_all (``send_rows``), the rows of its clients that r needs, each once however many
of r's clients hear it. What the rows are (predictions, FedAvg's weights), where they land
and what they cost is the exchange's business (``exchange.route``).

Faults: every collective runs under the process group's timeout (``--dist-timeout``); a peer
that died (its connection closes) or hangs (nothing arrives in time) makes it raise
``PeerFailure``, which the command line prints as one line. Checkpoints are per run: rank 0
gathers every rank's rows and writes the file a one-process run writes; a resumed run
scatters the rows by its own sharding, so it may use another number of ranks.
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor



class PeerFailure(RuntimeError):
    """A collective failed: another rank died, hung past --dist-timeout, or the network broke."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` holds clients [bounds[rank], bounds[rank + 1]).
    ``timeout``: the seconds a collective waits for the other ranks (for messages)."""

    rank: int
    world: int
    bounds: tuple[int, ...]
    timeout: float = 0.0

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def num_clients(self) -> int:
        return self.bounds[-1]

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes output."""
        return self.rank == 0

    @property
    def clients(self) -> range:
        return range(self.start, self.stop)

    def clients_of(self, rank: int) -> range:
        return range(self.bounds[rank], self.bounds[rank + 1])


def overlap(a: range, b: range) -> range:
    """The clients in both ranges (contiguous ranges)."""
    lo = max(a.start, b.start)
    return range(lo, max(lo, min(a.stop, b.stop)))


def shard_bounds(n: int, world: int) -> tuple[int, ...]:
    """world + 1 boundaries of balanced contiguous blocks of n clients (first ranks take one
    more when world does not divide n)."""
    base, extra = divmod(n, world)
    return tuple(r * base + min(r, extra) for r in range(world + 1))


def make_shard(n: int, rank: int = 0, world: int = 1, timeout: float = 0.0) -> Shard:
    if world > n:
        raise ValueError(f"--clients {n} must be >= the number of ranks {world}: every rank "
                         "holds at least one client")
    return Shard(rank, world, shard_bounds(n, world), timeout)


# ---- the process group ---------------------------------------------------------------------

def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout: float) -> bool:
    """Join the process group of a torchrun launch: gloo for CPU runs, NCCL for CUDA runs (each
    rank on GPU LOCAL_RANK), ``timeout`` seconds for every collective. Returns True when this
    call created the group (so the caller closes it); False in one process or when the caller
    made the group itself."""
    if dist.is_initialized() or not launched():
        return False
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = os.environ.get("RANK", "?"), os.environ["WORLD_SIZE"]
    try:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:  # the store or the rendezvous: a peer that never came
        raise PeerFailure(f"rank {rank} of {world}: joining the process group failed within "
                          f"--dist-timeout {timeout:g} s ({_first_line(e)})") from None
    return True


def current(n: int, timeout: float) -> Shard:
    """This process's shard of n clients: the whole range without a process group."""
    if not dist.is_initialized():
        return make_shard(n, timeout=timeout)
    return make_shard(n, dist.get_rank(), dist.get_world_size(), timeout)


def rank_device(device: torch.device, shard: Shard) -> torch.device:
    """Several ranks on CUDA: each its own GPU (set by ``init``)."""
    if shard.world > 1 and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shutdown(clean: bool) -> None:
    """Close the process group. clean (every rank got through its run): first a barrier, so
    that no rank tears its connections down while a peer's last send or receive on them is
    still in flight. After a failure the barrier is skipped: a dead peer would hold it for the
    whole --dist-timeout. The barrier alone did not stop gloo's occasional abort at interpreter
    exit ("terminate called without an active exception"); ``leave`` is what avoids that."""
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        # What still refers to the group's C++ object (finished works, cycles) goes now, while the
        # interpreter is whole, not at its finalization.
        gc.collect()


def leave(status: int) -> None:
    """End a process of a torchrun launch with ``status`` without the interpreter's
    finalization: gloo's teardown at exit still aborted a rank now and then after a clean
    shutdown ("terminate called without an active exception", 2 launches in 10 on this 2-core
    machine under load), turning a finished run into a failed launch. Everything the run writes
    is on disk by then (atomic writes); stdout and stderr are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo prefixes its source file and line
    return re.split(r"(?<=\.)\s", line)[0]      # and follows with advice about other logs


@contextmanager
def _collective(shard: Shard, what: str):
    """Turn a failed collective (gloo / NCCL errors are RuntimeErrors) into a PeerFailure."""
    try:
        yield
    except RuntimeError as e:
        raise PeerFailure(f"rank {shard.rank} of {shard.world}: {what} failed: another rank died, "
                          f"hung past --dist-timeout {shard.timeout:g} s or lost its connection "
                          f"({_first_line(e)})") from None


def all_sum(x: Tensor, shard: Shard, what: str) -> Tensor:
    """x summed over ranks, in place (x itself in one process)."""
    if shard.world > 1:
        with _collective(shard, what):
            dist.all_reduce(x)
    return x


def gather_objects(obj, shard: Shard, what: str) -> list | None:
    """Every rank's ``obj`` (picklable; tensors on the CPU) as a list in rank order on rank 0,
    None on the others."""
    if shard.world == 1:
        return [obj]
    out = [None] * shard.world if shard.lead else None
    with _collective(shard, what):
        dist.gather_object(obj, out, dst=0)
    return out


def scatter_objects(objs: list | None, shard: Shard, what: str):
    """objs[r] (a list on rank 0, None elsewhere) -> rank r."""
    if shard.world == 1:
        return objs[0]
    out = [None]
    with _collective(shard, what):
        dist.scatter_object_list(out, objs if shard.lead else None, src=0)
    return out[0]


# ---- the cut of a graph --------------------------------------------------------------------

@dataclass
class Cut:
    """A round's graph [N, N] seen from one rank.

    adj   [M, M] bool: the graph among the rank's M candidates (its clients and every client
          they hear, ascending); rows of other ranks' clients are empty
    rows  the candidates that are this rank's clients
    send  per rank: offsets (into this rank's clients) of the clients whose rows it needs,
          ascending; empty for this rank
    recv  per rank: how many client rows come from it (0 for this rank)
    """

    adj: Tensor
    rows: slice
    send: list[Tensor]
    recv: list[int]


def make_cut(graph: Tensor, shard: Shard) -> Cut:
    """The cut of ``graph`` for ``shard`` (every rank computes every other rank's needs from
    the same graph, so nothing is negotiated). One process needs none: its route is the
    identity (``exchange.route``)."""
    a, b = shard.start, shard.stop
    none = graph.new_zeros(0, dtype=torch.int64)
    own = graph[a:b]                                   # [n_local, N]: whom my clients hear
    need = own.any(dim=0)
    need[a:b] = True
    candidates = need.nonzero().squeeze(1)             # ascending client indices
    lo = int((candidates < a).sum())                   # sync: the sizes below are host ints
    m = len(candidates)
    adj = torch.zeros(m, m, dtype=torch.bool, device=graph.device)
    adj[lo:lo + (b - a)] = own[:, candidates]
    send, recv = [], []
    for s in range(shard.world):  # a loop over ranks, not clients
        lo_s, hi_s = shard.bounds[s], shard.bounds[s + 1]
        mine = s == shard.rank
        send.append(none if mine else graph[lo_s:hi_s, a:b].any(dim=0).nonzero().squeeze(1))
        recv.append(need[lo_s:hi_s].sum() * (not mine))
    recv = torch.stack(recv).tolist()                  # sync: the split sizes are host ints
    return Cut(adj, slice(lo, lo + (b - a)), send, recv)


def send_rows(parts: list[Tensor], cut: Cut, shard: Shard, what: str) -> tuple[list[Tensor], int]:
    """Rows of this rank's clients -> the rows it needs from the others, in candidate order.

    parts: tensors [n_local, ...] of any dtypes; a client's row crosses as one block of bytes
    (all its parts), in one all_to_all. Returns (the received parts [n_received, ...], the
    bytes this rank sent to other ranks)."""
    n = parts[0].shape[0]
    flat = [p.detach().reshape(n, -1).contiguous() for p in parts]
    widths = [f.shape[1] * f.element_size() for f in flat]
    rows = torch.cat([f.view(torch.uint8) for f in flat], dim=1)   # [n_local, R]
    width = rows.shape[1]
    out = rows[torch.cat(cut.send)]
    got = rows.new_empty(sum(cut.recv), width)
    send_sizes = [len(s) * width for s in cut.send]
    with _collective(shard, what):
        dist.all_to_all_single(got.view(-1), out.view(-1), [c * width for c in cut.recv],
                               send_sizes)
    received, col = [], 0
    for p, w in zip(parts, widths):
        block = got[:, col:col + w].contiguous().view(p.dtype)
        received.append(block.reshape(len(got), *p.shape[1:]))
        col += w
    return received, sum(send_sizes)
