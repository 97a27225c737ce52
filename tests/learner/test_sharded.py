"""FSDP2 sharded full fine-tuning (learner/sharded.py): two ranks, each its own process with a gloo default group
(FSDP2 needs one; threads cannot share it), take the AdamW updates one unsharded transformer takes on the same rows,
and the full state they gather loads into one unsharded model (M=2 -> M=1) and back into the shards (M=1 -> M=2)."""

import copy

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from learner.collective import form_group, free_port
from learner.sharded import (
    clip_grad_norm,
    full_optimizer_state,
    full_state,
    init_default_group,
    load_full_optimizer_state,
    load_full_state,
    shard_transformer,
)
from models.adapter import SD3Adapter

# 2 updates of 4 rows; one micro-batch of 2 rows per rank, so the ranks' sum adds the same two terms as the single
# learner's accumulation over its two micro-batches (another order would differ by float rounding, which AdamW's
# division by the gradient's size magnifies in near-zero components, and 1e-6 would not hold)
WORLD, ROWS, UPDATES, MB = 2, 4, 2, 2
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-8}
CLIP = 0.05  # below the tiny model's gradient norm: the clip is exercised


def rows(update: int) -> dict[str, torch.Tensor]:
    """The update's fixed rows: latents x [R, 16, 16, 16], prompt tokens [R, 8, 64], pooled [R, 64], t [R], target."""
    g = torch.Generator().manual_seed(100 + update)
    return {
        "x": torch.randn(ROWS, 16, 16, 16, generator=g),
        "tokens": torch.randn(ROWS, 8, 64, generator=g),
        "pooled": torch.randn(ROWS, 64, generator=g),
        "t": 1000 * torch.rand(ROWS, generator=g),
        "target": torch.randn(ROWS, 16, 16, 16, generator=g),
    }


def forward(transformer, r: dict[str, torch.Tensor], mb) -> torch.Tensor:
    """The transformer's output (the velocity) on rows ``mb`` of ``r``: [B, 16, 16, 16]."""
    return transformer(
        hidden_states=r["x"][mb],
        encoder_hidden_states=r["tokens"][mb],
        pooled_projections=r["pooled"][mb],
        timestep=r["t"][mb],
        return_dict=False,
    )[0]


def train(transformer, opt, params, rank: int, world: int) -> list[float]:
    """The Learner's update: this rank's share of each update's rows in micro-batches, each loss scaled by its share
    of the update's rows, then the clip and the AdamW step. Returns the gradient norms before clipping."""
    norms = []
    for u in range(UPDATES):
        r = rows(u)
        mine = torch.tensor_split(torch.arange(ROWS), world)[rank]
        for mb in torch.split(mine, MB):
            loss = ((forward(transformer, r, mb) - r["target"][mb]) ** 2).mean()
            (loss * len(mb) / ROWS).backward()
        norms.append(float(clip_grad_norm(params, CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def moments(opt_state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.contiguous() for i, s in opt_state["state"].items() for k, v in s.items()}


def rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store, _, _ = form_group(rank, WORLD, "127.0.0.1", port, "gloo", timeout_s=60)
    group = init_default_group(rank, WORLD, store, "gloo", timeout_s=60)
    transformer = SD3Adapter.tiny(seed=0).transformer.train().requires_grad_(True)
    unsharded = copy.deepcopy(transformer)
    start = {k: v.clone() for k, v in transformer.state_dict().items()}
    shard_transformer(transformer, group, "cpu")
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **ADAMW)
    norms = train(transformer, opt, params, rank, WORLD)
    trained, opt_state = full_state(transformer), full_optimizer_state(opt)
    save_file(trained | {"norms": torch.tensor(norms)}, f"{out}/state{rank}.safetensors")
    save_file(moments(opt_state), f"{out}/moments{rank}.safetensors")
    # M=1 -> M=2: the unsharded start loads into the shards, and the gathered state and AdamW moments round-trip
    load_full_state(transformer, start)
    assert all(torch.equal(t, start[k]) for k, t in full_state(transformer).items())
    with torch.no_grad():  # and the forward computes with the loaded weights
        assert torch.equal(forward(transformer, rows(0), slice(None)), forward(unsharded, rows(0), slice(None)))
    load_full_state(transformer, trained)
    fresh = torch.optim.AdamW(params, **ADAMW)
    load_full_optimizer_state(fresh, opt_state)
    again = moments(full_optimizer_state(fresh))
    assert all(torch.equal(t, moments(opt_state)[k]) for k, t in again.items())
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    states = [load_file(str(out / f"state{r}.safetensors")) for r in range(WORLD)]
    norms = [s.pop("norms").tolist() for s in states]
    return states, norms, load_file(str(out / "moments0.safetensors"))


def test_two_sharded_ranks_make_the_updates_of_one_learner_on_the_same_rows(sharded):
    states, sharded_norms, sharded_moments = sharded
    one = SD3Adapter.tiny(seed=0).transformer.train().requires_grad_(True)
    start = {k: v.clone() for k, v in one.state_dict().items()}
    opt = torch.optim.AdamW(list(one.parameters()), **ADAMW)
    norms = train(one, opt, list(one.parameters()), rank=0, world=1)
    assert min(norms) > CLIP  # every update was clipped
    # the norm before clipping is the one test of the gradient's scale (the sum over ranks, not FSDP2's default mean):
    # clipping and AdamW are blind to a uniform scale, so the weights alone would not catch a mean
    for s, n in zip(states, sharded_norms):  # every rank gathered the same full state
        assert n == pytest.approx(norms, rel=1e-5)
        assert set(s) == set(one.state_dict())
    want = one.state_dict()
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 0.01  # the weights moved
    for k in want:
        torch.testing.assert_close(states[0][k], want[k], rtol=0, atol=1e-6)
        assert torch.equal(states[0][k], states[1][k])
    single_moments = moments(opt.state_dict())
    assert set(single_moments) == set(sharded_moments)
    for k, v in single_moments.items():
        torch.testing.assert_close(sharded_moments[k], v, rtol=1e-5, atol=1e-9)


def test_a_state_gathered_at_two_ranks_loads_into_one_unsharded_model(sharded):
    state = sharded[0][0]
    one = SD3Adapter.tiny(seed=1).transformer  # other weights, the same config
    load_full_state(one, state)
    assert all(torch.equal(t, state[k]) for k, t in one.state_dict().items())
    params = {n for n, _ in one.named_parameters()}
    other = SD3Adapter.tiny(seed=1).transformer
    load_full_state(other, {k: v for k, v in state.items() if k in params}, strict=False)  # a checkpoint's params
    assert all(torch.equal(t, state[k]) for k, t in other.named_parameters())
    with pytest.raises(ValueError, match="missing"):
        load_full_state(one, {k: v for k, v in state.items() if "proj_out" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        load_full_state(one, state | {"extra.weight": torch.zeros(1)}, strict=False)
