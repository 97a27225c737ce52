# Sourced by .ci/cluster-check after the container cluster: Ray's cluster launcher run on cluster/deploy/ray-cluster.yaml.
#
# The "machine" the launcher manages is a network namespace this script makes (loopback, and one test address,
# 198.51.100.10, on a veth pair inside it: the judge binds the node's own address, `hostname -I`), with its own sshd on
# 127.0.0.1:22 and its own dockerd (the images' data root, reused after the build's daemon stops), so the
# launcher's `docker run --net=host` containers and everything Ray binds stay in that namespace. `ray up` reaches it
# over SSH as Ray's `local` provider does, as a user of uid 1000 (the uid of the image's `ray`, as `ubuntu` is on the
# AMI: the file_mounts it copies are bind-mounted as they are).
#
# What is swapped in cluster/deploy/ray-cluster.yaml, and why: `provider` (local, head 127.0.0.1) and `auth` (this
# user and key); `available_node_types` and `head_node_type`, because Ray 2.60's local provider refuses node types of
# its own (autoscaler/_private/local/config.py, prepare_local: it makes its single `local.cluster.node`), and so no
# worker node: two nodes on one docker daemon would share the container name `fdfo` and every --net=host port;
# `pull_before_run: false` (no registry here: the image is the one just built, under the name the file pulls), and
# run_options' open-file limit lowered to this machine's hard limit (ulimit -Hn: 20000 here, 65536 refused). The
# rest runs as shipped: the docker section (image, head_image, container_name, run_options), file_mounts (the Ray
# token, the judge key, the Hugging Face token), the head's start commands. The judge node's setup command runs in
# the head's container with a stub server in place of vLLM (FDFO_VLLM; no GPU here).

LNS="fdfo-cc-launch"
LSOCK="/run/fdfo-cc-launch-docker.sock"
LUSER="fdfo-cc-launch"
LHOME="$WORK/launch-node-home"
LCLIENT="$WORK/launch-client"
JUDGE_ADDR="198.51.100.10"
T_LAUNCH=$(date +%s)

# the build's daemon gives back the data root (only one dockerd may hold it)
if [[ -n "${DOCKERD_PID:-}" ]]; then
  for c in "${CONTAINERS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  CONTAINERS=()
  kill "$DOCKERD_PID" && for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
else
  fail "the launcher check needs the dockerd this script started (another one holds $DATA): stop it and run again"
fi

[[ ! -e /tmp/ray_tmp_mount/fdfo ]] || fail "/tmp/ray_tmp_mount/fdfo exists (another launcher cluster named fdfo on this machine?)"
ip netns add "$LNS"
NETNS_MADE=1
ip -n "$LNS" link set lo up
ip -n "$LNS" link add fdfo0 type veth peer name fdfo1 # both ends in the namespace (no dummy driver here)
ip -n "$LNS" addr add "$JUDGE_ADDR/32" dev fdfo0
ip -n "$LNS" link set fdfo0 up
ip -n "$LNS" link set fdfo1 up
in_lns() { nsenter --net="/run/netns/$LNS" "$@"; } # the network namespace only (`ip netns exec` would hide the cgroups)

nsenter --net="/run/netns/$LNS" dockerd --host "unix://$LSOCK" --data-root "$DATA" --exec-root /run/fdfo-cc-launch-docker \
  --pidfile /run/fdfo-cc-launch-docker.pid --iptables=false --ip6tables=false --bridge=none --group docker \
  >"$WORK/dockerd-launch.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do DOCKER_HOST="unix://$LSOCK" docker version >/dev/null 2>&1 && break; sleep 1; done
DOCKER_HOST="unix://$LSOCK" docker image inspect "$CPU_IMAGE" >/dev/null || fail "the namespace's dockerd has no $CPU_IMAGE"

# the node's user (uid 1000, an alias if the uid is taken) with docker access, and its sshd on the namespace's loopback
id "$LUSER" >/dev/null 2>&1 || useradd -o -u 1000 -g docker -M -d "$LHOME" -s /bin/bash "$LUSER"
usermod -p "*" "$LUSER" # no password, but not locked (sshd refuses a locked account even with a key)
rm -rf "$LHOME" "$LCLIENT" && mkdir -p "$LHOME/.ssh" "$LCLIENT/.ssh" "$LCLIENT/.ray" "$LCLIENT/.fdfo" \
  "$LCLIENT/.cache/huggingface"
ssh-keygen -q -t ed25519 -N '' -f "$LCLIENT/.ssh/id_ed25519"
rm -f "$WORK/launch_host_key" "$WORK/launch_host_key.pub"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/launch_host_key"
cp "$LCLIENT/.ssh/id_ed25519.pub" "$LHOME/.ssh/authorized_keys"
touch "$LHOME/.bashrc" # Ray sources it (an AMI user has one)
chown -R "$LUSER" "$LHOME" && chmod 700 "$LHOME/.ssh"
cat >"$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1:22
HostKey $WORK/launch_host_key
PidFile /run/fdfo-cc-launch-sshd.pid
AuthorizedKeysFile $LHOME/.ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
AllowUsers $LUSER
SetEnv DOCKER_HOST=unix://$LSOCK
EOF
mkdir -p /run/sshd
nsenter --net="/run/netns/$LNS" /usr/sbin/sshd -D -e -f "$WORK/sshd_config" >"$WORK/sshd.log" 2>&1 &
PIDS+=($!)

# the operator's machine: the Ray token, the judge key and a Hugging Face token, made as the file's header says
HOME="$LCLIENT" RAY_AUTH_MODE=token "$VENV/ray" get-auth-token --generate >/dev/null 2>&1
"$VENV/python" -c "import secrets; print(secrets.token_urlsafe(32))" >"$LCLIENT/.fdfo/judge_api_key"
echo "hf_cluster_check_stand_in" >"$LCLIENT/.cache/huggingface/token"
chmod 600 "$LCLIENT/.fdfo/judge_api_key" "$LCLIENT/.cache/huggingface/token"
chown -R 1000:docker "$LCLIENT/.ray" "$LCLIENT/.fdfo" "$LCLIENT/.cache"
"$VENV/python" - "$ROOT/cluster/deploy/ray-cluster.yaml" "$WORK/launch.yaml" "$LUSER" "$LCLIENT/.ssh/id_ed25519" <<'EOF'
import subprocess, sys, yaml
src, dst, user, key = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}
for k in ("available_node_types", "head_node_type"):  # the local provider makes its own (naming one skips its
    cfg.pop(k)                                        # defaults: validate_config then misses cluster_synced_files)
cfg["max_workers"] = 0
cfg["docker"]["pull_before_run"] = False
hard = int(subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout)
cfg["docker"]["run_options"] = [  # no more open files than this machine's hard limit allows a container
    f"--ulimit nofile={min(hard, 65536)}:{min(hard, 65536)}" if o.startswith("--ulimit nofile=") else o
    for o in cfg["docker"]["run_options"]
]
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
EOF
launcher() { in_lns env "HOME=$LCLIENT" "RAY_TMPDIR=$WORK/launch-raytmp" RAY_AUTH_MODE=token "$@"; }
mkdir -p "$WORK/launch-raytmp"
LAUNCHED=1
launcher "$VENV/ray" up -y --no-config-cache "$WORK/launch.yaml" >"$WORK/ray-up.log" 2>&1 || {
  tail -40 "$WORK/ray-up.log"
  fail "ray up (log: $WORK/ray-up.log)"
}
export DOCKER_HOST="unix://$LSOCK"
[[ "$(docker inspect -f '{{.State.Running}} {{.Config.Image}}' fdfo)" == "true $CPU_IMAGE" ]] || fail "no head container"
owner="$(docker exec fdfo bash -c 'id -un; cat ~/.ray/auth_token >/dev/null && echo token-readable; test -s ~/.fdfo/judge_api_key && echo key-readable; test -s ~/.cache/huggingface/token && echo hf-token-readable' | tr '\n' ' ')"
[[ "$owner" == "ray token-readable key-readable hf-token-readable " ]] || fail "file_mounts in the head container: $owner"
proved "ray up of cluster/deploy/ray-cluster.yaml (local provider over SSH on 127.0.0.1) started its head container with the shipped docker, file_mounts and start commands in $(($(date +%s) - T_LAUNCH)) s; the token, judge key and HF token are readable by ray under /home/ray"

# the job, as the file's header submits one (through the dashboard on the head's loopback)
T_LJOB=$(date +%s)
out="$(launcher "$VENV/ray" job submit --address http://127.0.0.1:8265 --working-dir "$ROOT" -- \
  python -m cluster.cli train --config tiny-cpu train.epochs=2 sampling.num_steps=4 output_dir=/tmp/fdfo-cc-launch-runs 2>&1)" ||
  { printf '%s\n' "$out" | tail -30; fail "ray job submit on the launcher's cluster"; }
printf '%s\n' "$out" >"$WORK/launch-job.log"
grep -q "pairs requested 32 = trained 32" <<<"$out" || { tail -30 "$WORK/launch-job.log"; fail "the launcher's job ledger"; }
proved "ray job submit of tiny-cpu on the launcher's cluster succeeded in $(($(date +%s) - T_LJOB)) s: pairs requested 32 = trained 32"

# the judge node's setup command, as shipped, with a stub in place of vLLM: it must start a server on the node's
# address guarded by the file-mounted key
judge_cmd="$("$VENV/python" -c "import yaml; print(yaml.safe_load(open('$ROOT/cluster/deploy/ray-cluster.yaml'))['available_node_types']['judge_gpu']['worker_setup_commands'][0])")"
docker exec fdfo bash -c 'cat > /tmp/stub-vllm <<"PY"
#!/usr/bin/env python
"""A stand-in for `vllm serve MODEL --host H --port P`: /health answers; /v1/* wants the VLLM_API_KEY bearer."""
import http.server, os, sys
a = sys.argv
host, port, key = a[a.index("--host") + 1], int(a[a.index("--port") + 1]), os.environ["VLLM_API_KEY"]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" or self.headers.get("Authorization") == f"Bearer {key}"
        self.send_response(200 if ok else 401); self.end_headers()
http.server.HTTPServer((host, port), H).serve_forever()
PY
chmod +x /tmp/stub-vllm'
docker exec -e FDFO_VLLM=/tmp/stub-vllm fdfo bash --login -c "$judge_cmd"
key="$(cat "$LCLIENT/.fdfo/judge_api_key")"
code=""
for _ in $(seq 30); do
  code="$(in_lns curl -s -o /dev/null -w '%{http_code}' "http://$JUDGE_ADDR:8000/health" || true)"
  [[ "$code" == 200 ]] && break
  sleep 1
done
[[ "$code" == 200 ]] || fail "the judge command started nothing on $JUDGE_ADDR:8000 ($code)"
no_key="$(in_lns curl -s -o /dev/null -w '%{http_code}' "http://$JUDGE_ADDR:8000/v1/models")"
with_key="$(in_lns curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "http://$JUDGE_ADDR:8000/v1/models")"
[[ "$no_key $with_key" == "401 200" ]] || fail "the judge's key: without $no_key, with $with_key"
docker exec fdfo pkill -f stub-vllm || true
sleep 12
restarted="$(in_lns curl -s -o /dev/null -w '%{http_code}' "http://$JUDGE_ADDR:8000/health" || true)"
[[ "$restarted" == 200 ]] || fail "judge-serve.sh --supervise did not restart the server ($restarted)"
proved "the judge node's command (judge-serve.sh --supervise, stub server) serves on the node's address $JUDGE_ADDR:8000 with the file-mounted key (401 without it, 200 with it) and is restarted after it dies"

launcher "$VENV/ray" down -y "$WORK/launch.yaml" >"$WORK/ray-down.log" 2>&1 || fail "ray down (log: $WORK/ray-down.log)"
LAUNCHED=0
[[ -z "$(docker ps -q --filter name=^fdfo$)" ]] || fail "ray down left the head container running"
proved "ray down removed the head container"
