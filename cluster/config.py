"""The one typed configuration tree of an fdfo run, its YAML presets and ``key=value`` overrides.

Usage::

    cfg = load_config("cluster/configs/tiny-cpu.yaml", ["train.lr=1e-4", "runtime.sampler.count=2"])

Every field is a frozen dataclass field with a one-line doc. Unknown keys are errors that name the key and
list the valid ones (``cluster/config_build.py`` fills the tree); batch arithmetic is derived (and checked) in
``Batching`` (``cluster/batching.py``), the only place it lives.

Secrets stay in memory: ``to_dict`` (what ``config.json``, checkpoints and W&B get) and every error message
pass values through ``redacted`` (``cluster/redaction.py``), the one rule for what counts as a secret.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from cluster.batching import Batching
from cluster.config_build import applied, build, moved, refuse_renamed
from cluster.redaction import REDACTED as REDACTED  # re-exported, as is_secret_name: importers read them here
from cluster.redaction import is_secret_name as is_secret_name
from cluster.redaction import redacted
from cluster.runtime_config import RuntimeConfig
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
    staleness_correction: bool = False
    """fdfo, overlapped: anchor the trust region at the learner's policy when the epoch's update starts (a no-grad
    forward per stale row of updates 2..) and weigh each row by its behaviour policy's ratio, truncated at 2; lag-0
    rows are today's loss bit for bit, off = the reference exactly (docs/algorithms.md)"""


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
    cluster/eval_prompts.py's defaults"""
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


def grpo_of(cfg: RunConfig) -> GrpoConfig | None:
    """The ``grpo`` settings a sampler and the learner take: None unless ``train.algorithm`` is flow_grpo."""
    return cfg.grpo if cfg.train.algorithm == "flow_grpo" else None


def learner_sharding(cfg: RunConfig) -> str:
    """``runtime.learner.sharding`` resolved: "fsdp" or "replicate" (what every learner rank is built with). One
    learner has nothing to shard; auto shards full fine-tuning and replicates LoRA (its factors are small)."""
    group = cfg.runtime.learner
    if group.count < 2 or cfg.runtime.placement == "hybrid":  # a hybrid worker samples with its whole copy
        return "replicate"
    if group.sharding == "auto":
        return "replicate" if cfg.lora.enabled else "fsdp"
    return group.sharding


def _check_placement(cfg: RunConfig) -> None:
    """``runtime.placement: hybrid`` against the settings it cannot honour, refused with the fix named."""
    rt, why = cfg.runtime, "runtime.placement = hybrid"
    if rt.placement != "hybrid":
        return
    if rt.overlap:
        raise ValueError(
            f"{why} runs lock-step: a worker's GPU either samples or trains, so overlap would only interleave its "
            "sample calls between its own optimizer steps (no idle time removed, staleness added; the reward pool "
            "already overlaps the workers' sampling); set runtime.overlap=false, or runtime.placement=split to "
            "overlap separate sampler GPUs"
        )
    if rt.learner.sharding == "fsdp":
        raise ValueError(
            f"{why} keeps the whole trained weights in every worker (it samples with them), so they cannot be "
            "sharded; set runtime.learner.sharding=auto (replicated), or runtime.placement=split"
        )
    if rt.weight_sync != "auto":
        raise ValueError(
            f"{why}: workers sample with their own weights and nothing is sent to them, so runtime.weight_sync = "
            f"{rt.weight_sync} is not read; drop it (auto), or set runtime.placement=split"
        )
    default = type(rt.sampler)()
    given = [f.name for f in dataclasses.fields(default) if getattr(rt.sampler, f.name) != getattr(default, f.name)]
    if given:
        shown = ", ".join(f"runtime.sampler.{k} = {getattr(rt.sampler, k)}" for k in given)
        raise ValueError(
            f"{why} runs one worker per learner rank with runtime.learner's resources, so {shown} is not read: size "
            f"the workers with runtime.learner.count / num_cpus / num_gpus / resources and drop "
            f"{', '.join('runtime.sampler.' + k for k in given)}, or set runtime.placement=split"
        )


def _check_sharding(cfg: RunConfig) -> None:
    """The learner group's sharding against the run's settings, checked with the fix named."""
    if cfg.runtime.learner.sharding == "fsdp" and cfg.lora.enabled:
        raise ValueError(
            "runtime.learner.sharding = fsdp shards full fine-tuning, but lora.enabled is true (LoRA "
            "factors are small: every rank holds them); set runtime.learner.sharding=auto (or replicate), "
            "or lora.enabled=false"
        )
    if learner_sharding(cfg) == "fsdp" and cfg.train.precision == "fp16":
        raise ValueError(
            f"runtime.learner.sharding resolves to fsdp ({cfg.runtime.learner.count} learner ranks, full "
            "fine-tuning) but train.precision is fp16: the GradScaler's inf check reads only each rank's "
            "gradient shard, so the ranks could disagree on skipping a step; use train.precision=bf16 "
            "(or runtime.learner.sharding=replicate to keep fp16)"
        )


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


# Keys that moved when the runtime's settings were grouped by role (issue 29): a preset or override using one is
# refused with its new name; a saved config (a checkpoint's) is read with each moved (``upgraded``).
RENAMED = {
    "runtime.num_samplers": "runtime.sampler.count",
    "runtime.max_samplers": "runtime.sampler.max_count",
    "runtime.sampler_num_cpus": "runtime.sampler.num_cpus",
    "runtime.sampler_num_gpus": "runtime.sampler.num_gpus",
    "runtime.sampler_resources": "runtime.sampler.resources",
    "runtime.num_reward_actors": "runtime.reward.count",
    "runtime.max_reward_actors": "runtime.reward.max_count",
    "runtime.reward_num_cpus": "runtime.reward.num_cpus",
    "runtime.reward_num_gpus": "runtime.reward.num_gpus",
    "runtime.reward_resources": "runtime.reward.resources",
    "runtime.reward_backend": "runtime.reward.backend",
    "runtime.reward_max_batch": "runtime.reward.max_batch",
    "runtime.reward_max_wait_s": "runtime.reward.max_wait_s",
    "runtime.reward_timeout_s": "runtime.reward.timeout_s",
    "runtime.reward_target_ongoing": "runtime.reward.target_ongoing",
    "runtime.reward_upscale_delay_s": "runtime.reward.upscale_delay_s",
    "runtime.reward_downscale_delay_s": "runtime.reward.downscale_delay_s",
    "runtime.reward_look_back_s": "runtime.reward.look_back_s",
    "runtime.num_learners": "runtime.learner.count",
    "runtime.learner_num_cpus": "runtime.learner.num_cpus",
    "runtime.learner_num_gpus": "runtime.learner.num_gpus",
    "runtime.learner_resources": "runtime.learner.resources",
    "runtime.learner_sharding": "runtime.learner.sharding",
}


def upgraded(data: dict) -> dict:
    """A config dict written before a key was renamed, in today's keys (checkpoints keep the config they were trained
    with): ``train.amp`` (true = bf16 autocast on CUDA) is ``train.precision`` since the fp16 numerics mode, and the
    runtime's per-role keys are its role blocks since issue 29 (``RENAMED``)."""
    train = data.get("train")
    if isinstance(train, dict) and "amp" in train:
        train = dict(train)
        amp = train.pop("amp")
        train.setdefault("precision", "bf16" if amp else "fp32")
        data = {**data, "train": train}
    return moved(data, RENAMED)


def config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    """A plain config dict plus ``a.b=value`` overrides -> a checked ``RunConfig``. A renamed key is refused with its
    new name (a saved config goes through ``upgraded`` instead)."""
    refuse_renamed(data, RENAMED)
    data = applied(upgraded(data), overrides)
    refuse_renamed(data, RENAMED)
    cfg = build(RunConfig, data)
    Batching.of(cfg)  # fail on bad arithmetic before any resource is taken
    _check_sharding(cfg)
    _check_placement(cfg)
    from cluster.guard import gold_key

    gold_key(cfg)  # eval.gold_metric names an eval metric of this run
    return cfg


def to_dict(cfg: RunConfig, redact: bool = True) -> dict:
    """Plain JSON-able dict (tuples become lists) for checkpoints and logs, its secrets replaced by ``REDACTED``
    (``redacted``). ``redact=False`` is for round trips that stay in memory (``with_overrides``), never for a file."""
    d = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))
    return redacted(d) if redact else d
