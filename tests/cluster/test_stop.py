"""SIGTERM (what `ray job stop` sends) stops `fdfo train` as Ctrl-C does: a checkpoint and the accounting line are
written, and `--resume` continues from them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path):
    """Two `fdfo train` processes (stopped, then resumed), each paying the full import and model build: 20-40 s."""
    common = ["--config", "tiny-cpu", "--local", "sampling.num_steps=4", f"output_dir={tmp_path}", "name=stopped"]
    cmd = [sys.executable, "-m", "cluster.cli", "train", *common]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd + ["train.epochs=1000"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    history = tmp_path / "stopped" / "history.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (history.exists() and history.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err

    done = len(history.read_text().splitlines())  # epochs closed before the stop
    folders = sorted((tmp_path / "stopped" / "checkpoints").glob("v*"))
    assert len(folders) == 1, (folders, err[-2000:])
    (folder,) = folders
    state = json.loads((folder / "state.json").read_text())
    assert state["state"]["epoch"] == done and folder.name == f"v{2 * done:06d}"  # tiny-cpu: 2 updates an epoch
    assert f"stopped at epoch {done} (version {2 * done}): checkpoint {folder}" in err
    assert "pairs requested" in err.split("stopped at epoch")[1].splitlines()[0]  # the accounting line with it

    resumed = subprocess.run(
        cmd + [f"train.epochs={done + 1}", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder} at epoch {done}" in resumed.stderr
    assert (tmp_path / "stopped" / "checkpoints" / f"v{2 * (done + 1):06d}").exists()
