"""Loading a real model's pipeline into a log (a Ray actor's stderr is no terminal) prints no progress bars and no
deprecation warning of fdfo's own call: the adapters pass ``dtype=`` (diffusers deprecates ``torch_dtype=``) and
turn diffusers' and transformers' loading bars off off a terminal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys, warnings, torch
warnings.simplefilter("default")
from models.tiny import tiny_{kind}_pipeline
from models.{module} import {adapter}
from diffusers import {pipeline}
tiny_{kind}_pipeline(0).save_pretrained(sys.argv[1])
{pipeline}.from_pretrained(sys.argv[1], torch_dtype=torch.float32)      # the call fdfo used to make
print("=" * 20, file=sys.stderr, flush=True)
{adapter}.from_pretrained(sys.argv[1], device="cpu", dtype=torch.float32, resolution=32)
"""


@pytest.mark.parametrize(
    "kind, module, adapter, pipeline",
    [("sd3", "adapter", "SD3Adapter", "StableDiffusion3Pipeline"), ("flux", "flux", "FluxAdapter", "FluxPipeline")],
)
def test_from_pretrained_is_quiet_in_a_log(tmp_path, kind, module, adapter, pipeline):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    code = CODE.format(kind=kind, module=module, adapter=adapter, pipeline=pipeline)
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pipe")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    raw, ours = run.stderr.split("=" * 20 + "\n")
    assert "Loading pipeline components" in raw and "torch_dtype" in raw  # what the old call printed, here too
    assert "Loading" not in ours and "it/s]" not in ours and "Warning" not in ours, ours[-2000:]
