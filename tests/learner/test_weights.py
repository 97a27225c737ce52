"""The checksum is equal iff the weights are bit-identical, in both of its schemes (bytes; word fingerprint, checked
against a numpy reference) and without copying the tensors; Weights travel as out-of-band buffers. Weights.load_into
and load_checkpoint refuse what would leave a model silently holding other weights: unknown names, a corrupted
payload, a dtype-narrowing copy (refused before copying), a checkpoint whose names do not match."""

import pickle
import re
import shutil
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

import learner.weights as weights_module
from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.learner import Learner
from learner.weights import ROW_WORDS, Weights, checksum, word_fingerprint
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


# -- checksum -------------------------------------------------------------------------------------------------
@pytest.fixture(params=["bytes", "words"])
def scheme(request, monkeypatch):
    """Run a test under each digest scheme: raw bytes (small payloads) and the word fingerprint (large ones)."""
    if request.param == "words":
        monkeypatch.setattr(weights_module, "FINGERPRINT_FROM_BYTES", -1)
    return request.param


def payload() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.weight": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: not a whole number of words
        "c.step": torch.tensor(11),  # 0-dim
        "d.mask": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 4),
    }


def flip_bit(t: torch.Tensor, byte: int, bit: int) -> torch.Tensor:
    out = t.clone()
    out.reshape(-1).view(torch.uint8)[byte] ^= 1 << bit
    return out


def test_checksum_is_equal_iff_the_weights_are_bit_identical(scheme):
    w = payload()
    digest = checksum(w)
    assert re.fullmatch("[0-9a-f]{32}", digest)
    assert checksum({n: t.clone() for n, t in w.items()}) == digest
    transposed = {**w, "a.weight": w["a.weight"].T.contiguous().T}  # same values, non-contiguous strides
    assert not transposed["a.weight"].is_contiguous() and checksum(transposed) == digest
    for name, t in w.items():
        for byte in range(t.numel() * t.element_size()):
            assert checksum({**w, name: flip_bit(t, byte, byte % 8)}) != digest, (name, byte)
    assert checksum({**w, "a.weight": flip_bit(w["a.weight"], 59, 7)}) != digest  # a sign bit
    renamed = {("z.weight" if n == "a.weight" else n): t for n, t in w.items()}
    assert checksum(renamed) != digest
    assert checksum({**w, "a.weight": w["a.weight"].reshape(5, 3)}) != digest  # same bytes, other shape
    assert checksum({**w, "a.weight": w["a.weight"].view(torch.int32)}) != digest  # same bytes, other dtype
    assert checksum({**w, "e.empty": torch.empty(0, 3)}) != digest
    assert checksum({n: t for n, t in w.items() if n != "e.empty"}) != digest


def test_the_two_schemes_give_different_digests(monkeypatch):
    w = payload()
    digest = checksum(w)
    monkeypatch.setattr(weights_module, "FINGERPRINT_FROM_BYTES", -1)
    assert checksum(w) != digest


def test_checksum_hashes_cpu_tensors_in_place():
    """xxh3 is handed each tensor's own memory (no tobytes copy); Python allocates nothing payload-sized."""
    tensors = {f"layer{i}.weight": torch.full((2**20,), float(i)) for i in range(8)}  # 32 MiB
    handed: list[int] = []
    xxh3_128 = xxhash.xxh3_128

    class Recording:
        def __init__(self):
            self.h = xxh3_128()

        def update(self, data):
            if isinstance(data, np.ndarray):
                handed.append(data.__array_interface__["data"][0])
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    want = checksum(tensors)
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(weights_module.xxhash, "xxh3_128", Recording)
            assert checksum(tensors) == want
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert handed == [tensors[n].data_ptr() for n in sorted(tensors)]
    assert peak < 2**20, f"checksum allocated {peak} bytes: it copied the payload"


# The word fingerprint by its definition (learner.weights.word_fingerprint), in numpy's uint64 arithmetic.
_U = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _U(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


def reference_fingerprint(raw: bytes) -> list[int]:
    raw += bytes(-len(raw) % 4)
    w = np.frombuffer(raw, "<i4").astype(np.int64).view(np.uint64)  # signed words, sign-extended
    i = np.arange(len(w), dtype=np.uint64)
    lanes = []
    for position_stream, row_stream in ((0, 1 << 48), (2 << 48, 3 << 48)):
        k = (_splitmix64(i % _U(ROW_WORDS) + _U(position_stream)) | _U(1)) * (
            _splitmix64(i // _U(ROW_WORDS) + _U(row_stream)) | _U(1)
        )
        lanes.append(int((w * k).sum(dtype=np.uint64)))
    return [x - (1 << 64) if x >> 63 else x for x in lanes]


def test_word_fingerprint_matches_its_definition():
    # splitmix64's first output for seed 0, as published: the keys start from the reference generator
    assert weights_module._odd_keys(0, 1, torch.device("cpu")).item() == 0xE220A8397B1DCDAF - (1 << 64)
    one = torch.tensor([1], dtype=torch.int32)  # lane l = P_l[0] * R_l[0]: the first keys
    assert word_fingerprint(one).tolist() == reference_fingerprint(b"\x01\0\0\0")
    tripled = [(3 * x + 2**63) % 2**64 - 2**63 for x in word_fingerprint(one).tolist()]  # linear, modulo 2^64
    assert word_fingerprint(one * 3).tolist() == tripled
    g = torch.Generator().manual_seed(1)
    for t in (
        torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g),  # 3 whole words and one padded word
        torch.randn(3, generator=g).to(torch.bfloat16),
        torch.randn(2 * ROW_WORDS + 5, generator=g),  # two full rows and a partial one
        torch.tensor(-1.5),
        torch.empty(0, 3),
    ):
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert word_fingerprint(t).tolist() == reference_fingerprint(raw), (t.dtype, tuple(t.shape))
    misaligned = torch.randn(40, generator=g).to(torch.bfloat16)[1:30]  # starts 2 bytes into an int32 word
    assert word_fingerprint(misaligned).tolist() == word_fingerprint(misaligned.clone()).tolist()


def test_word_fingerprint_sees_any_one_bit_flip_and_a_swap_of_two_words():
    g = torch.Generator().manual_seed(2)
    t = torch.randint(-(2**31), 2**31, (2 * ROW_WORDS + 3,), dtype=torch.int32, generator=g)
    want = word_fingerprint(t)
    n_bytes = t.numel() * 4
    for byte in [0, 1, 2, 3, 4 * ROW_WORDS - 1, 4 * ROW_WORDS, n_bytes // 2, n_bytes - 1]:
        for bit in range(8):
            got = word_fingerprint(flip_bit(t, byte, bit))
            assert (got != want).all(), (byte, bit)  # both lanes change
    for i, j in [(0, 1), (5, ROW_WORDS + 5), (7, 2 * ROW_WORDS + 2)]:  # in a row; same column, two rows; any
        swapped = t.clone()
        swapped[[i, j]] = t[[j, i]]
        assert (word_fingerprint(swapped) != want).all(), (i, j)
    top_bits = torch.tensor([1, 1 - 2**31, 0], dtype=torch.int32)  # words that differ only in the top bit
    assert (word_fingerprint(top_bits[[1, 0, 2]]) != word_fingerprint(top_bits)).all()
    rows = t[: 2 * ROW_WORDS].view(2, ROW_WORDS)
    assert (word_fingerprint(rows.flip(0)) != word_fingerprint(rows)).all()  # two whole rows swapped


def test_weights_pickle_as_out_of_band_buffers_and_load_from_read_only_memory():
    """What Ray does: the bytes go out of band, and the receiver's tensors are read-only views of them."""
    tensors = {n.replace(".", "_"): t for n, t in payload().items()} | {"f_big": torch.randn(2**14)}
    w = Weights(version=4, tensors=tensors, checksum=checksum(tensors))
    buffers = []
    data = pickle.dumps(w, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 4096  # the 64 KiB tensor is not in the stream
    # one buffer (Ray pays per out-of-band buffer), every tensor at a 64-byte aligned offset, in order: a_weight
    # 60 bytes, b_weight 14, c_step 8, d_mask 3 take 64 each, e_empty 0, f_big 65,536
    assert [memoryview(b).nbytes for b in buffers] == [4 * 64 + 65_536]
    views = [memoryview(b).toreadonly() for b in buffers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning escapes
        got = pickle.loads(data, buffers=views)
    assert got.version == 4 and got.checksum == w.checksum
    layout = {n: (t.dtype, t.shape) for n, t in tensors.items()}
    assert {n: (t.dtype, t.shape) for n, t in got.tensors.items()} == layout
    base = np.frombuffer(views[0], np.uint8).__array_interface__["data"][0]
    offsets = {n: t.data_ptr() - base for n, t in got.tensors.items() if t.numel()}
    assert offsets == {"a_weight": 0, "b_weight": 64, "c_step": 128, "d_mask": 192, "f_big": 256}  # views, not copies
    target = torch.nn.Module()
    for name, t in tensors.items():
        target.register_parameter(name, torch.nn.Parameter(torch.zeros_like(t), requires_grad=False))
    assert got.load_into(target) == w.checksum
    assert same(params(target), tensors)


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
    bad = Weights(3, tensors, checksum(tensors))  # a valid payload, just for another model
    target = Net(seed=2)
    before = params(target)
    with pytest.raises(
        ValueError,
        match=re.escape("weights name parameters the model lacks (LoRA config differs?): ['lin.lora_A.weight']"),
    ):
        bad.load_into(target)
    assert same(params(target), before)


def test_lora_weights_into_a_model_without_the_adapter_are_refused():
    cfg = load_config("tiny-cpu", ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
    lora_model = SD3Adapter.tiny(seed=0)
    make_trainable(lora_model.transformer, cfg.lora)
    w = Weights.of(lora_model.transformer, version=1)
    assert w.tensors and all("lora_" in n for n in w.tensors)
    with pytest.raises(
        ValueError,
        match=r"^weights name parameters the model lacks \(LoRA config differs\?\): "
        r"\['[^']*lora_A[^']*', '[^']*', '[^']*'\]$",
    ):
        w.load_into(SD3Adapter.tiny(seed=0).transformer)  # full-weight model: no lora_ parameters


def test_a_corrupted_payload_fails_its_checksum_and_is_not_loaded():
    w = Weights.of(Net(seed=1), version=3)
    w.tensors["lin.weight"][0, 0] += 1.0  # bytes changed after the checksum was taken
    target = Net(seed=2)
    before = params(target)
    got = checksum(w.tensors)
    assert got != w.checksum
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"weights version 3 failed its checksum ({got} != {w.checksum}): the payload was corrupted in transit; "
            "refusing to sample with it"
        ),
    ):
        w.load_into(target)
    assert same(params(target), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_narrowing_copy_is_refused_before_anything_is_copied(dtype):
    net = Net(seed=1)
    with torch.no_grad():  # values exact in fp16 and bf16 (k / 8): only the
        net.lin.weight.copy_(torch.arange(6.0).view(2, 3) / 8)  # dtype would tell the copies apart
        net.lin.bias.copy_(torch.tensor([0.5, -0.25]))
    w = Weights.of(net, version=7)
    target = Net(seed=2).to(dtype)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(
        RuntimeError,
        match=rf"^cannot load version 7: lin.weight is torch.float32 \(2, 3\) in the weights "
        rf"but {dtype} \(2, 3\) in the model \(model.dtype or LoRA settings differ\)$",
    ):
        w.load_into(target)
    assert same(params(target), before)  # the model still holds what it held


# -- load_checkpoint ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full-weight tiny SD3 learner after one update, checkpointed: (config, folder, its weights)."""
    cfg = load_config(
        "tiny-cpu",
        [
            "lora.enabled=false",
            "sampling.num_steps=2",
            "train.pairs_per_epoch=1",
            "train.updates_per_epoch=1",
            "train.lr=1e-2",
        ],
    )
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
    assert learner.weights().checksum != saved.checksum  # starts at the base weights
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
    msg = (
        f"checkpoint {folder} does not match this model's trainable parameters (LoRA config?): "
        f"{names if isinstance(names, list) else ''}"
    )
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        load_checkpoint(folder, learner)
    after = learner.weights()  # nothing was loaded: still the base, version 0
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
    _refused(cfg, folder, None, lora=True)  # names differ entirely: lora_A/B vs base weights


def test_a_checkpoint_with_changed_bytes_fails_its_checksum(copy_of):
    cfg, folder, _ = copy_of
    tensors = load_file(str(folder / "trainable.safetensors"))
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1.0
    _rewrite(folder, tensors)
    msg = f"checkpoint {folder}: restored weights do not match the saved checksum"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        load_checkpoint(folder, fresh_learner(cfg))


def test_a_packed_snapshot_moves_to_a_model_device_as_one_buffer():
    # a GPU sampler's load: the packed bytes cross once, then every tensor is a view of the moved buffer (the meta
    # device stands in for CUDA here: same code, no data)
    from torch.overrides import TorchFunctionMode

    class Copies(TorchFunctionMode):  # every tensor copy or move the snapshot makes
        names = {"to", "copy_", "clone", "cuda", "_foreach_copy_", "empty_like", "contiguous"}

        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in self.names:
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    w = Weights.of(Net(seed=1), version=1)
    assert len(w.tensors) > 1
    with Copies() as copies:
        moved = w._on(torch.device("meta"))
    assert copies.calls == ["to"]  # one move: the packed buffer's
    assert list(moved) == list(w.tensors)
    assert {n: (t.device.type, t.dtype, t.shape) for n, t in moved.items()} == {
        n: ("meta", t.dtype, t.shape) for n, t in w.tensors.items()
    }
    # one storage: every tensor a view of the one moved buffer (the packed size), at its packed offset
    assert len({t.untyped_storage()._cdata for t in moved.values()}) == 1
    assert {t.untyped_storage().nbytes() for t in moved.values()} == {w.packed.numel()}
    assert w.packed.numel() >= sum(t.nbytes for t in w.tensors.values())
    assert [t.storage_offset() * t.element_size() for t in moved.values()] == [
        v.storage_offset() * v.element_size() for v in w.tensors.values()
    ]
    assert len({t.storage_offset() for t in moved.values()}) == len(moved)
    assert w._on(torch.device("cpu")) is w.tensors  # a CPU model reads the snapshot in place
