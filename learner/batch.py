"""The Arrow batch of velocity pairs: the one contract between samplers and the learner.

Usage::

    rb = to_arrow(traj, rewards, prompt_ids, pair_ids, prompts, policy_version=3)   # sampler side
    batch = from_arrow(rb)                                                           # learner side

One row per (pair, branch); the N recorded steps of that branch are a fixed-shape tensor column, so a row
is self-contained and the learner flattens rows into (branch, step) training rows itself. Tensors are Arrow
fixed-shape tensor columns (zero-copy to numpy/torch) and keep their dtype; bfloat16, which Arrow has no
type for, travels as its uint16 bit pattern with ``fdfo.dtype = bfloat16`` in the field metadata.
Prompt embeddings are not shipped: the learner re-encodes ``prompt`` (and caches by ``prompt_id``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from learner.loss import pair_signal
from models.device import DTYPES

# Column names. Shapes: N recorded steps, latent (C, H, W).
PROMPT_ID = "prompt_id"            # int64: index of the prompt in the run's prompt list
PROMPT = "prompt"                  # string: the prompt text (the learner re-encodes it)
PAIR_ID = "pair_id"                # int64: unique per pair within a run
BRANCH = "branch"                  # int8: 0 or 1
SEED = "seed"                      # int64: the pair's noise seed (both branches share it)
POLICY_VERSION = "policy_version"  # int64: weight version the pair was sampled with
GUIDANCE = "guidance_scale"        # float32: CFG weight used for sampling (1.0 = none)
REWARD = "reward"                  # float64: this branch's (combined) reward r_k
DR = "dR"                          # float32: (r_k - r_k') / 2
SIGMAS = "sigmas"                  # float32 tensor [N]: sigma at each recorded state
X = "x"                            # tensor [N, C, H, W], sampling dtype: states x_i
V = "v"                            # tensor [N, C, H, W], sampling dtype: velocities v_i used at x_i
D = "d"                            # float32 tensor [C, H, W]: dx_k / (mean(dx_k^2) + 1e-6)

DTYPE_KEY = b"fdfo.dtype"
_ARROW_OF = {torch.float32: pa.float32(), torch.float16: pa.float16(), torch.bfloat16: pa.uint16()}


def _tensor_field(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> pa.Field:
    if dtype not in _ARROW_OF:
        raise ValueError(f"column {name!r}: dtype {dtype} not supported; use float32, float16 or bfloat16")
    meta = {DTYPE_KEY: str(dtype).removeprefix("torch.").encode()}
    return pa.field(name, pa.fixed_shape_tensor(_ARROW_OF[dtype], list(shape)), nullable=False, metadata=meta)


def batch_schema(num_steps: int, latent_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> pa.Schema:
    """The schema for trajectories of ``num_steps`` recorded steps of latents ``latent_shape`` in ``dtype``."""
    N, lat = num_steps, tuple(latent_shape)
    return pa.schema(
        [
            pa.field(PROMPT_ID, pa.int64(), nullable=False),
            pa.field(PROMPT, pa.string(), nullable=False),
            pa.field(PAIR_ID, pa.int64(), nullable=False),
            pa.field(BRANCH, pa.int8(), nullable=False),
            pa.field(SEED, pa.int64(), nullable=False),
            pa.field(POLICY_VERSION, pa.int64(), nullable=False),
            pa.field(GUIDANCE, pa.float32(), nullable=False),
            pa.field(REWARD, pa.float64(), nullable=False),
            pa.field(DR, pa.float32(), nullable=False),
            _tensor_field(SIGMAS, (N,), torch.float32),
            _tensor_field(X, (N, *lat), dtype),
            _tensor_field(V, (N, *lat), dtype),
            _tensor_field(D, lat, torch.float32),
        ]
    )


def _to_tensor_array(t: torch.Tensor, field: pa.Field) -> pa.Array:
    t = t.detach().cpu().contiguous()
    arr = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    out = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))
    return out.cast(field.type) if out.type != field.type else out


def _from_tensor_column(col: pa.Array | pa.ChunkedArray, field: pa.Field) -> torch.Tensor:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    arr = col.to_numpy_ndarray()
    dtype = DTYPES[field.metadata[DTYPE_KEY].decode()]
    with warnings.catch_warnings():  # Arrow buffers are read-only; the learner only reads them (zero-copy)
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def to_arrow(
    traj,
    rewards: torch.Tensor | np.ndarray,
    prompt_ids: list[int],
    pair_ids: list[int],
    prompts: list[str],
    policy_version: int,
    guidance_scale: float = 1.0,
) -> pa.RecordBatch:
    """Rows for P finished pairs: rewards [P, 2] -> 2P rows (pair-major, branch-minor), with the pair signal.

    traj: the pairs' trajectories, anything with ``xs``, ``vs`` [P, 2, N, C, H, W], ``sigmas`` [>= N],
    ``x_final`` [P, 2, C, H, W] and ``seeds`` (P ints), such as ``actors.sampling.PairTrajectory``."""
    P, _, N = traj.xs.shape[:3]
    lat = tuple(traj.xs.shape[3:])
    rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    if rewards.shape != (P, 2):
        raise ValueError(f"rewards must be [P, 2] = [{P}, 2], got {tuple(rewards.shape)}")
    if not (len(prompt_ids) == len(pair_ids) == len(prompts) == P):
        raise ValueError(f"prompt_ids, pair_ids, prompts must each have P = {P} entries")
    dR, d = pair_signal(rewards, traj.x_final)                # [P, 2], [P, 2, C, H, W]
    schema = batch_schema(N, lat, traj.xs.dtype)
    rep = lambda seq: [s for s in seq for _ in range(2)]  # noqa: E731  (pair-major, branch-minor)
    cols = [
        pa.array(rep(prompt_ids), pa.int64()),
        pa.array(rep(prompts), pa.string()),
        pa.array(rep(pair_ids), pa.int64()),
        pa.array([0, 1] * P, pa.int8()),
        pa.array(rep(traj.seeds), pa.int64()),
        pa.array([policy_version] * (2 * P), pa.int64()),
        pa.array([guidance_scale] * (2 * P), pa.float32()),
        pa.array(rewards.reshape(-1).numpy(), pa.float64()),
        pa.array(dR.reshape(-1).numpy(), pa.float32()),
        _to_tensor_array(traj.sigmas[:N].float().expand(2 * P, N), schema.field(SIGMAS)),
        _to_tensor_array(traj.xs.reshape(2 * P, N, *lat), schema.field(X)),
        _to_tensor_array(traj.vs.reshape(2 * P, N, *lat), schema.field(V)),
        _to_tensor_array(d.reshape(2 * P, *lat), schema.field(D)),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


@dataclass
class TrainBatch:
    """Torch views of R rows. x, v: [R, N, C, H, W]; d: [R, C, H, W]; sigmas: [R, N]; the rest [R]."""

    prompt_id: torch.Tensor
    prompt: list[str]
    pair_id: torch.Tensor
    branch: torch.Tensor
    policy_version: torch.Tensor
    guidance_scale: torch.Tensor
    reward: torch.Tensor
    dR: torch.Tensor
    sigmas: torch.Tensor
    x: torch.Tensor
    v: torch.Tensor
    d: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt)


def check_schema(schema: pa.Schema, expected: pa.Schema | None = None) -> None:
    """Raise a message naming the column if ``schema`` is not a valid (or not the ``expected``) batch schema."""
    if expected is None:
        x = schema.field(X) if X in schema.names else None
        if x is None or not isinstance(x.type, pa.FixedShapeTensorType) or x.metadata is None:
            raise ValueError(f"not an fdfo batch: column {X!r} must be a fixed-shape tensor [N, C, H, W]")
        shape = x.type.shape
        expected = batch_schema(shape[0], tuple(shape[1:]), DTYPES[x.metadata[DTYPE_KEY].decode()])
    for field in expected:
        if field.name not in schema.names:
            raise ValueError(f"batch is missing column {field.name!r} ({field.type})")
        got = schema.field(field.name)
        if got.type != field.type or (field.metadata and got.metadata != field.metadata):
            raise ValueError(
                f"batch column {field.name!r} has type {got.type} {dict(got.metadata or {})}; expected "
                f"{field.type} {dict(field.metadata or {})} (same steps, latent shape and dtype on every sampler)"
            )


def from_arrow(batch: pa.RecordBatch | pa.Table, expected: pa.Schema | None = None) -> TrainBatch:
    """Validate and view a batch as torch tensors (zero-copy for the tensor columns where Arrow allows)."""
    check_schema(batch.schema, expected)
    col = lambda name: batch.column(name)  # noqa: E731
    num = lambda name: torch.from_numpy(col(name).to_numpy().copy())  # noqa: E731  (small columns)
    return TrainBatch(
        prompt_id=num(PROMPT_ID),
        prompt=col(PROMPT).to_pylist(),
        pair_id=num(PAIR_ID),
        branch=num(BRANCH),
        policy_version=num(POLICY_VERSION),
        guidance_scale=num(GUIDANCE),
        reward=num(REWARD),
        dR=num(DR),
        sigmas=_from_tensor_column(col(SIGMAS), batch.schema.field(SIGMAS)),
        x=_from_tensor_column(col(X), batch.schema.field(X)),
        v=_from_tensor_column(col(V), batch.schema.field(V)),
        d=_from_tensor_column(col(D), batch.schema.field(D)),
    )
