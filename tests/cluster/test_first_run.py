"""A first run that explains itself: captioned grids, errors as one message, a short end-of-run table with the full
JSON in a file, progress with an ETA in logs, no third-party notices, and W&B resuming the same run."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cluster.cli as cli_module
from cluster.cli import cli, error_message, summary_table
from cluster.config import load_config
from cluster.epoch_stats import clock
from cluster.pipeline import Book, RunLog
from models.images import save_grid

ROOT = Path(__file__).resolve().parents[2]


def test_grid_rows_are_captioned_with_their_prompts(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    save_grid(imgs, cols=2, path=tmp_path / "plain.png", scale=2)
    save_grid(imgs, cols=2, path=tmp_path / "cap.png", scale=2, labels=["two red circles above a blue square", "x", ""])
    plain, cap = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "cap.png"))
    label_w = cap.shape[1] - plain.shape[1]
    assert cap.shape[0] == plain.shape[0] == 3 * 18 * 2 and label_w > 0
    assert np.array_equal(cap[:, label_w:], plain)  # the tiles are untouched, to the right
    ink = (cap[:, :label_w] < 128).any(axis=(1, 2))  # dark text pixels per pixel row
    rows = [ink[r * 36 : (r + 1) * 36].any() for r in range(3)]
    assert rows == [True, True, False]  # each row's own caption, the empty one blank
    with pytest.raises(ValueError) as e:
        save_grid(imgs, cols=2, path=tmp_path / "bad.png", labels=["a", "b"])
    assert str(e.value) == "save_grid: 2 labels for 3 rows (6 images, 2 per row): give one per row"


def test_heldout_grid_rows_are_labelled_with_the_eval_prompts(tmp_path, monkeypatch):
    from cluster import evaluate
    from rewards.base import RewardOutput

    cfg = load_config("tiny-cpu", ["eval.num_prompts=3", "eval.seeds_per_prompt=2"])
    chosen = evaluate.eval_set(cfg)[0]
    seen = {}
    monkeypatch.setattr(
        evaluate, "save_grid", lambda images, cols, path, labels: seen.update(n=len(images), cols=cols, labels=labels)
    )
    evaluate.heldout_reward(
        cfg,
        lambda p, s, n: np.zeros((len(p), 4, 4, 3), np.uint8),
        lambda images, prompts: RewardOutput(scores=np.zeros(len(prompts)), info={}),
        tmp_path / "g.png",
    )
    assert seen == {"n": 6, "cols": 2, "labels": chosen} and len(chosen) == 3


def test_errors_print_one_message_and_exit_non_zero(capsys, monkeypatch):
    assert cli(["train", "--config", "tiny-cpu", "train.nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fdfo: error: unknown config key 'train.nope'; valid keys here: train.algorithm, train.lr, ")
    assert err.endswith("\n(run again with --debug for the traceback)\n") and "Traceback" not in err
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        cli(["train", "--config", "tiny-cpu", "--debug", "train.nope=1"])

    def stopped(args):
        raise KeyboardInterrupt("SIGTERM during an update: stopped once it was recorded")

    monkeypatch.setattr(cli_module, "_train", stopped)
    assert cli(["train"]) == 130
    assert capsys.readouterr().err == (
        "fdfo: stopped: KeyboardInterrupt: SIGTERM during an update: stopped once it "
        "was recorded (continue with --resume)\n"
    )


def test_error_message_names_a_remote_cause():
    class RemoteError(Exception):  # what Ray's RayTaskError carries: the actor's exception as .cause
        cause = FileNotFoundError("no state.json in s3://b/runs/x/checkpoints/v000002")

    assert error_message(RemoteError("long remote traceback")) == (
        "FileNotFoundError: no state.json in s3://b/runs/x/checkpoints/v000002"
    )
    assert error_message(ValueError("bad value")) == "bad value"
    assert error_message(KeyError("k")) == "KeyError: 'k'"
    assert error_message(RuntimeError()) == "RuntimeError"


def test_end_of_run_table():
    cfg = load_config("tiny-cpu", ["name=t", "eval.num_prompts=4", "eval.seeds_per_prompt=1"])
    summary = {
        "time_s": 75.2,
        "version": 4,
        "stopped": None,
        "ledger": {
            "pairs_requested": 36,
            "pairs_trained": 32,
            "pairs_dropped": {"stale": 3, "nan": 1},
            "pairs_in_flight": 0,
        },
        "final": {
            "epoch": 1,
            "perf/wall_s": 61.0,
            "heldout": {
                "reward/mean": {"before": -1.5, "after": -1.25, "gain": 0.25},
                "metric/shapes_exact/mean": {"before": 0.1, "after": 0.05, "gain": -0.05},
            },
        },
        "paths": {
            "run_dir": "runs/t",
            "checkpoint": "runs/t/checkpoints/v000004",
            "grid_after": "runs/t/a.png",
            "summary": "runs/t/summary.json",
        },
    }
    assert summary_table(cfg, summary).splitlines() == [
        "fdfo train t: 2 epochs, policy version 4, 1m15s (1m01s training)",
        "held-out (4 prompts x 1 seeds)    before     after    change",
        "  reward                         -1.5000   -1.2500   +0.2500",
        "  metric/shapes_exact             0.1000    0.0500   -0.0500",
        "pairs requested 36 = trained 32 + dropped 4 (nan 1, stale 3) + in flight 0",
        "run folder       runs/t",
        "checkpoint       runs/t/checkpoints/v000004",
        "grid after       runs/t/a.png",
        "summary (JSON)   runs/t/summary.json",
    ]


def test_run_writes_its_full_summary_json_and_prints_the_table(tmp_path, capsys):
    extra = tmp_path / "extra.json"
    assert (
        cli(
            [
                "train",
                "--config",
                "tiny-cpu",
                "--local",
                "name=first",
                f"output_dir={tmp_path}",
                "train.epochs=1",
                "sampling.num_steps=4",
                "eval.num_prompts=2",
                "eval.seeds_per_prompt=1",
                "train.pairs_per_epoch=8",
                f"--summary-json={extra}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert json.loads(extra.read_text()) == written
    assert written["version"] == 2 and written["ledger"]["pairs_trained"] == 8 and written["stopped"] is None
    assert written["paths"]["summary"] == str(tmp_path / "first" / "summary.json")
    assert out.startswith("fdfo train first: 1 epochs, policy version 2, ") and "{" not in out  # a table, not JSON
    assert f"summary (JSON)   {tmp_path / 'first' / 'summary.json'}\n" in out


def test_clock_and_eta(tmp_path):
    assert [clock(42.4), clock(185), clock(7620), clock(float("nan"))] == ["42s", "3m05s", "2h07m", "?"]
    cfg = load_config("tiny-cpu", [f"output_dir={tmp_path}", "train.epochs=10"])
    book = Book(cfg, evaluate=None, save=None)
    book.stats.first_epoch, book.stats.t_start = 2, 100.0  # resumed at 2, 4 epochs in 80 s
    assert book.stats.eta(6, 180.0) == "epoch 6/10, 1m20s elapsed, eta 1m20s"
    assert book.stats.eta(2, 101.0) == "epoch 2/10, 1s elapsed, eta ?"
    book.runlog.close()


@pytest.mark.slow
def test_torchvision_notices_are_dropped_and_nothing_else():
    """Slow: two fresh interpreters import diffusers' SD3 pipeline (10-15 s). The SD3 pipeline's import makes transformers log two notices without torchvision (never installed beside
    the CPU torch); ``quiet_third_party`` drops exactly those."""
    code = (
        "import os, sys; quiet = sys.argv[1] == '1'\n"
        "from cluster.pipeline import quiet_third_party\n"
        "quiet and quiet_third_party()\n"
        "from diffusers import StableDiffusion3Pipeline\n"
        "import logging; logging.getLogger('transformers.utils.import_utils').warning('another notice')\n"
        "print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    loud, quiet = (
        subprocess.run(
            [sys.executable, "-c", code, flag],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        for flag in ("0", "1")
    )
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr[-2000:]
    assert "`SiglipImageProcessor` requires torchvision (not installed)" in loud.stderr  # the notice is real here
    assert "requires torchvision" not in quiet.stderr and "another notice" in quiet.stderr
    assert (loud.stdout, quiet.stdout) == ("None\n", "1\n")  # Hugging Face progress bars off in a log


class FakeWandb(types.ModuleType):
    """The slice of ``wandb`` RunLog uses, recording each ``init``."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []

    def init(self, **kw):
        self.inits.append(kw)
        return types.SimpleNamespace(
            id=kw.get("id") or f"run{len(self.inits)}", log=lambda *a, **k: None, finish=lambda: None
        )


def test_wandb_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("tiny-cpu", [f"output_dir={tmp_path}", "name=w", "wandb_project=proj"])
    RunLog(cfg).close()
    assert json.loads((tmp_path / "w" / "wandb.json").read_text()) == {"project": "proj", "id": "run1"}
    RunLog(cfg, resume=True).close()
    assert "id" not in fake.inits[0] and "resume" not in fake.inits[0]
    assert (fake.inits[1]["id"], fake.inits[1]["resume"], fake.inits[1]["project"]) == ("run1", "must", "proj")
    RunLog(cfg).close()  # a fresh (not resumed) run is a new W&B run
    assert "id" not in fake.inits[2] and json.loads((tmp_path / "w" / "wandb.json").read_text())["id"] == "run3"
    assert math.isfinite(len(fake.inits))
