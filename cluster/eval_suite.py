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

Writes into the output folder ``<tag>.json`` (per prompt set the reference's result layout: ``{metric: mean,
"_config": {...}, "_elapsed_seconds": s}``), ``<tag>.md`` (the table, the paper's numbers beside), ``<tag>_scores.json``
(every image's scores with its prompt and seed, for paired comparisons) and ``<tag>_<set>_grid.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cluster.build import build_model, reward_specs
from cluster.config import RunConfig
from cluster.plan import sampler_room
from models.euler import generate_images
from models.images import save_grid
from models.lora import make_trainable

log = logging.getLogger("fdfo")
CHUNK_IMAGES = 16  # images per generation call (whole prompts): fixed, so images do not depend on the pool
PROMPT_SEED = 0  # np.random.RandomState seed of the prompt shuffle (the reference's prompt_seed)
IMAGE_SEED = 0  # seed of image r of prompt i: IMAGE_SEED + i * R + r (the reference's image_seed)


@dataclass(frozen=True)
class PromptSet:
    name: str  # pickscore_train or hpdv2
    num_prompts: int  # the first prompts of the shuffled list
    images_per_prompt: int  # R
    metrics: tuple[str, ...]  # names as in METRIC_SCORER


PAPER = (
    PromptSet("pickscore_train", 4096, 1, ("pickscore", "vlm_alignment")),
    PromptSet("hpdv2", 3200, 4, ("hpsv2", "clip_h14", "clip_l14", "dreamsim_diversity", "vlm_quality", "vlm_photo")),
)
SUITES = {"paper": PAPER, "quick": tuple(dataclasses.replace(p, num_prompts=64) for p in PAPER)}

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

VLM_QUESTIONS = {  # the reference's evaluation questions (training asks 'Answer Yes or No.', evaluation 'with')
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
METRIC_SCORER = {
    "pickscore": "pickscore",
    "hpsv2": "hpsv2",
    "clip_h14": "clip_h14",
    "clip_l14": "clip_l14",
    "dreamsim_diversity": "dreamsim",
    **{m: "vlm" for m in VLM_QUESTIONS},
}
SCORER_SPECS = {  # the reference's models, all in float32; the judge is the run's vlm_judge component if it has one
    "pickscore": {"name": "pickscore", "dtype": "float32"},
    "hpsv2": {"name": "hpsv2", "model": "adams-story/HPSv2-hf", "logit_scale": True, "dtype": "float32"},
    "clip_h14": {"name": "clip_logit", "model": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "dtype": "float32"},
    "clip_l14": {"name": "clip_logit", "model": "openai/clip-vit-large-patch14", "dtype": "float32"},
    "dreamsim": {},  # rewards.dreamsim.DreamSim settings
    "vlm": {"name": "vlm_judge"},  # Qwen2.5-VL-7B-Instruct in process (transformers)
}

PROMPT_SOURCES = {"pickscore_train": "prompts/pickscore_train.txt", "hpdv2": "hub:zhwang/HPDv2"}
HPDV2_CATEGORIES = ("anime", "concept-art", "paintings", "photo")
HOW_TO_GET = {
    "pickscore_train": "mkdir -p prompts && curl -o prompts/pickscore_train.txt "
    "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/train.txt",
    "hpdv2": "set it to hub:zhwang/HPDv2 (downloads benchmark/<category>.json), or `huggingface-cli download "
    "zhwang/HPDv2 --repo-type dataset --include 'benchmark/*.json' --local-dir <folder>` and give the folder",
}


# -- prompts ----------------------------------------------------------------------------------------------------------
def load_prompt_set(name: str, source: str) -> list[str]:
    """All prompts of set ``name`` from ``source``: ``hub:<dataset>`` (HPDv2's layout), a folder holding HPDv2's
    ``benchmark/<category>.json``, a JSON file (a list of prompts), a text file (one per line) or ``builtin:...``."""
    from cluster.prompts import load_prompts

    if source.startswith("hub:"):
        return _hub_prompts(name, source[len("hub:") :])
    if source.startswith("builtin:"):
        return load_prompts(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = [
            next((f for f in (path / "benchmark" / f"{c}.json", path / f"{c}.json") if f.is_file()), None)
            for c in HPDV2_CATEGORIES
        ]
        if None in files:
            raise FileNotFoundError(
                f"prompt set {name!r}: folder {source!r} lacks benchmark/<category>.json for "
                f"{[c for c, f in zip(HPDV2_CATEGORIES, files) if f is None]}; {HOW_TO_GET['hpdv2']}"
            )
        return [p for f in files for p in _json_prompts(f, name)]
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt set {name!r}: no file at {source!r}. Get it with: {HOW_TO_GET[name]}; or "
            f"set eval.suite_prompts.{name}=<your file> (one prompt per line, or a JSON list)"
        )
    if path.suffix == ".json":
        return _json_prompts(path, name)
    return load_prompts(str(path))


def _json_prompts(path: Path, name: str) -> list[str]:
    data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise ValueError(f"prompt set {name!r}: {path} must hold a non-empty JSON list of prompt strings")
    return [p.strip() for p in data]


def _hub_prompts(name: str, repo: str) -> list[str]:
    """HPDv2's four benchmark categories from a hub dataset (huggingface_hub's cache; HF_HUB_OFFLINE=1 uses it)."""
    if name != "hpdv2":
        raise ValueError(f"prompt set {name!r} has no hub source; {HOW_TO_GET[name]}")
    from huggingface_hub import hf_hub_download

    prompts = []
    for c in HPDV2_CATEGORIES:
        try:
            path = hf_hub_download(repo, filename=f"benchmark/{c}.json", repo_type="dataset")
        except Exception as e:  # offline, no such repo, no access: say how to get the files another way
            raise OSError(
                f"prompt set 'hpdv2': could not download benchmark/{c}.json from hub dataset {repo} "
                f"({type(e).__name__}: {e}). Offline: {HOW_TO_GET['hpdv2']}"
            ) from None
        prompts += _json_prompts(Path(path), name)
    return prompts


@dataclass
class Part:
    """One prompt set as evaluated: the chosen prompts (shuffled order) and every image's prompt and seed."""

    spec: PromptSet
    source: str
    chosen: list[str]
    prompts: list[str]  # [P * R], a prompt's images adjacent
    seeds: list[int]  # [P * R]


def plan(cfg: RunConfig, suite: str, num_prompts: int | None = None) -> list[Part]:
    """The suite's prompt sets, prompts loaded and cut (``num_prompts`` caps every set, e.g. for a smoke run)."""
    if suite not in SUITES:
        raise ValueError(f"unknown eval suite {suite!r}; suites: {', '.join(SUITES)}")
    sources = dict(cfg.eval.suite_prompts or {})
    unknown = sorted(set(sources) - set(PROMPT_SOURCES))
    if unknown:
        raise ValueError(
            f"eval.suite_prompts: unknown prompt set {unknown[0]!r}; prompt sets: {', '.join(PROMPT_SOURCES)}"
        )
    parts = []
    for ps in SUITES[suite]:
        source = str(sources.get(ps.name) or PROMPT_SOURCES[ps.name])
        everything = load_prompt_set(ps.name, source)
        np.random.RandomState(PROMPT_SEED).shuffle(everything)
        chosen = everything[: min(ps.num_prompts, num_prompts or ps.num_prompts)]
        R = ps.images_per_prompt
        parts.append(
            Part(
                ps,
                source,
                chosen,
                [p for p in chosen for _ in range(R)],
                [IMAGE_SEED + i * R + r for i in range(len(chosen)) for r in range(R)],
            )
        )
    return parts


# -- scorers ----------------------------------------------------------------------------------------------------------
def scorer_specs(cfg: RunConfig, keys) -> dict[str, dict]:
    """Settings of every scorer in ``keys``: ``SCORER_SPECS`` with ``eval.suite_scorers`` on top, each checked
    (names, settings, files) without loading anything."""
    from rewards.base import check_kwargs, check_spec
    from rewards.dreamsim import INSTALL_HINT, DreamSim

    user = dict(cfg.eval.suite_scorers or {})
    unknown = sorted(set(user) - set(SCORER_SPECS))
    if unknown:
        raise ValueError(f"eval.suite_scorers: unknown scorer {unknown[0]!r}; scorers: {', '.join(SCORER_SPECS)}")
    specs = {}
    for key in keys:
        over = user.get(key) or {}
        if not isinstance(over, dict):
            raise ValueError(f"eval.suite_scorers.{key} must be a mapping of settings, e.g. {{dtype: float32}}")
        spec = judge_spec(cfg, over) if key == "vlm" else {**SCORER_SPECS[key], **over}
        if key == "dreamsim":
            check_kwargs(DreamSim, spec, "eval.suite_scorers.dreamsim")
        else:
            check_spec(spec, f"eval.suite_scorers.{key}")
        specs[key] = spec
    if "model" not in specs.get("dreamsim", {"model": "given"}) and importlib.util.find_spec("dreamsim") is None:
        raise ImportError(INSTALL_HINT)  # an optional package: say how to install it before anything loads
    return specs


def judge_spec(cfg: RunConfig, over: dict) -> dict:
    """The VLM judge of the vlm_* metrics: the run's vlm_judge component (its model, backend, url, ...) if it has
    one, else ``SCORER_SPECS["vlm"]``; ``over`` on top. The judge is asked the metric's question verbatim (its
    template is "{prompt}" and the suite passes the formatted question), at the image's own size."""
    if "question" in over:
        raise ValueError(
            "eval.suite_scorers.vlm: the questions belong to the metrics (VLM_QUESTIONS in "
            "cluster/eval_suite.py); drop question"
        )
    run_judge = [dict(s) for s in reward_specs(cfg.reward) if s.get("name") == "vlm_judge"]
    base = run_judge[0] if run_judge else dict(SCORER_SPECS["vlm"])
    for k in ("weight", "key", "question", "image_size"):
        base.pop(k, None)
    return {**base, "image_size": None, **over, "question": "{prompt}"}


def build_scorer(key: str, spec: dict):
    if key == "dreamsim":
        from rewards.dreamsim import DreamSim

        return DreamSim(**spec)
    from rewards.base import build_reward

    return build_reward(spec)


def score_chunk(metrics, scorers: dict, images: np.ndarray, prompts: list[str], R: int) -> dict[str, np.ndarray]:
    """Every metric on a chunk of whole prompts: per image [B], except dreamsim_diversity per prompt [B / R]."""
    out = {}
    for m in metrics:
        key = METRIC_SCORER[m]
        if m == "dreamsim_diversity":
            out[m] = scorers[key].diversity(images, R)
        elif key == "vlm":
            out[m] = scorers[key].score(images, [VLM_QUESTIONS[m].format(prompt=p) for p in prompts]).scores
        else:
            out[m] = scorers[key].score(images, prompts).scores
    return {m: np.asarray(v, dtype=np.float64) for m, v in out.items()}


# -- generation ------------------------------------------------------------------------------------------------------
def spans(num_prompts: int, R: int) -> list[tuple[int, int]]:
    """Prompt index ranges [a, b) of the generation chunks: CHUNK_IMAGES // R whole prompts each (at least one)."""
    step = max(1, CHUNK_IMAGES // R)
    return [(a, min(a + step, num_prompts)) for a in range(0, num_prompts, step)]


class LocalImages:
    """Chunks generated in this process, in order."""

    def __init__(self, model, cfg: RunConfig):
        self.model, self.guidance = model, cfg.sampling.guidance_scale

    def chunks(self, part: Part, num_steps: int):
        R = part.spec.images_per_prompt
        for a, b in spans(len(part.chosen), R):
            yield (
                (a, b),
                generate_images(
                    self.model, part.prompts[a * R : b * R], part.seeds[a * R : b * R], num_steps, self.guidance
                ),
            )

    def close(self) -> None:
        pass


class RayImages:
    """Chunks generated by ``runtime.sampler.count`` sampler actors (two calls queued each), yielded as they finish;
    a checkpoint's weights are loaded into every actor first and the proofs checked."""

    def __init__(self, cfg: RunConfig, weights=None):
        import ray

        from actors.sampler import Sampler
        from cluster.resources import actor_threads, connect

        rt, pool = cfg.runtime, cfg.runtime.sampler
        n = pool.count
        started = connect(rt, (1 if n == "auto" else n) * pool.num_cpus)
        have = ray.cluster_resources()
        if n == "auto":  # evaluation only samples: every sampler that fits
            n, why = sampler_room(rt, have, learners=0, rewards=0)
            n = max(1, n)
            log.info("runtime.sampler.count=auto: %d sampler actor(s) (%s)", n, why)
        if started and (n * pool.num_gpus > have.get("GPU", 0) or n * pool.num_cpus > have.get("CPU", 0)):
            raise RuntimeError(
                f"{n} sampler actors x {{CPU: {pool.num_cpus:g}, GPU: {pool.num_gpus:g}}} do "
                f"not fit this local Ray instance ({{CPU: {have.get('CPU', 0):g}, GPU: "
                f"{have.get('GPU', 0):g}}}): lower runtime.sampler.count or the per-sampler asks, or --local"
            )
        self.ray = ray
        self.actors = [
            ray.remote(Sampler)
            .options(
                name=f"fdfo/eval-{os.getpid()}/sampler/{i}",
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus,
                resources=dict(pool.resources),
                max_restarts=0,
            )
            .remote(
                model=partial(build_model, cfg.model),
                sampling=cfg.sampling,
                lora=cfg.lora,
                index=i,
                precision=cfg.train.precision,
                threads=actor_threads(rt, pool.num_cpus),
            )
            for i in range(n)
        ]
        if weights is not None:
            ref = ray.put(weights)
            for proof in ray.get([a.set_weights.remote(weights=ref) for a in self.actors]):
                if proof["checksum"] != weights.checksum:
                    raise RuntimeError(
                        f"sampler {proof['sampler']} holds checksum {proof['checksum']}, not the "
                        f"checkpoint's {weights.checksum}"
                    )

    def chunks(self, part: Part, num_steps: int):
        R = part.spec.images_per_prompt
        todo, running = list(reversed(spans(len(part.chosen), R))), {}

        def submit(i: int) -> None:
            a, b = todo.pop()
            ref = self.actors[i].generate.remote(
                prompts=part.prompts[a * R : b * R], seeds=part.seeds[a * R : b * R], num_steps=num_steps
            )
            running[ref] = (i, (a, b))

        for i in [i for _ in range(2) for i in range(len(self.actors))]:
            if todo:
                submit(i)
        while running:
            [ref], _ = self.ray.wait(list(running), num_returns=1)
            i, span = running.pop(ref)
            if todo:
                submit(i)
            yield span, self.ray.get(ref)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


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
