"""Versioned weights: the state that samplers load, and its checksum.

Usage::

    w = Weights.of(model.transformer, version=3)      # what the learner broadcasts
    w.load_into(sampler_model.transformer)            # what a sampler does; returns w.checksum
    checksum(trainable(model.transformer))            # 32 hex chars, on whatever device the tensors live

A ``Weights`` is the trainable tensors (LoRA factors, or every transformer parameter for full fine-tuning)
by parameter name, plus the version and a checksum over names, dtypes, shapes and bytes, so that a sampler
can prove which version it holds.

The checksum is an integrity check, not a signature: it catches corruption in transit, partial writes and
mix-ups (another version, another model), and two digests are equal iff the weights are bit-identical, barring
an accidental collision (at most about 2^-64 per comparison). It does not stand against an attacker: xxh3 and
the word fingerprint are not cryptographic, and the weights only travel inside the authenticated cluster.

How the digest is formed. xxh3_128 over a scheme tag, then per tensor in name order the header
``name|dtype|shape|`` (a renamed, reshaped or retyped tensor changes the digest) and the tensor's value:

- payloads of at most ``FINGERPRINT_FROM_BYTES`` in all (LoRA adapters): the tensor's raw bytes, read in place
  (no copy for a contiguous CPU tensor; a CUDA tensor is copied to the host first);
- larger payloads (full weights): ``word_fingerprint``, two 64-bit lanes computed by torch on the tensor's own
  device, so for weights on a GPU only 16 bytes per tensor cross PCIe.

Why the payload's size picks the scheme, never the device: the digest has to be a function of the weights
alone. The learner's digest of its GPU parameters, the digest of the CPU snapshot it ships, a sampler's proof
after loading and a checkpoint's ``state.json`` are compared as plain strings across processes and devices (and a
checkpoint written on a GPU is checked again on a CPU); a scheme chosen by device would make two copies of one
version disagree. The size threshold follows where each payload is hashed: xxh3 reads ~13 GiB/s per CPU core,
the word fingerprint only 1-2 GiB/s on a CPU (torch int64 arithmetic), and LoRA payloads are hashed in host
memory (object store, snapshots), while full weights live on GPUs and move GPU-to-GPU (``learner.collective``),
where copying GBs to the host only to hash them would cost more than the transfer itself.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from models.lora import trainable

# Payloads larger than this (bytes, all tensors together) are hashed by ``word_fingerprint``. Far above any LoRA
# adapter (SD3.5-M's at rank 32 is 72 MiB) and far below full weights (SD3.5-M's are 5 GB in bf16).
FINGERPRINT_FROM_BYTES = 2**30

# Words per row of the word fingerprint (its keys repeat per row, times one key per row: see word_fingerprint).
# Part of the digest's definition: changing it changes every large payload's digest.
ROW_WORDS = 2**16
# Rows summed per step on a GPU (fewer kernel launches; int64 scratch of 3 x rows x ROW_WORDS x 8 bytes = 96 MiB:
# the widened words and both lanes' products). A CPU takes one row per step, whose 1.5 MiB of scratch stays in
# cache (4x faster there). The step changes nothing in the result: the sums are exact modulo 2^64, in any order.
GPU_BLOCK_ROWS = 64

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Key streams (splitmix64 inputs start here): per lane, one for positions within a row, one for rows.
_POSITION_STREAMS = (0, 2 << 48)
_ROW_STREAMS = (1 << 48, 3 << 48)


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; splitmix64 needs the logical shift.
    return (z >> s) & ((1 << (64 - s)) - 1)


def _odd_keys(start: int, n: int, device: torch.device) -> torch.Tensor:
    """splitmix64(start + j) | 1 for j < n as int64 [n]: a fixed, odd, well-mixed key per position."""
    z = torch.arange(start, start + n, dtype=torch.int64, device=device) + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return (z ^ _shr(z, 31)) | 1


@functools.cache
def _position_keys(device: torch.device) -> torch.Tensor:
    """int64 [2, ROW_WORDS]: each lane's key per position within a row, made once per device."""
    return torch.stack([_odd_keys(s, ROW_WORDS, device) for s in _POSITION_STREAMS])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as uint8 [nbytes] in row-major order: a view, copied only if ``t`` is not contiguous."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def word_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two 64-bit lanes over the tensor's bytes, computed on ``t``'s device: int64 [2] on that device.

    The bytes (row-major, zero-padded to a multiple of 4) are read as little-endian int32 words w_i and lane l is
    ``sum_i w_i * k_l(i) mod 2^64`` with ``k_l(i) = P_l[i % ROW_WORDS] * R_l[i // ROW_WORDS]``, where P_l and R_l
    are ``splitmix64(stream + index) | 1`` (odd). Exact integer arithmetic, so the result is the same on every
    device and for any summation order. A change of one word always changes both lanes (an odd key times a
    nonzero 32-bit difference is nonzero modulo 2^64); other changes, swapped words included, go unseen only if
    the keys happen to cancel them: about 2^-64 per lane for scattered damage, at worst about 2^-32 per lane for
    changes confined to the top bits of words. Memory: int64 scratch for ``GPU_BLOCK_ROWS`` rows (one row on a
    CPU) at a time; the tensor itself is read in place.
    """
    if t.is_meta:
        raise ValueError("a meta tensor has no data to fingerprint (it was never loaded)")
    b = _as_bytes(t)
    keys = _position_keys(b.device)
    row_bytes = 4 * ROW_WORDS
    row_keys = torch.stack([_odd_keys(s, -(-b.numel() // row_bytes), b.device) for s in _ROW_STREAMS])  # [2, rows]
    step = row_bytes * (GPU_BLOCK_ROWS if b.is_cuda else 1)
    lanes = torch.zeros(2, dtype=torch.int64, device=b.device)
    for start in range(0, b.numel(), step):
        chunk = b[start : start + step]
        if chunk.numel() % row_bytes or chunk.storage_offset() % 4:
            # The last, partial row (or an int32-misaligned view): copy this step's bytes into zeroed whole rows;
            # zero words add nothing to the sums.
            padded = torch.zeros(-(-chunk.numel() // row_bytes) * row_bytes, dtype=torch.uint8, device=b.device)
            padded[: chunk.numel()] = chunk
            chunk = padded
        # int32 words widened first: an int64 x int64 product is vectorised, a mixed-dtype one is not (3x slower).
        words = chunk.view(torch.int32).to(torch.int64).view(-1, 1, ROW_WORDS)  # [rows, 1, ROW_WORDS]
        row_sums = (words * keys).sum(dim=2)  # [rows, 2] int64
        first = start // row_bytes
        lanes += (row_sums * row_keys[:, first : first + len(row_sums)].T).sum(dim=0)
    return lanes


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3_128 hex digest (32 chars) of names, dtypes, shapes and bytes; see the module docstring.

    Equal iff bit-identical, wherever each tensor lives (CPU, CUDA, mixed). Raises ValueError for a
    meta tensor (a parameter that was never loaded has no bytes to vouch for).
    """
    by_words = sum(t.numel() * t.element_size() for t in tensors.values()) > FINGERPRINT_FROM_BYTES
    h = xxhash.xxh3_128()
    h.update(b"fdfo-weights|words|" if by_words else b"fdfo-weights|bytes|")
    lanes = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device (never loaded): no bytes to checksum")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if by_words:
            lanes.append(word_fingerprint(t))  # queued on its device; fetched below, all at once
        else:
            h.update(_as_bytes(t).cpu().numpy())  # buffer protocol: xxh3 reads the tensor's memory in place
    if lanes:
        h.update(torch.stack([lane.cpu() for lane in lanes]).numpy())
    return h.hexdigest()


# Byte offset alignment of each tensor in a packed payload: a view of any dtype is aligned (and starts a cache line).
ALIGN = 64


def packed_layout(tensors: dict[str, torch.Tensor]) -> tuple[list[tuple[str, torch.dtype, tuple, int]], int]:
    """([(name, dtype, shape, byte offset)] in the dict's order, total bytes) of ``tensors`` packed ``ALIGN``-aligned."""
    layout, offset = [], 0
    for name, t in tensors.items():
        layout.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return layout, offset


def pack(
    tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(one CPU uint8 buffer holding every tensor's bytes at ``packed_layout``'s offsets, the tensors as views of
    it). One copy per tensor, into ``out`` when it is a CPU uint8 buffer of the packed size (reused: no allocation,
    whose first touch costs more than the copy: ~40 ms for 72 MiB on a VM), else into a new one. Tensors on one GPU
    are packed there first and cross PCIe in one copy."""
    layout, total = packed_layout(tensors)
    if out is None or out.dtype != torch.uint8 or out.device.type != "cpu" or out.numel() != total:
        out = torch.empty(total, dtype=torch.uint8)
    devices = {t.device for t in tensors.values()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    flat = out if device.type == "cpu" else torch.empty(total, dtype=torch.uint8, device=device)
    views = unpack(flat, layout)
    with torch.no_grad():  # one call for every tensor (a LoRA has hundreds: a Python loop of copies costs ms)
        torch._foreach_copy_(list(views.values()), [t.detach() for t in tensors.values()])
    if flat is not out:
        out.copy_(flat)
        views = unpack(out, layout)
    return out, views


def unpack(flat: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple, int]]) -> dict[str, torch.Tensor]:
    """The tensors of a packed buffer, as views of it (by name)."""
    return {
        name: flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, dtype, shape, offset in layout
    }


def _rebuild(version: int, flat: np.ndarray, layout: list, digest: str) -> Weights:
    # A buffer from the object store is a read-only view of the shared object; torch warns that it cannot mark it
    # read-only. Nothing here writes to it (load_into only reads), hence the local silence.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        buffer = torch.from_numpy(flat)
    return Weights(version=version, tensors=unpack(buffer, layout), checksum=digest, packed=buffer)


@dataclass
class Weights:
    """A versioned snapshot of the trainable parameters. tensors: name -> CPU tensor.

    A snapshot is packed: its tensors are views of one byte buffer (``pack``), so it pickles (Ray's object store)
    as that single numpy array, which travels out of band: the learner's ``ray.put`` copies the bytes once into
    shared memory and a sampler on the same node maps them without copying (one buffer, not one per tensor: Ray's
    cost per out-of-band buffer is ~0.6 ms, 230 ms for a LoRA's 384 tensors). The tensors of a ``Weights`` that
    arrived that way are therefore views of the shared object: read them (``load_into``), copy them, but never
    write to them in place.
    """

    version: int
    tensors: dict[str, torch.Tensor]
    checksum: str
    packed: torch.Tensor | None = field(default=None, repr=False, compare=False)  # the buffer tensors view, if any

    @classmethod
    def of(
        cls,
        transformer: torch.nn.Module | dict[str, torch.Tensor],
        version: int,
        digest: str | None = None,
        buffer: torch.Tensor | None = None,
    ) -> Weights:
        """A snapshot of ``transformer``'s trainable tensors as ``version`` (or of a dict of tensors by name: the full
        tensors a sharded learner gathered); ``digest``: their checksum if the caller has just computed it (the
        learner has, after every step), else computed here. ``buffer``: the previous snapshot's ``packed`` to write
        this one into (``pack``): the caller's promise that the previous snapshot is no longer read (the runtime's
        learner actor, ``Learner(reuse_snapshots=True)``, once that ``Weights`` is gone: Ray stores a call's result
        when the call returns; a snapshot overwritten all the same fails ``verify``, it never loads other bytes)."""
        live = trainable(transformer) if isinstance(transformer, torch.nn.Module) else transformer
        flat, tensors = pack(live, out=buffer)
        # Taken over the live tensors (same digest as the snapshot's: it does not depend on the device): for
        # full weights on a GPU the fingerprint runs there, and the digest also vouches for the snapshot's copy.
        return cls(version=version, tensors=tensors, checksum=digest or checksum(live), packed=flat)

    def __reduce__(self):
        flat = self.packed if self.packed is not None else pack(self.tensors)[0]
        return _rebuild, (self.version, flat.numpy(), packed_layout(self.tensors)[0], self.checksum)

    def verify(self) -> None:
        got = checksum(self.tensors)
        if got != self.checksum:
            raise RuntimeError(
                f"weights version {self.version} failed its checksum ({got} != {self.checksum}): the payload was "
                "corrupted in transit; refusing to sample with it"
            )

    def load_into(self, transformer: torch.nn.Module) -> str:
        """Copy into ``transformer`` (which must have the same trainable names, dtypes and shapes); returns the
        loaded checksum. The payload is verified before anything is copied; a copy between tensors of one dtype and
        shape is exact, so the model then holds exactly the verified bytes (no second checksum over the model)."""
        self.verify()
        params = dict(transformer.named_parameters())
        unknown = set(self.tensors) - set(params)
        if unknown:
            raise ValueError(f"weights name parameters the model lacks (LoRA config differs?): {sorted(unknown)[:3]}")
        for name, t in self.tensors.items():
            p = params[name]
            if p.dtype != t.dtype or p.shape != t.shape:  # a narrowing copy: the model would not hold this version
                raise RuntimeError(
                    f"cannot load version {self.version}: {name} is {t.dtype} {tuple(t.shape)} in the "
                    f"weights but {p.dtype} {tuple(p.shape)} in the model (model.dtype or LoRA settings differ)"
                )
        source = self._on(params[next(iter(self.tensors))].device if self.tensors else None)
        with torch.no_grad():  # one call for every tensor
            torch._foreach_copy_([params[name] for name in source], list(source.values()))
        return self.checksum

    def _on(self, device: torch.device | None) -> dict[str, torch.Tensor]:
        """The tensors to copy from for a model on ``device``: a packed snapshot crosses to a GPU in one transfer (one
        host-to-device copy of the buffer instead of one per tensor, then copies on the device); else as they are."""
        if self.packed is None or device is None or device.type == "cpu":
            return self.tensors
        return unpack(self.packed.to(device, non_blocking=False), packed_layout(self.tensors)[0])
