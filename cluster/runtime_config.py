"""The ``runtime`` section of the config tree: where and how the roles run, one block per role.

Usage (YAML)::

    runtime:
      overlap: true
      sampler: {count: auto, max_count: 8, num_gpus: 1}
      reward: {count: 1, max_count: 4, num_gpus: 1}
      learner: {count: 2, num_gpus: 1}

``runtime.sampler`` is the sampler pool, ``runtime.reward`` the reward pool, ``runtime.learner`` the learner group
(``cluster/sampler_pool.py``, ``reward_pool.py``, ``learner_group.py``): each block holds how many actors the part runs
and what each asks of Ray, with the part's own settings (the reward pool's batching and Serve autoscaling, the learner
group's sharding). The settings every role shares (Ray address, lock-step or overlap, weight sync, storage) stay at
``runtime``'s top level. ``cluster/config.py`` builds it into ``RunConfig`` and re-exports ``RuntimeConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def actor_options(role) -> dict:
    """The Ray actor options a role's block asks for (``runtime.sampler``, ``.reward`` or ``.learner``): its CPUs, GPUs
    and custom resources, and no restarts (the pools replace a lost actor themselves, with its books)."""
    return {
        "num_cpus": role.num_cpus,
        "num_gpus": role.num_gpus,
        "resources": dict(role.resources),
        "max_restarts": 0,
    }


@dataclass(frozen=True)
class SamplerPoolConfig:
    """The sampler pool (``cluster/sampler_pool.py``): how many sampler actors, and what each asks of Ray."""

    count: int | Literal["auto"] = 1
    """sampler actors at start (the pool's minimum: a lost one is replaced up to it); auto = from the cluster's
    resources at start: lock-step all that fit beside the learner ranks and the reward pool, overlap enough to keep
    the learner busy at runtime.throughput's rates (cluster/plan.py auto_samplers; the run logs the arithmetic)"""
    max_count: int | None = None
    """autoscaling ceiling for samplers; None = count"""
    num_cpus: float = 1.0
    """CPUs per sampler actor"""
    num_gpus: float = 0.0
    """GPUs per sampler actor"""
    resources: dict = field(default_factory=dict)
    """custom Ray resources each sampler asks for, e.g. {sampler: 1}: roles land on their own node types (ray start
    --resources='{"sampler": 8}')"""


@dataclass(frozen=True)
class RewardPoolConfig:
    """The reward pool (``cluster/reward_pool.py``): plain reward actors or a Ray Serve deployment, what each asks of
    Ray, how requests are batched, and Serve's autoscaling."""

    count: int = 1
    """reward actors (or Serve replicas, the pool's minimum), each serving the whole weighted sum"""
    max_count: int | None = None
    """the reward pool's ceiling; above count the pool is a Ray Serve deployment whose replicas follow its queue
    (cluster/serving.py); None = count"""
    backend: Literal["auto", "actors", "serve"] = "auto"
    """auto: Serve when max_count > count, else plain actors (requests spread by pair id)"""
    num_cpus: float = 0.5
    """CPUs per reward actor"""
    num_gpus: float = 0.0
    """GPUs per reward actor"""
    resources: dict = field(default_factory=dict)
    """custom Ray resources each reward actor asks for, e.g. {reward: 1}"""
    max_batch: int = 32
    """images per reward call"""
    max_wait_s: float = 0.05
    """longest a reward request waits for its batch to fill"""
    timeout_s: float = 300.0
    """a reward call slower than this fails its pairs (dropped: reward_failure)"""
    target_ongoing: float = 2.0
    """Serve autoscaling: requests (sampler calls) in flight per replica it aims at"""
    upscale_delay_s: float = 10.0
    """Serve autoscaling: how long demand must stay high before a replica is added"""
    downscale_delay_s: float = 60.0
    """Serve autoscaling: how long demand must stay low before a replica goes"""
    look_back_s: float = 10.0
    """Serve autoscaling: the window its queue-depth average is taken over"""


@dataclass(frozen=True)
class LearnerGroupConfig:
    """The learner group (``cluster/learner_group.py``): its ranks, how they hold the weights, what each asks of Ray."""

    count: int = 1
    """learner ranks in one gradient group (gloo on CPU, NCCL on GPU): each trains its share of every update's rows and
    the group sums the gradients, so M ranks take one learner's step"""
    sharding: Literal["auto", "replicate", "fsdp"] = "auto"
    """how the learner ranks hold full fine-tuning: fsdp = each rank 1/M of the fp32 weights, gradients and AdamW
    moments (FSDP2; bf16 or fp32 only); replicate = every rank all of them, gradients all-reduced; auto = fsdp for
    full fine-tuning with count > 1, replicate for LoRA or one learner"""
    num_cpus: float = 1.0
    """CPUs per learner rank"""
    num_gpus: float = 0.0
    """GPUs per learner rank"""
    resources: dict = field(default_factory=dict)
    """custom Ray resources each learner rank asks for, e.g. {learner: 1}"""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the roles run: Ray or one process, weight sync, storage; each role's pool and resources in its
    own block (``runtime.sampler``, ``runtime.reward``, ``runtime.learner``)."""

    local: bool = False
    """True = one process, no Ray (debug mode: breakpoint() works)"""
    address: str | None = None
    """Ray address; None = RAY_ADDRESS or a running cluster if any, else a new local one; "local" = always a new local
    one"""
    placement: Literal["split", "hybrid"] = "split"
    """split = samplers and learner ranks are separate actors (GPUs), the learner publishing weights to the samplers;
    hybrid = one worker per learner rank that samples and trains with one copy of the weights (cluster/hybrid.py:
    lock-step, as many workers as runtime.learner.count, each with runtime.learner's resources)"""
    overlap: bool = False
    """false = lock-step, as the reference: sample an epoch with the current weights, then train it
    (bench_time_to_reward: as much gain per pair as the in-process loop); true = keep sampling while the learner
    trains, within train.max_policy_lag"""
    sampler: SamplerPoolConfig = field(default_factory=SamplerPoolConfig)
    reward: RewardPoolConfig = field(default_factory=RewardPoolConfig)
    learner: LearnerGroupConfig = field(default_factory=LearnerGroupConfig)
    throughput: str | None = None
    """bench/bench_gpu_throughput.py's JSON (images/s per sampler GPU and learner rank) for runtime.sampler.count auto;
    None = the reference's 0.50 images/GPU-s split 40 : 92"""
    torch_threads: int | None = None
    """torch intra-op threads of every actor; None = each actor's CPU reservation (at least 1); in process: torch's
    default (all cores)"""
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"
    """auto: weights under 512 MiB (LoRA, small models) via the object store after every update, larger via a gloo/NCCL
    group once an epoch"""
    weight_sync_timeout_s: float = 120.0
    """a collective transfer stalled this long (a member died) fails over to the object store"""
    resource_wait_s: float = 600.0
    """a joined cluster short of what the pools ask may scale up: wait this long (logging every 30 s), then fail naming
    the role"""
    storage_path: str | None = None
    """where the run folder <storage_path>/<name> lives: a local folder or a URI pyarrow.fs opens (s3://bucket/runs,
    gs://bucket/runs); checkpoints, history, TensorBoard, grids and curves go there and --resume reads from there on
    any node; None = output_dir (local files, as before)"""
