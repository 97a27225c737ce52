"""What a run exposes and what it writes (issue #20).

- fdfo's own listeners (the weight group's rendezvous store and gloo sockets, anything a driver or an actor of fdfo
  opens) are on loopback when every member of the run is on one machine: a real Ray run is watched with psutil
  while it runs, and Ray's own listeners are reported against ``RAY_LISTENERS``, the allowlist docs/security.md
  is written from;
- the runtime asks for the node's cluster address only when a member is on another node;
- secrets planted in the environment and in the config appear in no file of the run (config.json, history.jsonl,
  TensorBoard events, checkpoints), in no W&B config or log, in no log line, and in no config error.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import re
import sys
import threading
import time
import types
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from cluster.config import REDACTED, config_from_dict, load_config, redacted, to_dict, with_overrides

LOOPBACK = "127.0.0.1"
FDFO_ACTORS = ("Learner", "Sampler", "RewardBatcher")  # the classes fdfo runs as Ray actors (cluster/runtime.py)

# Ray's own listeners on a node of a local instance (Ray 2.60, `ray.init` with token authentication on), by the
# process kind ``_kind`` gives. All but the dashboard's HTTP port and the agents on the node address listen on every
# interface: that is Ray's design, and Ray's token authentication guards them. docs/security.md lists
# them; a kind not named here is reported as a warning (a Ray upgrade added a listener: update both).
RAY_LISTENERS = {
    "driver": "the driver's core-worker gRPC server (all interfaces)",
    "gcs_server": "GCS gRPC, cluster metadata: the head's `--port` (all interfaces)",
    "raylet": "node manager and object manager gRPC (all interfaces)",
    "ray::DashboardAgent": "agent gRPC and metrics export (all interfaces); HTTP agent (node address, 127.0.0.1)",
    "ray::RuntimeEnvAgent": "runtime-env agent (node address)",
    "dashboard.py": "dashboard head: HTTP on dashboard_host (127.0.0.1 with fdfo), gRPC and metrics (all interfaces)",
    "monitor.py": "autoscaler monitor metrics (all interfaces)",
    "log_monitor.py": "nothing (reads the session's logs)",
    "ray::IDLE": "a pooled worker's core-worker gRPC (all interfaces)",
    "worker": "an actor's core-worker gRPC (all interfaces): the port the GCS records as the actor's address",
}


# -- watching listeners --------------------------------------------------------------------------------------------
def _kind(p: psutil.Process) -> str:
    """What a process of the local Ray instance is: ``ray::<Actor>`` for a worker (its title, method dropped),
    the binary for gcs_server / raylet, the script for Ray's Python daemons."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    scripts = [os.path.basename(c) for c in cmd[1:] if c.endswith(".py")]
    return scripts[0] if scripts else os.path.basename(cmd[0])


class ListenerWatch(threading.Thread):
    """Polls the TCP listeners of this process and its descendants (the local Ray instance this driver started:
    GCS, raylet, agents, workers) every ``interval_s`` until ``stop``. ``seen[(pid, ip, port)]`` is the kind of
    the process when the listener was first seen (a pooled ray::IDLE worker later becomes an actor: judge by pid)."""

    def __init__(self, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.interval_s, self.done = interval_s, threading.Event()
        self.seen: dict[tuple[int, str, int], str] = {}
        self.polls = 0

    def poll(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                kind = "driver" if p.pid == me.pid else _kind(p)
                conns = p.net_connections(kind="inet")
            except psutil.Error:  # exited between listing and reading: nothing to see
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    self.seen.setdefault((p.pid, c.laddr.ip, c.laddr.port), kind)
        self.polls += 1

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.interval_s)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)
        self.poll()


def _fdfo_actors_since(t0_ms: float) -> dict[int, dict]:
    """pid -> the GCS actor table's entry (alive or dead) of each fdfo actor started after ``t0_ms``: its class and
    the core-worker address Ray serves it on (``Address.Port``; ``OwnerAddress.Port`` is the driver's)."""
    import ray._private.state  # the GCS table; ray.util.state would need the dashboard, off in tests

    return {
        a["Pid"]: a
        for a in ray._private.state.actors().values()
        if a.get("StartTime", 0) >= t0_ms and a["Name"].startswith("fdfo/") and a["ActorClassName"] in FDFO_ACTORS
    }


def test_a_one_node_run_listens_on_loopback_only(ray_local, tmp_path, caplog):
    # Full weights over the collective path, two samplers: the learner opens the rendezvous store (TCPStore) and
    # every rank a gloo listener; all of them must be on 127.0.0.1 because every member is on this machine.
    from cluster.runtime import run_ray

    cfg = load_config(
        "tiny-cpu",
        [
            "train.epochs=2",
            "train.pairs_per_epoch=8",
            "train.updates_per_epoch=2",
            "sampling.pairs_per_call=4",
            "sampling.num_steps=4",
            "runtime.sampler.count=2",
            "runtime.sampler.num_cpus=1",
            "runtime.learner.num_cpus=1",
            "lora.enabled=false",
            "runtime.weight_sync=collective",
            "eval.num_prompts=4",
            "eval.seeds_per_prompt=1",
            f"output_dir={tmp_path}",
        ],
    )
    caplog.set_level(logging.INFO, logger="fdfo")
    t0_ms = time.time() * 1000
    watch = ListenerWatch()
    watch.start()
    try:
        out = run_ray(cfg)
    finally:
        watch.stop()
    assert out["version"] == 4 and watch.polls > 10

    fdfo = _fdfo_actors_since(t0_ms)
    assert sorted(a["ActorClassName"] for a in fdfo.values()) == ["Learner", "RewardBatcher", "Sampler", "Sampler"]
    driver_ports = {a["OwnerAddress"]["Port"] for a in fdfo.values()}

    own: dict[int, list[tuple[str, int]]] = {pid: [] for pid in fdfo}  # fdfo's listeners, per actor process
    ray_report, beyond_loopback = [], []
    for (pid, ip, port), kind in sorted(watch.seen.items()):
        if pid in fdfo:
            if port == fdfo[pid]["Address"]["Port"]:
                ray_report.append(("worker", f"ray::{fdfo[pid]['ActorClassName']}", ip, port))
                continue
            own[pid].append((ip, port))
            if ip != LOOPBACK:
                beyond_loopback.append((fdfo[pid]["ActorClassName"], pid, ip, port))
        elif pid == os.getpid():
            if port in driver_ports:
                ray_report.append(("driver", "driver", ip, port))
            elif ip != LOOPBACK:  # fdfo's driver starts no server; nothing of its own may face the network
                beyond_loopback.append(("driver", pid, ip, port))
        else:
            ray_report.append((kind, kind, ip, port))
    assert not beyond_loopback, f"fdfo listeners beyond loopback (class, pid, ip, port): {beyond_loopback}"

    # the rendezvous of every generation, as the runtime chose it (its log line), was seen in the learner's process
    rendezvous = [(m[1], int(m[2])) for m in re.finditer(r"rendezvous at (\S+):(\d+)", caplog.text)]
    assert rendezvous and all(host == LOOPBACK for host, _ in rendezvous), rendezvous
    learner_pid = next(pid for pid, a in fdfo.items() if a["ActorClassName"] == "Learner")
    assert set(rendezvous) <= set(own[learner_pid])
    for pid, a in fdfo.items():  # every rank's gloo listener was seen too
        if a["ActorClassName"] in ("Learner", "Sampler"):
            assert len(own[pid]) >= 1 + (a["ActorClassName"] == "Learner"), (a["ActorClassName"], own[pid])
        else:
            assert own[pid] == [], own[pid]  # the reward actor opens nothing of its own

    lines = [f"{kind:22s} {who:22s} {ip}:{port}" for kind, who, ip, port in ray_report]
    print("Ray's listeners during the run (allowlist RAY_LISTENERS):\n  " + "\n  ".join(lines))
    unlisted = sorted({kind for kind, *_ in ray_report if kind not in RAY_LISTENERS})
    if unlisted:
        warnings.warn(f"Ray listeners of kinds not in RAY_LISTENERS (update it and docs/security.md): {unlisted}")


def test_the_weight_group_asks_for_the_cluster_address_only_when_a_member_is_on_another_node(ray_local):
    # The runtime's choice on stand-in actors that report given node ids (a one-machine Ray cannot host two nodes).
    import ray

    from cluster.sampler_pool import Pool
    from cluster.weight_sync import WeightSync

    @ray.remote(num_cpus=0)
    class Member:
        def __init__(self, node: str):
            self.node, self.asked, self.joined = node, [], []

        def node_id(self) -> str:
            return self.node

        def weight_backend(self) -> str:
            return "gloo"  # CPU actors: what each member picks from its device

        def weight_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
            self.asked.append(peers_on_this_node)
            return (LOOPBACK if peers_on_this_node else "10.1.2.3"), 29500 + len(self.asked)

        def join_weight_group(self, **kwargs) -> None:
            self.joined.append(kwargs)

        def record(self) -> tuple[list, list]:
            return self.asked, self.joined

    learner = Member.remote("node-a")
    sync = WeightSync(learner, collective=True, timeout_s=30.0)
    sync._form(Pool(actors={0: Member.remote("node-a"), 3: Member.remote("node-a")}))
    assert sync.address == (LOOPBACK, 29501) and sync.members == [0, 3]
    far = Member.remote("node-b")
    pool = Pool(actors={0: Member.remote("node-a"), 3: far})
    sync._form(pool)
    assert sync.address == ("10.1.2.3", 29502)
    asked, joined = ray.get(learner.record.remote())
    assert asked == [True, False]
    assert joined[-1] == {
        "world_size": 3,
        "master_addr": "10.1.2.3",
        "master_port": 29502,
        "backend": "gloo",
        "timeout_s": 30.0,
    }
    assert ray.get(far.record.remote())[1] == [
        {
            "rank": 2,
            "world_size": 3,
            "master_addr": "10.1.2.3",
            "master_port": 29502,
            "backend": "gloo",
            "timeout_s": 30.0,
        }
    ]


def test_weight_group_members_pick_their_backend_and_must_agree(ray_local):
    # each member picks NCCL or gloo from its own device; a learner on a GPU with samplers on CPUs cannot form a group
    import ray

    from cluster.sampler_pool import Pool
    from cluster.weight_sync import WeightSync

    @ray.remote(num_cpus=0)
    class Member:
        def __init__(self, backend: str):
            self.backend = backend

        def weight_backend(self) -> str:
            return self.backend

    sync = WeightSync(Member.remote("nccl"), collective=True)
    with pytest.raises(
        RuntimeError,
        match=r"^weight group members disagree on the backend \(learner nccl, samplers "
        r"\['gloo', 'gloo'\]\): put the learner and every sampler on GPUs \(NCCL\) or "
        r"all on CPUs \(gloo\), or set runtime.weight_sync=object_store$",
    ):
        sync._form(Pool(actors={0: Member.remote("gloo"), 1: Member.remote("gloo")}))


# -- secrets -------------------------------------------------------------------------------------------------------
PLANTED_ENV = {  # what a real run has in its environment, as planted values
    "RAY_AUTH_TOKEN": "planted-ray-token-6f1d2c0e",
    "WANDB_API_KEY": "planted-wandb-key-93ab71f4",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-5c0e88d2",
    "AWS_SESSION_TOKEN": "planted-aws-session-17e4b9",
}
JUDGE_KEY = "planted-judge-api-key-2b7f41aa"  # a config secret: the judge server's API key
URL_PASSWORD = "planted-url-password-a1c9e3"  # a config secret inside a URL's userinfo
PLANTED = [*PLANTED_ENV.values(), JUDGE_KEY, URL_PASSWORD]


def test_redaction_rule():
    os.environ.pop("FDFO_TEST_PLAIN", None)
    env = {"HF_TOKEN": "hf_planted_0123456789", "FDFO_TEST_PLAIN": "not-a-secret-value"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        got = redacted(
            {
                "judge": {
                    "api_key": JUDGE_KEY,
                    "apiKey": "x" * 9,
                    "client_secret": 7,
                    "password": None,
                    "token": "",
                    "yes_token": "Yes",
                    "no_token": "No",
                    "max_tokens": 1,
                    "key": "judge_a",
                    "tokenizer": "bert",
                },
                "address": f"ray://ops:{URL_PASSWORD}@head.example:10001",
                "weights": [
                    "s3://bucket/w.safetensors?X-Amz-Credential=AKIA/x&X-Amz-Signature=f00d&region=eu",
                    "https://hub.example/m?token=hf_planted_0123456789",
                    "not-a-secret-value",
                ],
                "note": "uses hf_planted_0123456789 inline",
            }
        )
    assert got == {
        "judge": {
            "api_key": REDACTED,
            "apiKey": REDACTED,
            "client_secret": REDACTED,
            "password": None,
            "token": "",
            "yes_token": "Yes",
            "no_token": "No",
            "max_tokens": 1,
            "key": "judge_a",
            "tokenizer": "bert",
        },
        "address": f"ray://{REDACTED}@head.example:10001",
        "weights": [
            f"s3://bucket/w.safetensors?X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}&region=eu",
            f"https://hub.example/m?token={REDACTED}",
            "not-a-secret-value",
        ],
        "note": f"uses {REDACTED} inline",
    }


JUDGE_COMPONENT = {
    "name": "vlm_judge",
    "weight": 0.001,
    "backend": "server",
    "model": "stub",
    "image_size": 16,
    "retries": 0,
    "api_key": JUDGE_KEY,
}


def test_written_configs_are_redacted_in_memory_ones_are_not():
    cfg = load_config(
        "tiny-cpu",
        [
            f"reward.components=[{{name: jpeg_compressibility, weight: 1.0}}, {json.dumps(JUDGE_COMPONENT)}]",
            f"runtime.address=ray://ops:{URL_PASSWORD}@head.example:10001",
        ],
    )
    written = to_dict(cfg)
    assert written["reward"]["components"][1] == {**JUDGE_COMPONENT, "api_key": REDACTED}
    assert written["reward"]["components"][0] == {"name": "jpeg_compressibility", "weight": 1.0}
    assert written["runtime"]["address"] == f"ray://{REDACTED}@head.example:10001"
    kept = with_overrides(cfg, ["train.lr=1e-3"])  # a round trip in memory keeps what it holds
    assert kept.reward.components[1]["api_key"] == JUDGE_KEY and kept.runtime.address == cfg.runtime.address
    assert to_dict(cfg, redact=False)["reward"]["components"][1]["api_key"] == JUDGE_KEY


@pytest.mark.parametrize(
    "data",
    [
        {"wandb_project": {"api_key": JUDGE_KEY}},  # a secret nested where a string belongs
        {"runtime": {"address": [f"ray://ops:{URL_PASSWORD}@head:10001"]}},
        {"runtime": {"weight_sync": f"https://ops:{URL_PASSWORD}@x"}},  # not one of the choices
    ],
)
def test_config_errors_do_not_echo_secrets(data):
    with pytest.raises(ValueError) as err:
        config_from_dict(data)
    assert REDACTED in str(err.value)
    assert not any(s in str(err.value) for s in PLANTED), str(err.value)


class _JudgeStub(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge server: Yes/No are tokens 1/2; it records each request's Authorization."""

    seen: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _JudgeStub.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/tokenize":
            body = {"tokens": [1]}
        else:
            top = [{"token": "token_id:1", "logprob": -0.4}, {"token": "token_id:2", "logprob": -1.1}]
            body = {"choices": [{"logprobs": {"content": [dict(top[0], top_logprobs=top)]}}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what fdfo hands it."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe for wandb by its spec
        self.inits, self.rows, self.finished = [], [], False
        self.id = "run-1a2b3c"  # wandb.init returns the run, whose id a resume asks for again

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step=None):
        self.rows.append(row)

    def finish(self):
        self.finished = True

    class Image:
        def __init__(self, path):
            self.path = path


def test_planted_secrets_reach_no_file_tracker_or_log(tmp_path, monkeypatch, caplog, capfd):
    # A short in-process run with every secret it could hold: in the environment (Ray token, W&B key, object-store
    # credentials) and in the config (the judge's API key, a password in a URL). The judge really uses its key
    # (the stub server sees it), so the secret is live in memory while the run writes everything it writes.
    from cluster.driver import run_local

    for k, v in PLANTED_ENV.items():
        monkeypatch.setenv(k, v)
    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    _JudgeStub.seen = []
    server = ThreadingHTTPServer((LOOPBACK, 0), _JudgeStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge = {**JUDGE_COMPONENT, "url": f"http://{LOOPBACK}:{server.server_address[1]}"}
    cfg = load_config(
        "tiny-cpu",
        [
            "train.epochs=2",
            "train.pairs_per_epoch=8",
            "train.updates_per_epoch=2",
            "sampling.pairs_per_call=4",
            "sampling.num_steps=4",
            "train.checkpoint_every=2",
            "eval.num_prompts=4",
            "eval.seeds_per_prompt=1",
            f"reward.components=[{{name: jpeg_compressibility, weight: 1.0}}, {json.dumps(judge)}]",
            f"runtime.address=ray://ops:{URL_PASSWORD}@head.example:10001",
            "wandb_project=fdfo-security",
            f"output_dir={tmp_path}",
        ],
    )
    caplog.set_level(logging.DEBUG)
    try:
        out = run_local(cfg)
    finally:
        server.shutdown()
        server.server_close()
    assert out["version"] == 4 and out["ledger"]["pairs_trained"] == 16
    chats = [auth for path, auth in _JudgeStub.seen if path == "/v1/chat/completions"]
    assert len(chats) >= 16 and set(chats) == {f"Bearer {JUDGE_KEY}"}  # the key was used, and only sent there

    run_dir = tmp_path / "tiny-cpu"
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    names = {str(p.relative_to(run_dir)) for p in files}
    assert {
        "config.json",
        "history.jsonl",
        "checkpoints/v000002/state.json",
        "checkpoints/v000004/state.json",
        "checkpoints/v000004/trainable.safetensors",
        "checkpoints/v000004/optimizer.json",
        "checkpoints/v000004/transformer/config.json",
    } <= names
    assert any(n.startswith("tb/events.out.tfevents") for n in names)
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in PLANTED if s.encode() in data]
        assert not leaked, f"{path.relative_to(run_dir)} holds {leaked}"

    written = json.loads((run_dir / "config.json").read_text())
    assert written["reward"]["components"][1] == {**judge, "api_key": REDACTED}
    assert written["runtime"]["address"] == f"ray://{REDACTED}@head.example:10001"
    assert json.loads((run_dir / "checkpoints/v000004/state.json").read_text())["config"] == written
    assert [i["config"] for i in wandb.inits] == [written] and wandb.rows and wandb.finished
    assert not any(s in json.dumps(wandb.rows, default=str) for s in PLANTED)
    logs = caplog.text + "".join(capfd.readouterr())
    assert "epoch 1 reward" in logs and not [s for s in PLANTED if s in logs]
