"""`ray start --head` (token auth, loopback) + `ray job submit --working-dir .` runs a short training job."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_ray_job_submit_runs_to_success(tmp_path):
    """End to end as a user submits: its own `ray start --head`, a job whose working_dir is uploaded and whose actors
    start in a fresh Ray session (about a minute on 2 cores)."""
    ray_tmp = tempfile.mkdtemp(prefix="fdfo-ray-", dir="/tmp")  # unix socket paths must stay short
    # the job's `python` must be this venv's, as it is for a user who activated it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": ray_tmp, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash = free_port(), free_port()
    # its own agent ports: the default ones (52365, ...) belong to the test session's Ray instance if it started first,
    # and a head whose job agent cannot bind answers every submission "No available agent to submit job"
    agent = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    subprocess.run(
        [
            BIN / "ray",
            "start",
            "--head",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={ray_tmp}",
            "--disable-usage-stats",
            *agent,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        out = tmp_path / "runs"
        for _ in range(30):  # the head's job agent may still be starting on a busy machine: Ray says to try again
            submit = subprocess.run(
                [
                    BIN / "ray",
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--working-dir",
                    str(ROOT),
                    "--no-wait",
                    "--",
                    "python",
                    "-m",
                    "cluster.cli",
                    "train",
                    "--config",
                    "tiny-cpu",
                    "train.epochs=2",
                    "sampling.num_steps=4",
                    f"output_dir={out}",
                    f"--summary-json={tmp_path / 'summary.json'}",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if submit.returncode == 0 or "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stderr
        job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
        status = ""
        for _ in range(120):
            res = subprocess.run(
                [BIN / "ray", "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
            )
            status = (res.stdout + res.stderr).lower()  # "Job '...' succeeded" / "... failed"
            if any(f"{s}" in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run(
            [BIN / "ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
        ).stdout
        assert "succeeded" in status, status + logs[-3000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["version"] == 4 and summary["ledger"]["pairs_trained"] == 32
        assert "pairs requested 32 = trained 32" in logs
    finally:
        stop_cluster(ray_tmp, gcs)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop only the processes of the cluster this test started (`ray stop` would stop every Ray on the machine):
    those naming its temp dir or its GCS port, and their children (agents, workers), which outlive a stopped raylet
    and would hold the agent ports the next cluster needs."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if temp_dir in text or f":{gcs_port} " in text + " ":
            procs.append(p)
    for p in list(procs):
        try:
            procs += [c for c in p.children(recursive=True) if c not in procs]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        p.kill()
