#!/usr/bin/env bash
# The training job on a cluster: `fdfo train` with the job's arguments, and the reward of sd35m-combined
# (1.0 PickScore + 0.1 Qwen2.5-VL judge) pointed at the cluster's judge server with its API key, once the server
# answers. The key stays out of the job's entrypoint (the dashboard shows that) and off every command line (`ps`
# shows those): it is read here, on the head node, and reaches `fdfo train` as an argument file on a descriptor.
#
#   bash /app/cluster/deploy/train-job.sh --config sd35m-combined [--resume] [section.key=value ...]
# Options first, then overrides (argparse takes one run of overrides). The judge's url: FDFO_JUDGE_URL if set
# (KubeRay: the fdfo-judge Service), else the node with the `judge` resource (cluster launcher); the job waits up to
# FDFO_JUDGE_WAIT_S seconds (default 1800: a first start downloads the model) for its /health. Its key:
# FDFO_JUDGE_API_KEY if set (KubeRay: from a Secret), else the file FDFO_JUDGE_API_KEY_FILE (~/.fdfo/judge_api_key,
# copied to every node by the launcher's file_mounts); a missing or empty key stops the job (vLLM would take an
# empty key for none).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${FDFO_JUDGE_API_KEY:-}" ]]; then
  key_file="${FDFO_JUDGE_API_KEY_FILE:-$HOME/.fdfo/judge_api_key}"
  if [[ ! -r "$key_file" ]]; then
    echo "train-job.sh: no judge API key: set FDFO_JUDGE_API_KEY or create $key_file (the header of cluster/deploy/ray-cluster.yaml says how)" >&2
    exit 2
  fi
  FDFO_JUDGE_API_KEY="$(tr -d '[:space:]' <"$key_file")"
  if [[ -z "$FDFO_JUDGE_API_KEY" ]]; then
    echo "train-job.sh: the judge API key file $key_file is empty (the header of cluster/deploy/ray-cluster.yaml says how to make one)" >&2
    exit 2
  fi
fi
export FDFO_JUDGE_API_KEY        # a secret-named variable: fdfo redacts its value from everything it writes
wait_s="${FDFO_JUDGE_WAIT_S:-1800}"
if [[ -n "${FDFO_JUDGE_URL:-}" ]]; then
  url="$(python "$here/judge_url.py" --url "$FDFO_JUDGE_URL" --wait "$wait_s")"
else
  url="$(python "$here/judge_url.py" --port "${FDFO_JUDGE_PORT:-8000}" --wait "$wait_s")"
fi
judge="reward.components=[{name: pickscore, weight: 1.0}, {name: vlm_judge, weight: 0.1, model: Qwen/Qwen2.5-VL-7B-Instruct, backend: server, url: '$url', api_key: '$FDFO_JUDGE_API_KEY', resize: float_bilinear}]"
# the override with the key as an argument file (`fdfo train` reads @FILE, one argument a line) on descriptor 3
exec python -m cluster.cli train "$@" @/dev/fd/3 3<<<"$judge"
