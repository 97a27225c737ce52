"""The paper's evaluation protocol: ``fdfo eval --suite paper``, and its 64-prompt subset ``--suite quick``.

Usage::

    fdfo eval --suite paper --checkpoint runs/sd35m-combined runtime.sampler.count=8   # 8 sampler actors (Ray)
    fdfo eval --suite quick --config sd35m-combined --local                          # the base model, in process

What it measures (ALGORITHM.md §7; the reference's ``metrics.py`` and ``eval/calculate_metrics.py``):

    prompt set        prompts x images   metrics
    pickscore_train   4,096 x 1          pickscore, vlm_alignment
    hpdv2             3,200 x 4          hpsv2, clip_h14, clip_l14 (each logit_scale * cos), dreamsim_diversity,
                                         vlm_quality, vlm_photo

Each prompt list is shuffled with ``np.random.RandomState(0)`` and cut to its first prompts (``quick``: the first
64, so its images are a subset of ``paper``'s). Image r of prompt i starts from seed ``i * R + r`` (R images per
prompt), as in the reference on one GPU, whatever the policy: numbers of two checkpoints are paired image by image.
Images are plain Euler samples at ``eval.num_steps`` (else ``sampling.num_steps``) and ``sampling.guidance_scale``.
The VLM metrics ask the judge ``VLM_QUESTIONS`` about the uint8 image at its own size (the judge processor's resize).

Generation runs in process (``--local`` or ``runtime.sampler.count=1``) or on ``runtime.sampler.count`` sampler
actors (``Sampler.generate``, the class training samples with), in chunks of ``CHUNK_IMAGES`` whole prompts that
are the same either way, so the images do not depend on the pool. Scores are computed in this process as chunks
arrive (images are not kept): on a cluster give the driver the scorers' GPU (``ray job submit
--entrypoint-num-gpus 1``). Every scorer loads by hub id (``SCORER_SPECS``) unless ``eval.suite_scorers`` says
otherwise, e.g. ``eval.suite_scorers='{vlm: {backend: server, url: "http://127.0.0.1:8000"}}'``.

Its parts: the prompt sets and their cut (cluster/eval_prompts.py), the scorers and the judge's questions
(cluster/eval_scorers.py), the images, in process or on sampler actors (cluster/eval_images.py); this module runs
them and writes the report.

Writes into the output folder ``<tag>.json`` (per prompt set the reference's result layout: ``{metric: mean,
"_config": {...}, "_elapsed_seconds": s}``), ``<tag>.md`` (the table, the paper's numbers beside), ``<tag>_scores.json``
(every image's scores with its prompt and seed, for paired comparisons) and ``<tag>_<set>_grid.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from cluster.build import build_model
from cluster.config import RunConfig
from cluster.eval_images import LocalImages, RayImages
from cluster.eval_prompts import IMAGE_SEED, PROMPT_SEED, Part, plan
from cluster.eval_scorers import METRIC_SCORER, build_scorer, score_chunk, scorer_specs
from models.images import save_grid
from models.lora import make_trainable

log = logging.getLogger("fdfo")


# The reference's numbers for its released checkpoint "combined, no CFG, epoch 100" (its README), for the table.
PAPER_RESULTS = {
    "pickscore": 22.4704,
    "vlm_alignment": 61.7239,
    "hpsv2": 28.2949,
    "clip_h14": 35.7743,
    "clip_l14": 28.1932,
    "dreamsim_diversity": 0.4550,
}
PAPER_LABEL = "paper: FDFO combined, no CFG, epoch 100"


# -- the suite --------------------------------------------------------------------------------------------------------
def evaluate_part(part: Part, images_src, scorers: dict, num_steps: int, grid_png: Path, progress: bool = True):
    """Generate and score one prompt set; returns ({metric: mean, "_unscored": {...}}, per-image scores)."""
    from tqdm import tqdm

    ps, R = part.spec, part.spec.images_per_prompt
    per_image = {
        m: np.full(len(part.chosen) if m == "dreamsim_diversity" else len(part.prompts), np.nan) for m in ps.metrics
    }
    # a bar only on a terminal: in a log (`ray job logs`, a file) its carriage returns are noise
    bar = tqdm(
        total=len(part.prompts), desc=f"{ps.name} images", unit="img", disable=not (progress and sys.stderr.isatty())
    )
    for (a, b), images in images_src.chunks(part, num_steps):
        if a == 0:  # the first prompts: one row of images (R = 1), or a row per prompt
            save_grid(images[: min(b, 8) * R], R if R > 1 else min(b, 8), grid_png)
        for m, v in score_chunk(ps.metrics, scorers, images, part.prompts[a * R : b * R], R).items():
            if m == "dreamsim_diversity":
                per_image[m][a:b] = v
            else:
                per_image[m][a * R : b * R] = v
        bar.update(len(images))
    bar.close()
    means = {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in per_image.items()}
    unscored = {m: int((~np.isfinite(v)).sum()) for m, v in per_image.items() if (~np.isfinite(v)).any()}
    return means | ({"_unscored": unscored} if unscored else {}), per_image


def run_suite(
    cfg: RunConfig,
    suite: str,
    out_dir: str | Path,
    *,
    tag: str,
    model=None,
    weights=None,
    checkpoint: str | None = None,
    num_prompts: int | None = None,
    scorers: dict | None = None,
    local: bool | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a policy on ``suite``; writes ``<tag>.json``, ``<tag>.md``, ``<tag>_scores.json`` and a grid per set
    into ``out_dir`` and returns the JSON's content. In process when ``local`` (default: ``runtime.local`` or a pool
    of one): ``model`` is the policy, or a zero-argument function that loads it (None: ``cfg.model``'s base); else on sampler actors loading ``weights``
    (a checkpoint's ``Weights``; None = the base model). ``scorers``: built scorers by ``SCORER_SPECS`` key (tests),
    the others are built from the config. Prompts, scorer settings and optional packages are checked first."""
    t0 = time.perf_counter()
    parts = plan(cfg, suite, num_prompts)
    given = dict(scorers or {})
    needed = [[METRIC_SCORER[m] for m in p.spec.metrics] for p in parts]
    specs = scorer_specs(cfg, sorted({k for keys in needed for k in keys} - set(given)))
    num_steps = cfg.eval.num_steps or cfg.sampling.num_steps
    local = (cfg.runtime.local or cfg.runtime.sampler.count in (0, 1)) if local is None else local
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if local:
        if model is None:
            model = build_model(cfg.model)
            if getattr(cfg.lora, "init_from", None):  # starting weights (e.g. the authors' released LoRA)
                make_trainable(model.transformer, cfg.lora)
            model.transformer.requires_grad_(False)
        elif not hasattr(model, "velocity"):  # a zero-argument builder: the policy loads after the checks
            model = model()
        images_src = LocalImages(model, cfg)
    else:
        images_src = RayImages(cfg, weights)
    built, results, per_image = dict(given), {}, {}
    try:
        for k, part in enumerate(parts):
            t_part = time.perf_counter()
            for key in needed[k]:
                if key not in built:
                    built[key] = build_scorer(key, specs[key])
            means, scores = evaluate_part(
                part, images_src, built, num_steps, out_dir / f"{tag}_{part.spec.name}_grid.png", progress
            )
            results[part.spec.name] = means | {
                "_config": part_config(part, cfg, checkpoint, num_steps),
                "_elapsed_seconds": time.perf_counter() - t_part,
            }
            per_image[part.spec.name] = {
                "prompts": part.prompts,
                "seeds": part.seeds,
                **{m: [None if not np.isfinite(x) else float(x) for x in v] for m, v in scores.items()},
            }
            later = {key for keys in needed[k + 1 :] for key in keys}
            for key in [key for key in built if key not in later and key not in given]:
                del built[key]  # free a model no later prompt set uses
    finally:
        images_src.close()
    summary = {
        "suite": suite,
        "checkpoint": checkpoint,
        "prompt_sets": results,
        "paper": PAPER_RESULTS,
        "_elapsed_seconds": time.perf_counter() - t0,
    }
    (out_dir / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    (out_dir / f"{tag}.md").write_text(markdown(summary))
    (out_dir / f"{tag}_scores.json").write_text(json.dumps(per_image))
    return summary


def part_config(part: Part, cfg: RunConfig, checkpoint: str | None, num_steps: int) -> dict:
    """The reference's ``_config`` block, plus what else fixes the images here."""
    return {
        "checkpoint": checkpoint,
        "prompt_set": part.spec.name,
        "prompts_source": part.source,
        "num_prompts": len(part.chosen),
        "num_repeats": part.spec.images_per_prompt,
        "prompt_seed": PROMPT_SEED,
        "image_seed": IMAGE_SEED,
        "num_inference_steps": num_steps,
        "guidance_scale": cfg.sampling.guidance_scale,
        "model": cfg.model.path or cfg.model.kind,
    }


def markdown(summary: dict) -> str:
    """The results table: one row per (prompt set, metric), sorted by metric as the reference prints them, with
    the paper's value beside (measured on its full prompt sets with SD3.5 Medium)."""
    lines = [
        f"# fdfo eval --suite {summary['suite']}: {summary['checkpoint'] or 'base model'}",
        "",
        f"| prompt set | prompts x images | metric | value | {PAPER_LABEL} |",
        "|---|---|---|---:|---:|",
    ]
    for name, res in summary["prompt_sets"].items():
        c = res["_config"]
        for m in sorted(k for k in res if not k.startswith("_")):
            paper = f"{PAPER_RESULTS[m]:.4f}" if m in PAPER_RESULTS else ""
            lines.append(f"| {name} | {c['num_prompts']} x {c['num_repeats']} | {m} | {res[m]:.4f} | {paper} |")
    unscored = {f"{n}/{m}": k for n, r in summary["prompt_sets"].items() for m, k in r.get("_unscored", {}).items()}
    if unscored:
        lines += ["", f"Unscored (left out of the means): {json.dumps(unscored)}"]
    lines += ["", f"Completed in {summary['_elapsed_seconds']:.1f} seconds."]
    return "\n".join(lines) + "\n"


def eval_suite_command(
    suite: str,
    config: str | None,
    checkpoint: str | None,
    out: str | None,
    overrides: list[str],
    local: bool = False,
    num_prompts: int | None = None,
) -> dict:
    """``fdfo eval --suite``: a checkpoint (its config, overrides except model.* / lora.*) or a preset's base model."""
    from cluster.config import load_config
    from cluster.evaluate import checkpoint_config, checkpoint_weights, load_policy

    if checkpoint:
        folder, cfg = checkpoint_config(checkpoint, overrides)
        out, tag = out or str(folder.parent.parent), f"eval_{suite}_{folder.name}"
    else:
        folder, cfg = None, load_config(config, overrides)
        tag = f"eval_{suite}_init" if getattr(cfg.lora, "init_from", None) else f"eval_{suite}_base"
        out = out or f"{cfg.output_dir}/{cfg.name}"
    local = local or cfg.runtime.local or cfg.runtime.sampler.count in (0, 1)  # auto: sampler actors, all that fit
    model = (lambda: load_policy(folder)[0]) if local and folder else None
    weights = checkpoint_weights(folder) if folder and not local else None
    return run_suite(
        cfg,
        suite,
        out,
        tag=tag,
        model=model,
        weights=weights,
        local=local,
        num_prompts=num_prompts,
        checkpoint=str(folder) if folder else getattr(cfg.lora, "init_from", None),
    )
