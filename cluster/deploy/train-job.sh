#!/usr/bin/env bash
# The training job on a cluster: `fdfo train` with the job's arguments, and the reward of sd35m-combined
# (1.0 PickScore + 0.1 Qwen2.5-VL judge) pointed at the cluster's judge server with its API key. The key stays out of
# the job's entrypoint (the dashboard shows that): it is read here, on the head node.
#
#   bash cluster/deploy/train-job.sh --config sd35m-combined [--resume] [section.key=value ...]
# Options first, then overrides (argparse takes one run of overrides). The judge's url: FDFO_JUDGE_URL if set
# (KubeRay: the fdfo-judge Service), else the node with the `judge` resource (cluster launcher); its key:
# FDFO_JUDGE_API_KEY if set (KubeRay: from a Secret), else the file FDFO_JUDGE_API_KEY_FILE (~/.fdfo/judge_api_key,
# copied to every node by the launcher's file_mounts).
set -euo pipefail
url="${FDFO_JUDGE_URL:-}"
if [[ -z "$url" ]]; then
  url="$(python cluster/deploy/judge_url.py --port "${FDFO_JUDGE_PORT:-8000}")"
fi
if [[ -z "${FDFO_JUDGE_API_KEY:-}" ]]; then
  key_file="${FDFO_JUDGE_API_KEY_FILE:-$HOME/.fdfo/judge_api_key}"
  if [[ ! -r "$key_file" ]]; then
    echo "train-job.sh: no judge API key: set FDFO_JUDGE_API_KEY or create $key_file (the header of cluster/deploy/ray-cluster.yaml says how)" >&2
    exit 2
  fi
  FDFO_JUDGE_API_KEY="$(cat "$key_file")"
fi
export FDFO_JUDGE_API_KEY        # a secret-named variable: fdfo redacts its value from everything it writes
judge="{name: vlm_judge, weight: 0.1, model: Qwen/Qwen2.5-VL-7B-Instruct, backend: server, url: '$url', api_key: '$FDFO_JUDGE_API_KEY', resize: float_bilinear}"
exec python -m cluster.cli train "$@" "reward.components=[{name: pickscore, weight: 1.0}, $judge]"
