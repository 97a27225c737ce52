"""Weight broadcast cost: gloo collective vs Ray object store vs a plain memory copy of the same bytes, and the
weight-sync target: a verified broadcast to every sampler within 3 x (raw copy) + 50 ms.

Usage::

    python bench/bench_broadcast.py             # LoRA 4 MiB and 71.7 MiB, full-weight 64 MiB; 2 samplers (~1 min)
    python bench/bench_broadcast.py --smoke     # tiny payload, 1 sampler, 1 repeat: checks that it runs (CI)
    python bench/bench_broadcast.py --payload 64:16 --samplers 2 --repeats 5

One learner and ``--samplers`` sampler actors on a local Ray instance hold the same float32 payload layout, one
``--payload MIB:TENSORS`` at a time (equal tensors). The defaults: ``4:384`` and ``71.7:384`` are LoRA adapters
with SD3.5-M's 384 factor matrices (71.7 MiB is its 18.8 M parameters at rank 32, kept in fp32; 4 MiB a low-rank
one), which travel through the object store; ``64:16`` is a full-weight payload for the collective. Each row is
timed ``--repeats`` times after one warm-up; the table shows medians and each row's ratio to the raw copy.

Rows:
- ``raw copy``: ``dst.copy_(src)`` for every payload tensor, inside a sampler (same threads as the transfers).
- ``checksum``: ``learner.weights.checksum`` over the payload on one rank (the verification each side pays).
- ``word fingerprint``: ``learner.weights.word_fingerprint`` over every tensor on one rank's CPU: what the checksum
  of a payload over ``FINGERPRINT_FROM_BYTES`` (full weights, fingerprinted on their GPU) would cost on a CPU.
- ``collective transfer``: ``WeightGroup`` bytes only (header + buckets + unpacking), the slowest sampler.
- ``collective send+receive``: driver wall time of ``send`` and all ``receive`` calls, including the learner's
  checksum, every sampler's checksum after receiving and the Ray call overhead. Target row.
- ``object store get+copy``: ``ray.put`` of the bare tensors in the learner, every sampler's ``ray.get`` and copy into
  its parameters, nothing verified (torch tensors are pickled by copy: the bytes' cost before ``Weights``).
- ``object store broadcast``: what a LoRA broadcast does: the learner's ``Weights.of`` (snapshot and checksum) stored
  as the call's result, every sampler's ``Weights.load_into`` (verify, copy, checksum after loading). Target row.

Target rows pass when their median is at most 3 x (raw copy median) + 50 ms. The exit status is 0 either way
(timings on a shared machine are no test); ``--smoke`` only shows that every path runs.

Writes ``bench/results/broadcast.json`` (``--smoke``: a file in the temp directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # the project runs Ray with token auth; must precede `import ray`

import ray
import torch

from learner.collective import DEFAULT_BUCKET_BYTES, WeightGroup, free_port, node_ip
from learner.weights import Weights, checksum, word_fingerprint
from models.lora import trainable

DEFAULT_PAYLOADS = ("4:384", "71.7:384", "64:16")
TARGET_ROWS = ("collective send+receive", "object store broadcast")
ORDER = ("raw copy", "checksum", "word fingerprint", "collective transfer", "collective send+receive",
         "object store get+copy", "object store broadcast")  # fmt: skip


def target_bound_s(raw_copy_s: float) -> float:
    """The weight-sync target for one payload: 3 x (raw copy of its bytes) + 50 ms."""
    return 3 * raw_copy_s + 0.050


def make_payload(mb: float, n_tensors: int, fill: float) -> torch.nn.Module:
    """A module of n_tensors float32 parameters (``layer000`` ...) of equal size, ``mb`` MiB in total."""
    numel = int(mb * 2**20) // 4 // n_tensors
    module = torch.nn.Module()
    for i in range(n_tensors):
        module.register_parameter(f"layer{i:03d}", torch.nn.Parameter(torch.full((numel,), fill + i)))
    return module


@ray.remote(num_cpus=0)  # the actors wait on sockets; num_cpus=0 lets 1 + N of them start on a small machine
class BenchLearner:
    def __init__(self):
        self.model: torch.nn.Module | None = None
        self.buffer: torch.Tensor | None = None
        self.group: WeightGroup | None = None

    def set_payload(self, mb: float, n_tensors: int) -> None:
        self.model = make_payload(mb, n_tensors, fill=1.0)
        self.buffer = None

    def address(self) -> tuple[str, int]:
        ip = node_ip()
        return ip, free_port(ip)

    def join(self, world_size: int, addr: str, port: int, bucket_bytes: int) -> None:
        self.group = WeightGroup(0, world_size, addr, port, bucket_bytes=bucket_bytes)

    def send(self, version: int) -> dict:
        self.group.send(trainable(self.model), version=version)
        return self.group.last_stats

    def put(self) -> list:
        # Wrapped in a list so Ray hands the caller the reference, not the value.
        return [ray.put(trainable(self.model))]

    def snapshot(self, version: int) -> Weights:
        # as the Learner publishes: packed into the previous snapshot's buffer (Ray stored that one as it returned)
        w = Weights.of(self.model, version=version, buffer=self.buffer)
        self.buffer = w.packed
        return w

    def checksum_s(self) -> float:
        t = time.perf_counter()
        checksum(trainable(self.model))
        return time.perf_counter() - t

    def fingerprint_s(self) -> float:
        t = time.perf_counter()
        torch.stack([word_fingerprint(p) for p in trainable(self.model).values()]).tolist()
        return time.perf_counter() - t

    def close(self) -> None:
        self.group.close()


@ray.remote(num_cpus=0)
class BenchSampler:
    def __init__(self):
        self.model: torch.nn.Module | None = None
        self.source: dict[str, torch.Tensor] = {}
        self.group: WeightGroup | None = None

    def set_payload(self, mb: float, n_tensors: int) -> None:
        self.model = make_payload(mb, n_tensors, fill=0.0)
        self.source = trainable(make_payload(mb, n_tensors, fill=2.0))

    def join(self, rank: int, world_size: int, addr: str, port: int) -> None:
        self.group = WeightGroup(rank, world_size, addr, port)

    def receive(self) -> dict:
        self.group.receive(trainable(self.model))
        return self.group.last_stats

    def load_tensors(self, wrapped: list) -> None:
        tensors = ray.get(wrapped[0])
        params = trainable(self.model)
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)

    def load(self, weights: Weights) -> str:
        return weights.load_into(self.model)

    def raw_copy_s(self) -> float:
        params = trainable(self.model)
        t = time.perf_counter()
        with torch.no_grad():
            for name, src in self.source.items():
                params[name].copy_(src)
        return time.perf_counter() - t

    def close(self) -> None:
        self.group.close()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-touch page faults, connection set-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(learner, samplers: list, mb: float, n_tensors: int, repeats: int) -> dict[str, list[float]]:
    """Every row's timings (seconds) for one payload, the actors already in one weight group."""
    ray.get([a.set_payload.remote(mb, n_tensors) for a in [learner, *samplers]])
    rows: dict[str, list[float]] = {}
    rows["raw copy"] = [ray.get(samplers[0].raw_copy_s.remote()) for _ in range(repeats + 1)][1:]
    rows["checksum"] = [ray.get(learner.checksum_s.remote()) for _ in range(repeats + 1)][1:]
    rows["word fingerprint"] = [ray.get(learner.fingerprint_s.remote()) for _ in range(repeats + 1)][1:]

    version = iter(range(1, 10**6))
    transfer: list[float] = []

    def collective():
        stats = ray.get([learner.send.remote(version=next(version))] + [s.receive.remote() for s in samplers])
        transfer.append(max(s["transfer_s"] for s in stats[1:]))

    rows["collective send+receive"] = timed(collective, repeats)
    rows["collective transfer"] = transfer[1:]

    def object_store_bytes():
        (ref,) = ray.get(learner.put.remote())
        ray.get([s.load_tensors.remote([ref]) for s in samplers])
        del ref

    rows["object store get+copy"] = timed(object_store_bytes, repeats)

    def object_store_weights():
        ref = learner.snapshot.remote(version=next(version))  # the result lands in the object store
        proofs = ray.get([s.load.remote(ref) for s in samplers])  # each sampler maps it and verifies
        if len(set(proofs)) != 1:
            raise RuntimeError(f"samplers disagree on the loaded checksum: {proofs}")
        del ref

    rows["object store broadcast"] = timed(object_store_weights, repeats)
    return rows


def summarize(rows: dict[str, list[float]], mb: float) -> dict:
    """Medians, ratios and the target verdicts for one payload's rows."""
    raw = statistics.median(rows["raw copy"])
    bound = target_bound_s(raw)
    results = {}
    for name in ORDER:
        median = statistics.median(rows[name])
        r = {"median_s": median, "ratio_to_raw_copy": median / raw, "GiB_per_s": mb / 1024 / median,
             "samples_s": rows[name]}  # fmt: skip
        if name in TARGET_ROWS:
            r |= {"ratio_to_target": median / bound, "target": "PASS" if median <= bound else "FAIL"}
        results[name] = r
    return {"target_bound_s": bound, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--payload",
        nargs="+",
        default=list(DEFAULT_PAYLOADS),
        metavar="MIB:TENSORS",
        help="float32 payloads measured one after another (size in MiB : number of equal tensors)",
    )
    ap.add_argument("--samplers", type=int, default=2, help="number of sampler actors (group is 1 + this)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (after one warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20, help="WeightGroup bucket size")
    ap.add_argument("--smoke", action="store_true", help="0.25 MiB in 8 tensors, 1 sampler, 1 repeat (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/broadcast.json)")
    args = ap.parse_args()
    if args.smoke:
        args.payload, args.samplers, args.repeats = ["0.25:8"], 1, 1
    out = Path(args.out or (Path(tempfile.gettempdir()) / "fdfo_broadcast_smoke.json" if args.smoke
                            else Path(__file__).parent / "results" / "broadcast.json"))  # fmt: skip
    payloads = []
    for spec in args.payload:
        mb, _, n = spec.partition(":")
        try:
            payloads.append((float(mb), int(n)))
        except ValueError:
            ap.error(f"--payload {spec!r}: expected MIB:TENSORS, e.g. 71.7:384")

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    learner = BenchLearner.remote()
    samplers = [BenchSampler.remote() for _ in range(args.samplers)]
    addr, port = ray.get(learner.address.remote())
    world = 1 + args.samplers
    ray.get(
        [learner.join.remote(world, addr, port, int(args.bucket_mb * 2**20))]
        + [s.join.remote(rank, world, addr, port) for rank, s in enumerate(samplers, start=1)]
    )
    report = []
    for mb, n_tensors in payloads:
        rows = measure(learner, samplers, mb, n_tensors, args.repeats)
        report.append({"MiB": mb, "tensors": n_tensors, **summarize(rows, mb)})
    ray.get([a.close.remote() for a in [learner, *samplers]])
    ray.shutdown()

    for p in report:
        print(f"\npayload {p['MiB']:g} MiB float32 in {p['tensors']} tensors, learner -> {args.samplers} samplers, "
              f"bucket {args.bucket_mb:g} MiB, median of {args.repeats} on {os.cpu_count()} CPUs; "
              f"target 3 x raw copy + 50 ms = {p['target_bound_s'] * 1e3:.1f} ms")  # fmt: skip
        print(f"{'path':<26}{'median ms':>11}{'x raw copy':>12}{'GiB/s':>9}{'x target':>10}  target")
        for name, r in p["results"].items():
            verdict = f"{r['ratio_to_target']:>10.2f}  {r['target']}" if "target" in r else ""
            ms, ratio, rate = r["median_s"] * 1e3, r["ratio_to_raw_copy"], r["GiB_per_s"]
            print(f"{name:<26}{ms:>11.1f}{ratio:>12.1f}{rate:>9.2f}{verdict}")

    out.parent.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "out": str(out), "cpus": os.cpu_count(), "torch": torch.__version__,
              "ray": ray.__version__, "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip
    out.write_text(json.dumps({"config": config, "payloads": report}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
