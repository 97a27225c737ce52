"""What the deployment files must satisfy beyond their schemas, each rule read from the released source that enforces
it (cited per rule): KubeRay v1.7.0's admission checks of a RayJob, Ray 2.60's launcher (where it mounts files, which
AMI it picks), vLLM's API key handling, and the images the launcher runs. Each test fails on the files as they were
before issue 31 (per-group idleTimeoutSeconds, no HOME, no ssh, no AMI, no Hugging Face token, no compiler, an empty
key opening the judge); `bash .ci/cluster-check` runs the images and the launcher's commands for real."""

import copy
import http.server
import importlib.util
import re
import subprocess
import threading

import pytest
import yaml

from tests.cluster.test_deploy import DEPLOY, ROOT, containers, judge_docs, launcher, rayjob, run_train_job
from tests.cluster.test_images import DOCKERFILES, instructions

# -- KubeRay v1.7.0: ray-operator/controllers/ray/utils/validation.go (ValidateRayJobMetadata, ValidateRayJobSpec,
#    ValidateRayClusterSpec, validateWorkerGroupIdleTimeout) and utils/constant.go, restated for the fields a RayJob
#    of ours can set. The operator runs these before it creates a pod; a failure ends the RayJob ValidationFailed.
MAX_RAYJOB_NAME = 53 - 6  # constant.go: MaxRayJobNameLength = MaxRayClusterNameLength - 6
START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"v?(\d+)\.(\d+)\.(\d+)", text).groups())


def kuberay_error(job: dict) -> str | None:
    """The error KubeRay v1.7.0 refuses ``job`` with (its first, in its order), or None when it admits it."""
    name = job["metadata"]["name"]
    if len(name) > MAX_RAYJOB_NAME:
        return f"The RayJob metadata is invalid: RayJob name should be no more than {MAX_RAYJOB_NAME} characters"
    if not DNS1035.fullmatch(name):
        return "The RayJob metadata is invalid: RayJob name should be a valid DNS1035 label"
    spec = job["spec"]
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        return "The RayJob spec is invalid: TTLSecondsAfterFinished must be a non-negative integer"
    if not spec.get("shutdownAfterJobFinishes", False) and spec.get("ttlSecondsAfterFinished", 0) > 0:
        return (
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have "
            "TTLSecondsAfterFinished"
        )
    cluster = spec["rayClusterSpec"]
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    if spec.get("submissionMode") == "SidecarMode":
        if "submitterPodTemplate" in spec:
            return "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if "submitterConfig" in spec:
            return "Currently, SidecarMode doesn't support SubmitterConfig"
        if head_pod.get("restartPolicy", "Never") != "Never":
            return "restartPolicy for head Pod should be Never or unset when using SidecarMode"
    error = cluster_error(cluster)
    return f"The RayJob spec is invalid: {error}" if error else None


def cluster_error(cluster: dict) -> str | None:
    head = cluster["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return "headGroupSpec should have at least one container"
    head_env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0].get("env", [])}
    options = cluster.get("autoscalerOptions") or {}
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    v2 = options.get("version") == "v2" or head_env.get("RAY_enable_autoscaler_v2") in ("1", "true")
    groups = [("Head", head)] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in START_RESOURCE_PARAMS) and group.get("resources"):
            return (
                f"resource fields should not be set in both rayStartParams and Resources for {name} group; "
                "please use only one"
            )
        if "labels" in params:
            return f"rayStartParams['labels'] is not supported for {name} group; please use the top-level Labels field instead"
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if lo is not None and hi is not None and lo > hi:
            return f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}"
        idle = group.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                return f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}"
            if not v2:
                return (
                    f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. Please set "
                    ".spec.autoscalerOptions.version to 'v2' (or set RAY_enable_autoscaler_v2 environment variable "
                    "to 'true' in the head pod if using KubeRay < 1.4.0)"
                )
    if autoscaling and options.get("version") and "RAY_enable_autoscaler_v2" in head_env:
        return (
            "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set, please only "
            "use the former"
        )
    if autoscaling and options.get("version") == "v2":
        for name, group in groups:
            if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                where = "head Pod" if name == "Head" else f"worker group {name}"
                return f"restartPolicy for {where} should be Never or unset when using autoscaler V2"
    if options.get("idleTimeoutSeconds", 0) < 0:
        return f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {options['idleTimeoutSeconds']}"
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = cluster.get("rayVersion", "")
        if not version:
            return (
                "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is required"
            )
        if _version(version) < (2, 52, 0):
            return f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {version}"
    return None


def test_the_rayjob_passes_kuberay_1_7_validation():
    assert kuberay_error(rayjob()) is None


def test_kuberay_validation_refuses_what_it_refuses():
    """Each rule restated above, shown to fire on a one-field change of the shipped RayJob with KubeRay's message."""
    job = rayjob()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    before = copy.deepcopy(job)  # the file before issue 31: idleTimeoutSeconds on the sampler and reward groups
    before["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["idleTimeoutSeconds"] = 600
    assert kuberay_error(before) == (
        f"The RayJob spec is invalid: worker group {groups[0]['groupName']}: idleTimeoutSeconds is set, but autoscaler "
        "v2 is not enabled. Please set .spec.autoscalerOptions.version to 'v2' (or set RAY_enable_autoscaler_v2 "
        "environment variable to 'true' in the head pod if using KubeRay < 1.4.0)"
    )
    v2 = copy.deepcopy(before)
    v2["spec"]["rayClusterSpec"]["autoscalerOptions"]["version"] = "v2"
    assert kuberay_error(v2) is None
    v2["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert kuberay_error(v2) == "restartPolicy for head Pod should be Never or unset when using SidecarMode"

    def changed(path, value):
        doc = copy.deepcopy(job)
        *keys, last = path
        node = doc
        for k in keys:
            node = node[k]
        node[last] = value
        return kuberay_error(doc)

    cluster = ("spec", "rayClusterSpec")
    assert changed((*cluster, "rayVersion"), "2.51.0") == (
        "The RayJob spec is invalid: authOptions.mode is 'token' but minimum Ray version is 2.52.0, got 2.51.0"
    )
    assert changed((*cluster, "workerGroupSpecs", 0, "rayStartParams", "num-gpus"), "1") == (
        f"The RayJob spec is invalid: resource fields should not be set in both rayStartParams and Resources for "
        f"{groups[0]['groupName']} group; please use only one"
    )
    assert changed((*cluster, "workerGroupSpecs", 1, "minReplicas"), 2) == (
        f"The RayJob spec is invalid: worker group {groups[1]['groupName']} has minReplicas 2 greater than maxReplicas 1"
    )
    assert changed(("metadata", "name"), "fdfo-" + "x" * 43) == (
        "The RayJob metadata is invalid: RayJob name should be no more than 47 characters"
    )
    assert changed(("metadata", "name"), "fdfo_sd35m").endswith("valid DNS1035 label")
    assert changed(("spec", "shutdownAfterJobFinishes"), False).endswith("cannot have TTLSecondsAfterFinished")


def test_rayjob_states_the_kuberay_it_needs_and_gets_the_hugging_face_token():
    """authOptions (the cluster's one token from a Secret) first appears in KubeRay v1.6.0's API
    (ray-operator/apis/ray/v1/raycluster_types.go); the gated SD3.5 weights need a Hugging Face token in every Ray
    container (the driver evaluates, samplers and the learner load the model)."""
    text = (DEPLOY / "rayjob.yaml").read_text()
    assert "KubeRay >= 1.6" in text and "KubeRay >= 1.5" not in text
    assert "kubectl create secret generic fdfo-hf-token --from-literal=token=" in text
    for c in containers(rayjob()):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "fdfo-hf-token", "key": "token"}}, c["name"]


# -- Ray 2.60's launcher and the images ----------------------------------------------------------------------------


def test_every_node_type_names_an_ami_other_than_rays_default():
    """Without ImageId Ray 2.60 fills in its default, a Deep Learning AMI with CUDA 11.2
    (autoscaler/_private/aws/config.py, _check_ami: "" and "latest_dlami" both mean the default)."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    for name, node in launcher()["available_node_types"].items():
        ami = node["node_config"].get("ImageId", "")
        assert ami.lower() not in ("", "latest_dlami") and ami not in DEFAULT_AMI.values(), name
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-"), name


def test_file_mounts_land_in_the_images_home():
    """Ray 2.60's DockerCommandRunner.run_init (autoscaler/_private/command_runner.py) bind-mounts file_mounts under
    the HOME of the image's Config.Env, else /root; the `ray` user (USER ray) reads them only under its own HOME."""
    for dockerfile in DOCKERFILES:
        steps = instructions(dockerfile)
        env = " ".join(a for w, a in steps if w == "ENV")
        assert re.search(r"(^|\s)HOME=/home/ray(\s|$)", env), f"{dockerfile.name}: no HOME in the image's ENV"
        assert any("useradd --create-home" in a and " ray" in a for w, a in steps if w == "RUN"), dockerfile.name
    mounts = launcher()["file_mounts"]
    assert all(remote.startswith("~/") for remote in mounts)  # ~ is the image's HOME
    assert mounts["~/.cache/huggingface/token"] == "~/.cache/huggingface/token"  # huggingface_hub reads it there


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_carry_ssh_and_rsync_for_the_autoscaler(dockerfile):
    """The autoscaler in the head container reaches workers with ssh and syncs files with rsync (Ray's base-deps
    image installs both "for autoscaler"); no `# syntax=` line (BuildKit would fetch that frontend from a registry)."""
    installs = " ".join(a for w, a in instructions(dockerfile) if w == "RUN" and "apt-get install" in a)
    assert "openssh-client" in installs.split() and "rsync" in installs.split()
    assert not dockerfile.read_text().startswith("# syntax=")


def test_judge_stage_has_a_compiler_and_one_cuda_stack():
    """Triton compiles a launcher with the system C compiler when vLLM's engine starts; the judge stage is built on
    the base, not on fdfo's runtime (whose CUDA torch would sit beside vLLM's own), and serves with `vllm serve`."""
    steps = instructions(DOCKERFILES[0])
    stages = [a for w, a in steps if w == "FROM"]
    assert "base AS judge" in stages and "runtime AS judge" not in stages
    judge = steps[[i for i, (w, a) in enumerate(steps) if w == "FROM" and a.endswith("AS judge")][0] :]
    judge = judge[: next(i for i, (w, a) in enumerate(judge[1:], 1) if w == "FROM")]
    runs = " ".join(a for w, a in judge if w == "RUN")
    assert "gcc" in runs.split() and "libc6-dev" in runs.split()
    assert "torch" not in runs and '"vllm==${VLLM_VERSION}"' in runs and '"ray[default]==${RAY_VERSION}"' in runs
    assert ("COPY", "cluster/deploy/judge-serve.sh /app/cluster/deploy/judge-serve.sh") in judge
    assert [a for w, a in judge if w == "CMD"] == ['["/opt/vllm/bin/vllm", "serve", "--help"]']
    deprecated = "vllm.entrypoints.openai.api_server"  # vLLM's CLI is `vllm serve`
    assert not any(deprecated in p.read_text() for p in [*DEPLOY.glob("*.yaml"), *DOCKERFILES])


# -- the judge: its key, its command, its supervision --------------------------------------------------------------


def run_judge_serve(tmp_path, args, env):
    """judge-serve.sh with a stub vLLM that records its argv and the VLLM_API_KEY it got."""
    stub = tmp_path / "vllm"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT.argv"; printf "%s" "$VLLM_API_KEY" > "$OUT.key"\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    full = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FDFO_VLLM": str(stub), "OUT": str(out), **env}
    res = subprocess.run(
        ["bash", str(DEPLOY / "judge-serve.sh"), *args], env=full, capture_output=True, text=True, timeout=30
    )
    argv = (tmp_path / "out.argv").read_text().splitlines() if (tmp_path / "out.argv").exists() else None
    key = (tmp_path / "out.key").read_text() if (tmp_path / "out.key").exists() else None
    return res, argv, key


def test_judge_serve_refuses_a_missing_or_empty_key(tmp_path):
    """vLLM 0.32 (vllm/entrypoints/openai/api_server.py) authenticates only when the key is non-empty: an empty key
    file, as `cat` of a missing mount gives, would start it open to everyone."""
    res, argv, _ = run_judge_serve(tmp_path, ["--host", "192.0.2.5"], {})
    assert res.returncode == 2 and argv is None
    assert res.stderr.strip() == (
        f"judge-serve.sh: no API key: set VLLM_API_KEY or create {tmp_path}/.fdfo/judge_api_key (the header of "
        "cluster/deploy/ray-cluster.yaml says how); the judge does not start without one"
    )
    (tmp_path / ".fdfo").mkdir()
    (tmp_path / ".fdfo" / "judge_api_key").write_text("\n")
    res, argv, _ = run_judge_serve(tmp_path, ["--host", "192.0.2.5"], {})
    assert (res.returncode, argv) == (2, None)
    assert res.stderr.strip() == (
        "judge-serve.sh: the API key is empty: vLLM would serve without authentication; the judge does not start"
    )
    res, argv, _ = run_judge_serve(tmp_path, ["--host", "192.0.2.5"], {"VLLM_API_KEY": ""})  # an empty Secret
    assert (res.returncode, argv) == (2, None)
    res, argv, _ = run_judge_serve(tmp_path, ["--host", "0.0.0.0"], {"VLLM_API_KEY": "k"})
    assert res.returncode == 2 and "would listen on every interface" in res.stderr


def test_judge_serve_runs_vllm_serve_with_the_key_in_its_environment(tmp_path):
    (tmp_path / ".fdfo").mkdir()
    (tmp_path / ".fdfo" / "judge_api_key").write_text("file-key\n")
    res, argv, key = run_judge_serve(tmp_path, ["--host", "192.0.2.5", "--port", "8000"], {})
    assert res.returncode == 0, res.stderr
    assert argv == ["serve", "Qwen/Qwen2.5-VL-7B-Instruct", "--host", "192.0.2.5", "--port", "8000"]
    assert key == "file-key"  # stripped of the newline, and on no command line
    res, argv, key = run_judge_serve(
        tmp_path, ["--host", "$(POD_IP)", "--", "--max-model-len", "8192"], {"VLLM_API_KEY": "s"}
    )
    assert argv[-2:] == ["--max-model-len", "8192"] and key == "s"


def test_judge_manifest_starts_through_judge_serve_and_keeps_its_model():
    dep = judge_docs()["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    assert vllm["command"] == ["/app/cluster/deploy/judge-serve.sh"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # one GPU: a rolling update would wait for a second
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    probe = vllm["startupProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": 8000}
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800  # download and load of a 7B model
    cache = {v["name"]: v for v in pod["volumes"]}["hf-cache"]
    pvc = judge_docs()["PersistentVolumeClaim"]
    assert cache["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"]}


def test_train_job_refuses_an_empty_key_and_keeps_the_key_off_the_command_line(tmp_path):
    (tmp_path / ".fdfo").mkdir()
    (tmp_path / ".fdfo" / "judge_api_key").write_text("")
    res, argv = run_train_job(tmp_path, ["--config", "sd35m-combined"], {"FDFO_JUDGE_URL": "http://j:8000"})
    assert res.returncode == 2 and argv is None
    assert "the judge API key file" in res.stderr and "is empty" in res.stderr
    (tmp_path / ".fdfo" / "judge_api_key").write_text("s3cret-key\n")
    res, argv = run_train_job(tmp_path, ["--config", "sd35m-combined"], {"FDFO_JUDGE_URL": "http://j:8000"})
    assert res.returncode == 0, res.stderr
    ps = (tmp_path / "argv.ps").read_text().split("\0")[:-1]
    assert ps[-1] == "@/dev/fd/3" and not any("s3cret-key" in a for a in ps)
    assert "api_key: 's3cret-key'" in argv[-1]
    # the job waits for the judge's /health (FDFO_JUDGE_WAIT_S, default 1800 s) before it starts
    assert (tmp_path / "argv.judge").read_text().split() == ["--url", "http://j:8000", "--wait", "1800"]


def _judge_url_module():
    spec = importlib.util.spec_from_file_location("judge_url", DEPLOY / "judge_url.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_job_waits_for_the_judge_to_answer(tmp_path):
    """A server that answers 503 twice (vLLM loading its model), then 200; and one that never answers."""
    answers = [503, 503, 200]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answers.pop(0) if self.path == "/health" and answers else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    log = tmp_path / "log.txt"
    try:
        with log.open("w") as f:
            assert _judge_url_module().wait_healthy(url, timeout_s=10, poll_s=0.05, log=f) < 5
        assert answers == [] and log.read_text().count("waiting for the judge") == 2
        with pytest.raises(
            SystemExit, match=rf"the judge at {url} did not answer /health within 0.2 s \(last: HTTP 404\)"
        ):
            _judge_url_module().wait_healthy(url, timeout_s=0.2, poll_s=0.05, log=log.open("w"))
    finally:
        server.shutdown()


def test_deploy_docs_name_the_cluster_check():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    assert "bash .ci/cluster-check" in text
    assert (ROOT / ".ci" / "cluster-check").exists()
    assert "cluster-check" not in (ROOT / ".ci" / "run").read_text()  # not in CI: its time budget
    assert yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["entrypoint"].startswith(
        "bash /app/cluster/deploy/"
    )
