"""Dtype names (as the config spells them), the device a model runs on, and the one numerics mode both the sampler
and the learner compute velocities under (so that at lag 0 the learner's v_theta is the sampler's v, and log rho = 0).

Usage::

    with autocast(model.device, cfg.train.precision):      # "fp32" | "bf16" | "fp16"
        v = model.velocity(x, sigma, cond)
    scaler = grad_scaler(model.device, cfg.train.precision)  # the learner's; enabled for fp16 on CUDA only

and the GPU hot-path switches of ``model.compile`` / ``model.attention`` (``cluster.build.build_model`` applies them;
``bench/bench_gpu_throughput.py`` measures them), and host/device copies that do not wait::

    apply_compile(model.transformer, "regional")            # "off" | "regional" | "full"
    with attention("flash"):                                # "auto" | "flash" | "efficient" | "cudnn" | "math"
        v = model.transformer(...)
    x = to_device(x_cpu, model.device)                      # pinned + non_blocking when the device is CUDA
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# train.precision -> the autocast dtype on CUDA (None: no autocast). fp16 is the reference's (torch.autocast('cuda')
# with its default dtype, plus a GradScaler in training).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str) -> str:
    """ "auto" = cuda when this process sees a GPU, else cpu; an explicit cuda device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device!r} but this process sees no GPU; give the actor num_gpus or use cpu")
    return device


def _autocast_dtype(device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (train.precision), got {precision!r}")
    return PRECISIONS[precision] if torch.device(device).type == "cuda" else None


def autocast(device: torch.device | str, precision: str):
    """The mixed-precision context of every velocity a sampler records or the learner trains: autocast to
    ``precision``'s dtype on CUDA ("bf16", "fp16"; "fp32" = none). On CPU it is always off: the model computes in
    its own dtype (``model.dtype``), exactly and identically in sampler and learner."""
    dtype = _autocast_dtype(device, precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The learner's loss scaler: enabled for fp16 autocast on CUDA (as the reference's), a pass-through otherwise."""
    enabled = _autocast_dtype(device, precision) == torch.float16
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)


# -- the GPU hot-path switches (model.compile, model.attention) ----------------------------------------------------
COMPILE_MODES = ("off", "regional", "full")
RECOMPILE_LIMIT = 64  # graphs dynamo keeps per code object once a model is compiled (its default: 8)
# model.attention -> the SDPA backend it forces (auto: none forced, torch picks per call)
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# the backends that exist only as CUDA kernels (a CPU has flash and math)
_CUDA_ONLY = ("efficient", "cudnn")


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks, what regional compilation compiles one by one: ``transformer_blocks`` (SD3's
    joint blocks, FLUX's double-stream blocks) and FLUX's ``single_transformer_blocks``."""
    return [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, name, ())]


def apply_compile(transformer: torch.nn.Module, mode: str, **compile_kwargs) -> None:
    """``model.compile`` on ``transformer``, in place (parameter names unchanged, so checkpoints, LoRA and weight
    broadcasts see the same module): "regional" = ``block.compile()`` on each repeated block (torch's regional
    compilation: blocks of one structure share one compiled graph, so the compile time is a few blocks'), "full" =
    ``transformer.compile()``, "off" = eager. Compilation happens at the first call, so LoRA layers injected after
    this (``models.lora``) are traced with the block. ``compile_kwargs`` go to ``torch.compile``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode != "off":
        import torch._dynamo

        # dynamo's recompile limit (8) counts per code object, and every block of one class shares its forward: SD3's
        # 3 kinds of block (dual attention, plain, last) x grad / no-grad (the KL base) x static / dynamic batch would
        # exceed it and leave some blocks eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if mode == "regional":
        blocks = repeated_blocks(transformer)
        if not blocks:
            raise ValueError(
                f"model.compile=regional compiles transformer_blocks, which {type(transformer).__name__} "
                "does not have; use model.compile=full or off"
            )
        for block in blocks:
            block.compile(**compile_kwargs)
    elif mode == "full":
        transformer.compile(**compile_kwargs)


def check_attention(mode: str, device: torch.device | str, setting: str = "model.attention") -> None:
    """Fail before any work when ``mode`` (the value of ``setting``) names no SDPA backend or one that cannot run on
    ``device``."""
    if mode not in ATTENTION_BACKENDS:
        raise ValueError(f"{setting} must be one of {tuple(ATTENTION_BACKENDS)}, got {mode!r}")
    kind = torch.device(device).type
    if mode in _CUDA_ONLY and kind != "cuda":
        raise ValueError(
            f"{setting}={mode!r} is a CUDA kernel but the model runs on {kind}; set {setting}=auto (or "
            "flash or math, which a CPU has)"
        )


@contextlib.contextmanager
def attention(mode: str):
    """The SDPA backend of ``model.attention`` forced for the block (``torch.nn.attention.sdpa_kernel``); "auto"
    forces none. A backend that cannot serve a call (e.g. flash on a GPU without it, or on float32) fails with torch's
    reasons and the setting to change."""
    backend = ATTENTION_BACKENDS[mode]
    if backend is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            yield
    except RuntimeError as e:
        if not any(m in str(e) for m in ("No available kernel", "No viable backend")):  # torch's CUDA / CPU words
            raise
        raise RuntimeError(
            f"model.attention={mode!r}: torch's {backend} kernel cannot run this attention call "
            f"({str(e).splitlines()[0]}); set model.attention=auto to let torch choose"
        ) from e


def checkpoint_function(model):
    """diffusers' gradient-checkpointing function for ``model`` (an adapter with ``attention``): torch's non-reentrant
    checkpoint, whose recompute in the backward pass runs under the same SDPA backend as the forward did, so the
    recomputed activations are the forward's."""
    import torch.utils.checkpoint

    def recompute_contexts():
        return contextlib.nullcontext(), attention(model.attention)

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=recompute_contexts
        )

    return checkpointed


# -- copies between the host and the device that do not wait ---------------------------------------------------------
def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a CUDA device through pinned memory with ``non_blocking`` (the host goes on
    while the copy runs; the stream orders it before the kernels that read it). Elsewhere a plain ``.to``."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


class HostCopies:
    """Device tensors copied to the host as they come, without a host sync per copy: on CUDA each goes into a pinned
    buffer with ``non_blocking``, and ``stack`` waits once for all of them; elsewhere each is ``.cpu()``'d (on a CPU,
    the tensor itself).

        rec = HostCopies(model.device)
        for i in range(N): rec.add(v)                       # inside the loop: no sync
        vs = rec.stack(1)                                   # [B, N, ...] on the host (one sync)
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.parts: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        if not (self.cuda and t.device.type == "cuda"):
            self.parts.append(t.cpu())
            return
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        self.parts.append(buf)

    def stack(self, dim: int = 0) -> torch.Tensor:
        """The copies stacked along ``dim`` (a new host tensor in pageable memory; the pinned buffers go back)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return torch.stack(self.parts, dim)
