"""A sharded learner group (runtime.learner.sharding=fsdp): two Learner ranks, each a Ray actor (FSDP2 needs a process
per rank), take the update one unsharded Learner takes on the same rows, rank 0 publishes without a collective, an
uneven split pads instead of hanging, and checkpoints have one learner's layout: M=2 resumes at M=1 and back."""

import functools
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.config import Batching, learner_sharding, load_config
from learner.learner import Learner
from models.adapter import SD3Adapter
from tests.helpers import three_pair_batch


def cfg(*extra):
    # 3 pairs x 2 branches x 3 steps = 18 rows in 2 updates of 9: the ranks take 5 and 4 rows. Micro-batches of 5 make
    # each rank's share one micro-batch, so the group sums the single learner's two micro-batch terms in its order
    # (another order differs by float rounding, which AdamW magnifies in near-zero components: 1e-6 would not hold)
    return load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=3",
            "train.pairs_per_epoch=3",
            "train.updates_per_epoch=2",
            "train.micro_batch_rows=5",
            "train.lr=1e-2",
            "runtime.learner.count=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def batch():
    return three_pair_batch(cfg())


def single(*extra, dtype=torch.float32) -> Learner:
    c = cfg(*extra)
    return Learner(SD3Adapter.tiny(seed=0, dtype=dtype), c.train, Batching.of(c), c.lora, seed=0)


def sharded_group(*extra, dtype=torch.float32) -> list:
    """Two fsdp Learner ranks as Ray actors, joined (gloo), as cluster.runtime builds them."""
    import ray

    c = cfg(*extra)
    assert learner_sharding(c) == "fsdp"  # auto: full fine-tuning over 2 ranks
    remote = ray.remote(Learner).options(num_cpus=1)
    # the test process's torch threads: its single learner's matmuls then sum in the same order as the ranks'
    ranks = [
        remote.remote(
            model=functools.partial(SD3Adapter.tiny, seed=0, dtype=dtype),
            train=c.train,
            batching=Batching.of(c),
            lora=c.lora,
            seed=0,
            threads=torch.get_num_threads(),
            rank=r,
            world_size=2,
            sharding=learner_sharding(c),
        )
        for r in range(2)
    ]
    addr, port = ray.get(ranks[0].learner_group_address.remote(peers_on_this_node=True))
    ray.get(
        [r.join_learner_group.remote(master_addr=addr, master_port=port, backend="gloo", timeout_s=60) for r in ranks]
    )
    return ranks


def epoch(ranks, batch) -> list[dict]:
    import ray

    return ray.get([r.train_epoch.remote(batch) for r in ranks], timeout=120)


def layout(folder: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        torch.testing.assert_close(t, b[k], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def group(ray_local, batch):
    import ray

    ranks = sharded_group()
    yield ranks
    for r in ranks:
        ray.kill(r)


def test_two_sharded_ranks_make_the_update_of_one_learner_and_resume_either_way(group, batch, tmp_path):
    import ray

    one = single()
    start = one.weights().tensors
    want = one.train_epoch(batch)
    outs = epoch(group, batch)
    published = ray.get(group[0].weights.remote())  # rank 0 alone: the weights gathered after the last step
    published.verify()
    assert published.version == one.version == 2
    assert ray.get(group[1].weights_info.remote()) == (2, published.checksum)
    moved = max(float((one.weights().tensors[k] - start[k]).abs().max()) for k in start)
    assert moved > 0.01
    # the two ranks sum their gradients in another order than one learner does; AdamW divides by sqrt(v) and so
    # magnifies that float noise in components whose gradient is near zero: bound it by the move (on this machine's CPU
    # kernels one element in 4,096 differed by 1.6e-6 after a move above 0.01; none did on earlier machines), and the
    # sums themselves by the grad norm below
    tol = 1e-4 * moved
    close(published.tensors, one.weights().tensors, atol=tol)
    for key in ("learner/grad_norm", "learner/loss", "learner/rows", "learner/policy_lag_mean"):
        assert outs[0][key] == pytest.approx(want[key], rel=1e-5) == outs[1][key]

    # M=2 -> M=1: rank 0 writes one learner's layout (the others gather with it and return None) ...
    folders = ray.get(
        [r.save.remote(str(tmp_path / "m2"), {"epoch": 1}, {"train": {"keep_checkpoints": 0}}) for r in group]
    )
    assert folders[1] is None
    m2, m1 = folders[0], one.save(str(tmp_path / "m1"), {"epoch": 1}, {"train": {"keep_checkpoints": 0}})
    assert layout(m2) == layout(m1)
    saved, theirs = load_file(f"{m2}/optimizer.safetensors"), load_file(f"{m1}/optimizer.safetensors")
    assert saved.keys() == theirs.keys()
    for k in saved:  # indexed like one learner's AdamW, the same moments
        torch.testing.assert_close(saved[k], theirs[k], rtol=1e-5, atol=1e-9)
    # ... which one learner resumes: the published tensors and AdamW moments, bit for bit
    solo = single()
    assert solo.load(m2) == {"epoch": 1} and solo.weights_info() == (2, published.checksum)
    assert all(torch.equal(t, published.tensors[k]) for k, t in solo.weights().tensors.items())
    moments = {f"{i}.{k}": v for i, s in solo.opt.state_dict()["state"].items() for k, v in s.items()}
    assert moments.keys() == saved.keys() and all(torch.equal(moments[k], saved[k]) for k in saved)

    # M=1 -> M=2: the group resumes the single learner's checkpoint (every rank its chunks, then one gather) and the
    # next epoch from there is again one learner's
    assert ray.get([r.load.remote(m1) for r in group]) == [{"epoch": 1}] * 2
    assert ray.get(group[0].weights_info.remote()) == one.weights_info()
    one.train_epoch(batch)
    epoch(group, batch)
    close(ray.get(group[0].weights.remote()).tensors, one.weights().tensors, atol=tol)


def test_an_uneven_split_pads_the_short_rank_instead_of_hanging(ray_local, batch):
    # micro-batches of 2: the ranks' 5 and 4 rows are 3 and 2 micro-batches; the short rank runs one zero-weight
    # micro-batch, which adds no gradient and no metrics
    import ray

    ranks = sharded_group("train.micro_batch_rows=2")
    try:
        one = single("train.micro_batch_rows=2")
        start = one.weights().tensors
        want = one.train_epoch(batch)
        outs = epoch(ranks, batch)
        got = ray.get(ranks[0].weights.remote()).tensors
    finally:
        for r in ranks:
            ray.kill(r)
    w1 = one.weights().tensors
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    # the gradient sums run in another order than the single learner's (micro-batch by micro-batch over the ranks):
    # float rounding only, which AdamW magnifies in near-zero components; a padding row that counted would move the
    # weights by a share of the steps (and the gradient norm by a ninth)
    assert max(float((got[k] - w1[k]).abs().max()) for k in w1) < 1e-3 * moved
    assert outs[0]["learner/rows"] == want["learner/rows"] == 18
    for key in ("learner/grad_norm", "learner/loss", "learner/policy_lag_mean"):
        assert outs[0][key] == pytest.approx(want[key], rel=1e-5) == outs[1][key]


def test_bf16_sharded_ranks_train_fp32_masters_and_resume_at_one_rank_bit_for_bit(ray_local, batch, tmp_path):
    # bf16 weights: each rank's fp32 master shards take the steps and the bf16 weights are rounded from them, as the
    # single learner's fp32 masters (tests/learner/test_master_weights.py). The gradients differ by bf16 rounding
    # (each rank's bf16 gradient summed in fp32, against one learner's two micro-batches accumulated in bf16), so the
    # two agree to bf16's precision, not bit for bit; the M=2 checkpoint resumes at M=1 exactly.
    import ray

    ranks = sharded_group(dtype=torch.bfloat16)
    try:
        one = single(dtype=torch.bfloat16)
        start = one.weights().tensors
        want = one.train_epoch(batch)
        outs = epoch(ranks, batch)
        published = ray.get(ranks[0].weights.remote())
        folder = ray.get(
            [r.save.remote(str(tmp_path), {"epoch": 1}, {"train": {"keep_checkpoints": 0}}) for r in ranks]
        )[0]
        epoch(ranks, batch)  # one more epoch from the group's in-memory masters
        continued = ray.get(ranks[0].weights.remote())
    finally:
        for r in ranks:
            ray.kill(r)
    published.verify()
    assert {t.dtype for t in published.tensors.values()} == {torch.bfloat16}
    w1 = one.weights().tensors
    moved = max(float((w1[k].float() - start[k].float()).abs().max()) for k in w1)
    assert moved > 0.01  # an update at lr 1e-2 did not round away in bf16
    # the two updates agree to bf16 rounding: measured 4.8 % apart (L2) with 84 % of the elements identical; ranks
    # that stepped on their own rows alone, or counted a row twice, would be apart by a large share of the update
    d1 = torch.cat([(w1[k].float() - start[k].float()).flatten() for k in w1])
    d2 = torch.cat([(published.tensors[k].float() - start[k].float()).flatten() for k in w1])
    assert float((d2 - d1).norm() / d1.norm()) < 0.15 and float((d1 == d2).float().mean()) > 0.6
    assert outs[0]["learner/grad_norm"] == pytest.approx(want["learner/grad_norm"], rel=2e-2)
    solo = single(dtype=torch.bfloat16)
    assert solo.load(folder) == {"epoch": 1} and solo.weights_info() == (2, published.checksum)
    # the fp32 masters are saved (gathered from the ranks' shards), hold what bf16 rounds away, and are what one
    # learner resumes: a checkpoint of the bf16 weights alone would have passed the checksum above
    masters = load_file(f"{folder}/masters.safetensors")
    assert masters.keys() == published.tensors.keys() and {m.dtype for m in masters.values()} == {torch.float32}
    assert all(torch.equal(masters[k].bfloat16(), published.tensors[k]) for k in masters)  # the weights: rounded
    finer = sum(int((masters[k] != published.tensors[k].float()).sum()) for k in masters)
    assert finer > 0.5 * sum(m.numel() for m in masters.values())  # most bits below bf16
    names = [n for n, p in solo.model.transformer.named_parameters() if p.requires_grad]
    assert all(torch.equal(m, masters[n]) for n, m in zip(names, solo.masters, strict=True))
    # one more epoch both ways: the group from its live masters, one learner from the saved ones, agree as the first
    # epoch's two updates did (to bf16 rounding of the gradients)
    solo.train_epoch(batch)
    w3 = solo.weights().tensors
    d1 = torch.cat([(w3[k].float() - published.tensors[k].float()).flatten() for k in w3])
    d2 = torch.cat([(continued.tensors[k].float() - published.tensors[k].float()).flatten() for k in w3])
    assert continued.version == solo.version == 4 and float(d1.abs().max()) > 0.01
    assert float((d2 - d1).norm() / d1.norm()) < 0.15 and float((d1 == d2).float().mean()) > 0.6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["runtime.learner.sharding=fsdp", "lora.enabled=true"],
            (
                "runtime.learner.sharding = fsdp shards full fine-tuning, but lora.enabled is true (LoRA factors are small: "
                "every rank holds them); set runtime.learner.sharding=auto (or replicate), or lora.enabled=false"
            ),
        ),
        (
            ["train.precision=fp16"],  # auto resolves to fsdp: full fine-tuning, 2 ranks
            (
                "runtime.learner.sharding resolves to fsdp (2 learner ranks, full fine-tuning) but train.precision is fp16: "
                "the GradScaler's inf check reads only each rank's gradient shard, so the ranks could disagree on skipping a "
                "step; use train.precision=bf16 (or runtime.learner.sharding=replicate to keep fp16)"
            ),
        ),
    ],
)
def test_sharding_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cfg(*overrides)


def test_learner_sharding_resolves_auto():
    assert learner_sharding(cfg()) == "fsdp"
    assert learner_sharding(cfg("lora.enabled=true")) == "replicate"
    assert learner_sharding(cfg("runtime.learner.count=1")) == "replicate"
    assert learner_sharding(cfg("runtime.learner.sharding=fsdp", "runtime.learner.count=1")) == "replicate"
    assert learner_sharding(cfg("runtime.learner.sharding=replicate")) == "replicate"
    assert learner_sharding(cfg("train.precision=fp16", "runtime.learner.sharding=replicate")) == "replicate"
