"""The deployment files parse, run the same entrypoint the README documents, and keep token auth on."""

from pathlib import Path

import yaml

from cluster.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"


def test_rayjob_manifest():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "cluster.cli", "train"]
    load_config(entry[entry.index("--config") + 1])          # the preset it names exists and validates
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"sampler-gpu", "learner-gpu", "reward-gpu"}
    assert groups["sampler-gpu"]["maxReplicas"] > groups["sampler-gpu"]["minReplicas"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_cluster_launcher_config():
    cfg = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"sampler_gpu", "learner_gpu", "reward_gpu"} <= set(types)
    assert types["sampler_gpu"]["max_workers"] > types["sampler_gpu"]["min_workers"]
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
