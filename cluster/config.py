"""The one typed configuration tree of an fdfo run, its YAML presets and ``key=value`` overrides.

Usage::

    cfg = load_config("cluster/configs/tiny-cpu.yaml", ["train.lr=1e-4", "runtime.num_samplers=2"])

Every field is a frozen dataclass field with a one-line doc. Unknown keys are errors that name the key and
list the valid ones; batch arithmetic is derived (and checked) in ``Batching``, the only place it lives.

Secrets stay in memory: ``to_dict`` (what ``config.json``, checkpoints and W&B get) and every error message here
pass values through ``redacted``, the one rule for what counts as a secret.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.lora import LORA_TARGET_MODULES

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "shapes"


@dataclass(frozen=True)
class ModelConfig:
    """The flow model every role builds (samplers, learner, evaluation): which one, where from, in what dtype."""

    kind: Literal["sd3", "sd3_tiny", "flux", "flux_tiny", "shapes"] = "sd3_tiny"
    """sd3: SD3/3.5 from `path`; sd3_tiny: random offline SD3; flux: FLUX.1 (dev or schnell) from `path`; flux_tiny:
    random offline FLUX; shapes: shipped demo model"""
    path: str | None = None
    """kind sd3 / flux: hub id or local directory of a StableDiffusion3Pipeline / FluxPipeline; kind shapes: a folder
    with a re-built base model (default: the shipped one)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """compute dtype of the frozen weights"""
    device: str = "auto"
    """auto = cuda when the actor has a GPU, else cpu"""
    resolution: int = 512
    """image height and width (kinds sd3, flux)"""
    max_sequence_length: int = 128
    """T5 tokens (kinds sd3, flux; the reference's 128; FLUX's pipeline: 512, at most 512)"""
    seed: int = 0
    """weight seed of the random tiny model (kinds sd3_tiny, flux_tiny)"""
    learner_encoders: Literal["device", "offload", "cpu"] = "offload"
    """where the learner keeps the text encoders (it never holds the VAE): offload = in CPU memory, on its GPU only
    while encoding prompts not yet cached (one copy each way per epoch's new prompts; the samplers' bits); device =
    on its GPU all along; cpu = encode on the CPU (slow for T5-XXL, no GPU memory; CPU kernels round differently from
    the samplers', so log rho at lag 0 is no longer exactly 0)"""
    compile: Literal["off", "regional", "full"] = "off"
    """torch.compile of the transformer: regional = each transformer block (one block's compile time, reused by every
    identical block), full = the whole transformer (longer compile, may fuse more); off = eager"""
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    """the SDPA backend forced around every transformer forward (and its recompute); auto = torch's choice; efficient
    and cudnn are CUDA kernels"""


@dataclass(frozen=True)
class LoraSettings:
    """What trains: LoRA factors on the transformer's attention projections, or (``enabled: false``) all of it."""

    enabled: bool = True
    """False = full fine-tuning of the transformer"""
    rank: int = 32
    """LoRA rank r"""
    alpha: float = 64.0
    """LoRA alpha (scale alpha / r)"""
    init: str = "gaussian"
    """peft init_lora_weights"""
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    """attention projections (models/lora.py; peft matches a dotted suffix)"""
    init_from: str | None = None
    """start weights: a PEFT LoRA folder, an fdfo checkpoint or run folder, or a hub folder (owner/name/sub/folder);
    every role loads it (fdfo ... --init-from)"""


@dataclass(frozen=True)
class SamplingConfig:
    """How a sampler draws its churned pairs (FDFO) or SDE groups (Flow-GRPO)."""

    num_steps: int = 40
    """N Euler steps (all recorded and trained on)"""
    gamma: float = 0.0025
    """churn strength per step (last step 0)"""
    guidance_scale: float = 1.0
    """CFG weight w; 1.0 = no CFG; inference must use the same w"""
    pairs_per_call: int = 4
    """pairs a sampler generates per batched call (flow_grpo: groups)"""
    record_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of x_i, v_i in the Arrow batch"""
    noise_device: Literal["host", "device"] = "host"
    """where a sampler draws its per-seed noise: host = a CPU generator per seed (the same numbers on every device),
    device = a generator per seed on the model's device (no copy; on a GPU other numbers, still a function of the
    seed; on CPU the same); evaluation always draws on the host"""


@dataclass(frozen=True)
class RewardConfig:
    """The reward the run trains on: a named preset, or weighted components (rewards/presets.py)."""

    preset: str | None = "jpeg"
    """named weighted combination (jpeg, pickscore, vlm_alignment, combined, shapes); None = use components"""
    components: tuple[dict, ...] = ()
    """explicit [{name, weight, **kwargs}, ...]; overrides preset when non-empty"""


@dataclass(frozen=True)
class PromptConfig:
    """Where the training and held-out prompts come from."""

    source: str = "builtin:tiny"
    """builtin:<name> or a text file with one prompt per line"""
    eval_source: str | None = None
    """held-out prompts for evaluation (same forms); None = source"""


@dataclass(frozen=True)
class GrpoConfig:
    """Flow-GRPO's own settings (read only with ``train.algorithm: flow_grpo``)."""

    group_size: int = 8
    """G images per prompt (one group, one "pair" of the run's counts); advantages are relative to it (Flow-GRPO's
    SD3.5: 24)"""
    noise_level: float = 0.7
    """a: the SDE's noise, sigma_t = a * sqrt(sigma / (1 - sigma)) (Flow-GRPO: 0.7)"""
    clip_range: float = 1.0e-4
    """PPO clip range on the per-step ratio (Flow-GRPO: 1e-4; its log-probability is a per-element mean)"""
    adv_clip_max: float = 5.0
    """advantages clamped to +- this"""
    global_std: bool = False
    """normalise advantages by the std of the whole epoch's rewards instead of each group's (Flow-GRPO's SD3 settings:
    true)"""
    sde_window: int = 0
    """0 = every step is an SDE step and trained on (Flow-GRPO); W > 0 = only W consecutive steps are, ODE elsewhere
    (Flow-GRPO-Fast)"""
    sde_window_range: int | None = None
    """the window starts uniformly in [0, range - W] per group; None = sampling.num_steps"""


@dataclass(frozen=True)
class TrainConfig:
    """The algorithm, the optimiser, the batch arithmetic of an epoch and the run's length and checkpoints."""

    algorithm: Literal["fdfo", "flow_grpo"] = "fdfo"
    """fdfo: finite-difference pairs (ALGORITHM.md); flow_grpo: Flow-GRPO's SDE groups and PPO-clipped objective (the
    `grpo` section; learner/flow_grpo.py)"""
    lr: float = 3e-5
    """AdamW learning rate: the main knob (ALGORITHM.md §9)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """max global grad norm"""
    epsilon: float = 0.03
    """SPO trust-region epsilon"""
    kl_weight: float = 0.0
    """weight of the KL term against the frozen base model: fdfo mean((v_theta - v_base)^2); flow_grpo mean((mu_theta -
    mu_base)^2) / (2 std^2) of each SDE step (its beta)"""
    pairs_per_epoch: int = 432
    """pairs sampled per epoch (the reference: 432 pairs = 864 images); flow_grpo: groups per epoch"""
    updates_per_epoch: int = 4
    """optimizer steps per epoch, each on a global shuffle share of (image, step) rows"""
    micro_batch_rows: int = 64
    """(image, step) rows per forward/backward; gradients accumulate over an update"""
    timestep_fraction: float = 1.0
    """share of each epoch's (branch, step) rows trained on, drawn at random (1.0 = all, the reference)"""
    epochs: int = 1000
    """epochs to run"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """lr from `lr` at update 0 to `lr_final` at the last (epochs * updates_per_epoch)"""
    lr_final: float = 0.0
    """the lr the cosine / linear schedule ends at (ignored when constant)"""
    gradient_checkpointing: bool = False
    """the learner recomputes block activations in the backward pass: less memory (FLUX / SD3.5-L LoRA need it to fit),
    one more forward; same values"""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """numerics of every velocity, sampler and learner alike: autocast dtype on CUDA (fp16 = the reference's, with a
    GradScaler; fp32 = none); CPU never autocasts (the model's dtype)"""
    max_policy_lag: int | None = None
    """max (learner version - sample version) at any update; None = 2*updates_per_epoch - 1"""
    checkpoint_every: int = 20
    """save every K updates (0 = only at the end); a lost learner restarts from the last one, so at most K updates are
    trained again"""
    keep_checkpoints: int = 3
    """checkpoints kept under checkpoints/ (the oldest go; 0 = keep all)"""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the roles run: Ray or one process, the pools and their resources, weight sync, storage."""

    local: bool = False
    """True = one process, no Ray (debug mode: breakpoint() works)"""
    address: str | None = None
    """Ray address; None = RAY_ADDRESS or a running cluster if any, else a new local one; "local" = always a new local
    one"""
    overlap: bool = False
    """false = lock-step, as the reference: sample an epoch with the current weights, then train it
    (bench_time_to_reward: as much gain per pair as the in-process loop); true = keep sampling while the learner
    trains, within train.max_policy_lag"""
    num_samplers: int | Literal["auto"] = 1
    """sampler actors at start (min of the pool); auto = from the cluster's resources at start: lock-step all that fit
    beside the learner ranks and the reward pool, overlap enough to keep the learner busy at runtime.throughput's
    rates (cluster/plan.py auto_samplers; the run logs the arithmetic)"""
    max_samplers: int | None = None
    """autoscaling ceiling for samplers; None = num_samplers"""
    throughput: str | None = None
    """bench/bench_gpu_throughput.py's JSON (images/s per sampler GPU and learner rank) for num_samplers auto; None =
    the reference's 0.50 images/GPU-s split 40 : 92"""
    num_reward_actors: int = 1
    """reward actors (or Serve replicas, the pool's minimum), each serving the whole weighted sum"""
    max_reward_actors: int | None = None
    """the reward pool's ceiling; above num_reward_actors the pool is a Ray Serve deployment whose replicas follow its
    queue (cluster/serving.py); None = num_reward_actors"""
    reward_backend: Literal["auto", "actors", "serve"] = "auto"
    """auto: Serve when max_reward_actors > num_reward_actors, else plain actors (requests spread by pair id)"""
    reward_target_ongoing: float = 2.0
    """Serve autoscaling: requests (sampler calls) in flight per replica it aims at"""
    reward_upscale_delay_s: float = 10.0
    """Serve autoscaling: how long demand must stay high before a replica is added"""
    reward_downscale_delay_s: float = 60.0
    """Serve autoscaling: how long demand must stay low before a replica goes"""
    reward_look_back_s: float = 10.0
    """Serve autoscaling: the window its queue-depth average is taken over"""
    sampler_num_gpus: float = 0.0
    """GPUs per sampler actor"""
    sampler_num_cpus: float = 1.0
    """CPUs per sampler actor"""
    reward_num_gpus: float = 0.0
    """GPUs per reward actor"""
    reward_num_cpus: float = 0.5
    """CPUs per reward actor"""
    num_learners: int = 1
    """learner ranks in one gradient group (gloo on CPU, NCCL on GPU): each trains its share of every update's rows and
    the group sums the gradients, so M ranks take one learner's step"""
    learner_sharding: Literal["auto", "replicate", "fsdp"] = "auto"
    """how the learner ranks hold full fine-tuning: fsdp = each rank 1/M of the fp32 weights, gradients and AdamW
    moments (FSDP2; bf16 or fp32 only); replicate = every rank all of them, gradients all-reduced; auto = fsdp for
    full fine-tuning with num_learners > 1, replicate for LoRA or one learner"""
    learner_num_gpus: float = 0.0
    """GPUs per learner rank"""
    learner_num_cpus: float = 1.0
    """CPUs for the learner actor"""
    reward_max_batch: int = 32
    """images per reward call"""
    reward_max_wait_s: float = 0.05
    """longest a reward request waits for its batch to fill"""
    reward_timeout_s: float = 300.0
    """a reward call slower than this fails its pairs (dropped: reward_failure)"""
    torch_threads: int | None = None
    """torch intra-op threads of every actor; None = each actor's CPU reservation (at least 1); in process: torch's
    default (all cores)"""
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"
    """auto: weights under 512 MiB (LoRA, small models) via the object store after every update, larger via a gloo/NCCL
    group once an epoch"""
    weight_sync_timeout_s: float = 120.0
    """a collective transfer stalled this long (a member died) fails over to the object store"""
    sampler_resources: dict = field(default_factory=dict)
    """custom Ray resources each sampler asks for, e.g. {sampler: 1}: roles land on their own node types (ray start
    --resources='{"sampler": 8}')"""
    reward_resources: dict = field(default_factory=dict)
    """the same for each reward actor"""
    learner_resources: dict = field(default_factory=dict)
    """the same for the learner"""
    resource_wait_s: float = 600.0
    """a joined cluster short of what the pools ask may scale up: wait this long (logging every 30 s), then fail naming
    the role"""
    storage_path: str | None = None
    """where the run folder <storage_path>/<name> lives: a local folder or a URI pyarrow.fs opens (s3://bucket/runs,
    gs://bucket/runs); checkpoints, history, TensorBoard, grids and curves go there and --resume reads from there on
    any node; None = output_dir (local files, as before)"""


@dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation (before, during and after training), the hacking guard and ``fdfo eval --suite``."""

    every_epochs: int = 0
    """held-out evaluation during training every K epochs (0 = only before and after)"""
    num_prompts: int = 32
    """held-out prompts per evaluation (from prompts.eval_source)"""
    seeds_per_prompt: int = 4
    """images per prompt (diversity is measured across them)"""
    num_steps: int | None = None
    """Euler steps; None = sampling.num_steps"""
    seed: int = 1234
    """fixes the evaluation prompts and seeds, so before/after numbers are paired"""
    metrics: tuple[dict, ...] = ()
    """extra scorers the run does not train on, e.g. [{name: shapes_exact}]"""
    gold_metric: str | None = None
    """held-out metric that guards the run (cluster/guard.py): keeps checkpoints/best and detects reward hacking; a
    short name (shapes_exact) or full key (eval/metric/shapes_exact/mean); higher is better"""
    hacking_window: int = 4
    """evaluations the hacking test looks back over (>= 2)"""
    hacking_tolerance: float = 0.05
    """hacking = gold fell more than this (its units) below its best in the window while the training reward's slope is
    positive"""
    stop_on_hacking: bool = False
    """end the run when hacking is detected (final checkpoint and report still written)"""
    suite_prompts: dict | None = None
    """`fdfo eval --suite`: prompt source per set, {pickscore_train: FILE, hpdv2: FILE or hub:zhwang/HPDv2}; None =
    cluster/eval_suite.py's defaults"""
    suite_scorers: dict | None = None
    """`fdfo eval --suite`: settings per scorer (pickscore, hpsv2, clip_h14, clip_l14, dreamsim, vlm), e.g. {vlm:
    {backend: server, url: ...}}; None = the reference's models (vlm: the run's vlm_judge component if any)"""


@dataclass(frozen=True)
class RunConfig:
    """A whole run: its name, seed and outputs, and one section per concern (``fdfo config --explain``)."""

    name: str = "fdfo"
    """run name (dashboard actor prefix, output folder)"""
    seed: int = 0
    """run seed: pair noise, shuffles"""
    output_dir: str = "runs"
    """where checkpoints, TensorBoard logs and plots go"""
    wandb_project: str | None = None
    """also log to Weights & Biases under this project (needs `pip install wandb`)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class Batching:
    """The batch arithmetic of an epoch, derived and checked once; the learner takes its updates from ``plan``.
    A unit is what one schedule entry samples: a pair (FDFO, 2 images) or a group (Flow-GRPO, grpo.group_size
    images). Rows are (image, step) training rows: an epoch of P units of K images recording N steps has K * P * N."""

    pairs_per_epoch: int
    rows_per_epoch: int
    updates_per_epoch: int
    timestep_fraction: float
    micro_batch_rows: int
    max_policy_lag: int
    algorithm: str = "fdfo"
    images_per_unit: int = 2  # K: 2 (a pair) or grpo.group_size (a group)
    recorded_steps: int = 0  # N: steps each image records (FDFO: all; Flow-GRPO: its SDE window)

    @classmethod
    def of(cls, cfg: RunConfig) -> "Batching":
        t, g = cfg.train, cfg.grpo
        if t.pairs_per_epoch < 1 or t.updates_per_epoch < 1 or t.micro_batch_rows < 1:
            raise ValueError("train.pairs_per_epoch, train.updates_per_epoch and train.micro_batch_rows must be >= 1")
        if not 0.0 < t.timestep_fraction <= 1.0:
            raise ValueError(
                f"train.timestep_fraction must be in (0, 1] (the share of rows trained on); got {t.timestep_fraction}"
            )
        if not 0.0 <= t.lr_final <= t.lr:
            raise ValueError(
                f"train.lr_final must lie in [0, train.lr = {t.lr}] (where the schedule ends); got {t.lr_final}"
            )
        K, N, unit, each = 2, cfg.sampling.num_steps, "pairs", "branches"
        if t.algorithm == "flow_grpo":
            K, N, unit, each = g.group_size, g.sde_window or cfg.sampling.num_steps, "groups", "images"
            _check_grpo(cfg)
        rows = K * t.pairs_per_epoch * N
        if rows % t.updates_per_epoch:
            raise ValueError(
                f"an epoch has {K} {each} x {t.pairs_per_epoch} {unit} x {N} steps = {rows} rows, which "
                f"train.updates_per_epoch = {t.updates_per_epoch} does not divide; choose pairs_per_epoch so that "
                f"{K} * pairs_per_epoch * {N} is a multiple of updates_per_epoch"
            )
        lag = 2 * t.updates_per_epoch - 1 if t.max_policy_lag is None else t.max_policy_lag
        if lag < t.updates_per_epoch - 1:
            raise ValueError(
                f"train.max_policy_lag = {lag} is below updates_per_epoch - 1 = {t.updates_per_epoch - 1}: even pairs "
                "sampled with the current weights reach that lag by the last update of an epoch; raise it"
            )
        return cls(
            t.pairs_per_epoch,
            rows,
            t.updates_per_epoch,
            t.timestep_fraction,
            t.micro_batch_rows,
            lag,
            t.algorithm,
            K,
            N,
        )

    def plan(self, rows: int, generator) -> list:
        """The reference's arithmetic over the ``rows`` (branch, step) rows an epoch brought: one global random
        permutation, its first ``timestep_fraction`` share, split as evenly as possible into ``updates_per_epoch``
        updates. Returns the row indices of each update (a torch.LongTensor each; empty updates left out)."""
        import torch

        order = torch.randperm(rows, generator=generator)
        order = order[: max(1, round(self.timestep_fraction * rows))]
        return [chunk for chunk in torch.tensor_split(order, self.updates_per_epoch) if len(chunk)]

    def micro_batches(self, update_rows) -> tuple:
        """One update's rows in micro-batches of at most ``micro_batch_rows`` (gradients accumulate over them)."""
        import torch

        return torch.split(update_rows, self.micro_batch_rows)


def grpo_of(cfg: RunConfig) -> GrpoConfig | None:
    """The ``grpo`` settings a sampler and the learner take: None unless ``train.algorithm`` is flow_grpo."""
    return cfg.grpo if cfg.train.algorithm == "flow_grpo" else None


def learner_sharding(cfg: RunConfig) -> str:
    """``runtime.learner_sharding`` resolved: "fsdp" or "replicate" (what every learner rank is built with). One
    learner has nothing to shard; auto shards full fine-tuning and replicates LoRA (its factors are small)."""
    rt = cfg.runtime
    if rt.num_learners < 2:
        return "replicate"
    if rt.learner_sharding == "auto":
        return "replicate" if cfg.lora.enabled else "fsdp"
    return rt.learner_sharding


def _check_sharding(cfg: RunConfig) -> None:
    """The learner group's sharding against the run's settings, checked with the fix named."""
    if cfg.runtime.learner_sharding == "fsdp" and cfg.lora.enabled:
        raise ValueError(
            "runtime.learner_sharding = fsdp shards full fine-tuning, but lora.enabled is true (LoRA "
            "factors are small: every rank holds them); set runtime.learner_sharding=auto (or replicate), "
            "or lora.enabled=false"
        )
    if learner_sharding(cfg) == "fsdp" and cfg.train.precision == "fp16":
        raise ValueError(
            f"runtime.learner_sharding resolves to fsdp ({cfg.runtime.num_learners} learner ranks, full "
            "fine-tuning) but train.precision is fp16: the GradScaler's inf check reads only each rank's "
            "gradient shard, so the ranks could disagree on skipping a step; use train.precision=bf16 "
            "(or runtime.learner_sharding=replicate to keep fp16)"
        )


def _check_grpo(cfg: RunConfig) -> None:
    """Flow-GRPO's settings, checked with the fix named (train.algorithm flow_grpo)."""
    g, N = cfg.grpo, cfg.sampling.num_steps
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative to the group); got {g.group_size}")
    if g.noise_level <= 0:
        raise ValueError(
            f"grpo.noise_level must be > 0 (0 is the ODE, which has no log-probability); got {g.noise_level}"
        )
    if g.clip_range <= 0 or g.adv_clip_max <= 0:
        raise ValueError("grpo.clip_range and grpo.adv_clip_max must be > 0")
    hi = N if g.sde_window_range is None else g.sde_window_range
    if g.sde_window < 0 or (g.sde_window and not g.sde_window <= hi <= N):
        raise ValueError(
            f"grpo.sde_window = {g.sde_window} must be 0 (every step) or lie in [1, grpo.sde_window_range "
            f"= {hi}], and the range in [sde_window, sampling.num_steps = {N}]"
        )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a section; give a mapping, got {_shown(key, value)}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r}: {_shown(key, value)} fits none of {tp}: {errors}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {key!r} must be one of {typing.get_args(tp)}, got {_shown(key, value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} wants a list, got {_shown(key, value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"config key {key!r} wants {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-5" as a string
        except ValueError:
            pass
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ValueError(f"config key {key!r} wants {getattr(tp, '__name__', tp)}, got {_shown(key, value)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in data.items()})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(name_or_path: str | None) -> Path:
    """A preset name (``tiny-cpu``) or a YAML path -> the YAML path, or an error listing the presets."""
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file or preset {name_or_path!r}; presets: {known}")


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML preset (default ``tiny-cpu``), apply ``a.b=value`` overrides (values parsed as YAML)."""
    return config_from_dict(yaml.safe_load(resolve_preset(name_or_path).read_text()) or {}, overrides)


def with_overrides(cfg: RunConfig, overrides: list[str] = ()) -> RunConfig:
    """``cfg`` (e.g. a checkpoint's) with ``a.b=value`` overrides applied, checked like a preset's."""
    return config_from_dict(to_dict(cfg, redact=False), overrides)  # in memory: keeps the secrets it holds


def upgraded(data: dict) -> dict:
    """A config dict written before a key was renamed, in today's keys: ``train.amp`` (true = bf16 autocast on CUDA)
    is ``train.precision`` since the fp16 numerics mode (checkpoints keep the config they were trained with)."""
    train = data.get("train")
    if isinstance(train, dict) and "amp" in train:
        train = dict(train)
        amp = train.pop("amp")
        train.setdefault("precision", "bf16" if amp else "fp32")
        data = {**data, "train": train}
    return data


def config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    """A plain config dict plus ``a.b=value`` overrides -> a checked ``RunConfig``."""
    data = upgraded(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        node: dict = {}
        cursor = node
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = yaml.safe_load(raw)
        data = _merge(data, node)
    cfg = _build(RunConfig, data)
    Batching.of(cfg)  # fail on bad arithmetic before any resource is taken
    _check_sharding(cfg)
    from cluster.guard import gold_key

    gold_key(cfg)  # eval.gold_metric names an eval metric of this run
    return cfg


def to_dict(cfg: RunConfig, redact: bool = True) -> dict:
    """Plain JSON-able dict (tuples become lists) for checkpoints and logs, its secrets replaced by ``REDACTED``
    (``redacted``). ``redact=False`` is for round trips that stay in memory (``with_overrides``), never for a file."""
    d = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))
    return redacted(d) if redact else d


REDACTED = "<redacted>"

# A setting is a secret when its name says so: password, secret, credential(s), signature, authorization or cookie
# (alone or as the last word), an api / access / secret / private / client / signing key, a token named for what
# it authorises (auth_token, access_token, hf_token, x-amz-security-token, ...) or a setting called just "token".
# Not every name containing "token" or "key": the judge's yes_token / no_token are answer words, max_tokens is a
# length and a reward spec's "key" is its label; redacting those would break a checkpoint's config for nothing.
_SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|passphrase|secret|credentials?|signature|authorization|cookie)$"
    r"|(^|_)(api|access|secret|private|client|signing)_?key$"
    r"|(^|_)(auth|access|api|bearer|refresh|session|security|id|hf|wandb|ray)_?token$"
    r"|^token$"
)
# scheme://userinfo@host: the userinfo (user, or user:password, or a token in the user's place) is a credential.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]+@")
# name=value pairs of a URL's query (presigned object-store URLs carry X-Amz-Signature, X-Amz-Credential, ...).
_URL_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#;?\s]+)=(?P<value>[^&#;\s]*)")
# Shorter environment values are too likely to occur in ordinary settings to be blanked wherever they appear.
_MIN_ENV_SECRET = 8


def is_secret_name(name: str) -> bool:
    """Whether a setting, query parameter or environment variable called ``name`` holds a secret (the rule above;
    camelCase, dashes and dots count as word breaks: ``apiKey``, ``X-Amz-Signature``)."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return bool(_SECRET_NAME.search(re.sub(r"[^a-z0-9]+", "_", words.lower())))


def redacted(obj: Any) -> Any:
    """A copy of ``obj`` (JSON-like: dicts, lists, tuples, scalars) safe to write to a file, a tracker or a log:

    - the value of every secret-named key (``is_secret_name``) becomes ``REDACTED`` (None and "" stay, so "no key
      set" still reads as such);
    - in every string, URL userinfo becomes ``scheme://<redacted>@host`` and a secret-named query parameter
      ``name=<redacted>``;
    - every occurrence of the value of a secret-named environment variable (``RAY_AUTH_TOKEN``, ``WANDB_API_KEY``,
      ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ...; 8 characters or more) becomes ``REDACTED``, wherever a config
      value embeds it.

    Everything else is kept as is. Pass secrets through the environment rather than the config: a redacted value
    cannot be read back from ``config.json`` or a checkpoint (give it again with an override).
    """
    return _redact(obj, None, _env_secrets())


def _env_secrets() -> list[str]:
    # Longest first, so a secret that contains another is blanked whole.
    return sorted(
        (v for k, v in os.environ.items() if len(v) >= _MIN_ENV_SECRET and is_secret_name(k)), key=len, reverse=True
    )


def _redact(x: Any, key: Any, env: list[str]) -> Any:
    if key is not None and is_secret_name(key) and x is not None and x != "":
        return REDACTED
    if isinstance(x, dict):
        return {k: _redact(v, k, env) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_redact(v, None, env) for v in x)
    if isinstance(x, str):
        for secret in env:
            x = x.replace(secret, REDACTED)
        if "://" in x:
            x = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", x)
            x = _URL_PARAM.sub(
                lambda m: f"{m['lead']}{m['name']}={REDACTED if is_secret_name(m['name']) else m['value']}", x
            )
    return x


def _shown(key: str, value: Any) -> str:
    """``value`` of config key ``key`` (dotted) as an error message may show it: redacted like a written config."""
    return repr(_redact(value, key.rsplit(".", 1)[-1], _env_secrets()))
