"""The Ray runtime end to end on a local Ray instance with the tiny SD3: versions, accounting, metrics,
checkpoints, staleness, a lost sampler and resume."""

import json
import re
import threading
import time
import urllib.request

import pytest
import torch

from cluster.config import load_config
from models.adapter import SD3Adapter
from models.lora import add_lora
from models.tiny import tiny_sd3_pipeline

BASE = [
    "train.epochs=4",
    "train.pairs_per_epoch=8",
    "train.updates_per_epoch=2",
    "sampling.pairs_per_call=4",
    "sampling.num_steps=4",
    "runtime.sampler.count=2",
    "runtime.sampler.num_cpus=1",
    "runtime.learner.num_cpus=1",
]


def prometheus_values(text: str, run: str) -> dict[str, float]:
    """{metric name without Ray's ``ray_`` prefix: value} of the samples tagged run="<run>" (the last one wins)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(?:ray_)?(fdfo_[a-z_]+?)(?:_total)?\{(.*)\} ([0-9.eE+-]+)$", line)
        if m and f'run="{run}"' in m.group(2):
            out[m.group(1)] = float(m.group(3))
    return out


def run(tmp_path, extra, resume=False):
    from cluster.runtime import run_ray

    cfg = load_config("tiny-cpu", BASE + [f"output_dir={tmp_path}"] + extra)
    return cfg, run_ray(cfg, resume=resume)


def run_and_kill(tmp_path, extra, actor: str, after_epochs: int) -> dict:
    """A run in a thread whose actor named ``actor`` is killed once ``after_epochs`` epochs are logged; its summary."""
    import ray

    result = {}
    t = threading.Thread(target=lambda: result.update(out=run(tmp_path, extra)[1]))
    t.start()
    history = tmp_path / "tiny-cpu" / "history.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (history.exists() and history.read_text().count("\n") >= after_epochs):
        time.sleep(0.1)
    ray.kill(ray.get_actor(actor))
    t.join(timeout=300)
    return result["out"]


def test_end_to_end_versions_accounting_metrics_checkpoint(ray_local, tmp_path):
    # a run name of its own: Ray's counters live as long as the process, and other tests run tiny-cpu in it too
    cfg, out = run(
        tmp_path,
        ["name=e2e", "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.lr=1e-2", "train.checkpoint_every=4"],
    )
    ledger = out["ledger"]
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert ledger["pairs_trained"] == 32 and ledger["pairs_in_flight"] == 0
    assert out["version"] == 8 and [h["learner/version"] for h in out["history"]] == [2, 4, 6, 8]
    # every sampler holds the final version, proven by checksum
    statuses = out["samplers"]
    assert [s["sampler"] for s in statuses] == [0, 1]
    final_checksum = json.loads((tmp_path / "e2e" / "checkpoints" / "v000008" / "state.json").read_text())["checksum"]
    assert all(s["version"] == 8 and s["checksum"] == final_checksum and s["pending_pairs"] == 0 for s in statuses)
    # each actor runs the torch threads its CPU reservation gives it; every call's version was proven (8 calls)
    assert [s["torch_threads"] for s in statuses] == [1, 1] and out["torch_threads"] == {"learner": 1, "reward": [1]}
    assert set(out["sampled_versions"]) <= set(range(8)) and sum(out["sampled_versions"].values()) == 8
    assert max(h["learner/policy_lag_max"] for h in out["history"]) <= 3
    # the metrics endpoint serves the run's gauges and counters with their values (export is periodic: poll)
    url, want = (
        f"http://127.0.0.1:{ray_local['metrics_port']}/metrics",
        {"fdfo_weight_version": 8.0, "fdfo_pairs_trained": 32.0},
    )
    for _ in range(60):
        values = prometheus_values(urllib.request.urlopen(url, timeout=5).read().decode(), run=cfg.name)
        if all(values.get(k) == v for k, v in want.items()):
            break
        time.sleep(1)
    assert {k: values.get(k) for k in want} == want
    assert values["fdfo_reward_component_mean"] == pytest.approx(out["history"][-1]["reward/jpeg_compressibility/mean"])
    # the LoRA checkpoint loads into a fresh diffusers pipeline and reproduces the trained velocity
    folder = tmp_path / "e2e" / "checkpoints" / "v000008"
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.load_lora_weights(str(folder))
    loaded = SD3Adapter(pipe)
    from safetensors.torch import load_file

    trained = SD3Adapter.tiny(seed=0)
    add_lora(trained.transformer, 4, 8)
    trained.transformer.load_state_dict(load_file(str(folder / "trainable.safetensors")), strict=False)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trained.encode_prompts(["a red circle", "a black cat"])
    v_trained = trained.velocity(x, torch.tensor(0.5), cond)
    v_loaded = loaded.velocity(x, torch.tensor(0.5), cond)
    v_base = SD3Adapter.tiny(seed=0).velocity(x, torch.tensor(0.5), cond)
    assert torch.allclose(v_loaded, v_trained, atol=1e-5)
    assert not torch.allclose(v_trained, v_base, atol=1e-5)  # the LoRA did change the model


# tiny-cpu's overlapped shape: 8 pairs an epoch in 2 updates, pairs at most 3 versions old when trained
LAG_BATCHING = dict(
    pairs_per_epoch=8,
    rows_per_epoch=64,
    updates_per_epoch=2,
    timestep_fraction=1.0,
    micro_batch_rows=64,
    max_policy_lag=3,
)


def test_worst_lag_of_a_request_by_hand():
    from cluster.config import Batching
    from cluster.runtime import worst_lag

    b = Batching(**LAG_BATCHING)
    # no update running at version 6: pairs 0-7 train in the next epoch (versions 6 -> 8, worst lag 1), 8-15 in the
    # one after (lag 3: sampled at 6, trained up to the step that makes version 9)
    assert [worst_lag(6, None, ahead, b) for ahead in (0, 7, 8, 15, 16)] == [1, 1, 3, 3, 5]
    # an epoch running with both its steps left: the next epoch starts at 8, so a pair sampled now at 6 reaches 3
    assert [worst_lag(6, 2, ahead, b) for ahead in (0, 8)] == [3, 5]
    # its first step published (version 7, one step left): sampling now costs one version less
    assert [worst_lag(7, 1, ahead, b) for ahead in (0, 8)] == [2, 4]


def test_a_request_past_the_final_epoch_lands_in_it():
    # the run's last epoch takes every pair left, so a request that lands in it is judged by its lag there: a run
    # whose drops left more than one epoch's worth ready at its final epoch still requests the pairs it lacks (it
    # stalled before: .ci/cluster-check's worker-container kill)
    from cluster.config import Batching
    from cluster.runtime import worst_lag

    B = Batching(**LAG_BATCHING)
    # version 298, no update running, 16 pairs ready (two epochs' worth after drops) and only the final epoch left:
    # the pair joins the final epoch (versions 298 -> 300, worst lag 1), not a third epoch that will never run
    assert worst_lag(298, None, 16, B, epochs_to_start=1) == 1
    # with no end in sight the same queue position is two epochs further on: sampled at 298, trained up to 303
    assert worst_lag(298, None, 16, B) == 5
    # two epochs left: the queue's second epoch is the last, so ahead 16 and ahead 24 both land there (lag 3)
    assert [worst_lag(298, None, ahead, B, epochs_to_start=2) for ahead in (0, 8, 16, 24)] == [1, 3, 3, 3]
    # an update running with one step left (version 299): the next epoch starts at 300; its last update is 301
    assert worst_lag(299, 1, 40, B, epochs_to_start=1) == 2


def test_the_final_epoch_is_never_out_of_reach_of_the_lag_bound():
    from cluster.config import Batching
    from cluster.runtime import worst_lag

    B = Batching(**LAG_BATCHING)
    # whatever is ready, a request while the final epoch waits is within the bound of every lag setting the
    # schedule allows (max_policy_lag >= updates_per_epoch - 1), so the run can always complete its pairs
    for ahead in range(0, 200, 8):
        assert worst_lag(10, None, ahead, B, epochs_to_start=1) == B.updates_per_epoch - 1 <= B.max_policy_lag


def test_slow_learner_never_trains_beyond_max_policy_lag(ray_local, tmp_path):
    # one row per micro-batch makes the learner slow. With max_policy_lag = updates_per_epoch - 1 a pair sampled
    # while it trains would be stale, so samplers wait: nothing is dropped and every call samples with the version
    # an epoch starts from (proven by checksum against what the learner published)
    cfg, out = run(tmp_path, ["train.micro_batch_rows=1", "train.max_policy_lag=1"])
    assert out["ledger"] == {"pairs_requested": 32, "pairs_trained": 32, "pairs_dropped": {}, "pairs_in_flight": 0}
    assert max(h["learner/policy_lag_max"] for h in out["history"]) == 1
    assert set(out["sampled_versions"]) == {0, 2, 4, 6} and sum(out["sampled_versions"].values()) == 8


def reward_kill_with_backlog(monkeypatch) -> dict:
    """Kill ``fdfo/reward/0`` from the driver, right after a call lands in epoch 2 or later while it holds requests not
    yet scored. Returns what it held: {"pairs": pairs of requests routed to it and unscored at the kill, plus those
    routed to it after (until its replacement), "killed": True once done}."""
    import ray

    from cluster.reward_pool import RewardPool
    from cluster.runtime import RayRun
    from cluster.sampler_pool import SamplerPool

    held, served_by, dead = {"pairs": 0, "killed": False}, {}, []
    score, track, on_job = RewardPool.score, SamplerPool.track, RayRun.on_job

    def scoring(self, images, prompts, route):
        ref = score(self, images, prompts, route)
        served_by[ref] = self.actors[route % len(self.actors)] if self.actors else None
        return ref

    def tracking(self, job):
        track(self, job)
        if dead and served_by.get(job.out_ref) is dead[0]:  # sent to the dead actor before the driver knew
            held["pairs"] += len(job.pair_ids)

    def landing(self, ref):
        on_job(self, ref)
        if held["killed"] or self.book.epoch < 2:
            return
        reward0 = self.rewards.actors[0]
        mine = [job for job in self.samplers.jobs.values() if served_by.get(job.out_ref) is reward0]
        unscored = set(ray.wait([j.out_ref for j in mine], num_returns=len(mine), timeout=0)[1]) if mine else set()
        if unscored:
            held.update(pairs=sum(len(j.pair_ids) for j in mine if j.out_ref in unscored), killed=True)
            dead.append(reward0)
            ray.kill(reward0)

    monkeypatch.setattr(RewardPool, "score", scoring)
    monkeypatch.setattr(SamplerPool, "track", tracking)
    monkeypatch.setattr(RayRun, "on_job", landing)
    return held


@pytest.mark.parametrize("role", ["sampler", "reward"])
def test_a_killed_actor_costs_only_its_pairs(ray_local, tmp_path, monkeypatch, role):
    # two pairs per call keep 2 jobs queued on each sampler almost all the time: it dies holding pairs. The reward
    # actor is killed from the driver while it holds unscored requests: the pairs lost are at most those it held
    # (a request already scored when it died is kept)
    extra = ["train.epochs=12", "train.pairs_per_epoch=16", "sampling.num_steps=8", "sampling.pairs_per_call=2"]
    if role == "sampler":
        out = run_and_kill(tmp_path, extra, "fdfo/sampler/1", 2)
    else:
        held = reward_kill_with_backlog(monkeypatch)
        out = run(tmp_path, extra)[1]
        assert held["killed"] and held["pairs"] > 0
    ledger = out["ledger"]
    # a request waiting for the replacement reward actor (it starts its scorers first) may land past its epoch and be
    # dropped as stale; a lost sampler's are simply sampled again
    assert set(ledger["pairs_dropped"]) <= {"actor_lost"} | ({"stale"} if role == "reward" else set())
    assert ledger["pairs_in_flight"] == 0
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert len(out["history"]) == 12 and ledger["pairs_trained"] == 12 * 16  # the lost pairs were sampled again
    (fault,) = out["faults"]
    if role == "sampler":
        # the lost sampler was replaced (indices are not reused) and the replacement got the current weights
        assert ledger["pairs_dropped"]["actor_lost"] > 0
        assert {k: fault[k] for k in ("role", "lost", "replaced_by")} == {
            "role": "sampler",
            "lost": 1,
            "replaced_by": [2],
        }
        assert [s["sampler"] for s in out["samplers"]] == [0, 2]
    else:
        # a new reward actor took the dead one's place; both samplers lived on and freed what they held for it; the
        # loss is bounded by what the dead actor held
        assert {k: fault[k] for k in ("role", "lost", "replaced_by")} == {"role": "reward", "lost": 0, "replaced_by": 1}
        assert 0 < ledger["pairs_dropped"]["actor_lost"] <= held["pairs"]
        assert [s["sampler"] for s in out["samplers"]] == [0, 1]
        assert all(s["pending_pairs"] == 0 for s in out["samplers"])
    assert all(s["version"] == out["version"] for s in out["samplers"])


def test_a_lost_learner_restarts_from_the_last_checkpoint(ray_local, tmp_path, monkeypatch):
    # overlapped, two samplers, a checkpoint every 4 versions (2 epochs): the learner is killed from the driver while an
    # epoch is being updated and a batch sampled with a version past the last checkpoint waits ready. A new one
    # restores the last checkpoint, the epochs since are trained again, pairs sampled with the lost versions are
    # dropped as stale, and the run ends with every epoch trained exactly once on the surviving lineage
    import ray

    from cluster.ready import ReadyBatches
    from cluster.runtime import RayRun
    from cluster.weight_sync import Published

    records, taken, kill = [], [], {}  # records: what the learner published, in order, and each restore
    record, restore, take, start_update, on_job = (
        Published.record,
        Published.restore,
        ReadyBatches.take,
        RayRun.start_update,
        RayRun.on_job,
    )
    epoch_now = [0]

    def recording(self, version, checksum):
        records.append(("record", version, checksum))
        record(self, version, checksum)

    def restoring(self, version, checksum):
        records.append(("restore", version, checksum))
        restore(self, version, checksum)

    def taking(self, pairs):
        out = take(self, pairs)
        taken.append((epoch_now[0], [batch.sampled_with for batch in out]))
        return out

    def starting(self):
        epoch_now[0] = self.book.epoch
        return start_update(self)

    def landing(self, ref):
        on_job(self, ref)
        past = [b for b in self.ready.batches if b.sampled_with[0] > self.book.last_checkpoint]
        if not kill and self.book.epoch >= 3 and self.update is not None and past:
            kill.update(checkpoint=self.book.last_checkpoint, ready_past=len(past))
            ray.kill(self.learners.lead)

    for cls, name, fn in [
        (Published, "record", recording),
        (Published, "restore", restoring),
        (ReadyBatches, "take", taking),
        (RayRun, "start_update", starting),
        (RayRun, "on_job", landing),
    ]:
        monkeypatch.setattr(cls, name, fn)
    out = run(tmp_path, ["train.epochs=6", "train.checkpoint_every=4", "sampling.pairs_per_call=2"])[1]
    assert kill and kill["ready_past"] > 0
    (fault,) = out["faults"]
    assert {k: fault[k] for k in ("role", "lost", "replaced_by")} == {"role": "learner", "lost": 0, "replaced_by": 1}
    # restored from the checkpoint the driver last wrote (version 4 or 8, closing epoch 2 or 4); rolled back since
    assert fault["restored_version"] == kill["checkpoint"] and kill["checkpoint"] in (4, 8)
    assert fault["restored_epoch"] == fault["restored_version"] // 2
    assert fault["restored_from"].endswith(f"v{fault['restored_version']:06d}")
    assert fault["rolled_back_pairs"] == (fault["epoch"] - fault["restored_epoch"]) * 8
    ledger = out["ledger"]
    assert set(ledger["pairs_dropped"]) <= {"actor_lost", "rolled_back", "stale"} and ledger["pairs_in_flight"] == 0
    assert ledger["pairs_dropped"].get("rolled_back", 0) == fault["rolled_back_pairs"]
    assert ledger["pairs_dropped"].get("stale", 0) > 0  # the ready batches of the lost versions went
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert ledger["pairs_trained"] == 6 * 8 and out["version"] == 12
    assert [h["epoch"] for h in out["history"]] == list(range(6))
    assert all(s["version"] == 12 for s in out["samplers"])
    # the lost lineage: what the lost learner published past the restored version (or at it, with another checksum)
    (at,) = [i for i, r in enumerate(records) if r[0] == "restore"]
    _, restored, restored_checksum = records[at]
    lost = {(v, c) for kind, v, c in records[:at] if v > restored or (v == restored and c != restored_checksum)}
    assert lost and restored == fault["restored_version"]
    # what every surviving epoch was trained on (a rolled-back epoch's last take wins): none of it of the lost lineage,
    # all of it of the surviving lineage (sampled with versions below the epoch's start, each proven by its checksum)
    trained = dict(taken)
    assert sorted(trained) == list(range(6))
    sampled = [sw for batches in trained.values() for sw in batches]
    assert not set(sampled) & lost
    survived = {v: c for kind, v, c in records[at:]} | {v: c for kind, v, c in records[:at] if v < restored}
    assert all(v == 0 or survived[v] == c for v, c in sampled)
    assert all(v <= 2 * epoch for epoch, batches in trained.items() for v, _ in batches)


def test_a_learner_lost_writing_the_final_checkpoint_is_restored_and_the_last_epoch_trained_again(
    ray_local, tmp_path, monkeypatch
):
    # 4 epochs of 2 updates, a checkpoint every 5 versions: version 6 (epoch 3) is the last one before the end, and the
    # final version 8 is written by final_checkpoint, during which the learner dies (as when its node is removed as
    # the run ends): restored from version 6, epoch 4 is trained again, and the run finishes instead of failing
    import ray

    from cluster.recovery import LearnerRecovery

    final_checkpoint, killed = LearnerRecovery.final_checkpoint, []

    def dying(self):
        if not killed:
            killed.append(self.book.version)
            ray.kill(self.learners.lead)
        return final_checkpoint(self)

    monkeypatch.setattr(LearnerRecovery, "final_checkpoint", dying)
    _, out = run(tmp_path, ["runtime.overlap=false", "train.checkpoint_every=5"])
    (fault,) = out["faults"]
    assert killed == [8] and fault["role"] == "learner" and fault["epoch"] == 4 and fault["lost_version"] == 8
    assert (fault["restored_version"], fault["restored_epoch"], fault["rolled_back_pairs"]) == (6, 3, 8)
    ledger = out["ledger"]
    assert ledger["pairs_trained"] == 32 and ledger["pairs_dropped"] == {"rolled_back": 8} and out["version"] == 8
    assert out["paths"]["checkpoint"].endswith("v000008") and [h["epoch"] for h in out["history"]] == [0, 1, 2, 3]


def test_a_learner_group_trains_and_survives_losing_a_rank(ray_local, tmp_path):
    # two learner ranks in one gloo group (each its share of every update's rows, gradients summed); rank 1 is
    # killed mid-run: the group restarts from the last checkpoint (rank 0 alone cannot step) and the run completes
    out = run_and_kill(
        tmp_path,
        ["runtime.learner.count=2", "train.epochs=6", "train.checkpoint_every=4", "runtime.sampler.count=1"],
        "fdfo/learner/rank1",
        3,
    )
    assert out["learner_ranks"] == 2
    (fault,) = out["faults"]
    assert fault["role"] == "learner" and fault["restored_version"] in (4, 8)
    ledger = out["ledger"]
    assert ledger["pairs_trained"] == 6 * 8 and out["version"] == 12 and ledger["pairs_in_flight"] == 0
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert all(s["version"] == 12 for s in out["samplers"])


LOCK = ["runtime.overlap=false", "runtime.sampler.count=1", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_local):
    """The lock-step run both resume tests compare with, run once: (its folder, its summary)."""
    folder = tmp_path_factory.mktemp("whole")
    return folder, run(folder, LOCK)[1]


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_resume_continues_counters_and_weights(uninterrupted, tmp_path, monkeypatch, stop):
    # in lock-step a Ray run is deterministic: stopped after its mid-run checkpoint (epoch 2 of 4) and resumed, it
    # ends with the uninterrupted run's weights and AdamW moments, its counters and pair ids continuing
    from safetensors.torch import load_file

    from tests.helpers import stop_after_epoch

    lock, (whole_dir, whole) = LOCK, uninterrupted
    stop_after_epoch(monkeypatch, 2, stop)  # a crash, or Ctrl-C / `ray job stop` (a checkpoint as it stops)
    with pytest.raises(stop):
        run(tmp_path / "resumed", lock)
    monkeypatch.undo()
    _, resumed = run(tmp_path / "resumed", lock, resume=True)
    first = 2 if stop is RuntimeError else 3
    assert resumed["version"] == whole["version"] == 8 and [h["epoch"] for h in resumed["history"]] == list(
        range(first, 4)
    )
    assert resumed["samplers"][0]["checksum"] == whole["samplers"][0]["checksum"]
    assert (
        resumed["ledger"]
        == whole["ledger"]
        == {"pairs_requested": 32, "pairs_trained": 32, "pairs_dropped": {}, "pairs_in_flight": 0}
    )
    assert [h["reward/mean"] for h in resumed["history"]] == [h["reward/mean"] for h in whole["history"][first:]]
    final = lambda root: root / "tiny-cpu" / "checkpoints" / "v000008"  # noqa: E731
    a, b = (
        load_file(str(final(whole_dir) / "optimizer.safetensors")),
        load_file(str(final(tmp_path / "resumed") / "optimizer.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path / "fresh", ["train.epochs=1"], resume=True)


def test_sampler_pool_grows_when_the_learner_waits_for_data(ray_local, tmp_path):
    # one pair per sampler call (a Ray round trip each) and one update per epoch on a single micro-batch: the
    # learner idles waiting for pairs, so the driver asks Ray for a second sampler (up to runtime.sampler.max_count),
    # which loads the current weights before it samples
    _, out = run(
        tmp_path,
        [
            "runtime.sampler.count=1",
            "runtime.sampler.max_count=2",
            "sampling.num_steps=20",
            "sampling.pairs_per_call=1",
            "train.updates_per_epoch=1",
            "train.micro_batch_rows=1024",
            "train.epochs=3",
        ],
    )
    counts = [h["runtime/samplers"] for h in out["history"]]
    assert counts[0] == 1 and counts[-1] == 2 and max(counts) == 2  # grown after epoch 0, never past the ceiling
    assert [s["sampler"] for s in out["samplers"]] == [0, 1]
    assert all(s["version"] == out["version"] for s in out["samplers"])
    assert out["ledger"]["pairs_trained"] == 24 and out["ledger"]["pairs_dropped"] == {}


def test_auto_sampler_count_is_resolved_on_the_cluster(ray_local, tmp_path, caplog):
    # lock-step, 8 CPUs: room for (8 - 1 learner CPU - 0.5 reward CPU) / 1 = 6 samplers, capped by max_count = 2
    with caplog.at_level("INFO", logger="fdfo"):
        _, out = run(
            tmp_path,
            ["runtime.sampler.count=auto", "runtime.sampler.max_count=2", "runtime.overlap=false", "train.epochs=2"],
        )
    assert (
        "runtime.sampler.count=auto: 2 sampler(s) at start, up to 2: lock-step: all that fit (8 CPUs - 1.5"
        in caplog.text
    )
    assert [s["sampler"] for s in out["samplers"]] == [0, 1]
    assert [h["runtime/samplers"] for h in out["history"]] == [2, 2] and out["ledger"]["pairs_trained"] == 16
    # runtime.throughput only feeds auto: set without it, the run refuses before it connects
    with pytest.raises(ValueError) as e:
        run(tmp_path, ["runtime.throughput=bench/results/gpu_throughput.json"])
    assert str(e.value) == (
        "runtime.throughput (bench/results/gpu_throughput.json) is read only by "
        "runtime.sampler.count=auto, but runtime.sampler.count is 2: set runtime.sampler.count=auto or drop "
        "runtime.throughput"
    )
