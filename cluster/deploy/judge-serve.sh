#!/usr/bin/env bash
# The judge server: vLLM's OpenAI server (`vllm serve`, the CLI that replaced `python -m
# vllm.entrypoints.openai.api_server`) for the judge model, guarded by an API key, in the judge image
# (docker/Dockerfile.gpu --target judge). Run by the launcher's judge node (cluster/deploy/ray-cluster.yaml, with
# --supervise) and by cluster/deploy/judge.yaml (Kubernetes restarts the container itself).
#
#   judge-serve.sh --host ADDRESS [--port 8000] [--model Qwen/Qwen2.5-VL-7B-Instruct] [--supervise] [-- VLLM_ARGS...]
#
# The key: VLLM_API_KEY if set (Kubernetes: from a Secret), else the file FDFO_JUDGE_API_KEY_FILE
# (~/.fdfo/judge_api_key, copied by the launcher's file_mounts). A missing or empty key stops here: vLLM (0.32,
# vllm/entrypoints/openai/api_server.py) adds its authentication only for a non-empty key, and would serve everyone.
# The key reaches vLLM in its environment, never on a command line. --supervise restarts the server when it exits
# (after 10 s; a server that fails to start is retried, its log shows why). FDFO_VLLM (default /opt/vllm/bin/vllm)
# names the server's executable.
set -euo pipefail
host="" port=8000 model="Qwen/Qwen2.5-VL-7B-Instruct" supervise=0
while (($#)); do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --supervise) supervise=1; shift ;;
    --) shift; break ;;
    *) echo "judge-serve.sh: unknown argument $1 (usage: see the header of $0)" >&2; exit 2 ;;
  esac
done
if [[ -z "$host" ]]; then
  echo "judge-serve.sh: --host ADDRESS is required (the node's own address; never a wildcard)" >&2
  exit 2
fi
if [[ "$host" == 0.0.0.0 || "$host" == "::" ]]; then
  echo "judge-serve.sh: --host $host would listen on every interface: give the node's own address" >&2
  exit 2
fi
if [[ -z "${VLLM_API_KEY:-}" ]]; then
  key_file="${FDFO_JUDGE_API_KEY_FILE:-$HOME/.fdfo/judge_api_key}"
  if [[ ! -r "$key_file" ]]; then
    echo "judge-serve.sh: no API key: set VLLM_API_KEY or create $key_file (the header of cluster/deploy/ray-cluster.yaml says how); the judge does not start without one" >&2
    exit 2
  fi
  VLLM_API_KEY="$(tr -d '[:space:]' <"$key_file")"
fi
if [[ -z "$VLLM_API_KEY" ]]; then
  echo "judge-serve.sh: the API key is empty: vLLM would serve without authentication; the judge does not start" >&2
  exit 2
fi
export VLLM_API_KEY
vllm="${FDFO_VLLM:-/opt/vllm/bin/vllm}"
cmd=("$vllm" serve "$model" --host "$host" --port "$port" "$@")
if ((!supervise)); then
  exec "${cmd[@]}"
fi
trap 'kill "$child" 2>/dev/null; exit 0' TERM INT
while true; do
  echo "judge-serve.sh: $(date -u +%FT%TZ) starting ${cmd[*]}"
  "${cmd[@]}" &
  child=$!
  rc=0
  wait "$child" || rc=$?
  echo "judge-serve.sh: $(date -u +%FT%TZ) the server exited ($rc); restarting in 10 s"
  sleep 10
done
