"""Per-role GPU throughput of FDFO on SD3.5 Medium: sampler images/s, learner images/s and the model FLOP
utilisation (MFU) of each, on one GPU, with random weights (the architecture is what costs time, not the values).

Usage::

    python bench/bench_gpu_throughput.py                      # H200: SD3.5-M, 512 px, 40 steps, bf16, LoRA r32
    python bench/bench_gpu_throughput.py --compile regional --learner-micro-batch 32 64 --sampler-batch 16 32
    python bench/bench_gpu_throughput.py --precision fp16     # the reference's numerics (fp16 autocast)
    python bench/bench_gpu_throughput.py --smoke --out /tmp/t.json   # CPU: a 2-layer toy shape, same code path

Shape: ``SD35M_TRANSFORMER`` (diffusers' ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium)
at 512 px: 64 x 64 latents = 1,024 image tokens (patch 2), and 77 CLIP + 128 T5 = 205 text tokens. Weights are
bf16 (the reference loads the pipeline in bf16); the forward runs under CUDA autocast of ``--precision`` (bf16, the
project's default ``train.precision``, or fp16, the reference's); the LoRA (rank 32, alpha 64, the reference's 8
attention targets: 191 modules, 18.8 M parameters) is fp32, as ``models/lora.py::add_lora`` keeps it.

- Sampler: ``--steps`` Euler steps of a batch of ``--sampler-batch`` images under ``torch.inference_mode``
  (noise on the device, no host sync inside the loop); images/s = batch / (time of the steps). VAE decode, text
  encoders and the reward are not in it.
- Learner: micro-batches of ``--learner-micro-batch`` (branch, step) rows, forward + backward of a squared-error
  loss on v (the FDFO loss is elementwise: its cost is nil next to the transformer's), a GradScaler under fp16;
  images/s = rows/s / steps (every image trains at all its steps: ``timestep_fraction`` 1). The AdamW step, once
  per 8,640 rows, is left out.

FLOPs are counted here from the config (``flop_count``: 2 per multiply-add of every matmul; biases, norms and
softmax not counted) and checked against ``torch.utils.flop_counter`` in the tests. The learner's backward is
what LoRA training does: activation gradients through the frozen base, weight gradients of the LoRA factors only
(block 0's q/k/v projections read the untrained input and need no input gradient; its ``attn2`` branch holds
nothing trainable and is skipped): about 1.1 forwards, so a trained image costs ~2.1 forwards per step; the
``6 x params x tokens`` rule of full training (3 forwards) would overstate it by ~40 %. MFU = achieved FLOP/s / ``--peak-tflops`` (default 989: H100/H200 SXM
dense bf16 and fp16 tensor-core peak, without sparsity).

``colocated_images_per_gpu_s`` = 1 / (1 / sampler + 1 / learner): one GPU that samples its images then trains
them, the reference's layout, without the reward and the VAE; the reference reached 0.50 end to end
(ALGORITHM.md section 6). ``fdfo plan --throughput <this JSON>`` turns the per-role figures into a GPU split.

Writes ``bench/results/gpu_throughput.json`` on a GPU (``--out`` elsewhere); on CPU only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.device import ATTENTION_BACKENDS, COMPILE_MODES, apply_compile, attention, check_attention  # noqa: E402 (after the sys.path line: runs as a script)
from models.lora import LORA_TARGET_MODULES, add_lora, lora_module_names  # noqa: E402

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in blocks 0-12, qk RMSNorm)
SD35M_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# The CPU smoke shape: every kind of block SD3.5-M has (a dual-attention block, a last context_pre_only block)
SMOKE_TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "out_channels": 4,
    "pos_embed_max_size": 8,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
SD35M_TEXT_TOKENS = 77 + 128  # CLIP-L/G (77, concatenated along channels) then T5 (max_sequence_length 128)
SMOKE_TEXT_TOKENS = 5
TIME_PROJ = 256  # diffusers' sinusoidal timestep channels (Timesteps(num_channels=256))
REFERENCE_IMAGES_PER_GPU_S = 0.50  # ALGORITHM.md section 6: 864 images x 100 epochs in ~12 h on 4 x H200
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_throughput.json"


def flop_count(config: dict, latent_size: int, text_tokens: int, lora_rank: int) -> dict:
    """Matmul FLOPs per image of one transformer forward and of one LoRA backward (frozen base, LoRA on the
    reference's 8 attention targets), by part. ``latent_size``: latent height = width; ``text_tokens``: sequence
    length of ``encoder_hidden_states``. Returns ``{"forward": {...}, "backward": {...}}``, each with a ``total``."""
    p, r = config["patch_size"], lora_rank
    D = config["num_attention_heads"] * config["attention_head_dim"]
    if config["caption_projection_dim"] != D:
        raise ValueError(f"caption_projection_dim {config['caption_projection_dim']} != heads x head_dim {D}")
    n, t = (latent_size // p) ** 2, text_tokens  # image tokens, text tokens
    s = n + t  # joint attention sequence

    def lin(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    patch_in, patch_out = config["in_channels"] * p * p, config["out_channels"] * p * p
    embed = (
        lin(n, patch_in, D)
        + lin(1, TIME_PROJ, D)
        + lin(1, D, D)  # patches; timestep MLP
        + lin(1, config["pooled_projection_dim"], D)
        + lin(1, D, D)
        + lin(t, config["joint_attention_dim"], D)
    )
    # norm_out's modulation and proj_out here; the blocks' parts are added below
    fwd = {"embed": embed, "modulation": lin(1, D, 2 * D), "linear": lin(n, D, patch_out), "lora": 0, "attention": 0}
    bwd = {"linear": lin(n, D, patch_out), "lora": 0, "attention": 0}
    for i in range(config["num_layers"]):
        dual, last, grad_in = i in config["dual_attention_layers"], i == config["num_layers"] - 1, i > 0
        n_txt = 3 if last else 4  # add_q, add_k, add_v (+ to_add_out, absent from the last, context_pre_only block)
        fwd["modulation"] += lin(1, D, 9 * D if dual else 6 * D) + lin(1, D, 2 * D if last else 6 * D)
        ff = lin(n, D, 4 * D) * 2 + (0 if last else lin(t, D, 4 * D) * 2)
        fwd["linear"] += 4 * lin(n, D, D) + n_txt * lin(t, D, D) + ff
        lora = 4 * r * D * (4 * n + n_txt * t)  # per adapted module: 2 x tokens x (D r + r D)
        fwd["lora"] += lora
        fwd["attention"] += 4 * s * s * D  # Q K^T and P V
        # backward: input gradients through every frozen projection whose input depends on the LoRA (in block 0 only
        # to_out.0 / to_add_out and the feed-forwards), dA, dB and the input gradient of each LoRA factor pair
        out_proj = lin(n, D, D) + (0 if last else lin(t, D, D))
        bwd["linear"] += ff + (4 * lin(n, D, D) + n_txt * lin(t, D, D) if grad_in else out_proj)
        bwd["lora"] += 2 * lora if grad_in else 3 * lora // 2 + 2 * r * D * (n + (0 if last else t))
        bwd["attention"] += 8 * s * s * D  # dQ, dK, dV, dP: two matmuls per forward matmul
        if dual:
            fwd["linear"] += 4 * lin(n, D, D)
            fwd["attention"] += 4 * n * n * D
            if grad_in:  # attn2 of block 0 reads only the (untrained) input: no gradient flows there
                bwd["linear"] += 4 * lin(n, D, D)
                bwd["attention"] += 8 * n * n * D
    fwd["total"], bwd["total"] = sum(fwd.values()), sum(bwd.values())
    return {"forward": fwd, "backward": bwd}


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, lora_rank: int):
    """A random-weight ``SD3Transformer2DModel`` of ``config`` on ``device`` in ``dtype`` with the reference's LoRA."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with device:
        model = SD3Transformer2DModel(**config)
    torch.nn.Module.to(model, dtype)  # (ModelMixin.to warns about from_pretrained's keep-in-fp32 rule: none here)
    add_lora(model, rank=lora_rank, alpha=2.0 * lora_rank, target_modules=LORA_TARGET_MODULES)
    return model


def inputs(config: dict, batch: int, latent_size: int, text_tokens: int, device, dtype) -> dict:
    """Random model inputs for ``batch`` images: latents, text states, pooled text, timesteps (float32, 1000 sigma)."""

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return {
        "hidden_states": randn(batch, config["in_channels"], latent_size, latent_size),
        "encoder_hidden_states": randn(batch, text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(batch, config["pooled_projection_dim"]),
        "timestep": torch.rand(batch, device=device) * 1000,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def time_sampler(model, x: dict, steps: int, repeats: int, device, precision: str) -> float:
    """Median seconds of ``steps`` Euler steps (one forward each) of the batch ``x``, after one warm-up run."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
    times = []
    for k in range(repeats + 1):
        latents = torch.randn_like(x["hidden_states"])
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), _autocast(device, precision):
            for i in range(steps):
                t = (1000 * sigmas[i]).expand(latents.shape[0])
                v = model(**{**x, "hidden_states": latents, "timestep": t}, return_dict=False)[0]
                latents = latents + (sigmas[i + 1] - sigmas[i]) * v.to(latents.dtype)
        _sync(device)
        if k:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_learner(model, x: dict, iters: int, warmup: int, device, precision: str) -> float:
    """Median seconds of one micro-batch's forward + backward (gradients accumulate in the LoRA's fp32 ``.grad``)."""
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
    target = torch.randn_like(x["hidden_states"], dtype=torch.float32)
    times = []
    for k in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, precision):
            v = model(**x, return_dict=False)[0]
        loss = (v.float() - target).square().mean()
        scaler.scale(loss).backward()
        _sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _role_row(seconds: float, images: float, flops_per_image: float, peak_tflops: float, device, **extra) -> dict:
    """One measured configuration: images/s, achieved TFLOP/s and MFU against ``peak_tflops``, peak memory."""
    ips = images / seconds
    row = dict(
        extra,
        seconds=seconds,
        images_per_s=ips,
        tflops=ips * flops_per_image / 1e12,
        mfu=ips * flops_per_image / (peak_tflops * 1e12),
    )
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _out_of_memory(e: Exception, **key) -> dict:
    """The row of a configuration that does not fit in GPU memory (the next one still runs)."""
    torch.cuda.empty_cache()
    return {**key, "error": f"out of memory: {str(e).splitlines()[0]}"}


def measure(args, device: torch.device) -> dict:
    """Build the model, time every sampler batch and learner micro-batch of ``args``; the report as a dict."""
    smoke = device.type != "cuda"
    config, text_tokens = (SMOKE_TRANSFORMER, SMOKE_TEXT_TOKENS) if smoke else (SD35M_TRANSFORMER, SD35M_TEXT_TOKENS)
    latent = config["sample_size"] if smoke else args.resolution // 8
    dtype = torch.float32 if smoke else torch.bfloat16
    flops = flop_count(config, latent, text_tokens, args.lora_rank)
    fwd, bwd = flops["forward"]["total"], flops["backward"]["total"]
    check_attention(args.sdpa, device, setting="--sdpa")
    model = build_transformer(config, device, dtype, args.lora_rank)
    # the product's switches (model.compile, model.attention), applied by the same code as cluster.build.build_model
    apply_compile(model, args.compile, backend=args.compile_backend, dynamic=False)
    samplers, learners = [], []
    with attention(args.sdpa):
        for b in args.sampler_batch:
            x = inputs(config, b, latent, text_tokens, device, dtype)
            try:
                seconds = time_sampler(model, x, args.steps, args.repeats, device, args.precision)
                samplers.append(_role_row(seconds, b, args.steps * fwd, args.peak_tflops, device, batch=b))
            except torch.cuda.OutOfMemoryError as e:
                samplers.append(_out_of_memory(e, batch=b))
        for m in args.learner_micro_batch:
            x = inputs(config, m, latent, text_tokens, device, dtype)
            try:
                seconds = time_learner(model, x, args.iters, args.warmup, device, args.precision)
                learners.append(
                    _role_row(
                        seconds, m / args.steps, args.steps * (fwd + bwd), args.peak_tflops, device, micro_batch_rows=m
                    )
                )
            except torch.cuda.OutOfMemoryError as e:
                model.zero_grad(set_to_none=True)
                learners.append(_out_of_memory(e, micro_batch_rows=m))
    return _report(args, device, config, latent, text_tokens, model, flops, samplers, learners)


def _best(rows: list[dict]) -> float | None:
    ok = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return max(ok) if ok else None


def _report(args, device, config, latent, text_tokens, model, flops, samplers, learners) -> dict:
    s, l = _best(samplers), _best(learners)
    lora = lora_module_names(model, LORA_TARGET_MODULES)
    gpu = device.type == "cuda"
    fwd, bwd = flops["forward"]["total"], flops["backward"]["total"]
    return {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or 'cpu'})",
        "smoke": device.type != "cuda",
        "torch": torch.__version__,
        "transformer": dict(config),
        "latent_size": latent,
        "image_tokens": (latent // config["patch_size"]) ** 2,
        "text_tokens": text_tokens,
        "steps": args.steps,
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "options": {
            "precision": args.precision if gpu else "fp32 (CPU: no autocast)",
            "compile": args.compile,
            "compile_backend": args.compile_backend,
            "sdpa": args.sdpa,
            "lora_rank": args.lora_rank,
            "peak_tflops": args.peak_tflops,
        },
        "lora_modules": len(lora),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_per_forward": flops["forward"],
        "flops_per_backward": flops["backward"],
        "forward_equivalents_per_trained_image": args.steps * (1 + bwd / fwd),
        "sampler": samplers,
        "learner": learners,
        "sampler_images_per_s": s,
        "learner_images_per_s": l,
        "colocated_images_per_gpu_s": 1 / (1 / s + 1 / l) if s and l else None,
        "reference_images_per_gpu_s": REFERENCE_IMAGES_PER_GPU_S,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU toy shape (also when no CUDA device is there)")
    p.add_argument("--out", default=None, help=f"JSON path (GPU default: {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--resolution", type=int, default=512, help="image pixels per side (latents: / 8)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per image (default 40; smoke 4)")
    p.add_argument(
        "--sampler-batch",
        type=int,
        nargs="+",
        default=[16],
        help="images per sampler call (the presets: 2 x pairs_per_call 8 = 16)",
    )
    p.add_argument(
        "--learner-micro-batch",
        type=int,
        nargs="+",
        default=[32],
        help="(branch, step) rows per forward/backward (the presets' train.micro_batch_rows: 32)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="CUDA autocast dtype over the bf16 weights (fp16: the reference's)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile of the transformer, as model.compile (regional: each block)",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    p.add_argument(
        "--sdpa",
        choices=tuple(ATTENTION_BACKENDS),
        default="auto",
        help="scaled_dot_product_attention backend, as model.attention (auto: PyTorch's choice)",
    )
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 32, the reference's; smoke 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed sampler runs after a warm-up (default 3; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed learner micro-batches (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed learner micro-batches (default 3; smoke 1)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the peak MFU divides by (989: H100/H200 SXM dense bf16/fp16)"
    )
    args = p.parse_args(argv)
    small = args.smoke or not torch.cuda.is_available()
    defaults = (("steps", 40, 4), ("lora_rank", 32, 4), ("repeats", 3, 1), ("iters", 10, 2), ("warmup", 3, 1))
    for name, full, smoke in defaults:
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke shape (timings are not SD3.5-M's)")
    report = measure(args, device)
    out = args.out or (None if report["smoke"] else str(DEFAULT_OUT))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    _print(report, out)
    return report


def _print(report: dict, out: str | None) -> None:
    print(
        f"{report['device']}: {report['image_tokens']} image + {report['text_tokens']} text tokens, "
        f"{report['steps']} steps, {report['options']}"
    )
    print(
        f"forward {report['flops_per_forward']['total'] / 1e12:.4g} TFLOP/image, backward "
        f"{report['flops_per_backward']['total'] / 1e12:.4g}; a trained image = "
        f"{report['forward_equivalents_per_trained_image']:.1f} forwards (a sampled one {report['steps']})"
    )
    for role, key in (("sampler", "batch"), ("learner", "micro_batch_rows")):
        for row in report[role]:
            if "error" in row:
                print(f"  {role:8s} {key}={row[key]}: {row['error']}")
            else:
                print(
                    f"  {role:8s} {key}={row[key]:<4d} {row['images_per_s']:8.3f} images/s  "
                    f"{row['tflops']:9.4g} TFLOP/s  MFU {100 * row['mfu']:6.3g} %"
                )
    if report["colocated_images_per_gpu_s"]:
        print(
            f"colocated (sample then train on one GPU): {report['colocated_images_per_gpu_s']:.3f} images per "
            f"GPU-second; the reference: {report['reference_images_per_gpu_s']:.2f} end to end"
        )
    if out:
        print(f"wrote {out}; plan a cluster with: fdfo plan --throughput {out} --gpus 4 8 32")


if __name__ == "__main__":
    main()
