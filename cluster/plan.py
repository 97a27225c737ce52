"""``fdfo plan``: split a GPU count between sampler actors and learner ranks, from per-role throughputs.

Usage::

    fdfo plan --gpus 4 8 32                                        # sd35m-combined, the default per-role rates
    fdfo plan --gpus 4 8 32 --throughput bench/results/gpu_throughput.json --schedule lockstep overlap
    fdfo plan --gpus 16 --sampler-ips 3.0 --learner-ips 1.4 --config sd35m-pickscore

The cost model (one GPU per sampler and per learner rank; the reward pool on its own GPUs, fast enough to keep up:
samplers stream images to it while they sample). For an epoch of I = 2 x ``train.pairs_per_epoch`` images with
s sampled and l trained images per GPU-second:

    a = I / s                          sampler GPU-seconds per epoch
    b = I x timestep_fraction / l      learner GPU-seconds per epoch
    k = U x 2 x B / W                  U = updates_per_epoch ring all-reduces of B gradient bytes at bus bandwidth W:
                                       one costs 2 (M - 1) / M x B / W on M ranks, so an epoch's is k (1 - 1 / M)
    sample(S) = a / S,   train(L) = b / L + k (1 - 1 / L) = (b - k) / L + k
    lock-step epoch = sample(S) + train(L);   overlap epoch = max(sample(S), train(L))   (steady state)

with S + L = C, the GPUs left after the reward pool's R. Lock-step minimises a / S + (b - k) / L: S / L =
sqrt(a / (b - k)). Overlap balances a / S = train(L): S = a / (a + b) x C when k = 0, in general the root in (0, C)
of k S^2 - (a + b - k + k C) S + a C = 0, S = 2 a C / (beta + sqrt(beta^2 - 4 k a C)), beta = a + b - k + k C. Both
objectives are (quasi)convex in S, so the integer split is the better of the continuous optimum's neighbours
(the plan checks one step further each way). Images per GPU-second count every GPU, the reward pool's too:
I / (epoch x G); the scaling efficiency of G GPUs against G0 (4) is G0 x epoch(G0) / (G x epoch(G)).

Default rates (no ``--throughput`` or flags): the reference trains 864 images per epoch on 4 x H200 in 432 s, 0.50
images per GPU-second, every GPU sampling then training its share (ALGORITHM.md section 6): 2.0 GPU-seconds per
image. Split by compute, 40 forwards to sample an image and ~92 forward-equivalents to train it at all 40 steps
(ARCHITECTURE.md; the bench counts 85 with its exact LoRA backward): sampling 40 / 132 x 2.0 = 0.606 s, training
92 / 132 x 2.0 = 1.394 s, i.e. s = 0.50 x 132 / 40 = 1.65 and l = 0.50 x 132 / 92 = 0.717 images per GPU-second.
The reference's reward and VAE time is in both, in proportion, so these are conservative for roles on their own
GPUs. They reproduce the issue's figure: 4 samplers + 1 learner, overlapped, take max(864 / 6.6, 864 / 0.717) =
1,204 s an epoch, 2.8 x the reference's 432 s, with the samplers 11 % busy.

Gradient bytes B (``--gradient-mb`` overrides): the LoRA's fp32 gradients, rank x (1,536 + 1,536) per adapted
SD3.5-M attention projection (``lora_parameters``), or all 2.24 G transformer weights in fp32 for full
fine-tuning. Bus bandwidth W defaults to 25 GB/s: about half of one 400 Gb/s InfiniBand NIC per GPU, a
conservative figure for ranks on several nodes (NVLink within a node is ~10 x more). With LoRA (75 MB) the
all-reduce costs ~6 ms per update: the split is a question of compute. Not modelled: weight publishing to the
samplers, the optimizer step, checkpoints, start-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.config import Batching, RunConfig
from models.lora import target_matches

REFERENCE_IMAGES_PER_GPU_S = 0.50  # 864 images x 100 epochs in ~12 h on 4 x H200 (ALGORITHM.md section 6)
SAMPLE_FORWARDS, TRAIN_FORWARDS = 40, 92  # forward-equivalents per image at 40 steps, timestep_fraction 1
DEFAULT_BANDWIDTH_GBPS = 25.0  # all-reduce bus bandwidth between learner ranks, GB/s
BASELINE_GPUS = 4  # the reference's smallest setup: scaling efficiency is measured against it
# SD3.5 Medium's transformer (bench/bench_gpu_throughput.py's SD35M_TRANSFORMER): 24 joint blocks of width 1,536,
# the last one context_pre_only (no to_add_out), blocks 0-12 with a second self-attention attn2
SD35M_WIDTH, SD35M_LAYERS, SD35M_DUAL_LAYERS = 1536, 24, 13
SD35M_TRANSFORMER_PARAMETERS = 2_243_171_520  # every weight (pos_embed is a buffer), counted on the built model


@dataclass(frozen=True)
class Rates:
    """Per-GPU throughputs of the two roles at ``steps`` sampling steps per image."""

    sampler_ips: float  # images sampled per second by one sampler GPU
    learner_ips: float  # images trained (all steps) per second by one learner rank
    steps: int = 40  # the steps per image these were measured at
    source: str = "default"  # where they come from (shown in the plan)


@dataclass(frozen=True)
class Workload:
    """One epoch in GPU-seconds (module docstring): a sampler work, b learner work, k all-reduce seconds."""

    images: int
    a: float
    b: float
    k: float = 0.0

    def train_s(self, learners: int) -> float:
        return (self.b - self.k) / learners + self.k

    def epoch_s(self, samplers: int, learners: int, overlap: bool) -> float:
        sample, train = self.a / samplers, self.train_s(learners)
        return max(sample, train) if overlap else sample + train


def default_rates() -> Rates:
    """The reference's 0.50 images per GPU-second split 40 : 92 between sampling and training (module docstring)."""
    per_image_s = 1 / REFERENCE_IMAGES_PER_GPU_S
    total = SAMPLE_FORWARDS + TRAIN_FORWARDS
    return Rates(
        total / (SAMPLE_FORWARDS * per_image_s),
        total / (TRAIN_FORWARDS * per_image_s),
        40,
        f"default: the reference's {REFERENCE_IMAGES_PER_GPU_S} images/GPU-s split {SAMPLE_FORWARDS} : "
        f"{TRAIN_FORWARDS}",
    )


def load_rates(path: str | None, sampler_ips: float | None = None, learner_ips: float | None = None) -> Rates:
    """Rates from ``bench/bench_gpu_throughput.py``'s JSON, else the defaults; either flag replaces its value."""
    rates = default_rates()
    if path:
        report = json.loads(Path(path).read_text())
        s, l = report.get("sampler_images_per_s"), report.get("learner_images_per_s")
        if not s or not l:
            raise ValueError(
                f"{path} has no sampler_images_per_s / learner_images_per_s (got {s} / {l}): every "
                "configuration of that bench run failed; run bench/bench_gpu_throughput.py again"
            )
        smoke = " (a CPU smoke run: not SD3.5-M's rates)" if report.get("smoke") else ""
        rates = Rates(s, l, report.get("steps", 40), f"{path}: {report.get('device', '?')}{smoke}")
    if sampler_ips is not None or learner_ips is not None:
        rates = Rates(
            rates.sampler_ips if sampler_ips is None else sampler_ips,
            rates.learner_ips if learner_ips is None else learner_ips,
            rates.steps,
            f"flags (else {rates.source})",
        )
    if rates.sampler_ips <= 0 or rates.learner_ips <= 0:
        raise ValueError(
            f"throughputs must be > 0 images/s; got sampler {rates.sampler_ips}, learner {rates.learner_ips}"
        )
    return rates


def lora_parameters(target_modules, rank: int) -> int:
    """LoRA parameters on SD3.5-M: rank x (1,536 + 1,536) per attention projection a target matches (peft's rule)."""
    names = []
    for i in range(SD35M_LAYERS):
        attn = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
        names += [f"transformer_blocks.{i}.attn.{m}" for m in attn + (["to_add_out"] if i < SD35M_LAYERS - 1 else [])]
        if i < SD35M_DUAL_LAYERS:
            names += [f"transformer_blocks.{i}.attn2.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
    unknown = [t for t in target_modules if not any(target_matches(n, t) for n in names)]
    if unknown:
        raise ValueError(
            f"lora.target_modules {unknown} are not SD3.5-M attention projections, the only modules fdfo "
            "plan counts; give the gradient size with --gradient-mb"
        )
    return sum(rank * 2 * SD35M_WIDTH for n in names if any(target_matches(n, t) for t in target_modules))


def gradient_bytes(cfg: RunConfig) -> int:
    """Bytes one learner rank all-reduces per update: fp32 gradients of what trains (LoRA or every weight)."""
    if cfg.model.kind != "sd3":
        raise ValueError(
            f"fdfo plan models SD3.5-M's transformer (model.kind sd3); {cfg.name} has model.kind="
            f"{cfg.model.kind}: give --gradient-mb"
        )
    if not cfg.lora.enabled:
        return 4 * SD35M_TRANSFORMER_PARAMETERS
    return 4 * lora_parameters(cfg.lora.target_modules, cfg.lora.rank)


def reward_gpus(cfg: RunConfig) -> tuple[int, str]:
    """GPUs the preset's reward pool holds: its actors' GPUs, plus one per served VLM judge (backend server)."""
    pool = cfg.runtime.reward
    actors = math.ceil(pool.count * pool.num_gpus)
    judges = {
        c.get("url") for c in cfg.reward.components if c.get("name") == "vlm_judge" and c.get("backend") == "server"
    }
    what = f"{pool.count} reward actor(s) x {pool.num_gpus:g} GPU"
    return actors + len(judges), what + (f" + {len(judges)} VLM judge server(s)" if judges else "")


def workload(cfg: RunConfig, rates: Rates, grad_bytes: float, bandwidth_gbps: float) -> Workload:
    """The epoch of ``cfg`` in GPU-seconds of each role at ``rates`` (scaled to the preset's steps per image)."""
    b = Batching.of(cfg)  # a pair's 2 images, or a Flow-GRPO group's
    images = b.images_per_unit * cfg.train.pairs_per_epoch
    per_image = cfg.sampling.num_steps / rates.steps
    trained = b.recorded_steps / rates.steps  # Flow-GRPO's window: only its steps are trained
    k = cfg.train.updates_per_epoch * 2 * grad_bytes / (bandwidth_gbps * 1e9)
    return Workload(
        images,
        images * per_image / rates.sampler_ips,
        images * trained * cfg.train.timestep_fraction / rates.learner_ips,
        k,
    )


def continuous_samplers(w: Workload, gpus: int, overlap: bool) -> float:
    """The real-valued sampler count S (of S + L = ``gpus``) that minimises the epoch (module docstring)."""
    b = w.b - w.k
    if b <= 0:
        return gpus - 1.0  # the all-reduce outweighs the work: one learner rank is best
    if not overlap:
        return gpus * math.sqrt(w.a) / (math.sqrt(w.a) + math.sqrt(b))
    beta = w.a + b + w.k * gpus
    return 2 * w.a * gpus / (beta + math.sqrt(beta * beta - 4 * w.k * w.a * gpus))


def best_split(w: Workload, gpus: int, overlap: bool) -> tuple[int, int]:
    """(samplers, learners) with samplers + learners = ``gpus``: the closed form rounded, neighbours checked (ties
    go to fewer learner ranks)."""
    if gpus < 2:
        raise ValueError(f"sampling and training need at least 1 GPU each; got {gpus}")
    x = continuous_samplers(w, gpus, overlap)
    candidates = {min(max(s, 1), gpus - 1) for s in range(math.floor(x) - 1, math.ceil(x) + 2)}
    return min(((s, gpus - s) for s in candidates), key=lambda sl: (w.epoch_s(*sl, overlap), sl[1]))


def sampler_room(rt, resources: dict[str, float], learners: int, rewards: int) -> tuple[int, str]:
    """How many samplers of ``rt``'s ask fit in ``resources`` (``ray.cluster_resources()``) beside ``learners``
    learner ranks and ``rewards`` reward actors: (count, the unit's arithmetic). The unit is a GPU when
    ``runtime.sampler.num_gpus`` > 0, else a CPU."""
    key, per = ("GPU", rt.sampler.num_gpus) if rt.sampler.num_gpus > 0 else ("CPU", rt.sampler.num_cpus)
    other = {
        "GPU": learners * rt.learner.num_gpus + rewards * rt.reward.num_gpus,
        "CPU": learners * rt.learner.num_cpus + rewards * rt.reward.num_cpus,
    }[key]
    have = resources.get(key, 0.0)
    room = max(0, math.floor((have - other) / per + 1e-9)) if per > 0 else 0
    return room, (
        f"{have:g} {key}s - {other:g} for {learners} learner rank(s) and {rewards} reward actor(s) = "
        f"{have - other:g}, / {per:g} per sampler = {room}"
    )


def auto_samplers(cfg: RunConfig, resources: dict[str, float], rates: Rates) -> tuple[int, int, str]:
    """``runtime.sampler.count: auto``: (samplers to start, the pool's ceiling, the arithmetic in one line) on a
    cluster with ``resources``, beside ``runtime.learner.count`` ranks and the reward pool at its ceiling.

    Room R = the samplers that fit (``sampler_room``). Lock-step: the learner waits for the whole epoch's sampling,
    so every sampler shortens the epoch and all R start. Overlap: the epoch is the slower role's time, so samplers
    beyond the balance a / S = train(L) (module docstring, at ``rates``) would idle: S = ceil(a / train(L)) start,
    and the pool may grow to R when the learner waits for data (the rates are estimates). Always at least 1;
    ``runtime.sampler.max_count`` caps both."""
    rt = cfg.runtime
    rewards = rt.reward.max_count or rt.reward.count
    learners = rt.learner.count
    room, why = sampler_room(rt, resources, learners, rewards)
    ceiling = max(1, room if rt.sampler.max_count is None else min(room, rt.sampler.max_count))
    if not rt.overlap:
        return ceiling, ceiling, f"lock-step: all that fit ({why})"
    try:
        grad = gradient_bytes(cfg) if learners > 1 else 0.0
    except ValueError:
        grad = 0.0  # not SD3.5-M: the all-reduce is not modelled (k = 0)
    w = workload(cfg, rates, grad, DEFAULT_BANDWIDTH_GBPS)
    balance = math.ceil(w.a / w.train_s(learners) - 1e-9)
    start = max(1, min(balance, ceiling))
    return (
        start,
        ceiling,
        (
            f"overlap: a / train(L) = {w.a:.1f} / {w.train_s(learners):.1f} s -> {balance} keep "
            f"{learners} learner rank(s) busy ({rates.source}); room for {room} ({why})"
        ),
    )


def scaling_efficiency(base_gpus: int, base_epoch_s: float, gpus: int, epoch_s: float) -> float:
    """Images per GPU-second at ``gpus`` over those at ``base_gpus``: base_gpus x base_epoch / (gpus x epoch)."""
    return base_gpus * base_epoch_s / (gpus * epoch_s)


def split_row(w: Workload, gpus: int, rewards: int, overlap: bool) -> dict:
    """The best split of ``gpus`` (``rewards`` of them the reward pool's), its times and the overrides to run it."""
    samplers, learners = best_split(w, gpus - rewards, overlap)
    epoch = w.epoch_s(samplers, learners, overlap)
    overrides = [
        f"runtime.overlap={str(overlap).lower()}",
        f"runtime.sampler.count={samplers}",
        f"runtime.sampler.max_count={samplers}",
        f"runtime.learner.count={learners}",
        "runtime.sampler.num_gpus=1",
        "runtime.learner.num_gpus=1",
    ]
    return {
        "gpus": gpus,
        "reward_gpus": rewards,
        "samplers": samplers,
        "learners": learners,
        "sample_s": w.a / samplers,
        "train_s": w.train_s(learners),
        "epoch_s": epoch,
        "images_per_gpu_s": w.images / (epoch * gpus),
        "vs_reference": w.images / (epoch * gpus) / REFERENCE_IMAGES_PER_GPU_S,
        "colocated_epoch_s": w.a / (gpus - rewards) + w.train_s(gpus - rewards),
        "overrides": overrides,
    }


def plan(
    cfg: RunConfig,
    gpus: list[int],
    rates: Rates,
    overlap: bool,
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
    grad_bytes: float | None = None,
    rewards: int | None = None,
) -> dict:
    """The best split for each GPU count in ``gpus`` and its scaling efficiency against ``BASELINE_GPUS`` (or the
    fewest GPUs the roles fit in, when that is more). Raises before anything is computed if a count is too small."""
    reward_what = "--reward-gpus"
    if rewards is None:
        rewards, reward_what = reward_gpus(cfg)
    least = rewards + 2
    for g in gpus:
        if g < least:
            raise ValueError(
                f"--gpus {g} is too few for {cfg.name}: its reward pool takes {rewards} GPU(s) "
                f"({reward_what}) and sampling and training need at least 1 GPU each: give --gpus "
                f"{least} or more (or fewer --reward-gpus)"
            )
    grad_bytes = gradient_bytes(cfg) if grad_bytes is None else grad_bytes
    w = workload(cfg, rates, grad_bytes, bandwidth_gbps)
    base = split_row(w, max(BASELINE_GPUS, least), rewards, overlap)
    rows = [split_row(w, g, rewards, overlap) for g in gpus]
    for row in rows:
        row["efficiency"] = scaling_efficiency(base["gpus"], base["epoch_s"], row["gpus"], row["epoch_s"])
    return {
        "config": cfg.name,
        "schedule": "overlap" if overlap else "lock-step",
        "rates": asdict(rates),
        "workload": asdict(w),
        "gradient_bytes": grad_bytes,
        "bandwidth_gbps": bandwidth_gbps,
        "reward_gpus": rewards,
        "reward_pool": reward_what,
        "baseline_gpus": base["gpus"],
        "rows": rows,
    }


def format_plan(p: dict) -> str:
    """The plan as a table, with its inputs and each row's overrides."""
    w, r = p["workload"], p["rates"]
    allreduce_ms = 1e3 * p["gradient_bytes"] / (p["bandwidth_gbps"] * 1e9)
    rule = "S / L = sqrt(a / (b - k))" if p["schedule"] == "lock-step" else "a / S = train(L)"
    lines = [
        (
            f"{p['config']}, {p['schedule']}: {w['images']} images an epoch; rates {r['sampler_ips']:.3f} sampled, "
            f"{r['learner_ips']:.3f} trained images/s per GPU ({r['source']})"
        ),
        (
            f"a = {w['a']:.1f} sampler GPU-s, b = {w['b']:.1f} learner GPU-s per epoch; reward pool "
            f"{p['reward_gpus']} GPU(s) ({p['reward_pool']}); split: {rule}"
        ),
        (
            f"all-reduce of {p['gradient_bytes'] / 1e6:.1f} MB at {p['bandwidth_gbps']:g} GB/s: <= "
            f"{2 * allreduce_ms:.1f} ms per update (k = {1e3 * w['k']:.1f} ms an epoch)"
        ),
        (
            f"{'GPUs':>5} {'reward':>6} {'samplers':>8} {'learners':>8} {'sample s':>9} {'train s':>9} {'epoch s':>9} "
            f"{'img/GPU-s':>9} {'x ref':>6} {'eff vs ' + str(p['baseline_gpus']):>9} {'colocated s':>11}"
        ),
    ]
    for row in p["rows"]:
        lines.append(
            f"{row['gpus']:5d} {row['reward_gpus']:6d} {row['samplers']:8d} {row['learners']:8d} "
            f"{row['sample_s']:9.1f} {row['train_s']:9.1f} {row['epoch_s']:9.1f} "
            f"{row['images_per_gpu_s']:9.3f} {row['vs_reference']:6.2f} {100 * row['efficiency']:8.1f}% "
            f"{row['colocated_epoch_s']:11.1f}"
        )
    lines.append("colocated s: the same compute GPUs each sampling then training (the reference's layout), lock-step")
    lines += [f"  {row['gpus']} GPUs: {' '.join(row['overrides'])}" for row in p["rows"]]
    return "\n".join(lines)


def add_plan_arguments(p) -> None:
    """``fdfo plan``'s options, on the subparser ``p``."""
    p.add_argument(
        "--config", default="sd35m-combined", help="preset or YAML whose epoch, LoRA and reward pool to plan"
    )
    p.add_argument("--gpus", type=int, nargs="+", required=True, help="GPU counts to plan for, e.g. 4 8 32")
    p.add_argument("--throughput", default=None, help="bench/bench_gpu_throughput.py's JSON (per-role images/s)")
    p.add_argument("--sampler-ips", type=float, default=None, help="images/s one sampler GPU samples")
    p.add_argument("--learner-ips", type=float, default=None, help="images/s one learner rank trains (all steps)")
    p.add_argument(
        "--schedule",
        nargs="+",
        choices=("lockstep", "overlap"),
        default=None,
        help="lock-step (sample, then train) and/or overlap; default: the preset's runtime.overlap",
    )
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=DEFAULT_BANDWIDTH_GBPS,
        help="all-reduce bus bandwidth between learner ranks, GB/s (25: inter-node; NVLink ~10x)",
    )
    p.add_argument("--gradient-mb", type=float, default=None, help="gradient MB per all-reduce (default: the preset's)")
    p.add_argument("--reward-gpus", type=int, default=None, help="GPUs of the reward pool (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.pairs_per_epoch=416")
