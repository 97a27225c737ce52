#!/usr/bin/env bash
# Everything fdfo needs on a fresh machine, idempotent: the project venv (.venv) with the CPU torch pinned
# first (so nothing pulls a CUDA build), the project itself (editable, so Ray workers import it), and the
# separate vLLM venv the judge's tests serve from (with --tests). Usage: bash .ci/setup.sh [--tests]
set -euo pipefail
# --tests: also what only the test suite needs (Debian's prometheus, the vLLM venv the judge tests serve from); the
# main command does without them
FOR_TESTS=0
[[ "${1:-}" == "--tests" ]] && FOR_TESTS=1
cd "$(dirname "$0")/.."
VENV="${FDFO_VENV:-$PWD/.venv}"
PY="${FDFO_PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# torch first and pinned: the CPU wheel (a GPU machine installs its CUDA build of 2.13.0 before this script).
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
"$VENV/bin/python" -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4   # OCR reward (see pyproject)
# PyPI's torchvision builds are CUDA-only and crash beside the CPU torch; nothing of ours needs it.
if "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "removing torchvision from $VENV (pulled in by a dependency; it does not load beside the CPU torch)" >&2
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision
fi
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Debian's prometheus for tests/cluster/test_grafana_prometheus.py (the test starts its own on 127.0.0.1; without it the
# test skips, saying why, or fails where CI is set); the package's own service is not wanted: stop and disable it.
if [[ "$FOR_TESTS" == 1 ]] && ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
      >/dev/null 2>&1; then
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  else
    echo "could not install Debian's prometheus: tests/cluster/test_grafana_prometheus.py will skip (fail where CI is set)" >&2
  fi
fi
if [[ "$FOR_TESTS" == 1 ]]; then
  export FDFO_VLLM_VENV="${FDFO_VLLM_VENV:-$HOME/.cache/fdfo/vllm-venv}"
  bash .ci/vllm_env.sh >/dev/null
  echo "fdfo ready: $VENV (vLLM venv for the tests: $FDFO_VLLM_VENV)" >&2
else
  echo "fdfo ready: $VENV" >&2
fi
