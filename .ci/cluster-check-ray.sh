# Sourced by .ci/cluster-check after the images are built: a Ray cluster of containers of the CPU image and a job.
#
# Three containers (a head and two workers) share one network namespace that has nothing but loopback (the head
# runs with --network none, the workers join its namespace), so every listener of Ray's, on every interface it
# binds, is reachable from that namespace alone; the host reaches the dashboard by entering it (nsenter -n), as an
# SSH tunnel reaches a launcher head's 127.0.0.1:8265. Each node has its own ports. The nodes start as the launcher
# starts them (cluster/deploy/ray-cluster.yaml: `RAY_AUTH_MODE=token ray start ...`, the token made once by
# `ray get-auth-token --generate` and bind-mounted at ~/.ray/auth_token, owned by the uid that runs Ray there), with
# the role resources of its node types: the learner on the head, a sampler and a reward slot on each worker.

CC="fdfo-cc"
CLIENT_HOME="$WORK/client"  # the operator's machine: its ~/.ray/auth_token
rm -rf "$CLIENT_HOME" && mkdir -p "$CLIENT_HOME"
HOME="$CLIENT_HOME" RAY_AUTH_MODE=token "$VENV/ray" get-auth-token --generate >/dev/null 2>&1
TOKEN_FILE="$CLIENT_HOME/.ray/auth_token"
[[ -s "$TOKEN_FILE" ]] || fail "ray get-auth-token --generate made no $TOKEN_FILE"
MOUNT="$WORK/mounts"  # what the launcher's rsync leaves on a node, owned by the node's ssh user (uid 1000 there)
rm -rf "$MOUNT" && mkdir -p "$MOUNT" && install -m 600 -o 1000 -g 1000 "$TOKEN_FILE" "$MOUNT/auth_token"

# which names this checkout gives the role resources (runtime.sampler.resources, or runtime.sampler_resources before)
if "$VENV/python" -c "from cluster.config import load_config; load_config('tiny-cpu', ['runtime.sampler.resources={sampler: 1}'])" 2>/dev/null; then
  ROLE_KEYS=("runtime.sampler.resources={sampler: 1}" "runtime.reward.resources={reward: 1}" "runtime.learner.resources={learner: 1}" "runtime.sampler.count=2")
else
  ROLE_KEYS=("runtime.sampler_resources={sampler: 1}" "runtime.reward_resources={reward: 1}" "runtime.learner_resources={learner: 1}" "runtime.num_samplers=2")
fi

start_node() { # start_node NAME NETWORK RAY_START_ARGS...: a node as the launcher starts one, `ray start --block`
  local name="$1" net="$2"
  shift 2
  docker rm -f "$name" >/dev/null 2>&1 || true
  CONTAINERS+=("$name")
  # the launcher's run_options (--ulimit nofile=65536:65536) exceed this machine's hard limit (ulimit -Hn): the
  # containers keep the daemon's
  docker run -d --name "$name" --network "$net" --shm-size=1g \
    -e LC_ALL=C.UTF-8 -e LANG=C.UTF-8 -v "$MOUNT/auth_token:/home/ray/.ray/auth_token" \
    "$CPU_IMAGE" bash -lc "RAY_AUTH_MODE=token ray start --block --node-ip-address=127.0.0.1 --disable-usage-stats $*" >/dev/null
}
in_ns() { nsenter -t "$(docker inspect -f '{{.State.Pid}}' "$CC-head")" -n "$@"; }
T_CLUSTER=$(date +%s)
start_node "$CC-head" none --head --port=6379 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --metrics-export-port=8080 --num-cpus=1 "--resources='{\"learner\": 1}'" --min-worker-port=10100 --max-worker-port=10999
start_worker() { # start_worker I: worker I with its own ports (1I001-1I999), a sampler and a reward slot
  local i="$1"
  start_node "$CC-w$i" "container:$CC-head" --address=127.0.0.1:6379 "--metrics-export-port=808$i" --num-cpus=2 \
    "--resources='{\"sampler\": 1, \"reward\": 1}'" "--node-manager-port=1${i}001" "--object-manager-port=1${i}002" \
    "--dashboard-agent-listen-port=1${i}003" "--dashboard-agent-grpc-port=1${i}004" "--runtime-env-agent-port=1${i}005" \
    "--min-worker-port=1${i}100" "--max-worker-port=1${i}999"
}
start_worker 1
start_worker 2
ray_env=(env "HOME=$CLIENT_HOME" RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265)
nodes=""
for _ in $(seq 120); do
  nodes="$(docker exec "$CC-head" python -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sorted((n["Resources"].get("learner", 0), n["Resources"].get("sampler", 0)) for n in ray.nodes() if n["Alive"]))' 2>/dev/null || true)"
  [[ "$nodes" == "[(0, 1.0), (0, 1.0), (1.0, 0)]" ]] && break
  sleep 2
done
[[ "$nodes" == "[(0, 1.0), (0, 1.0), (1.0, 0)]" ]] || { docker logs "$CC-w1" 2>&1 | tail -20; fail "the cluster did not form: $nodes"; }
proved "a Ray cluster of 3 containers (head: learner; 2 workers: sampler, reward) formed with token auth in $(($(date +%s) - T_CLUSTER)) s"

# token auth: a client without the token is refused, one with it answers
code="$(in_ns curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8265/api/version)"
[[ "$code" == 401 || "$code" == 403 ]] || fail "the dashboard answered $code without the token"
code="$(in_ns curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(cat "$TOKEN_FILE")" http://127.0.0.1:8265/api/version)"
[[ "$code" == 200 ]] || fail "the dashboard answered $code with the token"
for port in 8080 8081 8082; do # Ray's metrics appear at the first export (about 10 s after a node starts)
  metrics=""
  for _ in $(seq 30); do
    metrics="$(in_ns curl -sf "http://127.0.0.1:$port/metrics" || true)"
    grep -q '^ray_' <<<"$metrics" && break
    sleep 2
  done
  grep -q '^ray_' <<<"$metrics" || fail "no Ray metrics on :$port"
done
proved "the dashboard refuses a request without the token and answers one with it; each node's metrics answer (:8080-8082)"

# the job: tiny-cpu, its roles on their node types, two samplers (one per worker), submitted from the host; long
# enough (an epoch takes about half a second here) for a worker to die mid-run and the GCS to notice (~30 s)
EPOCHS=150
T_JOB=$(date +%s)
submit=$(in_ns "${ray_env[@]}" "$VENV/ray" job submit --no-wait --working-dir "$ROOT" -- \
  python -m cluster.cli train --config tiny-cpu train.epochs=$EPOCHS sampling.num_steps=4 "${ROLE_KEYS[@]}" \
  output_dir=/tmp/fdfo-cc-runs --summary-json=/tmp/fdfo-cc-summary.json 2>&1) || fail "ray job submit: $submit"
job_id="$(grep -o 'raysubmit_[A-Za-z0-9]*' <<<"$submit" | head -1)"
[[ -n "$job_id" ]] || fail "no job id in: $submit"
say "submitted $job_id"
job_logs() { in_ns "${ray_env[@]}" "$VENV/ray" job logs "$job_id" 2>/dev/null || true; }
job_status() { in_ns "${ray_env[@]}" "$VENV/ray" job status "$job_id" 2>/dev/null | tr 'A-Z' 'a-z' || true; }
# kill a worker container once the run has trained an epoch: a real node loss, its sampler and what it held gone
killed=""
for _ in $(seq 300); do
  if [[ -z "$killed" ]] && grep -q "epoch 20 reward" <<<"$(job_logs)"; then
    docker kill "$CC-w2" >/dev/null && killed="$(date +%s)" && say "killed worker container $CC-w2 mid-run"
    start_worker 3 # a replacement node joins, as the autoscaler would add one: the lost sampler's replacement lands there
  fi
  st="$(job_status)"
  grep -qE "succeeded|failed|stopped" <<<"$st" && break
  sleep 3
done
logs="$(job_logs)"
printf '%s\n' "$logs" >"$WORK/job.log"
loss="$(grep -oE 'sampler [0-9]+ lost|reward actor [0-9]+ lost' <<<"$logs" | sort -u | paste -sd, - || true)"
if [[ -z "$killed" ]]; then
  fail "the run ended before a worker could be killed mid-run (log: $WORK/job.log)"
elif ! grep -q succeeded <<<"$st"; then # recorded; the steps after this one still run
  failed "the job with worker $CC-w2 killed mid-run ($loss) did not succeed: $(grep -E 'fdfo: error|Error' "$WORK/job.log" | tail -1 | cut -c1-400) (log: $WORK/job.log)"
else
  summary="$(docker exec "$CC-head" cat /tmp/fdfo-cc-summary.json)"
  ledger="$(grep -o 'pairs requested [0-9]* = trained .*in flight [0-9]*' <<<"$logs" | tail -1)"
  "$VENV/python" - "$summary" "$ledger" "$EPOCHS" <<'EOF' || fail "the ledger is not exact (log: $WORK/job.log)"
import json, re, sys
ledger, line, epochs = json.loads(sys.argv[1])["ledger"], sys.argv[2], int(sys.argv[3])
r, t, d, f = (int(x) for x in re.match(r"pairs requested (\d+) = trained (\d+) \+ dropped (\d+) .*in flight (\d+)", line).groups())
assert (r, t, d, f) == (ledger["pairs_requested"], ledger["pairs_trained"], sum(ledger["pairs_dropped"].values()),
                        ledger["pairs_in_flight"]), (line, ledger)
assert r == t + d + f and t == epochs * 16, line  # every pair accounted for; every epoch trained its 16 pairs
EOF
  [[ -n "$loss" ]] || fail "the job's log names no lost actor after the worker was killed (log: $WORK/job.log)"
  proved "ray job submit of tiny-cpu ($EPOCHS epochs, 2 samplers) succeeded in $(($(date +%s) - T_JOB)) s with worker container $CC-w2 killed mid-run ($loss; a replacement node joined); $ledger"
fi

# nothing listens beyond loopback: the namespace has no interface but lo, and every listener is in it
links="$(in_ns ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
[[ "$links" == "lo " ]] || fail "the cluster's network namespace has interfaces: $links"
n_listen="$(in_ns ss -Hltn | wc -l)"
wild="$(in_ns ss -Hltn | awk '{print $4}' | grep -cvE '^(127\.[0-9.]+|\[::1\]):[0-9]+$' || true)"
proved "nothing listens beyond loopback: the cluster's $n_listen TCP listeners ($wild on a wildcard address) are in a namespace whose only interface is lo"
