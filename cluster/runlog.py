"""Where a run writes: its folder (local, or a storage URI with a local mirror), TensorBoard, Weights & Biases, the
JSON-lines history and the final report's grids and learning curve.

Usage::

    runlog = RunLog(cfg, resume=False)        # <output_dir>/<name>, synced to runtime.storage_path if set
    runlog.scalars(epoch, metrics)            # TensorBoard, W&B and history.jsonl
    report = runlog.report(before, after, history)   # grids, learning curve, held-out gains; closes the log
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cluster.config import RunConfig, redacted, to_dict
from cluster.evaluate import plot_learning_curve
from learner.storage import Mirror, Storage, join

log = logging.getLogger("fdfo")
HISTORY, WANDB_ID = "history.jsonl", "wandb.json"  # in the run folder


def run_location(cfg: RunConfig) -> str:
    """Where the run folder lives: ``<runtime.storage_path>/<name>`` (a local folder or a storage URI), else
    ``<output_dir>/<name>``."""
    return (
        join(cfg.runtime.storage_path, cfg.name) if cfg.runtime.storage_path else str(Path(cfg.output_dir) / cfg.name)
    )


class RunLog:
    """Scalars and image grids to TensorBoard (``<output_dir>/<name>/tb``) and, with ``wandb_project`` set, to
    Weights & Biases; a JSON-lines history (appended to on resume).

    Everything is written to the local ``<output_dir>/<name>`` first (TensorBoard writes there as it goes); with
    ``runtime.storage_path`` set, ``sync`` (at every epoch end, after a grid, and at close) uploads what changed to
    the run's storage folder (``location``), where the learner writes its checkpoints directly, and a resumed run
    downloads its history and W&B run id from there first. A W&B run resumes as the same run: its id is kept in
    ``wandb.json`` in the run folder."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.dir = Path(cfg.output_dir) / cfg.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = Storage(run_location(cfg))
        self.location = self.store.location  # what the learner saves under, from whichever node
        self.mirror = Mirror(self.dir, self.store)
        if resume and not self.mirror.same:
            for rel in (HISTORY, WANDB_ID):
                if self.store.exists(rel):
                    self.store.download(rel, self.dir / rel)
        (self.dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tb"))
        self.history = self.dir / HISTORY
        if not resume:
            self.history.write_text("")
        self.wandb = _wandb_run(cfg, self.dir / WANDB_ID, resume)
        self.sync()

    def sync(self, *paths: str | Path) -> None:
        """Upload to the storage folder what changed: config, history, TensorBoard events and ``paths`` (files in
        the local run folder). A no-op without ``runtime.storage_path``."""
        if self.mirror.same:
            return
        self.tb.flush()
        self.mirror.sync(
            "config.json", HISTORY, WANDB_ID, "tb", *(Path(p).relative_to(self.dir).as_posix() for p in paths)
        )

    def shown(self, path: str | Path | None) -> str | None:
        """Where a file of the local run folder is kept, as a report shows it: its storage URI (secrets redacted),
        or the local path itself without ``runtime.storage_path``."""
        if path is None or self.mirror.same:
            return None if path is None else str(path)
        path = Path(path)
        return (
            redacted(self.store.uri(path.relative_to(self.dir).as_posix()))
            if path.is_relative_to(self.dir)
            else redacted(str(path))
        )

    def scalars(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        with self.history.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def image(self, tag: str, png: str | Path, step: int) -> None:
        """Log a PNG (an image grid) under ``tag``."""
        from PIL import Image

        arr = np.asarray(Image.open(png).convert("RGB"))
        self.tb.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(png))}, step=step)
        self.sync(png)

    def close(self) -> None:
        self.tb.close()
        self.sync()
        if self.wandb is not None:
            self.wandb.finish()

    def report(self, before: dict, after: dict, history: list[dict]) -> dict:
        """The end of a run: held-out reward ``before`` / ``after`` training (evaluation metrics with their grids),
        the grids and the learning curve of ``history`` written, logged and returned; the log closed."""
        if history:
            history[-1].update({k: v for k, v in after.items() if k.startswith("eval/")})
            self.image("eval/heldout", after["grid"], history[-1]["epoch"] + 1)
        start = {"pairs_trained": 0, "perf/wall_s": 0.0, **{k: v for k, v in before.items() if k.startswith("eval/")}}
        curve = plot_learning_curve([start, *history], self.dir / "learning_curve.png") if history else None
        self.sync(*[p for p in (curve,) if p])
        self.close()
        gains = {k: (before[k], after[k]) for k in before if k.startswith("eval/") and k in after}
        for k, (b, a) in gains.items():
            log.info("held-out %s before %.4f -> after %.4f (%+.4f)", k[len("eval/") : -len("/mean")], b, a, a - b)
        shown = {
            k: self.shown(v)
            for k, v in (
                ("grid_before", before.get("grid")),
                ("grid_after", after.get("grid")),
                ("learning_curve", curve),
            )
        }
        log.info("grids %s, %s; learning curve %s", shown["grid_before"], shown["grid_after"], shown["learning_curve"])
        b, a = before["eval/reward/mean"], after["eval/reward/mean"]
        summary = {
            "heldout_reward_before": b,
            "heldout_reward_after": a,
            "heldout_reward_gain": a - b,
            "heldout": {k[len("eval/") :]: {"before": b, "after": a, "gain": a - b} for k, (b, a) in gains.items()},
        }
        return {"heldout_summary": summary, "paths": shown}


def _wandb_run(cfg: RunConfig, id_file: Path, resume: bool):
    """A W&B run for ``wandb_project`` (None without): on ``--resume`` the same run again, by the id kept in
    ``id_file``; a new run otherwise, its id written there."""
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"wandb_project={cfg.wandb_project!r} needs `pip install wandb`") from e
    prior = json.loads(id_file.read_text()) if resume and id_file.exists() else None
    if resume and prior is None:
        log.warning(
            "--resume: no %s in the run folder (a run from before W&B ids were kept): W&B starts a new run",
            id_file.name,
        )
    same = prior is not None and prior.get("project") == cfg.wandb_project
    run = wandb.init(
        project=cfg.wandb_project,
        name=cfg.name,
        config=to_dict(cfg),
        **({"id": prior["id"], "resume": "must"} if same else {}),
    )
    id_file.write_text(json.dumps({"project": cfg.wandb_project, "id": run.id}))
    return run
