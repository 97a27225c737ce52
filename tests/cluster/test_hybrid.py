"""Hybrid workers (``runtime.placement: hybrid``): one model that samples and trains. The plain class against the
in-process loop's separate Sampler and Learner, and the placements that make no sense, refused with the fix named."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, load_config
from cluster.driver import publish
from cluster.hybrid import HybridWorker
from learner.learner import Learner

ROOT = Path(__file__).resolve().parents[2]
TINY = ["sampling.num_steps=4", "train.pairs_per_epoch=2", "train.updates_per_epoch=1", "sampling.pairs_per_call=2"]


def worker_of(cfg) -> HybridWorker:
    return HybridWorker(partial(build_model, cfg.model), cfg.sampling, cfg.train, Batching.of(cfg), cfg.lora, seed=0)


def test_a_worker_samples_with_the_weights_its_own_learner_stepped():
    # the in-process loop's pair (each role its own model, the sampler loading what the learner publishes) and one
    # hybrid worker (one model) sample, pack and train the same requests: every image, row, loss and weight is the
    # same bits, epoch after epoch, though nothing is ever copied into the worker's sampler
    cfg = load_config("tiny-cpu", TINY)
    sampler = Sampler(partial(build_model, cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    learner = Learner(partial(build_model, cfg.model, role="learner"), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    publish(learner, sampler)
    worker = worker_of(cfg)
    assert worker.sampler.model is worker.learner.model  # one copy of the transformer
    for epoch in range(2):
        req = {
            "prompts": ["a red circle", "a black cat"],
            "prompt_ids": [0, 2],
            "pair_ids": [2 * epoch, 2 * epoch + 1],
            "seeds": [100 * epoch, 100 * epoch + 1],
        }
        (job, images), (w_job, w_images) = sampler.sample(**req), worker.sample(**req)
        assert np.array_equal(images, w_images)
        rewards = np.linspace(0.0, 1.0, 4) * (epoch + 1)
        (batch, report), (w_batch, w_report) = sampler.complete(job, rewards), worker.complete(w_job, rewards)
        assert w_batch.equals(batch)
        assert (
            (w_report["version"], w_report["checksum"])
            == (report["version"], report["checksum"])
            == (
                epoch,
                learner.weights_info()[1],
            )
        )
        m = learner.train_epoch(batch)
        assert worker.begin_epoch(w_batch)["updates"] == 1
        w_m, nothing = worker.update()
        assert nothing is None and w_m["learner/loss"] == m["learner/loss"] and w_m["checksum"] == m["checksum"]
        publish(learner, sampler)
    assert worker.proof() == {"version": 2, "checksum": learner.weights_info()[1], "sampler": 0}
    assert worker.status()["version"] == 2 and worker.model.transformer.training  # left as its learner trains it


def test_a_lora_worker_adds_its_adapter_once():
    cfg = load_config("tiny-cpu", TINY + ["lora.enabled=true", "lora.rank=4"])
    worker, sampler = worker_of(cfg), Sampler(partial(build_model, cfg.model), cfg.sampling, cfg.lora)
    names = sorted(n for n, p in worker.model.transformer.named_parameters() if p.requires_grad)
    assert names == sampler._broadcast_names and all("lora_" in n for n in names)
    assert worker.weights_info()[0] == 0 and worker.proof()["checksum"] == worker.weights_info()[1]


def test_a_worker_takes_no_published_weights():
    cfg = load_config("tiny-cpu", TINY)
    worker = worker_of(cfg)
    with pytest.raises(ValueError, match=r"publishes nothing: its sampler holds the stepped weights \(publish=False\)"):
        worker.update(publish=True)
    with pytest.raises(ValueError, match=r"samples with its own weights: nothing is published to it \(newest=None\)"):
        worker.sample(prompts=["a"], prompt_ids=[0], pair_ids=[0], seeds=[0], newest=(1, "x", []))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["runtime.overlap=true"], "runtime.placement = hybrid runs lock-step: .* set runtime.overlap=false, or "),
        (["runtime.learner.sharding=fsdp"], "cannot be sharded; set runtime.learner.sharding=auto"),
        (["runtime.weight_sync=collective"], "runtime.weight_sync = collective is not read; drop it"),
        (
            ["runtime.sampler.count=2", "runtime.sampler.num_gpus=1"],
            r"so runtime.sampler.count = 2, runtime.sampler.num_gpus = 1.0 is not read: size the workers with "
            r"runtime.learner.count / num_cpus / num_gpus / resources and drop runtime.sampler.count, "
            r"runtime.sampler.num_gpus, or set runtime.placement=split",
        ),
    ],
)
def test_placements_that_make_no_sense_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny-cpu", ["runtime.overlap=false", "runtime.placement=hybrid"] + overrides)


def test_hybrid_workers_replicate_and_are_the_only_actors_with_gpus():
    from cluster.config import learner_sharding
    from cluster.resources import resource_shortfall, role_counts

    over = ["runtime.overlap=false", "runtime.learner.count=2", "runtime.learner.num_gpus=1"]
    split, hybrid = load_config("tiny-cpu", over), load_config("tiny-cpu", over + ["runtime.placement=hybrid"])
    assert (learner_sharding(split), learner_sharding(hybrid)) == ("fsdp", "replicate")  # full fine-tuning
    assert role_counts(hybrid.runtime) == {"sampler": 0, "reward": 1, "learner": 2}
    two_gpus = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert resource_shortfall(hybrid.runtime, two_gpus) is None  # one worker a GPU; the split run's samplers too
    assert resource_shortfall(split.runtime, [{"CPU": 1.0, "GPU": 1.0}] * 2).startswith("the run's actors ask for")


class FakeBook:
    def __init__(self):
        self.epoch, self.drops = 3, []

    def drop(self, reason: str, n: int) -> None:
        self.drops.append((reason, n))


@pytest.mark.ray_unit
def test_the_pool_adopts_the_groups_workers_and_the_in_place_sync_only_checks_proofs(ray_local):
    # the pool's members are the learner group's workers: a restarted group's workers replace them all, the old ones'
    # calls in flight are dropped (actor_lost), and a lost worker is not replaced by the pool nor autoscaled around
    import ray

    from cluster.sampler_pool import Job, SamplerPool
    from cluster.weight_sync import InPlace, start_publishing

    @ray.remote(num_cpus=0)
    class StubWorker:
        def __init__(self, index: int, version: int, checksum: str):
            self.proof_ = {"version": version, "checksum": checksum, "sampler": index}

        def proof(self) -> dict:
            return self.proof_

        def trainable_bytes(self) -> int:
            return 1024

        def weights_info(self) -> tuple[int, str]:
            return self.proof_["version"], self.proof_["checksum"]

    old = {0: StubWorker.remote(0, 0, "c0"), 1: StubWorker.remote(1, 0, "c0")}
    new = {2: StubWorker.remote(2, 4, "c4"), 3: StubWorker.remote(3, 4, "c4")}
    cfg = load_config("tiny-cpu", ["runtime.overlap=false", "runtime.placement=hybrid"])
    sync, published, nbytes = start_publishing(old[0], cfg.runtime, hybrid=True)
    assert isinstance(sync, InPlace) and (published.version, published.to_load(), nbytes) == (0, None, 1024)
    book = FakeBook()
    pool = SamplerPool(cfg, book, published, sync, faults=[], spawn=None)
    pool.adopt(old)
    assert pool.members.actors == old and pool.members.busy == {0: 0, 1: 0} and not pool.members.joining
    ref = ray.put(None)
    pool.track(Job(1, [8, 9, 10], ref, ref, ref, ray.put("report")))
    pool.adopt(new)  # the group restarted on version 4: the lost group's call is lost with it
    assert book.drops == [("actor_lost", 3)] and pool.jobs == {} and pool.members.actors == new
    pool.broadcast(4, "c4")  # nothing sent: each worker proves what it holds
    assert sync.lost == [] and published.weights_ref is None
    with pytest.raises(
        RuntimeError, match="sampler 2 reports version 4 checksum c4 but the learner broadcast version 4"
    ):
        pool.broadcast(4, "c5")
    ray.kill(new[3])
    pool.lose(3)
    pool.autoscale(waited_s=10.0, step_s=1.0)  # the learner waited: a split pool would grow
    assert sorted(pool.members.actors) == [2] and pool.size() == 1
    for actor in [*old.values(), *new.values()]:
        ray.kill(actor)


# A fresh Ray instance whose node declares two GPUs (this process holds the session's instance, which declares none):
# two hybrid workers ask one GPU each, form the learner group, and worker 1 is killed once two epochs are logged.
ON_TWO_GPUS = """
import json, sys, threading, time
import ray
ray.init(address="local", num_cpus=8, num_gpus=2, namespace="fdfo", include_dashboard=False,
         logging_level="WARNING", log_to_driver=False)
from cluster.config import load_config
from cluster.runtime import run_ray
out, gpus, tmp = {}, {}, sys.argv[1]
cfg = load_config("tiny-cpu", [
    "runtime.placement=hybrid", "runtime.overlap=false", "runtime.learner.count=2", "runtime.learner.num_gpus=1",
    "train.epochs=6", "train.checkpoint_every=4", "train.pairs_per_epoch=8", "train.updates_per_epoch=2",
    "sampling.pairs_per_call=2", "sampling.num_steps=4", "output_dir=" + tmp])
run = threading.Thread(target=lambda: out.update(run_ray(cfg)))
run.start()
history, deadline = __import__("pathlib").Path(tmp, "tiny-cpu", "history.jsonl"), time.monotonic() + 300
while time.monotonic() < deadline and not (history.exists() and history.read_text().count("\\n") >= 2):
    time.sleep(0.1)
workers = [ray.get_actor(f"fdfo/worker/{i}") for i in (0, 1)]
gpus = ray.get([w.gpu_ids.remote() for w in workers])
ray.kill(workers[1])
run.join(timeout=600)
print(json.dumps({"gpus": gpus, **{k: out[k] for k in ("ledger", "faults", "learner_ranks", "samplers", "version")},
                  "epochs": [h["epoch"] for h in out["history"]], "lags": [h["learner/policy_lag_max"] for h in
                  out["history"]]}))
"""


@pytest.mark.slow
def test_workers_on_declared_gpus_form_the_group_and_a_lost_worker_is_survived(tmp_path):
    """A fresh Ray instance (its node declaring two GPUs) in a subprocess, six lock-step epochs of the tiny SD3 on two
    hybrid workers and a restart of their group from a checkpoint: about a minute on two cores."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ON_TWO_GPUS, str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(out["gpus"]) == [["0"], ["1"]]  # one declared GPU each
    assert out["learner_ranks"] == 2
    (fault,) = out["faults"]  # worker 1 was a sampler and learner rank 1: its group restarted from a checkpoint
    assert fault["role"] == "learner" and fault["restored_version"] in (0, 4, 8)
    assert fault["rolled_back_pairs"] == (fault["epoch"] - fault["restored_epoch"]) * 8
    ledger = out["ledger"]
    assert ledger["pairs_trained"] == 6 * 8 and ledger["pairs_in_flight"] == 0 and out["version"] == 12
    assert set(ledger["pairs_dropped"]) <= {"actor_lost", "rolled_back", "stale"}
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert ledger["pairs_dropped"].get("rolled_back", 0) == fault["rolled_back_pairs"]
    assert out["epochs"] == list(range(6)) and max(out["lags"]) <= 1  # lock-step: 2 updates an epoch, lag <= 1
    # the pool's members are the new group's workers (indices 2 and 3), on the final version with the same weights
    assert [s["sampler"] for s in out["samplers"]] == [2, 3]
    assert {(s["version"], s["checksum"]) for s in out["samplers"]} == {(12, out["samplers"][0]["checksum"])}
