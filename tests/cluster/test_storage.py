"""Storage that outlives the cluster (``runtime.storage_path``), against a real S3-compatible server: moto's, started
on 127.0.0.1 by this module and stopped at its end; pyarrow's S3 client talks HTTP to it, nothing is mocked."""

import json
import logging
import shutil
import time
import uuid

import pyarrow.fs as pafs
import pytest

from cluster.cli import main
from cluster.config import load_config
from learner.checkpoint import LATEST, latest_checkpoint, prune_checkpoints
from learner.storage import Mirror, Storage, join, shown

KEY, SECRET = "fdfo-test-key", "fdfo-test-secret"  # moto accepts any; the run reads them from the environment


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request log line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = pafs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            region="us-east-1",
            scheme="http",
            endpoint_override=f"{host}:{port}",
            allow_bucket_creation=True,
        )
        deadline = time.monotonic() + 20
        while True:  # bounded: the server answers within seconds
            try:
                fs.create_dir("fdfo-probe")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield {"endpoint": endpoint, "fs": fs}
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; credentials, region and endpoint in the environment, as a user sets them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint["endpoint"])
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_endpoint["fs"].create_dir(name)
    return name


def test_storage_reads_writes_and_copies_trees_on_s3(bucket, tmp_path):
    store = Storage(f"s3://{bucket}/runs/a")
    assert not store.local and store.root == f"{bucket}/runs/a" and store.listdir() == []
    assert store.write_text("checkpoints/latest", "v000004") == f"s3://{bucket}/runs/a/checkpoints/latest"
    assert store.read_text("checkpoints/latest") == "v000004"
    (tmp_path / "v4" / "transformer").mkdir(parents=True)
    (tmp_path / "v4" / "state.json").write_text('{"version": 4}')
    (tmp_path / "v4" / "transformer" / "w.bin").write_bytes(b"\x00\x01")
    store.upload(tmp_path / "v4", "checkpoints/v000004")
    assert store.listdir("checkpoints") == ["latest", "v000004"]
    assert store.is_dir("checkpoints/v000004") and not store.is_dir("checkpoints/latest")
    store.child("checkpoints").copy_from(store.child("checkpoints", "v000004"), "best")
    got = store.download("checkpoints/best", tmp_path / "back")
    assert (got / "state.json").read_text() == '{"version": 4}' and (
        got / "transformer" / "w.bin"
    ).read_bytes() == b"\x00\x01"
    store.remove("checkpoints/v000004")
    assert store.listdir("checkpoints") == ["best", "latest"] and not store.exists("checkpoints/v000004")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/runs/a/nothing does not exist"):
        store.read_text("nothing")


def test_locations_keep_their_query_and_hide_credentials():
    uri = "s3://k:s@bucket/runs?endpoint_override=http://127.0.0.1:9000&scheme=http&secret_key=s"
    assert join(uri, "shapes", "checkpoints/") == (
        "s3://k:s@bucket/runs/shapes/checkpoints?endpoint_override=http://127.0.0.1:9000&scheme=http&secret_key=s"
    )
    assert shown(uri) == (
        "s3://<redacted>@bucket/runs?endpoint_override=http://127.0.0.1:9000&scheme=http&secret_key=<redacted>"
    )
    assert join("runs", "shapes") == "runs/shapes"


def test_unopenable_and_unreachable_storage_name_the_fix(bucket, monkeypatch):
    with pytest.raises(ValueError, match=r"^storage 'nosuch://x/y' cannot be opened by pyarrow.fs \("):
        Storage("nosuch://x/y")
    with pytest.raises(
        ValueError,
        match=r"^storage 's3://no-such-bucket-fdfo/runs' is not reachable \(.*\); check "
        r"that the bucket exists, the credentials",
    ):
        Storage("s3://no-such-bucket-fdfo/runs").check()


def test_prune_and_latest_work_in_the_bucket(bucket):
    ck = Storage(f"s3://{bucket}/r/checkpoints")
    for name in ("v000004", "v000008", "v000012", "best"):
        ck.write_text(f"{name}/state.json", "{}")
    ck.write_text(LATEST, "v000004")
    assert prune_checkpoints(ck.location, keep=1) == ["v000008"]
    assert ck.listdir() == ["best", "latest", "v000004", "v000012"]
    assert latest_checkpoint(f"s3://{bucket}/r") == f"s3://{bucket}/r/checkpoints/v000004"
    assert latest_checkpoint(f"s3://{bucket}/elsewhere") is None


def test_mirror_uploads_only_what_changed(bucket, tmp_path):
    store = Storage(f"s3://{bucket}/m")
    (tmp_path / "tb").mkdir()
    (tmp_path / "history.jsonl").write_text("a\n")
    (tmp_path / "tb" / "events.1").write_bytes(b"x")
    mirror = Mirror(tmp_path, store)
    assert mirror.sync("history.jsonl", "tb", "absent.png") == ["history.jsonl", "tb/events.1"]
    assert mirror.sync("history.jsonl", "tb") == []
    (tmp_path / "history.jsonl").write_text("a\nb\n")
    assert mirror.sync("history.jsonl", "tb") == ["history.jsonl"]
    assert store.read_text("history.jsonl") == "a\nb\n"
    assert Mirror(tmp_path, Storage(tmp_path)).sync("history.jsonl") == []  # the same folder: nothing to do


def test_in_process_run_writes_to_the_bucket_and_resumes_from_it(bucket, tmp_path, capsys, caplog):
    """A run whose only copy is in the bucket: checkpoints, history, TensorBoard, grids, curve and summary go
    there; with the local folder deleted, --resume continues from the bucket's latest checkpoint, counters
    continuing (8 pairs and 2 updates an epoch)."""
    local = tmp_path / "local"
    common = [
        "train",
        "--config",
        "tiny-cpu",
        "--local",
        "name=s3run",
        f"output_dir={local}",
        f"runtime.storage_path=s3://{bucket}/runs",
        "sampling.num_steps=4",
        "eval.num_prompts=2",
        "eval.seeds_per_prompt=1",
        "train.checkpoint_every=2",
        "train.pairs_per_epoch=8",
    ]
    assert main([*common, "train.epochs=1"]) == 0
    run = Storage(f"s3://{bucket}/runs/s3run")
    assert run.read_text("checkpoints/latest") == "v000002"
    assert run.listdir("checkpoints") == ["latest", "v000002"]
    assert run.listdir("checkpoints/v000002") == [
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
        "transformer",
    ]  # tiny-cpu: full weights
    assert run.listdir("checkpoints/v000002/transformer") == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [json.loads(r)["step"] for r in run.read_text("history.jsonl").splitlines()] == [0]
    assert any(n.startswith("events.out.tfevents") for n in run.listdir("tb"))
    for name in ("config.json", "summary.json", "heldout_before.png", "heldout_after.png", "learning_curve.png"):
        assert run.exists(name), name
    out = capsys.readouterr().out
    assert f"storage          s3://{bucket}/runs/s3run\n" in out
    assert f"checkpoint       s3://{bucket}/runs/s3run/checkpoints/v000002\n" in out
    assert f"grid after       s3://{bucket}/runs/s3run/heldout_after.png\n" in out

    shutil.rmtree(local)
    caplog.set_level(logging.INFO, logger="fdfo")
    assert main([*common, "train.epochs=2", "--resume"]) == 0
    assert f"resumed from s3://{bucket}/runs/s3run/checkpoints/v000002 at epoch 1" in caplog.text
    assert "| epoch 2/2, " in caplog.text and ", eta 0s" in caplog.text  # progress for `ray job logs`
    assert run.read_text("checkpoints/latest") == "v000004"
    state = json.loads(run.read_text("checkpoints/v000004/state.json"))
    assert state["version"] == 4 and state["state"]["epoch"] == 2
    assert state["state"]["ledger"]["pairs_trained"] == 16 and state["state"]["next_pair_id"] == 16
    assert [json.loads(r)["step"] for r in run.read_text("history.jsonl").splitlines()] == [0, 1]
    summary = json.loads(run.read_text("summary.json"))
    assert summary["version"] == 4 and summary["ledger"]["pairs_requested"] == 16


def test_resume_with_nothing_in_the_bucket_says_so(bucket, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        main(
            [
                "train",
                "--config",
                "tiny-cpu",
                "--local",
                "--resume",
                "name=empty",
                f"output_dir={tmp_path}",
                f"runtime.storage_path=s3://{bucket}/runs",
                "train.epochs=1",
            ]
        )
    assert str(e.value) == (
        f"--resume: no checkpoint under s3://{bucket}/runs/empty/checkpoints; run without --resume "
        "first (or check runtime.storage_path and name)"
    )


def test_ray_learner_resumes_from_the_bucket_and_writes_there(ray_local, s3_endpoint, tmp_path):
    """A run checkpointed in process, its local folder gone, continued by the Ray runtime: the driver finds
    ``latest`` in the bucket, the learner actor loads the checkpoint from there and writes the next one there.
    The actors have no AWS variables in their environment: the URI carries what they need (credentials included
    here only because this Ray instance was started without them; a user sets them in the environment)."""
    from cluster.runtime import run_ray

    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_endpoint["fs"].create_dir(name)
    host_port = s3_endpoint["endpoint"].removeprefix("http://")
    uri = f"s3://{KEY}:{SECRET}@{name}/runs?endpoint_override={host_port}&scheme=http&region=us-east-1"
    common = [
        "name=ray-s3",
        f"output_dir={tmp_path}",
        f"runtime.storage_path={uri}",
        "sampling.num_steps=4",
        "eval.num_prompts=2",
        "eval.seeds_per_prompt=1",
        "train.checkpoint_every=2",
        "train.pairs_per_epoch=8",
        "sampling.pairs_per_call=8",
        "runtime.sampler.count=1",
        "runtime.sampler.num_cpus=1",
        "runtime.learner.num_cpus=1",
    ]
    assert main(["train", "--config", "tiny-cpu", "--local", *common, "train.epochs=1"]) == 0
    shutil.rmtree(tmp_path / "ray-s3")
    out = run_ray(load_config("tiny-cpu", [*common, "train.epochs=2"]), resume=True)
    run = Storage(join(uri, "ray-s3"))
    assert run.read_text("checkpoints/latest") == "v000004" and out["version"] == 4
    state = json.loads(run.read_text("checkpoints/v000004/state.json"))
    assert state["state"]["epoch"] == 2 and state["state"]["ledger"]["pairs_trained"] == 16
    assert (
        out["paths"]["checkpoint"] == f"s3://<redacted>@{name}/runs/ray-s3/checkpoints/v000004?endpoint_override="
        f"{host_port}&scheme=http&region=us-east-1"
    )
    written = json.loads(run.read_text("config.json"))["runtime"]["storage_path"]
    assert written == f"s3://<redacted>@{name}/runs?endpoint_override={host_port}&scheme=http&region=us-east-1"
