"""The Arrow batches samplers hand the learner: the one contract between them, one schema per algorithm, versioned.

Usage::

    rb = to_arrow(traj, rewards, prompt_ids, pair_ids, prompts, policy_version=3)   # sampler side (FDFO pairs)
    rb = to_arrow_groups(gtraj, rewards, prompt_ids, group_ids, prompts, 3)        # sampler side (Flow-GRPO groups)
    batch = from_arrow(rb)                     # learner side: a TrainBatch or a GroupBatch, as the schema says

Every schema carries ``fdfo.algorithm`` (fdfo | flow_grpo) and ``fdfo.schema_version`` in its metadata
(``SCHEMA_VERSIONS``; bump a version when its columns change): a learner refuses a batch of another algorithm or
version with a message naming both, so samplers and a learner of different configurations or releases cannot mix.

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
PROMPT_ID = "prompt_id"  # int64: index of the prompt in the run's prompt list
PROMPT = "prompt"  # string: the prompt text (the learner re-encodes it)
PAIR_ID = "pair_id"  # int64: unique per pair within a run
BRANCH = "branch"  # int8: 0 or 1
SEED = "seed"  # int64: the pair's noise seed (both branches share it)
POLICY_VERSION = "policy_version"  # int64: weight version the pair was sampled with
GUIDANCE = "guidance_scale"  # float32: CFG weight used for sampling (1.0 = none)
REWARD = "reward"  # float64: this branch's (combined) reward r_k
DR = "dR"  # float32: (r_k - r_k') / 2
SIGMAS = "sigmas"  # float32 tensor [N]: sigma at each recorded state
X = "x"  # tensor [N, C, H, W], sampling dtype: states x_i
V = "v"  # tensor [N, C, H, W], sampling dtype: velocities v_i used at x_i
D = "d"  # float32 tensor [C, H, W]: dx_k / (mean(dx_k^2) + 1e-6)

# Flow-GRPO's columns (one row per image; W recorded SDE steps): PROMPT_ID, PROMPT, SEED, POLICY_VERSION, GUIDANCE,
# REWARD as above, and
GROUP_ID = "group_id"  # int64: unique per group (G images of one prompt) within a run
MEMBER = "member"  # int16: the image's index in its group
ADVANTAGE = "advantage"  # float32: (r - group mean) / (group std + 1e-4), learner.flow_grpo.group_advantages
STEP = "step"  # int32 tensor [W]: the trajectory step of each recorded state
SIGMAS_NEXT = "sigmas_next"  # float32 tensor [W]: sigma after each recorded step
SIGMA_MAX = "sigma_max"  # float32: the schedule's sigma after 1, what the SDE's std uses at sigma = 1
X_NEXT = "x_next"  # tensor [W, C, H, W], sampling dtype: the state each SDE step reached
LOG_PROB = "log_prob"  # float32 tensor [W]: log p(x_next | x) under the sampling weights (mean over elements)

DTYPE_KEY = b"fdfo.dtype"
ALGORITHM_KEY, VERSION_KEY = b"fdfo.algorithm", b"fdfo.schema_version"
SCHEMA_VERSIONS = {"fdfo": 1, "flow_grpo": 1}
_ARROW_OF = {
    torch.float32: pa.float32(),
    torch.float16: pa.float16(),
    torch.bfloat16: pa.uint16(),
    torch.int32: pa.int32(),
}


def _schema_meta(algorithm: str) -> dict[bytes, bytes]:
    return {ALGORITHM_KEY: algorithm.encode(), VERSION_KEY: str(SCHEMA_VERSIONS[algorithm]).encode()}


def _tensor_field(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> pa.Field:
    if dtype not in _ARROW_OF:
        raise ValueError(f"column {name!r}: dtype {dtype} not supported; use float32, float16, bfloat16 (or int32)")
    meta = {DTYPE_KEY: str(dtype).removeprefix("torch.").encode()}
    return pa.field(name, pa.fixed_shape_tensor(_ARROW_OF[dtype], list(shape)), nullable=False, metadata=meta)


def _image_fields(unit: str, member: str, member_type: pa.DataType) -> list[pa.Field]:
    """The columns every algorithm's row starts with: which prompt, which unit (pair / group) and which image of it,
    its seed, the weights it was sampled with, the guidance and its reward."""
    return [
        pa.field(PROMPT_ID, pa.int64(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(unit, pa.int64(), nullable=False),
        pa.field(member, member_type, nullable=False),
        pa.field(SEED, pa.int64(), nullable=False),
        pa.field(POLICY_VERSION, pa.int64(), nullable=False),
        pa.field(GUIDANCE, pa.float32(), nullable=False),
        pa.field(REWARD, pa.float64(), nullable=False),
    ]


def batch_schema(num_steps: int, latent_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> pa.Schema:
    """The schema for trajectories of ``num_steps`` recorded steps of latents ``latent_shape`` in ``dtype``."""
    N, lat = num_steps, tuple(latent_shape)
    return pa.schema(
        [
            *_image_fields(PAIR_ID, BRANCH, pa.int8()),
            pa.field(DR, pa.float32(), nullable=False),
            _tensor_field(SIGMAS, (N,), torch.float32),
            _tensor_field(X, (N, *lat), dtype),
            _tensor_field(V, (N, *lat), dtype),
            _tensor_field(D, lat, torch.float32),
        ],
        metadata=_schema_meta("fdfo"),
    )


def group_schema(num_steps: int, latent_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> pa.Schema:
    """Flow-GRPO's schema for groups whose images recorded ``num_steps`` SDE steps of latents ``latent_shape``."""
    W, lat = num_steps, tuple(latent_shape)
    return pa.schema(
        [
            *_image_fields(GROUP_ID, MEMBER, pa.int16()),
            pa.field(ADVANTAGE, pa.float32(), nullable=False),
            _tensor_field(STEP, (W,), torch.int32),
            _tensor_field(SIGMAS, (W,), torch.float32),
            _tensor_field(SIGMAS_NEXT, (W,), torch.float32),
            pa.field(SIGMA_MAX, pa.float32(), nullable=False),
            _tensor_field(X, (W, *lat), dtype),
            _tensor_field(X_NEXT, (W, *lat), dtype),
            _tensor_field(LOG_PROB, (W,), torch.float32),
        ],
        metadata=_schema_meta("flow_grpo"),
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
    dtype = {**DTYPES, "int32": torch.int32}[field.metadata[DTYPE_KEY].decode()]
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
    dR, d = pair_signal(rewards, traj.x_final)  # [P, 2], [P, 2, C, H, W]
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

    @property
    def unit_id(self) -> torch.Tensor:
        """The id the run's ledger counts each row's unit by: its pair."""
        return self.pair_id


@dataclass
class GroupBatch:
    """Torch views of R Flow-GRPO rows (one per image). x, x_next: [R, W, C, H, W]; step, sigmas, sigmas_next,
    log_prob: [R, W]; the rest [R]."""

    prompt_id: torch.Tensor
    prompt: list[str]
    group_id: torch.Tensor
    member: torch.Tensor
    policy_version: torch.Tensor
    guidance_scale: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor
    step: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    sigma_max: torch.Tensor
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def unit_id(self) -> torch.Tensor:
        """The id the run's ledger counts each row's unit by: its group."""
        return self.group_id


def schema_algorithm(schema: pa.Schema) -> str:
    """The algorithm whose rows ``schema`` holds, checked against this release's schema version (a clear error
    otherwise). A schema without the metadata (written before schemas were versioned) is FDFO's."""
    meta = schema.metadata or {}
    if ALGORITHM_KEY not in meta:
        return "fdfo"
    algorithm, version = meta[ALGORITHM_KEY].decode(), meta.get(VERSION_KEY, b"?").decode()
    if algorithm not in SCHEMA_VERSIONS:
        raise ValueError(f"batch of algorithm {algorithm!r}: this learner reads {sorted(SCHEMA_VERSIONS)}")
    if version != str(SCHEMA_VERSIONS[algorithm]):
        raise ValueError(
            f"batch schema {algorithm} v{version}, but this learner reads {algorithm} "
            f"v{SCHEMA_VERSIONS[algorithm]}: run samplers and learner from the same fdfo release"
        )
    return algorithm


def check_schema(schema: pa.Schema, expected: pa.Schema | None = None, algorithm: str | None = None) -> str:
    """Raise a message naming the column if ``schema`` is not a valid (or not the ``expected``) batch schema, or
    not of ``algorithm`` (when given: the learner's ``train.algorithm``); returns the batch's algorithm."""
    found = schema_algorithm(schema)
    if algorithm is not None and found != algorithm:
        raise ValueError(
            f"a {found} batch reached a {algorithm} learner: every sampler and the learner must run the "
            f"same train.algorithm"
        )
    if expected is None:
        x = schema.field(X) if X in schema.names else None
        if x is None or not isinstance(x.type, pa.FixedShapeTensorType) or x.metadata is None:
            raise ValueError(f"not an fdfo batch: column {X!r} must be a fixed-shape tensor [N, C, H, W]")
        shape = x.type.shape
        make = group_schema if found == "flow_grpo" else batch_schema
        expected = make(shape[0], tuple(shape[1:]), DTYPES[x.metadata[DTYPE_KEY].decode()])
    for field in expected:
        if field.name not in schema.names:
            raise ValueError(f"batch is missing column {field.name!r} ({field.type})")
        got = schema.field(field.name)
        if got.type != field.type or (field.metadata and got.metadata != field.metadata):
            raise ValueError(
                f"batch column {field.name!r} has type {got.type} {dict(got.metadata or {})}; expected "
                f"{field.type} {dict(field.metadata or {})} (same steps, latent shape and dtype on every sampler)"
            )
    return found


def from_arrow(
    batch: pa.RecordBatch | pa.Table, expected: pa.Schema | None = None, algorithm: str | None = None
) -> "TrainBatch | GroupBatch":
    """Validate and view a batch as torch tensors (zero-copy for the tensor columns where Arrow allows): a
    ``TrainBatch`` for FDFO's schema, a ``GroupBatch`` for Flow-GRPO's."""
    found = check_schema(batch.schema, expected, algorithm)
    col = lambda name: batch.column(name)  # noqa: E731
    num = lambda name: torch.from_numpy(col(name).to_numpy().copy())  # noqa: E731  (small columns)
    tensor = lambda name: _from_tensor_column(col(name), batch.schema.field(name))  # noqa: E731
    if found == "flow_grpo":
        return GroupBatch(
            prompt_id=num(PROMPT_ID),
            prompt=col(PROMPT).to_pylist(),
            group_id=num(GROUP_ID),
            member=num(MEMBER),
            policy_version=num(POLICY_VERSION),
            guidance_scale=num(GUIDANCE),
            reward=num(REWARD),
            advantage=num(ADVANTAGE),
            step=tensor(STEP),
            sigmas=tensor(SIGMAS),
            sigmas_next=tensor(SIGMAS_NEXT),
            sigma_max=num(SIGMA_MAX),
            x=tensor(X),
            x_next=tensor(X_NEXT),
            log_prob=tensor(LOG_PROB),
        )
    return TrainBatch(
        prompt_id=num(PROMPT_ID),
        prompt=col(PROMPT).to_pylist(),
        pair_id=num(PAIR_ID),
        branch=num(BRANCH),
        policy_version=num(POLICY_VERSION),
        guidance_scale=num(GUIDANCE),
        reward=num(REWARD),
        dR=num(DR),
        sigmas=tensor(SIGMAS),
        x=tensor(X),
        v=tensor(V),
        d=tensor(D),
    )


def to_arrow_groups(
    traj,
    rewards: np.ndarray,
    prompt_ids: list[int],
    group_ids: list[int],
    prompts: list[str],
    policy_version: int,
    guidance_scale: float = 1.0,
) -> pa.RecordBatch:
    """Rows for P finished groups of G images: rewards [P, G] -> P * G rows (group-major), with each image's
    group-normalised advantage. traj: ``actors.sampling.GroupTrajectory`` (or anything with its fields)."""
    from learner.flow_grpo import group_advantages

    P, G, W = traj.xs.shape[:3]
    lat = tuple(traj.xs.shape[3:])
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != (P, G):
        raise ValueError(f"rewards must be [P, G] = [{P}, {G}], got {tuple(rewards.shape)}")
    if not (len(prompt_ids) == len(group_ids) == len(prompts) == P):
        raise ValueError(f"prompt_ids, group_ids, prompts must each have P = {P} entries")
    adv = group_advantages(torch.from_numpy(rewards.reshape(-1)), torch.arange(P).repeat_interleave(G))
    schema = group_schema(W, lat, traj.xs.dtype)
    rep = lambda seq: [s for s in seq for _ in range(G)]  # noqa: E731  (group-major, member-minor)
    per_image = lambda t: t[:, None].expand(P, G, *t.shape[1:]).reshape(P * G, *t.shape[1:])  # noqa: E731
    cols = [
        pa.array(rep(prompt_ids), pa.int64()),
        pa.array(rep(prompts), pa.string()),
        pa.array(rep(group_ids), pa.int64()),
        pa.array(list(range(G)) * P, pa.int16()),
        pa.array(rep(traj.seeds), pa.int64()),
        pa.array([policy_version] * (P * G), pa.int64()),
        pa.array([guidance_scale] * (P * G), pa.float32()),
        pa.array(rewards.reshape(-1), pa.float64()),
        pa.array(adv.numpy(), pa.float32()),
        _to_tensor_array(per_image(traj.steps.to(torch.int32)), schema.field(STEP)),
        _to_tensor_array(per_image(traj.sigmas.float()), schema.field(SIGMAS)),
        _to_tensor_array(per_image(traj.sigmas_next.float()), schema.field(SIGMAS_NEXT)),
        pa.array([traj.sigma_max] * (P * G), pa.float32()),
        _to_tensor_array(traj.xs.reshape(P * G, W, *lat), schema.field(X)),
        _to_tensor_array(traj.x_next.reshape(P * G, W, *lat), schema.field(X_NEXT)),
        _to_tensor_array(traj.log_probs.reshape(P * G, W).float(), schema.field(LOG_PROB)),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=schema)
