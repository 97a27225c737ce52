"""The GPU hot-path switches (model.compile, model.attention, sampling.noise_device) on CPU: each is a checked config
field, each leaves the numbers as they were (compile and the SDPA backends to float tolerance, host vs device noise
bit for bit on a CPU), and the learner's metrics read once per update are the values read per micro-batch."""

import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from actors.sampling import sample_groups, sample_pairs
from cluster.build import build_model
from cluster.config import LoraSettings, ModelConfig, load_config
from models.adapter import SD3Adapter
from models.device import HostCopies, apply_compile, attention, repeated_blocks
from models.lora import make_trainable
from tests.helpers import GaussianFlow

LORA = LoraSettings(rank=4, alpha=8.0)


def _inputs(model, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.latent_shape, generator=g)
    return x, torch.tensor(0.7), model.encode_prompts(["a red circle", "two blue squares"][:batch])


def _with_lora(model):
    """LoRA added as the Sampler adds it (after build_model), its factors set to random values (peft starts B at 0,
    which would hide a LoRA the compiled blocks left out). A one-block SD3 has no to_add_out (its block is the last)."""
    last_only = len(model.transformer.transformer_blocks) == 1
    targets = tuple(t for t in LORA.target_modules if not (last_only and t == "attn.to_add_out"))
    make_trainable(model.transformer, dataclasses.replace(LORA, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_the_switches_are_config_fields_and_bad_values_name_the_key():
    cfg = load_config("tiny-cpu")
    assert (cfg.model.compile, cfg.model.attention, cfg.sampling.noise_device) == ("off", "auto", "host")
    cfg = load_config("tiny-cpu", ["model.compile=regional", "model.attention=math", "sampling.noise_device=device"])
    assert (cfg.model.compile, cfg.model.attention, cfg.sampling.noise_device) == ("regional", "math", "device")
    with pytest.raises(ValueError) as e:
        load_config("tiny-cpu", ["model.compile=fast"])
    assert str(e.value) == "config key 'model.compile' must be one of ('off', 'regional', 'full'), got 'fast'"
    with pytest.raises(ValueError) as e:
        load_config("tiny-cpu", ["model.attention=xformers"])
    assert str(e.value) == (
        "config key 'model.attention' must be one of ('auto', 'flash', 'efficient', 'cudnn', 'math'), got 'xformers'"
    )
    with pytest.raises(ValueError) as e:
        load_config("tiny-cpu", ["sampling.noise_device=gpu"])
    assert str(e.value) == "config key 'sampling.noise_device' must be one of ('host', 'device'), got 'gpu'"


def test_build_model_applies_compile_and_attention_to_every_kind():
    for kind in ("sd3_tiny", "flux_tiny"):
        model = build_model(ModelConfig(kind=kind, compile="regional", attention="math"))
        blocks = repeated_blocks(model.transformer)
        assert model.attention == "math" and model.transformer._compiled_call_impl is None
        assert len(blocks) == 2 and (kind == "sd3_tiny") != hasattr(model.transformer, "single_transformer_blocks")
        assert all(b._compiled_call_impl is not None for b in blocks)
        model = build_model(ModelConfig(kind=kind, compile="full"))
        assert model.attention == "auto" and model.transformer._compiled_call_impl is not None
        assert not any(b._compiled_call_impl is not None for b in repeated_blocks(model.transformer))
    model = build_model(ModelConfig(kind="sd3_tiny"))
    assert model.attention == "auto" and model.transformer._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= 64  # every block of a class shares one code object's limit


def _velocity_after_weight_change(eager, compiled):
    """(compiled v, eager v) before and after new LoRA weights are copied in place, as a sampler's set_weights does."""
    x, sigma, cond = _inputs(eager)
    out = []
    for _ in range(2):
        with torch.no_grad():
            out.append((compiled.velocity(x, sigma, cond), eager.velocity(x, sigma, cond)))
            for m in (eager, compiled):
                for name, p in m.transformer.named_parameters():
                    if "lora_B" in name:
                        p.mul_(-2.0)
    return out


@pytest.mark.slow
def test_regional_compile_by_inductor_with_lora_added_after_gives_the_eager_velocity():
    """Inductor really compiles (C++ kernels built on 2 cores: 15-30 s); the other compile tests trace with the eager
    backend and stay in the fast tier."""
    # one block (one graph to compile: about 10 s of inductor on 2 cores), LoRA injected after compile() as the roles
    # do; inductor's kernels against eager to float tolerance, before and after new weights reach the compiled block
    torch._dynamo.reset()
    eager = _with_lora(SD3Adapter.tiny(num_layers=1))
    compiled = SD3Adapter.tiny(num_layers=1)
    apply_compile(compiled.transformer, "regional")
    _with_lora(compiled)
    assert sorted(dict(compiled.transformer.named_parameters())) == sorted(dict(eager.transformer.named_parameters()))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (v, v_eager), (v2, v2_eager) = _velocity_after_weight_change(eager, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 1  # compiled once, LoRA in it
    torch.testing.assert_close(v, v_eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v2, v2_eager, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(v2, v, atol=1e-4)  # the LoRA counts
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compile_traces_each_block_kind_once_and_keeps_the_velocity(mode):
    # the same code path with a tracing backend (no kernels to build): regional compiles one graph per kind of block
    # (3 blocks, the last context_pre_only: 2 graphs), full one graph; aot_eager runs the traced graph's ops
    torch._dynamo.reset()
    eager = _with_lora(SD3Adapter.tiny(num_layers=3))
    compiled = SD3Adapter.tiny(num_layers=3)
    apply_compile(compiled.transformer, mode, backend="aot_eager")
    _with_lora(compiled)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (v, v_eager), (v2, v2_eager) = _velocity_after_weight_change(eager, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + (2 if mode == "regional" else 1)
    torch.testing.assert_close(v, v_eager, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v2, v2_eager, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_apply_compile_rejects_a_transformer_without_blocks():
    with pytest.raises(ValueError, match="model.compile=regional compiles transformer_blocks, which Linear"):
        apply_compile(torch.nn.Linear(2, 2), "regional")


def _recording_sdpa(monkeypatch) -> list:
    """Record, at each SDPA call, which backends the global SDPA flags allow (what sdpa_kernel sets)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return seen


@pytest.mark.parametrize("kind", ["sd3_tiny", "flux_tiny"])
def test_attention_modes_give_the_same_velocity_and_run_where_forced(monkeypatch, kind):
    model = build_model(ModelConfig(kind=kind))
    x, sigma, cond = _inputs(model)
    seen = _recording_sdpa(monkeypatch)
    with torch.no_grad():
        v = {}
        for mode in ("auto", "math", "flash"):
            model.attention = mode
            seen.clear()
            v[mode] = model.velocity(x, sigma, cond)
            assert seen, "the transformer's attention did not go through F.scaled_dot_product_attention"
            assert set(seen) == {{"auto": (True, True), "math": (False, True), "flash": (True, False)}[mode]}
    torch.testing.assert_close(v["flash"], v["auto"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v["math"], v["auto"], atol=1e-5, rtol=1e-4)


def test_a_cuda_only_backend_on_cpu_fails_before_the_model_loads(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model loaded before the attention setting was checked")

    monkeypatch.setattr(SD3Adapter, "tiny", no_load)
    for mode in ("cudnn", "efficient"):
        with pytest.raises(ValueError) as e:
            build_model(ModelConfig(kind="sd3_tiny", attention=mode))
        assert str(e.value) == (
            f"model.attention={mode!r} is a CUDA kernel but the model runs on cpu; set "
            "model.attention=auto (or flash or math, which a CPU has)"
        )


def test_gradient_checkpointing_recomputes_under_the_forward_backend(monkeypatch):
    model = _with_lora(build_model(ModelConfig(kind="sd3_tiny", attention="math")))
    x, sigma, cond = _inputs(model)

    def grads():
        model.transformer.zero_grad(set_to_none=True)
        model.velocity(x, sigma, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.requires_grad}

    plain = grads()
    model.enable_gradient_checkpointing()
    seen = _recording_sdpa(monkeypatch)
    checkpointed = grads()
    assert len(seen) == 2 * 2 and set(seen) == {(False, True)}  # 2 blocks: forward, then recompute, both math
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_the_attention_context_names_the_setting_when_torch_has_no_kernel():
    q = torch.randn(1, 1, 4, 8)  # a CPU has no efficient kernel (build_model refuses it first)
    with pytest.raises(RuntimeError) as e:
        with attention("efficient"):
            F.scaled_dot_product_attention(q, q, q)
    assert str(e.value) == (
        "model.attention='efficient': torch's EFFICIENT_ATTENTION kernel cannot run this attention "
        "call (No viable backend for scaled_dot_product_attention was found. This is likely due "
        "to turning off both the math kernel and the fused kernels.); set model.attention=auto to "
        "let torch choose"
    )


@pytest.mark.parametrize("model", [GaussianFlow(shape=(1, 2, 2)), SD3Adapter.tiny()], ids=["gaussian", "tiny_sd3"])
def test_device_noise_on_cpu_is_host_noise_and_a_pair_depends_only_on_its_seed(model):
    common = dict(num_steps=3, gamma=0.1)
    host = sample_pairs(model, ["a", "b", "c"], [5, 6, 7], **common)
    device = sample_pairs(model, ["a", "b", "c"], [5, 6, 7], noise_device="device", **common)
    for f in ("xs", "vs", "x_final"):
        assert torch.equal(getattr(host, f), getattr(device, f))
    for noise_device in ("host", "device"):
        alone = sample_pairs(model, ["c"], [7], noise_device=noise_device, **common)
        assert torch.equal(alone.xs[0, :, 0], host.xs[2, :, 0])  # the start states: the seed's noise alone
        if isinstance(model, GaussianFlow):  # an elementwise model: the whole trajectory
            assert torch.equal(alone.xs[0], host.xs[2]) and torch.equal(alone.x_final[0], host.x_final[2])
    with pytest.raises(ValueError, match=r"sampling.noise_device must be one of \('host', 'device'\), got 'gpu'"):
        sample_pairs(model, ["a"], [5], noise_device="gpu", **common)


def test_device_noise_on_cpu_is_host_noise_for_flow_grpo_groups():
    model = GaussianFlow(shape=(1, 2, 2))
    common = dict(group_size=3, num_steps=4, window=2)
    host = sample_groups(model, ["a", "b"], [5, 6], **common)
    device = sample_groups(model, ["a", "b"], [5, 6], noise_device="device", **common)
    for f in ("xs", "x_next", "log_probs", "steps", "x_final"):
        assert torch.equal(getattr(host, f), getattr(device, f))


def test_host_copies_on_cpu_stack_the_tensors_given():
    rec = HostCopies("cpu")
    parts = [torch.full((2, 3), float(i)) for i in range(4)]
    for t in parts:
        rec.add(t)
    assert torch.equal(rec.stack(1), torch.stack(parts, 1))


def test_learner_metrics_read_once_per_update_equal_reading_each_micro_batch():
    from learner.epoch import EpochState

    g = torch.Generator().manual_seed(0)
    metrics = [
        (
            share,
            {
                "loss": torch.randn((), generator=g),
                "log_rho_abs_max": torch.rand((), generator=g),
                "clip_frac": torch.rand((), generator=g),
            },
        )
        for share in (0.3, 0.45, 0.25)
    ]
    ep = EpochState.__new__(EpochState)  # only the running sums that metrics go to
    ep.sums = {}
    ep.add_metrics(metrics, updates_per_epoch=3)
    expected: dict = {}
    for share, m in metrics:  # the per-micro-batch reading it replaced
        for k, val in m.items():
            if k == "log_rho_abs_max":
                expected[k] = max(expected.get(k, 0.0), float(val))
            else:
                expected[k] = expected.get(k, 0.0) + float(val) * share / 3
    assert ep.sums == expected and list(ep.sums) == list(expected)


def test_the_gpu_bench_takes_the_same_switches(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    smoke = [
        "--smoke",
        "--steps",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--sampler-batch",
        "2",
        "--learner-micro-batch",
        "2",
    ]
    torch._dynamo.reset()
    report = bench.main([*smoke, "--compile", "regional", "--compile-backend", "eager", "--sdpa", "math"])
    assert report["options"]["compile"] == "regional" and report["options"]["sdpa"] == "math"
    assert report["sampler_images_per_s"] > 0 and report["learner_images_per_s"] > 0
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"^--sdpa='cudnn' is a CUDA kernel but the model runs on cpu; set --sdpa="):
        bench.main([*smoke, "--sdpa", "cudnn"])
