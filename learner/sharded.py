"""FSDP2 sharded full fine-tuning for the learner group: each of M ranks holds 1/M of the fp32 master weights, of
their gradients and of the AdamW moments, and the group takes the step one learner takes on the same rows.

Usage (every rank of the group, each in its own process)::

    group = init_default_group(rank=r, world_size=M, store=store, backend="gloo")  # once per process
    shard_transformer(model.transformer, group, device, param_dtype=torch.bfloat16)  # in place
    params = [p for p in model.transformer.parameters() if p.requires_grad]       # fp32 DTensor shards
    opt = torch.optim.AdamW(params, lr=...)                                          # moments sharded too
    (loss * len(mb) / len(update_rows)).backward()   # this rank's micro-batches: grads SUM over the ranks
    gn = clip_grad_norm(params, max_norm)           # the global norm, the same on every rank
    opt.step(); opt.zero_grad(set_to_none=True)
    state = full_state(model.transformer, dtype=torch.bfloat16)   # every rank takes part; full tensors on each
    load_full_state(model.transformer, state)                     # a state gathered at any M, loaded at this M
    opt_state = full_optimizer_state(opt); load_full_optimizer_state(opt, opt_state)   # the same for AdamW

Why the *default* process group (global state), unlike ``learner.collective``'s standalone groups: FSDP2 works
through ``DeviceMesh`` and DTensor, and in torch 2.13 both read the global registry. ``DeviceMesh.from_group`` calls
``get_process_group_ranks(group)``, which raises ``KeyError`` for a group that ``torch.distributed`` did not create
(a ``ProcessGroupGloo`` from ``form_group`` is not even a ``ProcessGroup``: ``TypeError: object is not iterable``),
and ``DeviceMesh.get_rank`` / DTensor's shard coordinates use the default group's rank. So each learner rank must be
its own process (a Ray learner actor is) and calls ``init_default_group`` once; two ranks cannot share a process
(threads, as ``GradientGroup`` allows in tests). The default group is built on a ``TCPStore`` the caller passes
(e.g. the one ``form_group`` returns, bound to ``master_addr`` only) under a prefix of its own, so no second
rendezvous port is needed. With gloo, the default group's data sockets bind where gloo's default device resolves
(this host's name, or ``GLOO_SOCKET_IFNAME``), not through ``form_group``'s explicit device.

Why gradients are *summed*: the Learner scales each micro-batch's loss by its share of the whole update's rows (over
all ranks), so the update's gradient is the sum of the ranks' gradients. FSDP2's reduce-scatter averages by default;
``shard_transformer`` sets every FSDP module's gradient divide factor to 1 and forces plain SUM collectives (gloo
has neither AVG nor PREMUL_SUM; on NCCL it is the zero-copy path), so each rank's gradient shard is the sum.

Numerics: the sharded parameters are fp32 (a half-precision transformer is made fp32 block by block before it is
sharded): they are the master weights, and AdamW steps them directly. ``param_dtype`` (default: the transformer's
dtype before sharding) is what the forward computes with: FSDP2 all-gathers the fp32 shards and rounds them to it,
as the unsharded Learner rounds its masters into its bf16 weights; gradients are reduced in fp32. Forward inputs are
not cast (timesteps stay fp32; ``models.device.autocast`` governs activations, as for the samplers).

Limits (the caller must handle them):

- **Every forward and backward is a collective** (all-gather of each block's weights, reduce-scatter of its
  gradients), so every rank runs the same number of micro-batches in an update: a rank with fewer rows (an uneven
  split, or none) runs padding micro-batches with a loss weight of 0, or the group hangs until its timeout.
- ``full_state``, ``full_optimizer_state`` and ``clip_grad_norm`` are collectives too: all ranks call them together.
- fp16 with ``torch.amp.GradScaler`` is not supported: its inf check reads only this rank's gradient shard, so ranks
  could disagree on skipping a step (the skip on a non-finite ``clip_grad_norm`` is global and safe). Use bf16.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# Key prefix of the default group's rendezvous in a shared store (keeps it apart from the store's other users).
STORE_PREFIX = "fdfo/sharded/"


def peer_lost(e: BaseException) -> bool:
    """Whether a sharded (default-group) collective failed because a rank died or timed out: torch says so with a
    ``DistError`` (NCCL, stores), gloo with a plain RuntimeError from its transport."""
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/" in str(e))


def init_default_group(
    rank: int, world_size: int, store: dist.Store, backend: str = "gloo", timeout_s: float = 120.0
) -> dist.ProcessGroup:
    """Make this process's default ``torch.distributed`` group over ``store`` (every rank calls it at once) and return
    it; FSDP2 needs it (module docstring). Idempotent for the same rank and world size; a default group of another
    shape already in this process is an error (only one per process)."""
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(
                f"this process already has a default process group (rank {dist.get_rank()} of "
                f"{dist.get_world_size()}), not rank {rank} of {world_size}; a process holds one learner rank: call "
                "torch.distributed.destroy_process_group() first, or run each rank in its own process (actor)"
            )
        return dist.group.WORLD
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(STORE_PREFIX, store),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


def shard_transformer(
    transformer: torch.nn.Module,
    group: dist.ProcessGroup,
    device: torch.device | str,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Shard ``transformer`` in place with FSDP2 over ``group`` (one unit per block of ``transformer_blocks``, then
    the root) and return it. Parameters become fp32 ``DTensor`` shards on ``device`` (the masters); the forward
    computes with ``param_dtype`` (default: the transformer's dtype before this call). Gradients are summed over the
    group, not averaged. Every rank calls it with the same weights (the same checkpoint or seed)."""
    device = torch.device(device)
    param_dtype = param_dtype or next(transformer.parameters()).dtype
    mesh = DeviceMesh.from_group(group, device.type)
    mp = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,
    )
    # Block by block, so a half-precision model never holds a whole fp32 copy before it is sharded.
    for block in transformer.transformer_blocks:
        fully_shard(block.to(torch.float32), mesh=mesh, mp_policy=mp)
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(torch.float32)
    for p in transformer.parameters(recurse=False):
        p.data = p.data.float()
    fully_shard(transformer, mesh=mesh, mp_policy=mp)
    for m in transformer.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # per module (not recursive): each unit's own groups
            m.set_force_sum_reduction_for_comms(True)
    return transformer


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients of ``params`` to a global L2 norm of ``max_norm`` (a collective: every rank calls
    it); returns the norm before clipping as a plain 0-d tensor, the same on every rank (inf/nan when not finite)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _gathered(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)  # before the gather: rounding is elementwise, bytes halve
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.to(device) if device is not None else t


def full_state(
    transformer: torch.nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of ``transformer``'s state dict (parameters and persistent buffers, named as in
    the unsharded model), gathered one at a time; ``dtype`` casts floating tensors (e.g. the samplers' bf16),
    ``device`` moves each after its gather (e.g. "cpu": one full tensor on the GPU at a time). A collective: every
    rank calls it and every rank gets the full tensors."""
    return {name: _gathered(t, dtype, device) for name, t in transformer.state_dict().items()}


def _load_into(target: torch.Tensor, full: torch.Tensor, name: str) -> None:
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(
            f"{name}: the state holds shape {tuple(full.shape)}, the model {tuple(target.shape)}; "
            "the checkpoint is of another model config"
        )
    if isinstance(target, DTensor):  # this rank's chunk, cut locally (no communication)
        full = distribute_tensor(
            full.to(target.device, target.dtype), target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target = target.to_local()
    target.copy_(full)


@torch.no_grad()
def load_full_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full tensors (``full_state`` of any number of ranks, or an unsharded model's state dict) into
    ``transformer``, sharded or not; each rank keeps its own chunk (no communication). Every rank passes the same
    ``state``. ``strict``: its names are exactly the model's; else a subset (e.g. a checkpoint's trainable tensors,
    without buffers), and a name the model lacks is still an error."""
    live = transformer.state_dict(keep_vars=True)
    missing, extra = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if extra or (strict and missing):
        raise ValueError(
            f"the state does not match the model: missing {missing[:5]} ({len(missing)}), unexpected "
            f"{extra[:5]} ({len(extra)}); load a checkpoint of the same model config"
        )
    for name, full in state.items():
        target = live[name]
        _load_into(target if isinstance(target, DTensor) else target.data, full, name)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with every sharded moment gathered to its full tensor (a collective: every rank calls
    it). Indices follow the optimizer's parameter order, which is the same at any M when the optimizer is built
    from ``transformer.parameters()`` in order."""
    sd = opt.state_dict()
    state = {
        i: {k: _gathered(v, None, None) if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a ``full_optimizer_state`` (of any M, or an unsharded optimizer's state dict) into ``opt``: each moment
    shaped like its parameter is cut to this rank's chunk (scalars such as ``step`` load as they are)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: _shard_like(v, p) if torch.is_tensor(v) and v.dim() > 0 and isinstance(p, DTensor) else v
            for k, v in s.items()
        }
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _shard_like(full: torch.Tensor, p: DTensor) -> DTensor:
    return distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
