"""bench/bench_gpu_throughput.py: its FLOP count equals a count by hand and torch's own FLOP counter, its SD3.5-M
config has the reference's LoRA layout, and its CPU smoke path runs end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu_throughput", ROOT / "bench" / "bench_gpu_throughput.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# 1 block (so also the last, context_pre_only one), width D = 1 head x 4 = 4, patch 1 on a 2 x 2 latent: n = 4 image
# tokens; t = 2 text tokens of width J = 3; pooled width 2; LoRA rank r = 1
TOY = {
    "sample_size": 2,
    "patch_size": 1,
    "in_channels": 1,
    "num_layers": 1,
    "attention_head_dim": 4,
    "num_attention_heads": 1,
    "joint_attention_dim": 3,
    "caption_projection_dim": 4,
    "pooled_projection_dim": 2,
    "out_channels": 1,
    "pos_embed_max_size": 2,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}


def test_flop_count_of_a_one_block_toy_by_hand():
    f = bench.flop_count(TOY, latent_size=2, text_tokens=2, lora_rank=1)
    fwd, bwd = f["forward"], f["backward"]
    # 2 x tokens x fan_in x fan_out per linear. embed: patch 2*4*1*4 = 32, timestep 2*256*4 + 2*4*4 = 2080,
    # pooled 2*2*4 + 2*4*4 = 48, context 2*2*3*4 = 48
    assert fwd["embed"] == 32 + 2080 + 48 + 48 == 2208
    # per image: norm1 4 -> 6*4 (192), norm1_context of the last block 4 -> 2*4 (64), norm_out 4 -> 8 (64)
    assert fwd["modulation"] == 192 + 64 + 64 == 320
    # q, k, v, to_out.0 on 4 image tokens 4 * 128; add_q, add_k, add_v on 2 text tokens 3 * 64 (no to_add_out: last
    # block); feed-forward 4 -> 16 -> 4 on image tokens 2 * 512 (no ff_context); proj_out 2*4*4*1 = 32
    assert fwd["linear"] == 512 + 192 + 1024 + 32 == 1760
    # LoRA A (4 -> 1) and B (1 -> 4): 2 * tokens * 8 per module: 4 image modules * 4 tokens, 3 text ones * 2 tokens
    assert fwd["lora"] == 16 * (4 * 4 + 3 * 2) == 352
    # joint attention over s = 6 tokens: Q K^T and P V, 2 * 6 * 6 * 4 each
    assert fwd["attention"] == 2 * (2 * 36 * 4) == 576
    assert fwd["total"] == 2208 + 320 + 1760 + 352 + 576 == 5216
    # backward of block 0: input gradients only where the LoRA reaches: to_out.0 (128), feed-forward (1024),
    # proj_out (32); q, k, v and the text projections read the untrained input
    assert bwd["linear"] == 128 + 1024 + 32 == 1184
    # LoRA: dB, d(hidden), dA = 6 * tokens * r * D per module (+ 2 * tokens * r * D of input gradient for to_out.0)
    assert bwd["lora"] == 3 * 96 + 3 * 48 + 128 == 560
    assert bwd["attention"] == 2 * 576 and bwd["total"] == 1184 + 560 + 1152 == 2896


def _counted(model, x: dict) -> tuple[int, int]:
    """torch's FLOP counter over a forward, then over forward + backward (math SDPA: its matmuls are counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x)
    forward = counter.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**x, return_dict=False)[0].square().mean().backward()
    return forward, counter.get_total_flops() - forward


def test_flop_count_equals_torchs_counter():
    # the smoke shape has a dual-attention block 0 (its attn2 gets no gradient) and a context_pre_only last block
    config = bench.SMOKE_TRANSFORMER
    model = bench.build_transformer(config, torch.device("cpu"), torch.float32, lora_rank=4)
    x = bench.inputs(config, 3, 8, 5, "cpu", torch.float32)
    forward, backward = _counted(model, x)
    f = bench.flop_count(config, latent_size=8, text_tokens=5, lora_rank=4)
    assert (forward, backward) == (3 * f["forward"]["total"], 3 * f["backward"]["total"])
    # the one-block toy counted by hand above (its only block is the last: no to_add_out to adapt)
    from diffusers import SD3Transformer2DModel

    toy = SD3Transformer2DModel(**TOY)
    targets = tuple(t for t in bench.LORA_TARGET_MODULES if t != "attn.to_add_out")
    bench.add_lora(toy, rank=1, alpha=2.0, target_modules=targets)
    assert _counted(toy, bench.inputs(TOY, 1, 2, 2, "cpu", torch.float32)) == (5216, 2896)


def test_sd35m_shape_and_lora_layout():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**bench.SD35M_TRANSFORMER)
    lora = bench.lora_module_names(model, bench.LORA_TARGET_MODULES)
    assert len(lora) == 191  # ALGORITHM.md section 6
    fans = [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in lora]
    assert sum(32 * (i + o) for i, o in fans) == 18_776_064
    from cluster.plan import SD35M_TRANSFORMER_PARAMETERS, lora_parameters

    assert sum(p.numel() for p in model.parameters()) == SD35M_TRANSFORMER_PARAMETERS
    assert lora_parameters(bench.LORA_TARGET_MODULES, 32) == 18_776_064
    bare = tuple(t.removeprefix("attn.") for t in bench.LORA_TARGET_MODULES)  # also SD3.5-M's attn2 of blocks 0-12
    assert len(bench.lora_module_names(model, bare)) == 243 and lora_parameters(bare, 32) == 243 * 32 * 3072
    # one forward of one 512 px image: ~2.2 TFLOP (ARCHITECTURE.md's cost model); 1,024 + 205 tokens
    f = bench.flop_count(bench.SD35M_TRANSFORMER, 64, bench.SD35M_TEXT_TOKENS, 32)
    assert 2.2e12 < f["forward"]["total"] < 2.3e12 and 1.0 < f["backward"]["total"] / f["forward"]["total"] < 1.2


def test_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    report = bench.main(
        [
            "--smoke",
            "--out",
            str(out),
            "--steps",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--sampler-batch",
            "2",
            "--learner-micro-batch",
            "3",
            "5",
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["smoke"] and report["image_tokens"] == 16 and report["steps"] == 2
    # block 0: 8 LoRA modules, the last block 7 (no to_add_out); each rank 4 x (16 + 16)
    assert report["lora_modules"] == 15 and report["trainable_parameters"] == 15 * 4 * 32
    (sampler,) = report["sampler"]
    assert [r["micro_batch_rows"] for r in report["learner"]] == [3, 5]
    # 2 steps of 2 images in `seconds`; a learner micro-batch of m rows trains m / 2 images
    assert sampler["images_per_s"] == pytest.approx(2 / sampler["seconds"])
    assert report["learner"][1]["images_per_s"] == pytest.approx(5 / 2 / report["learner"][1]["seconds"])
    fwd = report["flops_per_forward"]["total"]
    assert sampler["mfu"] == pytest.approx(sampler["images_per_s"] * 2 * fwd / 989e12)
    s, l = report["sampler_images_per_s"], report["learner_images_per_s"]
    assert l == max(r["images_per_s"] for r in report["learner"])
    assert report["colocated_images_per_gpu_s"] == pytest.approx(s * l / (s + l))
