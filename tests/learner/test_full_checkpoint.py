"""A full-fine-tuning checkpoint (``transformer/`` in diffusers layout) loads back as docs/evaluation.md shows, with its
checksum verified; a checkpoint whose tensor names do not match the model is refused, never half-loaded."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import cluster.driver
from cluster.config import load_config
from learner.checkpoint import latest_checkpoint, load_checkpoint
from learner.learner import Learner
from learner.weights import checksum
from models.adapter import SD3Adapter
from models.lora import trainable


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny-cpu full-fine-tuning run; (its checkpoint folder, the run's own trained Learner)."""
    tmp = tmp_path_factory.mktemp("full")
    learners = []

    class Recording(Learner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            learners.append(self)

    cfg = load_config(
        "tiny-cpu", ["train.epochs=1", f"output_dir={tmp}", "sampling.num_steps=4", "train.pairs_per_epoch=4"]
    )
    assert not cfg.lora.enabled  # tiny-cpu is full fine-tuning: this is the transformer/ path
    mp = pytest.MonkeyPatch()
    mp.setattr(cluster.driver, "Learner", Recording)
    try:
        out = cluster.driver.run_local(cfg)
    finally:
        mp.undo()
    (learner,) = learners
    folder = latest_checkpoint(tmp / cfg.name)
    assert folder is not None and learner.version == out["version"] > 0
    return folder, learner


def probe(model):
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["a red circle", "a black cat"])
    with torch.no_grad():
        return model.velocity(x, torch.tensor(0.5), cond)


def test_transformer_folder_loads_as_the_readme_shows_with_its_checksum(trained):
    from diffusers import SD3Transformer2DModel

    folder, learner = trained
    meta = json.loads((folder / "state.json").read_text())
    assert (folder / "transformer" / "config.json").exists()
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    assert meta["version"] == learner.version and meta["checksum"] == learner.weights_info()[1]

    # docs/evaluation.md's recipe, on the model the run was built from (the tiny SD3 at seed 0)
    model = SD3Adapter.tiny(seed=0)
    base_v = probe(model)
    t = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
    model.pipe.transformer = model.transformer = t
    t.requires_grad_(True)
    assert checksum(trainable(t)) == meta["checksum"]
    t.eval()
    learner.model.transformer.eval()
    v = probe(model)
    assert torch.equal(v, probe(learner.model))
    assert not torch.allclose(v, base_v, atol=1e-5)  # training did change the model: the check above has teeth


def test_a_checkpoint_missing_a_tensor_is_refused_and_leaves_the_weights(trained, tmp_path):
    folder, learner = trained
    broken = tmp_path / folder.name
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "trainable.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(broken / "trainable.safetensors"))

    fresh = Learner(SD3Adapter.tiny(seed=0), learner.cfg, learner.batching, None, seed=0)
    before = {n: p.clone() for n, p in trainable(fresh.model.transformer).items()}
    version, before_sum = fresh.weights_info()
    with pytest.raises(
        ValueError, match=r"does not match this model's trainable parameters.*" + dropped.replace(".", r"\.")
    ):
        load_checkpoint(broken, fresh)
    assert fresh.weights_info() == (version, before_sum)
    after = trainable(fresh.model.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)

    # the intact checkpoint does load into it, and proves itself by checksum
    load_checkpoint(folder, fresh)
    assert fresh.weights_info() == learner.weights_info()


def test_a_transformer_folder_missing_a_weight_is_caught_by_the_checksum(trained, tmp_path):
    # diffusers (0.42) does NOT fail from_pretrained on a missing key: it only logs "Some weights ... are newly
    # initialized". By default (low_cpu_mem_usage) the tensor is left on the meta device; with
    # low_cpu_mem_usage=False it holds uninitialised memory. What catches both is the docs-recipe check against
    # state.json's checksum: it cannot be computed over a meta tensor, and it differs for garbage. (If a future
    # diffusers raises at load instead, that is a refusal too.)
    from diffusers import SD3Transformer2DModel

    folder, _ = trained
    meta = json.loads((folder / "state.json").read_text())
    broken = tmp_path / "transformer"
    shutil.copytree(folder / "transformer", broken)
    (weights,) = broken.glob("*.safetensors")
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for kwargs in ({}, {"low_cpu_mem_usage": False}):
        try:
            t = SD3Transformer2DModel.from_pretrained(str(broken), **kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            assert dropped in str(e)
            continue
        t.requires_grad_(True)
        assert dropped in trainable(t)
        if trainable(t)[dropped].is_meta:
            with pytest.raises(
                ValueError, match=rf"^tensor {dropped!r} is on the meta device \(never loaded\): no bytes to checksum$"
            ):
                checksum(trainable(t))
        else:
            assert checksum(trainable(t)) != meta["checksum"]
