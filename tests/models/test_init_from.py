"""``lora.init_from`` / ``--init-from``: a LoRA written by peft's ``save_pretrained`` (the authors' release format)
or an fdfo checkpoint becomes the starting weights of every role, reproducing the saved adapter's velocities."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from actors.sampler import Sampler
from cluster.build import check_run
from cluster.cli import main
from cluster.config import Batching, LoraSettings, load_config, to_dict
from learner.learner import Learner
from learner.weights import checksum
from models.adapter import SD3Adapter
from models.euler import generate_images
from models.lora import LORA_TARGET_MODULES, check_init_from, make_trainable, resolve_init_from, trainable

PROMPTS = ["a red circle", "two blue squares"]


def probe(model: SD3Adapter) -> torch.Tensor:
    """Velocities of ``model`` on fixed inputs: [2, 16, 16, 16]."""
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.velocity(x, torch.tensor(0.6), model.encode_prompts(PROMPTS))


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A rank-4 LoRA saved by peft itself (get_peft_model + save_pretrained) on the tiny SD3, its B non-zero, and
    the velocities it gives."""
    from peft import LoraConfig, get_peft_model

    model = SD3Adapter.tiny(seed=0)
    conf = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES))
    peft_model = get_peft_model(model.transformer, conf)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("peft") / "epoch-0000100"
    peft_model.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    return folder, probe(model)


def lora(folder, rank=4, alpha=8.0) -> LoraSettings:
    return LoraSettings(rank=rank, alpha=alpha, init_from=str(folder))


def test_peft_lora_reproduces_its_velocities(peft_lora):
    folder, v_saved = peft_lora
    model = SD3Adapter.tiny(seed=0)
    v_base = probe(model)
    assert make_trainable(model.transformer, lora(folder)) is True
    assert torch.equal(probe(model), v_saved) and not torch.equal(v_base, v_saved)


def test_mismatched_rank_names_the_fix(peft_lora):
    folder, _ = peft_lora
    msg = (
        f"lora.init_from='{folder}' was trained with lora.rank=4 but this run has lora.rank=8; set lora.rank=4 "
        "(an override or the preset) to load it"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        make_trainable(SD3Adapter.tiny(seed=0).transformer, lora(folder, rank=8))
    msg = "was trained with lora.target_modules=[attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    with pytest.raises(ValueError, match=re.escape(msg)):
        make_trainable(SD3Adapter.tiny(seed=0).transformer, replace(lora(folder), target_modules=("to_q", "to_k")))


def test_every_role_starts_from_the_same_weights(peft_lora, tmp_path):
    folder, v_saved = peft_lora
    cfg = load_config(
        "tiny-cpu",
        [
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            f"lora.init_from={folder}",
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
        ],
    )
    check_run(cfg)
    learner = Learner(SD3Adapter.tiny(seed=0), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    assert learner.weights_info() == (0, sampler.checksum) and torch.equal(probe(sampler.model), v_saved)
    # an fdfo checkpoint of that learner loads through init_from too (here: its run folder -> the latest checkpoint)
    learner.save(str(tmp_path), state={}, config=to_dict(cfg))
    model = SD3Adapter.tiny(seed=0)
    make_trainable(model.transformer, lora(tmp_path))
    assert checksum(trainable(model.transformer)) == sampler.checksum and torch.equal(probe(model), v_saved)


def test_bad_init_from_fails_before_anything_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"lora.init_from='{tmp_path}/nope' is not a folder")):
        check_init_from(f"{tmp_path}/nope")
    msg = f"{tmp_path} holds neither adapter_config.json (a PEFT LoRA) nor state.json (an fdfo checkpoint)"
    with pytest.raises(FileNotFoundError, match=re.escape(msg)):
        check_init_from(str(tmp_path))
    check_init_from("nvidia/finite-difference-flow-optimization/fdfo-combined-reward-no-cfg/epoch-0000100")  # form only
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(LORA_TARGET_MODULES)})
    )
    save_file(
        {"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"does not fit this model's trainable parameters: \d+ missing"):
        make_trainable(SD3Adapter.tiny(seed=0).transformer, lora(tmp_path))


def test_cli_generate_from_a_peft_lora(peft_lora, tmp_path):
    folder, _ = peft_lora
    preset = tmp_path / "tiny-lora.yaml"
    preset.write_text(
        "model: {kind: sd3_tiny}\nlora: {enabled: true, rank: 4, alpha: 8}\n"
        "sampling: {num_steps: 2}\ntrain: {pairs_per_epoch: 2, updates_per_epoch: 1}\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--config",
                str(preset),
                "--init-from",
                str(folder),
                "--prompt",
                PROMPTS[0],
                "--seed",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (png,) = out.iterdir()
    model = SD3Adapter.tiny(seed=0)
    make_trainable(model.transformer, lora(folder))
    expected = generate_images(model, [PROMPTS[0]], [4], 2, 1.0)[0]
    assert np.array_equal(np.asarray(Image.open(png)), expected)


@pytest.mark.parametrize(
    "source,revision",
    [
        ("https://huggingface.co/nvidia/finite-difference-flow-optimization/tree/v1/fdfo-x/epoch-0000100", "v1"),
        ("hf:nvidia/finite-difference-flow-optimization/fdfo-x/epoch-0000100", "main"),
        ("nvidia/finite-difference-flow-optimization/fdfo-x/epoch-0000100", "main"),
    ],
)
def test_hub_folder_forms_download_only_their_subfolder(peft_lora, tmp_path, monkeypatch, source, revision):
    import shutil

    import huggingface_hub

    folder, _ = peft_lora
    calls = []

    def snapshot_download(**kw):  # the hub, offline: the release's layout under a cache root
        calls.append(kw)
        shutil.copytree(folder, tmp_path / "fdfo-x" / "epoch-0000100")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_init_from(source) == tmp_path / "fdfo-x" / "epoch-0000100"
    assert calls == [
        {
            "repo_id": "nvidia/finite-difference-flow-optimization",
            "revision": revision,
            "allow_patterns": ["fdfo-x/epoch-0000100/*"],
        }
    ]
