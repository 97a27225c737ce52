"""Full-weight broadcast from the learner to the samplers over a torch.distributed collective group.

Usage::

    addr, port = rendezvous_address(peers_on_this_node=True)              # asked of the learner (rank 0)
    group = WeightGroup(rank=r, world_size=1 + n_samplers, master_addr=addr, master_port=port)  # every rank at once
    checksum = group.send(learner_tensors, version=3)                      # rank 0
    version, checksum = group.receive(sampler_params)                      # ranks 1..n, in place, verified
    group.close()

LoRA adapters travel through the Ray object store (``learner.weights.Weights``); full weights (GBs) take this
path, as OpenRLHF and verl do: gloo on CPU, NCCL on GPU.

Why a standalone group, not ``torch.distributed.init_process_group``: the default group is one per process and
may already belong to someone else (FSDP across the learner's GPUs, a sampling engine's tensor parallelism).
``WeightGroup`` builds its own ``TCPStore`` + ``ProcessGroupGloo``/``ProcessGroupNCCL`` object and calls the
backend directly, so it touches no global state: several groups can live in one process (an old generation
being closed while the next forms) and nothing else in the actor sees it.

Why rank 0 binds the store socket itself: ``TCPStore`` left to itself listens on every interface; we hand it a
socket bound to ``master_addr`` only. Gloo's own sockets are bound to the same address through an explicit device.
``rendezvous_address`` picks that address: 127.0.0.1 when every rank runs on the learner's node, the node's
cluster address (``node_ip``) only when some rank is elsewhere, and never a wildcard (``WeightGroup`` refuses
one). The store has no authentication of its own, so keep the learner's node address behind the cluster's
firewall; what arrives through a group is still verified by the checksum of every version (``receive``).

Wire protocol of one ``send`` (every message is a broadcast from rank 0):

1. header, int64[9]: ``MAGIC, version, n_tensors, n_buckets, bucket_bytes, checksum (16 bytes as 2 int64),
   layout digest (16 bytes as 2 int64)``;
2. bucket sizes, int64[n_buckets], in bytes;
3. the buckets, each a uint8 buffer. Tensors are grouped by dtype (dtypes by name), sorted by parameter name
   within a dtype, and packed greedily into buckets of at most ``bucket_bytes``; a tensor larger than that is
   a bucket on its own and is sent from / received into its own memory (no staging copy). Bytes, not typed
   elements, go on the wire, so any dtype arrives bit-exact.

Both sides verify with ``learner.weights.checksum``, which reads CPU tensors (gloo) in place and fingerprints full
weights on GPUs (NCCL) on the device, so only 16 bytes per tensor reach the host: nothing copies the payload to
hash it.

The layout digest (names, dtypes, shapes; no values) lets a sampler whose model differs from the learner's say
so precisely, instead of reporting a corrupted transfer; it then drains the buckets into scratch memory so the
group stays in step and the next ``send`` works.

Limits (the runtime must handle them):

- **The group is static.** The world size is fixed when it forms, every rank must construct ``WeightGroup``
  concurrently (issue all the ``.remote`` joins before any ``ray.get``), and every rank must take part in
  every ``send``. A sampler that joins late, or replaces a crashed one, cannot enter a formed gloo/NCCL group.
  The runtime's recipe: the late sampler loads the current version once through the object-store path
  (``Weights.load_into``, verified by checksum) so it can sample at once; at the next broadcast the driver
  closes the old group on every survivor and forms a new *generation* with a new port from ``free_port`` and
  the new member list. Nothing here is shared between generations, so re-forming is just ``close`` then a new
  ``WeightGroup``.
- **A dead rank breaks the generation.** If a sampler dies mid-transfer, the other ranks' calls fail (peer
  closed) or time out after ``timeout_s``; the driver closes the group everywhere and re-forms it without the
  dead actor.
- **After a failed ``receive`` the sampler's parameters are undefined** (some buckets may already be written).
  It must not sample until it holds a verified version again (the next successful ``receive``, or the
  object-store path).
- ``free_port`` has the usual race: the port is free when asked, and another process could take it before
  rank 0 binds it; ``WeightGroup`` then fails at once with a message, and the driver retries with a new port.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from learner.weights import checksum

# Staging buffer size per call. Each bucket is one collective call plus one staging copy on either side; at
# 32 MiB the per-call cost (tens of microseconds of framing, a round trip) is well under 1% of the bytes' time,
# while the extra memory stays at one bucket per rank (which matters on a GPU sharing memory with a model).
DEFAULT_BUCKET_BYTES = 32 * 2**20

# First header word: rejects a peer speaking another protocol (or a stale generation's leftovers).
MAGIC = 0x66646630_00000001  # "fdf0", protocol 1
_HEADER_LEN = 9


LOOPBACK = "127.0.0.1"
# Addresses that mean "every interface" to bind(), and nothing a peer could dial.
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bound on ``host`` only, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's IP as Ray knows it (the address other nodes reach it by); 127.0.0.1 outside Ray."""
    try:
        import ray  # lazy: the module stays importable and usable without Ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def node_id() -> str | None:
    """This process's Ray node id (hex); None outside Ray. Ranks with equal ids share a machine."""
    try:
        import ray  # lazy, as in node_ip

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return None


def rendezvous_address(peers_on_this_node: bool) -> tuple[str, int]:
    """(host, free port) for rank 0 of a new weight group, asked of the learner's process.

    ``host`` is 127.0.0.1 when every other rank runs on this node (nothing off the machine can reach the store),
    else this node's cluster address (``node_ip``), which every node can dial. Never a wildcard address.
    """
    host = LOOPBACK if peers_on_this_node else node_ip()
    return host, free_port(host)


def _local_ip_towards(addr: str) -> str:
    # A UDP "connect" sends nothing; it only asks the kernel which local address routes to ``addr``.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def form_group(
    rank: int, world_size: int, master_addr: str, master_port: int, backend: str, timeout_s: float, what: str = "group"
):
    """A standalone process group (its own ``TCPStore`` + gloo/NCCL group object, no global state): returns
    (store, group, device). Blocks until all ``world_size`` ranks joined; rank 0 listens on ``master_addr`` only."""
    timeout = datetime.timedelta(seconds=timeout_s)
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available() or not hasattr(dist, "ProcessGroupNCCL"):
            raise RuntimeError(
                "backend='nccl' needs a CUDA build of torch and a visible GPU; use backend='gloo' on CPU"
            )
        device = torch.device("cuda", torch.cuda.current_device())
    if rank == 0:
        # Bind the store's socket ourselves so it listens on master_addr only (TCPStore alone binds to all).
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((master_addr, master_port))
            listener.listen(128)
        except OSError as e:
            listener.close()
            raise RuntimeError(
                f"rank 0 could not listen on {master_addr}:{master_port} ({e}); the port was probably taken "
                "after free_port() returned it: form the group again with a new free_port()"
            ) from e
        store = dist.TCPStore(
            master_addr, master_port, world_size, True, timeout,
            wait_for_workers=False, master_listen_fd=listener.detach(),
        )  # fmt: skip
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    try:
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Gloo's data sockets bind to one address: this node's address on the route to master_addr
            # (127.0.0.1 when rank 0 is reached over loopback), never to every interface.
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_local_ip_towards(master_addr))]
            pg = dist.ProcessGroupGloo(store, rank, world_size, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {rank} could not form the {what} of {world_size} at {master_addr}:{master_port} within "
            f"{timeout_s}s ({e}); every rank must join concurrently (issue all the joins before waiting on any) and "
            "master_addr must be rank 0's node IP"
        ) from e
    return store, pg, device


def _leave(group) -> None:
    """Shut a standalone group's process group down (idempotent) and drop its store."""
    pg, group._pg = getattr(group, "_pg", None), None
    if pg is not None:
        try:
            pg.shutdown()
        except RuntimeError:
            pass  # already broken by a dead peer: nothing left to release cleanly
    group._store = None


@dataclass(frozen=True)
class _Bucket:
    """Tensors (by name) sent as one contiguous byte buffer of ``nbytes``; all share ``dtype``."""

    dtype: torch.dtype
    names: tuple[str, ...]
    nbytes: int


def plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[_Bucket]:
    """Group by dtype (ordered by dtype name), names sorted within a dtype, packed greedily up to ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` is a bucket of its own. Sender and receiver compute this from their own
    tensors with the sender's ``bucket_bytes``; equal layouts give equal plans.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in sorted(tensors):
        by_dtype.setdefault(tensors[name].dtype, []).append(name)
    buckets: list[_Bucket] = []
    for dtype in sorted(by_dtype, key=str):
        names: list[str] = []
        size = 0
        for name in by_dtype[dtype]:
            n = tensors[name].numel() * tensors[name].element_size()
            if names and size + n > bucket_bytes:
                buckets.append(_Bucket(dtype, tuple(names), size))
                names, size = [], 0
            names.append(name)
            size += n
        if names:
            buckets.append(_Bucket(dtype, tuple(names), size))
    return buckets


def _layout_digest(tensors: dict[str, torch.Tensor]) -> bytes:
    # Names, dtypes and shapes only (no values: that is ``checksum``'s job), so "your model differs from the
    # learner's" is told apart from "the bytes were corrupted" before any payload moves.
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(f"{name}|{tensors[name].dtype}|{tuple(tensors[name].shape)}\n".encode())
    return h.digest()


def _bytes_to_words(b: bytes) -> list[int]:
    return torch.frombuffer(bytearray(b), dtype=torch.int64).tolist()


def _words_to_bytes(words: torch.Tensor) -> bytes:
    return words.to(torch.int64).cpu().numpy().tobytes()


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as uint8[nbytes] (a view, no copy)."""
    return t.detach().reshape(-1).view(torch.uint8)


class WeightGroup:
    """One rank of a standalone process group that broadcasts versioned weights from rank 0 (the learner).

    Construction blocks until all ``world_size`` ranks have joined (or ``timeout_s`` passes), so every rank must
    be constructed concurrently. ``backend`` is "gloo" (CPU tensors) or "nccl" (CUDA tensors, one GPU per rank;
    written to the same contract but not exercised by the CPU test suite). ``bucket_bytes`` matters on rank 0
    only: receivers take it from the header.

    After each ``send``/``receive``, ``last_stats`` holds ``{"version", "bytes", "buckets", "transfer_s",
    "checksum_s"}`` for the perf metrics.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        backend: str = "gloo",
        timeout_s: float = 120,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}: ranks are 0 (learner) .. world_size-1")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if master_addr in WILDCARDS:
            raise ValueError(
                f"master_addr {master_addr!r} is a wildcard: rank 0 would listen on every interface and no peer can "
                "dial it; use 127.0.0.1 when every rank runs on one node, else the learner node's address "
                "(rendezvous_address picks it)"
            )
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.bucket_bytes = bucket_bytes
        self.last_stats: dict[str, float] = {}
        self._store, self._pg, self._device = form_group(
            rank, world_size, master_addr, master_port, backend, timeout_s, what="weight group"
        )

    # -- the one place bytes move; a test may subclass this to corrupt data in flight ----------------------
    def _broadcast(self, t: torch.Tensor) -> None:
        if self._pg is None:
            raise RuntimeError(f"rank {self.rank}'s weight group is closed; form a new WeightGroup to broadcast again")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self._pg.broadcast([t], opts).wait()
        except RuntimeError as e:
            raise RuntimeError(
                f"weight group broadcast failed on rank {self.rank} of {self.world_size} ({e}): a peer died or timed "
                "out, and this generation of the group is broken; close it on every rank and form a new one "
                "(a receiving sampler's weights are undefined until it loads a verified version)"
            ) from e

    def send(self, tensors: dict[str, torch.Tensor], version: int) -> str:
        """Rank 0: broadcast ``tensors`` (name -> tensor of any shape/dtype on this rank's device) as ``version``.

        Returns their ``checksum``. Blocks until every rank has taken every buffer; all ranks must be in
        ``receive`` at the same time.
        """
        if self.rank != 0:
            raise RuntimeError(f"send is for rank 0 (the learner); this is rank {self.rank}: call receive instead")
        if version < 0:
            raise ValueError(f"version must be a non-negative int, got {version}")
        t0 = time.perf_counter()
        digest = checksum(tensors)
        t1 = time.perf_counter()
        buckets = plan_buckets(tensors, self.bucket_bytes)
        header = [MAGIC, version, len(tensors), len(buckets), self.bucket_bytes]
        header += _bytes_to_words(bytes.fromhex(digest)) + _bytes_to_words(_layout_digest(tensors))
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self._device))
        self._broadcast(torch.tensor([b.nbytes for b in buckets], dtype=torch.int64, device=self._device))
        for b in buckets:
            if len(b.names) == 1:  # a large tensor: send from its own memory
                buf = _flat_bytes(tensors[b.names[0]].contiguous())
            else:
                buf = _flat_bytes(torch.cat([tensors[n].detach().reshape(-1) for n in b.names]))
            self._broadcast(buf)
        t2 = time.perf_counter()
        self.last_stats = self._stats(version, buckets, transfer_s=t2 - t1, checksum_s=t1 - t0)
        return digest

    def receive(self, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Ranks > 0: receive the next ``send`` into ``tensors`` in place (the sampler's own parameters).

        ``tensors`` must have the learner's names, dtypes and shapes. Returns ``(version, checksum)`` after
        recomputing the checksum over ``tensors``. Raises RuntimeError if the layout differs from the learner's
        (``tensors`` untouched) or if the received bytes do not match the learner's checksum (``tensors``
        undefined: do not sample with them).
        """
        if self.rank == 0:
            raise RuntimeError("receive is for ranks > 0 (samplers); rank 0 (the learner) calls send")
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self._device)
        self._broadcast(header)  # waits for the learner (its checksum included): not counted as transfer time
        t0 = time.perf_counter()
        magic, version, n_tensors, n_buckets, bucket_bytes = header[:5].tolist()
        if magic != MAGIC:
            raise RuntimeError(
                f"weight group header has magic {magic:#x}, expected {MAGIC:#x}: rank 0 is not a WeightGroup.send of "
                "this protocol (mismatched fdfo versions?); the group is out of step, close and re-form it"
            )
        sent_digest = _words_to_bytes(header[5:7]).hex()
        sent_layout = _words_to_bytes(header[7:9])
        sizes = torch.empty(n_buckets, dtype=torch.int64, device=self._device)
        self._broadcast(sizes)
        sizes = sizes.tolist()

        buckets = plan_buckets(tensors, bucket_bytes)
        if _layout_digest(tensors) != sent_layout or [b.nbytes for b in buckets] != sizes:
            # Take the payload anyway so rank 0 and the other samplers are not left waiting; then refuse.
            scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8, device=self._device)
            for n in sizes:
                self._broadcast(scratch[:n])
            raise RuntimeError(
                f"weights version {version}: this sampler's tensors do not match the learner's layout (learner: "
                f"{n_tensors} tensors, {sum(sizes)} bytes; here: {len(tensors)} tensors, "
                f"{sum(b.nbytes for b in buckets)} bytes; names, dtypes or shapes differ). Build the sampler's "
                "model with the same model id, dtype and LoRA/full-finetune config as the learner; weights not loaded"
            )

        staging = None
        with torch.no_grad():
            for b in buckets:
                if len(b.names) == 1 and tensors[b.names[0]].is_contiguous():  # large tensor: straight into it
                    self._broadcast(_flat_bytes(tensors[b.names[0]]))
                    continue
                if staging is None:
                    staging = torch.empty(max(sizes), dtype=torch.uint8, device=self._device)
                buf = staging[: b.nbytes]
                self._broadcast(buf)
                flat = buf.view(b.dtype)
                offset = 0
                for name in b.names:
                    t = tensors[name]
                    t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()
        t1 = time.perf_counter()
        got = checksum(tensors)
        t2 = time.perf_counter()
        self.last_stats = self._stats(version, buckets, transfer_s=t1 - t0, checksum_s=t2 - t1)
        if got != sent_digest:
            raise RuntimeError(
                f"weights version {version} failed its checksum after the broadcast (received {got}, learner sent "
                f"{sent_digest}): the transfer was corrupted or partial; this sampler's weights are now undefined, "
                "do not sample until a verified version is loaded (next broadcast or the object-store path)"
            )
        return version, got

    def close(self) -> None:
        """Leave the group (idempotent). Every rank closes; the driver then forms the next generation."""
        _leave(self)

    def _stats(self, version: int, buckets: list[_Bucket], transfer_s: float, checksum_s: float) -> dict[str, float]:
        return {
            "version": version,
            "bytes": sum(b.nbytes for b in buckets),
            "buckets": len(buckets),
            "transfer_s": transfer_s,
            "checksum_s": checksum_s,
        }


class LearnerGroupBroken(RuntimeError):
    """A learner rank's collective failed: a peer died or timed out; the group must be formed again."""


class GradientGroup:
    """The learner ranks' group (``runtime.learner.count``): each rank computes the gradient of its share of an
    update's rows, scaled by its share of the update's row count, and ``all_reduce_grads`` sums them, so every rank
    then holds the gradient one learner computes on all the rows and takes the same step (the weights and AdamW
    states stay replicated: any rank's checkpoint resumes any number of ranks). A standalone group like
    ``WeightGroup`` (gloo on CPU, NCCL on GPU); gradients travel flattened per dtype in buckets."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        backend: str = "gloo",
        timeout_s: float = 120,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        if master_addr in WILDCARDS:
            raise ValueError(f"master_addr {master_addr!r} is a wildcard; give rank 0's node address")
        self.rank, self.world_size, self.bucket_bytes = rank, world_size, bucket_bytes
        self._store, self._pg, self._device = form_group(
            rank, world_size, master_addr, master_port, backend, timeout_s, what="learner group"
        )

    def _all_reduce(self, t: torch.Tensor, op) -> None:
        if self._pg is None:
            raise RuntimeError(f"learner rank {self.rank}'s group is closed")
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        try:
            self._pg.allreduce([t], opts).wait()
        except RuntimeError as e:
            raise LearnerGroupBroken(
                f"learner group all-reduce failed on rank {self.rank} of {self.world_size} ({e}): a "
                "rank died or timed out; the runtime restarts the group from the last checkpoint"
            ) from e

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's ``.grad`` over the ranks, in place (a missing grad counts as zeros)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for g in grads + [None]:
                if g is None or (bucket and size + g.numel() * g.element_size() > self.bucket_bytes):
                    flat = torch.cat([b.reshape(-1) for b in bucket])
                    self._all_reduce(flat, dist.ReduceOp.SUM)
                    offset = 0
                    for b in bucket:
                        b.copy_(flat[offset : offset + b.numel()].view_as(b))
                        offset += b.numel()
                    bucket, size = [], 0
                if g is not None:
                    bucket.append(g)
                    size += g.numel() * g.element_size()

    def reduce_metrics(self, sums: dict[str, float], maxima: dict[str, float]) -> tuple[dict, dict]:
        """Each rank's metric sums added up and its maxima maxed over the ranks (keys in the same order everywhere)."""
        out = []
        for values, op in ((sums, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX)):
            keys = sorted(values)
            t = torch.tensor([float(values[k]) for k in keys] or [0.0], dtype=torch.float64, device=self._device)
            self._all_reduce(t, op)
            out.append(dict(zip(keys, t.tolist())))
        return out[0], out[1]

    def close(self) -> None:
        """Leave the group (idempotent); the runtime forms a new one after a loss."""
        _leave(self)
