"""Weights.load_into and load_checkpoint refuse what would leave a model silently holding other weights:
unknown names, a corrupted payload, a dtype-narrowing copy, a checkpoint whose names do not match."""

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.learner import Learner
from learner.weights import Weights, checksum
from models.adapter import SD3Adapter
from models.lora import make_trainable


class Net(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(3, 2)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# -- Weights.load_into ----------------------------------------------------------------------------------------
def test_load_into_copies_every_tensor_and_returns_the_checksum():
    w = Weights.of(Net(seed=1), version=3)
    target = Net(seed=2)
    assert not same(params(target), w.tensors)
    assert w.load_into(target) == w.checksum
    assert same(params(target), w.tensors)


def test_unknown_names_are_refused_before_anything_is_copied():
    w = Weights.of(Net(seed=1), version=3)
    tensors = {**w.tensors, "lin.lora_A.weight": torch.zeros(4, 3)}
    bad = Weights(3, tensors, checksum(tensors))              # a valid payload, just for another model
    target = Net(seed=2)
    before = params(target)
    with pytest.raises(ValueError, match=re.escape(
            "weights name parameters the model lacks (LoRA config differs?): ['lin.lora_A.weight']")):
        bad.load_into(target)
    assert same(params(target), before)


def test_lora_weights_into_a_model_without_the_adapter_are_refused():
    cfg = load_config("tiny-cpu", ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
    lora_model = SD3Adapter.tiny(seed=0)
    make_trainable(lora_model.transformer, cfg.lora)
    w = Weights.of(lora_model.transformer, version=1)
    assert w.tensors and all("lora_" in n for n in w.tensors)
    with pytest.raises(ValueError, match=r"^weights name parameters the model lacks \(LoRA config differs\?\): "
                                         r"\['[^']*lora_A[^']*', '[^']*', '[^']*'\]$"):
        w.load_into(SD3Adapter.tiny(seed=0).transformer)       # full-weight model: no lora_ parameters


def test_a_corrupted_payload_fails_its_checksum_and_is_not_loaded():
    w = Weights.of(Net(seed=1), version=3)
    w.tensors["lin.weight"][0, 0] += 1.0                      # bytes changed after the checksum was taken
    target = Net(seed=2)
    before = params(target)
    got = checksum(w.tensors)
    assert got != w.checksum
    with pytest.raises(RuntimeError, match=re.escape(
            f"weights version 3 failed its checksum ({got} != {w.checksum}): the payload was corrupted in transit; "
            "refusing to sample with it")):
        w.load_into(target)
    assert same(params(target), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_narrowing_copy_is_caught_by_the_checksum(dtype):
    net = Net(seed=1)
    with torch.no_grad():                                       # values exact in fp16 and bf16 (k / 8): only the
        net.lin.weight.copy_(torch.arange(6.0).view(2, 3) / 8)  # dtype tells the copies apart
        net.lin.bias.copy_(torch.tensor([0.5, -0.25]))
    w = Weights.of(net, version=7)
    target = Net(seed=2).to(dtype)
    with pytest.raises(RuntimeError, match=r"^after loading version 7 the model's checksum is [0-9a-f]{32}, not "
                                           + w.checksum + "$") as err:
        w.load_into(target)
    held = {n: p.detach() for n, p in target.named_parameters()}
    assert f"checksum is {checksum(held)}," in str(err.value)  # the checksum of what the model now holds
    assert all(held[n].dtype == dtype and torch.equal(held[n].float(), w.tensors[n]) for n in held)


# -- load_checkpoint ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full-weight tiny SD3 learner after one update, checkpointed: (config, folder, its weights)."""
    cfg = load_config("tiny-cpu", ["lora.enabled=false", "sampling.num_steps=2", "train.pairs_per_epoch=1",
                                   "train.updates_per_epoch=1", "train.lr=1e-2"])
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=["a red circle"], prompt_ids=[0], pair_ids=[0], seeds=[3])
    batch, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0]]))
    learner = Learner(SD3Adapter.tiny(seed=0), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    assert learner.train_epoch(batch)["updates"] == 1
    run_dir = tmp_path_factory.mktemp("run")
    folder = save_checkpoint(run_dir, learner, state={"next_pair_id": 1}, config={})
    assert latest_checkpoint(run_dir) == folder
    return cfg, folder, learner.weights()


def fresh_learner(cfg, lora: bool = False) -> Learner:
    lora_cfg = load_config("tiny-cpu", ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]).lora if lora else cfg.lora
    return Learner(SD3Adapter.tiny(seed=0), cfg.train, Batching.of(cfg), lora_cfg, seed=0)


def test_an_intact_checkpoint_restores_the_trained_weights(trained):
    cfg, folder, saved = trained
    learner = fresh_learner(cfg)
    assert learner.weights().checksum != saved.checksum        # starts at the base weights
    assert load_checkpoint(folder, learner) == {"next_pair_id": 1}
    assert learner.version == 1 and learner.weights().checksum == saved.checksum


def _rewrite(folder, tensors):
    save_file(tensors, str(folder / "trainable.safetensors"))


@pytest.fixture
def copy_of(trained, tmp_path):
    """A copy of the checkpoint folder the test may damage."""
    cfg, folder, saved = trained
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return cfg, dst, saved


def _refused(cfg, folder, names, lora=False):
    learner = fresh_learner(cfg, lora)
    base = learner.weights()
    msg = (f"checkpoint {folder} does not match this model's trainable parameters (LoRA config?): "
           f"{names if isinstance(names, list) else ''}")
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        load_checkpoint(folder, learner)
    after = learner.weights()                                  # nothing was loaded: still the base, version 0
    assert learner.version == 0 and after.checksum == base.checksum


def test_a_checkpoint_missing_a_name_is_refused(copy_of):
    cfg, folder, _ = copy_of
    tensors = load_file(str(folder / "trainable.safetensors"))
    dropped = "proj_out.weight"
    assert dropped in tensors
    del tensors[dropped]
    _rewrite(folder, tensors)
    _refused(cfg, folder, [dropped])


def test_a_checkpoint_with_an_extra_name_is_refused(copy_of):
    cfg, folder, _ = copy_of
    tensors = load_file(str(folder / "trainable.safetensors"))
    _rewrite(folder, {**tensors, "zz_extra.weight": torch.zeros(2)})
    _refused(cfg, folder, ["zz_extra.weight"])


def test_a_full_weight_checkpoint_into_a_lora_learner_is_refused(trained):
    cfg, folder, _ = trained
    _refused(cfg, folder, None, lora=True)                     # names differ entirely: lora_A/B vs base weights


def test_a_checkpoint_with_changed_bytes_fails_its_checksum(copy_of):
    cfg, folder, _ = copy_of
    tensors = load_file(str(folder / "trainable.safetensors"))
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1.0
    _rewrite(folder, tensors)
    msg = f"checkpoint {folder}: restored weights do not match the saved checksum"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        load_checkpoint(folder, fresh_learner(cfg))
