"""cluster/plan.py (`fdfo plan`): the split arithmetic by hand and in closed form, the default rates against the
issue's figures, the preset's reward GPUs and gradient bytes, and the command line."""

import json
import math
from itertools import product

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.plan import (
    Rates,
    Workload,
    auto_samplers,
    best_split,
    continuous_samplers,
    default_rates,
    gradient_bytes,
    load_rates,
    plan,
    reward_gpus,
    sampler_room,
    scaling_efficiency,
)


def test_lockstep_split_by_hand():
    # a = 1 sampler GPU-s, b = 4 learner GPU-s, 3 GPUs: S / L = sqrt(1 / 4) -> S = 3 x 1 / 3 = 1
    w = Workload(images=1, a=1.0, b=4.0)
    assert continuous_samplers(w, 3, overlap=False) == pytest.approx(1.0)
    assert best_split(w, 3, overlap=False) == (1, 2)
    assert w.epoch_s(1, 2, overlap=False) == 1 / 1 + 4 / 2 == 3.0
    assert w.epoch_s(2, 1, overlap=False) == 1 / 2 + 4 / 1 == 4.5  # the other split is worse
    # a = 2, b = 6, 8 GPUs: S = 8 / (1 + sqrt(3)) = 2.93 -> 3 + 5: 2/3 + 6/5 = 28/15 beats 2 + 6 and 4 + 4 (both 2)
    w = Workload(images=1, a=2.0, b=6.0)
    assert continuous_samplers(w, 8, overlap=False) == pytest.approx(8 / (1 + math.sqrt(3)))
    assert best_split(w, 8, overlap=False) == (3, 5) and w.epoch_s(3, 5, overlap=False) == pytest.approx(28 / 15)


def test_overlap_balances_the_two_roles():
    # overlap: the epoch is the slower role; it is balanced where a / S = b / L, i.e. S = C a / (a + b)
    w = Workload(images=1, a=2.0, b=6.0)
    assert continuous_samplers(w, 8, overlap=True) == pytest.approx(2.0)
    assert best_split(w, 8, overlap=True) == (2, 6) and w.epoch_s(2, 6, overlap=True) == 1.0  # 2/2 = 6/6
    w = Workload(images=1, a=1.0, b=4.0)
    assert best_split(w, 3, overlap=True) == (1, 2) and w.epoch_s(1, 2, overlap=True) == 2.0  # max(1, 2)


def test_allreduce_cost_and_its_closed_form():
    # train(L) = b / L + k (1 - 1 / L): no all-reduce with one rank, k (M - 1) / M with M ranks
    w = Workload(images=1, a=4.0, b=5.0, k=1.0)
    assert [w.train_s(1), w.train_s(2), w.train_s(4)] == [5.0, 2.5 + 0.5, 1.25 + 0.75]
    # overlap on 4 GPUs: 4 / S = 4 / (4 - S) + 1  <=>  S^2 - 12 S + 16 = 0  ->  S = 6 - sqrt(20)
    assert continuous_samplers(w, 4, overlap=True) == pytest.approx(6 - math.sqrt(20))
    # lock-step: S / L = sqrt(a / (b - k)) = 1 -> S = 2
    assert continuous_samplers(w, 4, overlap=False) == pytest.approx(2.0)
    # an all-reduce that outweighs the work leaves one learner rank
    assert best_split(Workload(images=1, a=1.0, b=1.0, k=2.0), 5, overlap=False) == (4, 1)


@pytest.mark.parametrize("overlap", [False, True])
def test_rounded_closed_form_is_the_best_integer_split(overlap):
    for a, b, k, gpus in product([0.3, 1.0, 7.0], [0.5, 2.3, 40.0], [0.0, 0.05, 0.4], [2, 3, 7, 30]):
        w = Workload(images=1, a=a, b=b, k=k)
        brute = min(w.epoch_s(s, gpus - s, overlap) for s in range(1, gpus))
        assert w.epoch_s(*best_split(w, gpus, overlap), overlap) == pytest.approx(brute), (a, b, k, gpus)


def test_scaling_efficiency():
    # images per GPU-second at G over those at G0: G0 x epoch(G0) / (G x epoch(G))
    assert scaling_efficiency(4, 100.0, 32, 12.5) == 1.0  # 8x the GPUs, 1/8 of the time
    assert scaling_efficiency(4, 100.0, 32, 15.0) == pytest.approx(400 / 480)


def test_default_rates_reproduce_the_issues_figures():
    r = default_rates()
    # 0.50 images/GPU-s = 2.0 GPU-s per image, split 40 : 92 -> 0.606 s sampling, 1.394 s training
    assert (r.sampler_ips, r.learner_ips) == (pytest.approx(1.65), pytest.approx(0.5 * 132 / 92))
    # sd35m-combined's 4 samplers + 1 learner, overlapped: the learner takes 864 / 0.717 = 1,204 s an epoch, 2.8 x the
    # reference's 432 s, with the samplers 11 % busy
    w = Workload(images=864, a=864 / r.sampler_ips, b=864 / r.learner_ips)
    assert w.epoch_s(4, 1, overlap=True) == pytest.approx(1204.36, abs=0.01)
    assert w.epoch_s(4, 1, overlap=True) / 432 == pytest.approx(2.79, abs=0.01)
    assert (w.a / 4) / w.epoch_s(4, 1, overlap=True) == pytest.approx(0.109, abs=0.001)
    # and the reference's own layout back: 4 GPUs each sampling then training a quarter of the epoch take 432 s
    assert w.a / 4 + w.b / 4 == pytest.approx(432.0)


def test_preset_reward_gpus_and_gradient_bytes():
    combined = load_config("sd35m-combined")
    assert reward_gpus(combined) == (2, "1 reward actor(s) x 1 GPU + 1 VLM judge server(s)")
    assert reward_gpus(load_config("sd35m-pickscore"))[0] == 1
    assert gradient_bytes(combined) == 4 * 191 * 32 * 3072 == 75_104_256  # fp32 LoRA gradients, 18.8 M params
    assert gradient_bytes(load_config("sd35m-combined", ["lora.enabled=false"])) == 4 * 2_243_171_520
    with pytest.raises(ValueError, match=r"model.kind=shapes: give --gradient-mb"):
        gradient_bytes(load_config("shapes"))


def test_plan_rows_on_the_combined_preset():
    cfg = load_config("sd35m-combined")
    p = plan(cfg, [4, 8], Rates(2.0, 1.0), overlap=True, bandwidth_gbps=25.0)
    a, b, k = 864 / 2.0, 864 / 1.0, 4 * 2 * 75_104_256 / 25e9
    assert p["workload"] == pytest.approx({"images": 864, "a": a, "b": b, "k": k})
    four, eight = p["rows"]
    # 4 GPUs: 2 hold the reward pool, 1 sampler + 1 learner: epoch = max(432, 864)
    assert (four["samplers"], four["learners"], four["epoch_s"]) == (1, 1, 864.0)
    # 8 GPUs: 6 left; a / S = (b - k) / L + k near S = 6 a / (a + b) = 2 -> 2 samplers + 4 learners
    assert (eight["samplers"], eight["learners"]) == (2, 4)
    assert eight["epoch_s"] == pytest.approx(max(a / 2, (b - k) / 4 + k))
    assert eight["images_per_gpu_s"] == pytest.approx(864 / (eight["epoch_s"] * 8))
    assert eight["efficiency"] == pytest.approx(4 * 864 / (8 * eight["epoch_s"]))
    assert eight["colocated_epoch_s"] == pytest.approx(a / 6 + (b - k) / 6 + k)
    assert "runtime.sampler.count=2" in eight["overrides"] and "runtime.learner.count=4" in eight["overrides"]


def test_too_few_gpus_is_an_error_that_names_the_need():
    with pytest.raises(ValueError) as e:
        plan(load_config("sd35m-combined"), [8, 3], default_rates(), overlap=False)
    assert str(e.value) == (
        "--gpus 3 is too few for sd35m-combined: its reward pool takes 2 GPU(s) (1 reward actor(s) x 1 GPU + 1 VLM "
        "judge server(s)) and sampling and training need at least 1 GPU each: give --gpus 4 or more (or fewer "
        "--reward-gpus)"
    )


def test_rates_from_the_bench_json_scale_to_the_presets_steps(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"sampler_images_per_s": 3.0, "learner_images_per_s": 1.5, "steps": 20}))
    r = load_rates(str(path), learner_ips=1.2)
    assert (r.sampler_ips, r.learner_ips, r.steps) == (3.0, 1.2, 20)
    # measured at 20 steps, the preset samples 40: an image costs twice the bench's
    p = plan(load_config("sd35m-pickscore"), [4], r, overlap=False)
    assert p["workload"]["a"] == pytest.approx(864 * 2 / 3.0) and p["workload"]["b"] == pytest.approx(864 * 2 / 1.2)
    path.write_text(json.dumps({"sampler_images_per_s": None, "learner_images_per_s": 1.5}))
    with pytest.raises(ValueError, match="has no sampler_images_per_s"):
        load_rates(str(path))


def test_cli_plan(capsys):
    assert (
        main(
            [
                "plan",
                "--gpus",
                "4",
                "32",
                "--sampler-ips",
                "2",
                "--learner-ips",
                "1",
                "--reward-gpus",
                "0",
                "--schedule",
                "lockstep",
                "overlap",
                "--json",
            ]
        )
        == 0
    )
    lock, over = json.loads(capsys.readouterr().out)
    assert (lock["schedule"], over["schedule"]) == ("lock-step", "overlap")
    # 4 GPUs, no reward pool, a = 432, b = 864: lock-step S / L = sqrt(1/2) -> 2 + 2; overlap S = 4/3 -> 1 + 3
    assert next((r["samplers"], r["learners"]) for r in lock["rows"]) == (2, 2)
    assert next((r["samplers"], r["learners"]) for r in over["rows"]) == (1, 3)
    assert main(["plan", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "sd35m-combined, lock-step" in out
    assert (
        "8 GPUs: runtime.overlap=false runtime.sampler.count=2 runtime.sampler.max_count=2 runtime.learner.count=4"
        in out
    )


def test_auto_samplers_lockstep_takes_every_sampler_that_fits():
    # sd35m-combined: 1 GPU per sampler, per learner rank and per reward actor; 2 learner ranks, reward pool of 2
    cfg = load_config(
        "sd35m-combined", ["runtime.sampler.count=auto", "runtime.learner.count=2", "runtime.reward.max_count=2"]
    )
    assert sampler_room(cfg.runtime, {"GPU": 8.0, "CPU": 64.0}, learners=2, rewards=2) == (
        4,
        "8 GPUs - 4 for 2 learner rank(s) and 2 reward actor(s) = 4, / 1 per sampler = 4",
    )
    start, ceiling, why = auto_samplers(cfg, {"GPU": 8.0, "CPU": 64.0}, default_rates())
    assert (start, ceiling) == (4, 4) and why.startswith("lock-step: all that fit (8 GPUs - 4")
    # runtime.sampler.max_count caps it; a cluster with no room still gets one sampler (the resource check then says why)
    capped = load_config("sd35m-combined", ["runtime.sampler.count=auto", "runtime.sampler.max_count=3"])
    assert auto_samplers(capped, {"GPU": 16.0}, default_rates())[:2] == (3, 3)
    assert auto_samplers(capped, {"GPU": 2.0}, default_rates())[:2] == (1, 1)


def test_auto_samplers_overlap_starts_enough_to_keep_the_learner_busy():
    cfg = load_config(
        "sd35m-combined", ["runtime.sampler.count=auto", "runtime.overlap=true", "runtime.learner.count=2"]
    )
    # a = 864 / 0.6 = 1,440 s; train(2) = (864 / 2.0 - k) / 2 + k with k = 4 x 2 x 75,104,256 B / 25 GB/s = 24 ms
    k = 4 * 2 * 75_104_256 / 25e9
    train = (432.0 - k) / 2 + k
    assert 1440 / train == pytest.approx(6.6663, abs=1e-4)  # -> 7 samplers keep 2 learner ranks busy
    # room: 16 GPUs - 2 learner ranks - 1 reward actor = 13; the pool may grow there when the learner waits
    start, ceiling, why = auto_samplers(cfg, {"GPU": 16.0}, Rates(0.6, 2.0))
    assert (start, ceiling) == (7, 13) and "-> 7 keep 2 learner rank(s) busy" in why
    assert auto_samplers(cfg, {"GPU": 6.0}, Rates(0.6, 2.0))[:2] == (3, 3)  # room for 3 only
    # CPU actors (no GPU asked): the unit is a CPU; tiny-cpu: 1 CPU per sampler and learner, 0.5 per reward actor
    tiny = load_config("tiny-cpu", ["runtime.sampler.count=auto"])
    assert sampler_room(tiny.runtime, {"CPU": 8.0}, learners=1, rewards=1) == (
        6,
        "8 CPUs - 1.5 for 1 learner rank(s) and 1 reward actor(s) = 6.5, / 1 per sampler = 6",
    )
