"""The prompt sets of the paper's evaluation (``fdfo eval --suite``): which sets, how many prompts and images each,
where their prompts come from, and the shuffled cut every checkpoint is scored on.

Usage::

    parts = plan(cfg, "quick")        # [Part]: each set's chosen prompts, every image's prompt and seed

Each prompt list is shuffled with ``np.random.RandomState(PROMPT_SEED)`` and cut to its first prompts; image r of
prompt i starts from seed ``IMAGE_SEED + i * R + r`` (R images per prompt), so two checkpoints are paired image by
image. ``cluster/eval_suite.py`` runs the suite.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.config import RunConfig

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

PROMPT_SOURCES = {"pickscore_train": "prompts/pickscore_train.txt", "hpdv2": "hub:zhwang/HPDv2"}
HPDV2_CATEGORIES = ("anime", "concept-art", "paintings", "photo")
HOW_TO_GET = {
    "pickscore_train": "mkdir -p prompts && curl -o prompts/pickscore_train.txt "
    "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/train.txt",
    "hpdv2": "set it to hub:zhwang/HPDv2 (downloads benchmark/<category>.json), or `huggingface-cli download "
    "zhwang/HPDv2 --repo-type dataset --include 'benchmark/*.json' --local-dir <folder>` and give the folder",
}


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
