"""Where the roles run, compared per GPU-hour: hybrid lock-step, split lock-step, split overlap (with and without the
staleness correction), from the cost model of ``cluster.plan``.

Usage::

    rows = compare_layouts(workload(cfg, rates, grad, 25.0), gpus=32, rewards=2, updates=4)
    print(format_layouts(rows, rates))           # what ``fdfo plan`` prints under its split

For an epoch of a sampler and b learner GPU-seconds (``cluster.plan.Workload``; k of b is the all-reduce) on G GPUs,
R of them the reward pool's, C = G - R:

    hybrid lock-step   every worker samples its share, then trains its share (one weight copy):  a / C + train(C)
                       = (a + b - k) / C + k, the reference's (a + b) / C when k = 0
    split lock-step    S samplers then L learner ranks:  a / S + train(L), best at S / L = sqrt(a / (b - k)):
                       (sqrt(a) + sqrt(b))^2 / C when k = 0
    split overlap      both at once:  max(a / S, train(L)), best near S = a / (a + b) x C: (a + b) / C when k = 0
    split overlap, corrected   the same with b' = b (1 + (U - 1) / U x 40 / 92): the staleness correction's no-grad
                       forward for each stale row of an epoch's updates 2..U (one forward, against 92 / 40 for a
                       trained row; none when U = 1)

Images per GPU-second count every GPU: I / (epoch x G), against the reference's 0.50. Lock-step learns the
reference's amount per pair; overlapped pairs learn ``learning`` x as much (measured on shapes, bench/results/
time_to_reward_staleness.json, at a lag bound of 3). What a run pays for a reward is GPU-hours per unit learned:
``per_gpu_hour`` = images per GPU-second x learning, over the reference's (above 1: fewer GPU-hours than the
reference for the same model); ``to_reward_s`` = epoch / learning is the wall time per reference epoch of learning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from cluster.plan import (
    REFERENCE_IMAGES_PER_GPU_S,
    SAMPLE_FORWARDS,
    TRAIN_FORWARDS,
    Rates,
    Workload,
    best_split,
    format_plan,
    gradient_bytes,
    load_rates,
    plan,
    reward_gpus,
    workload,
)

# Held-out gain per pair of overlapped pairs over lock-step's on shapes at a lag bound of 3 (every pair 3 versions old
# once the run is 3 updates in; 2 seeds, the mean over the curve: bench/results/time_to_reward_staleness.json,
# docs/benchmarks.md#the-staleness-correction-issue-30): uncorrected 0.20 / 0.42, corrected 1.00 / 1.01 (taken as
# 1.0: a stale pair learning more than a fresh one is seed noise)
OVERLAP_LEARNING = {"uncorrected": 0.31, "corrected": 1.0}
ANCHOR_FORWARD = SAMPLE_FORWARDS / TRAIN_FORWARDS  # one no-grad forward of a row, against training it (40 / 92)
LAYOUTS = ("hybrid lock-step", "split lock-step", "split overlap", "split overlap, corrected")


@dataclass(frozen=True)
class LayoutRow:
    """One layout on ``gpus`` GPUs: its epoch, throughput and what a unit of learning costs against the reference."""

    layout: str  # one of LAYOUTS
    gpus: int
    reward_gpus: int
    samplers: int  # hybrid: the workers (each samples and trains)
    learners: int  # hybrid: the same workers
    epoch_s: float
    images_per_gpu_s: float
    vs_reference: float  # images per GPU-second over the reference's 0.50
    learning: float  # held-out gain per pair over lock-step's
    per_gpu_hour: float  # vs_reference x learning: the reference's GPU-hours per ours for the same reward
    to_reward_s: float  # epoch / learning: wall seconds per reference epoch of learning
    overrides: tuple[str, ...]


def corrected(w: Workload, updates: int) -> Workload:
    """The workload with the staleness correction's forwards: every overlapped row is stale, and the rows of updates
    2..U each get one no-grad forward (module docstring)."""
    return replace(w, b=w.b * (1 + (updates - 1) / updates * ANCHOR_FORWARD))


def compare_layouts(
    w: Workload, gpus: int, rewards: int, updates: int, learning: dict[str, float] | None = None
) -> list[LayoutRow]:
    """Every layout of ``LAYOUTS`` on ``gpus`` GPUs (``rewards`` of them the reward pool's) for the epoch ``w`` of
    ``updates`` updates; ``learning``: the overlapped learning factors (default ``OVERLAP_LEARNING``)."""
    learning = OVERLAP_LEARNING if learning is None else learning
    compute = gpus - rewards
    if compute < 2:
        raise ValueError(
            f"{gpus} GPUs with {rewards} for the reward pool leave {compute} for sampling and training: split layouts "
            "need at least 2 (one sampler, one learner rank); give more GPUs or fewer reward GPUs"
        )

    def row(layout: str, samplers: int, learners: int, epoch: float, factor: float, overrides) -> LayoutRow:
        ips = w.images / (epoch * gpus)
        vs = ips / REFERENCE_IMAGES_PER_GPU_S
        return LayoutRow(
            layout,
            gpus,
            rewards,
            samplers,
            learners,
            epoch,
            ips,
            vs,
            factor,
            vs * factor,
            epoch / factor if factor > 0 else float("inf"),
            tuple(overrides),
        )

    hybrid = w.a / compute + w.train_s(compute)
    rows = [
        row(
            "hybrid lock-step",
            compute,
            compute,
            hybrid,
            1.0,
            ["runtime.placement=hybrid", "runtime.overlap=false", f"runtime.learner.count={compute}"],
        ),
    ]
    for layout, overlap, work, factor in (
        ("split lock-step", False, w, 1.0),
        ("split overlap", True, w, learning["uncorrected"]),
        ("split overlap, corrected", True, corrected(w, updates), learning["corrected"]),
    ):
        s, l = best_split(work, compute, overlap)
        overrides = [
            "runtime.placement=split",
            f"runtime.overlap={str(overlap).lower()}",
            f"runtime.sampler.count={s}",
            f"runtime.learner.count={l}",
        ] + (["train.staleness_correction=true"] if layout.endswith("corrected") else [])
        rows.append(row(layout, s, l, work.epoch_s(s, l, overlap), factor, overrides))
    return rows


def layouts_for(
    cfg,
    gpus: list[int],
    rates: Rates,
    bandwidth_gbps: float,
    grad_bytes: float | None = None,
    rewards: int | None = None,
) -> list[dict]:
    """``fdfo plan``'s layout comparison for the preset ``cfg`` (a ``RunConfig``) at each GPU count: every layout's
    row (as a dict) and the best layout's name, at ``rates``."""
    rewards = reward_gpus(cfg)[0] if rewards is None else rewards
    w = workload(cfg, rates, gradient_bytes(cfg) if grad_bytes is None else grad_bytes, bandwidth_gbps)
    out = []
    for g in gpus:
        rows = compare_layouts(w, g, rewards, cfg.train.updates_per_epoch)
        out.append({"gpus": g, "best": best_layout(rows).layout, "rows": [asdict(r) for r in rows]})
    return out


def best_layout(rows: list[LayoutRow]) -> LayoutRow:
    """The layout that pays least for a unit of learning (highest ``per_gpu_hour``; ties: the first of LAYOUTS)."""
    return max(rows, key=lambda r: (round(r.per_gpu_hour, 9), -LAYOUTS.index(r.layout)))


def format_layouts(rows: list[LayoutRow]) -> str:
    """The layouts as a table: per GPU count, each layout's split, epoch, throughput and cost of learning (rows may be
    ``LayoutRow``s or their dicts)."""
    rows = [r if isinstance(r, LayoutRow) else LayoutRow(**r) for r in rows]
    lines = [
        f"{'GPUs':>5} {'layout':<25} {'smp+lrn':>9} {'epoch s':>8} {'img/GPU-s':>9} {'x ref':>6} {'learn':>6} "
        f"{'x ref/GPU-h':>11} {'s/ref epoch':>11}"
    ]
    for r in rows:
        split = f"{r.samplers} both" if r.layout.startswith("hybrid") else f"{r.samplers}+{r.learners}"
        lines.append(
            f"{r.gpus:5d} {r.layout:<25} {split:>9} {r.epoch_s:8.1f} {r.images_per_gpu_s:9.3f} {r.vs_reference:6.2f} "
            f"{r.learning:6.2f} {r.per_gpu_hour:11.2f} {r.to_reward_s:11.1f}"
        )
    lines.append(
        "learn: held-out gain per pair over lock-step's (overlap: measured on shapes at lag bound 3); x ref/GPU-h: "
        "images per GPU-s x learn over the reference's (> 1: fewer GPU-hours than the reference for the same reward)"
    )
    return "\n".join(lines)


def plan_command(args) -> int:
    """``fdfo plan``: print the split for each of ``args.gpus`` and each schedule asked, then every layout
    (hybrid and split, lock-step and overlap) and the one that pays least per unit learned."""
    from cluster.config import load_config

    cfg = load_config(args.config, args.overrides)
    rates = load_rates(args.throughput, args.sampler_ips, args.learner_ips)
    schedules = args.schedule or ["overlap" if cfg.runtime.overlap else "lockstep"]
    grad = None if args.gradient_mb is None else args.gradient_mb * 1e6
    plans = [
        plan(cfg, args.gpus, rates, schedule == "overlap", args.bandwidth_gbps, grad, args.reward_gpus)
        for schedule in schedules
    ]
    layouts = layouts_for(cfg, args.gpus, rates, args.bandwidth_gbps, grad, args.reward_gpus)
    for p in plans:
        p["layouts"] = layouts
    text = "\n\n".join(format_plan(p) for p in plans)
    best = ", ".join(f"{g['gpus']} GPUs: {g['best']}" for g in layouts)
    text += f"\n\nlayouts ({rates.source}):\n{format_layouts([r for g in layouts for r in g['rows']])}\nbest: {best}"
    print(json.dumps(plans, indent=2) if args.json else text)
    return 0
