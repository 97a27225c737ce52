"""Weight broadcast cost: gloo collective vs Ray object store vs a plain memory copy of the same bytes.

Usage::

    python bench/bench_broadcast.py --mb 64 --tensors 16 --samplers 2 --repeats 5

One learner and ``--samplers`` sampler actors on a local Ray instance hold the same float32 payload layout.
Each row is timed ``--repeats`` times after one warm-up; the table shows medians and each row's ratio to the
raw copy (one ``Tensor.copy_`` of the payload inside a sampler actor, same threads as the transfers).

Rows:
- ``raw copy``: ``dst.copy_(src)`` for every payload tensor, inside a sampler.
- ``collective transfer``: ``WeightGroup`` bytes only (header + buckets + unpacking), the slowest sampler.
- ``collective send+receive``: driver wall time of ``send`` and all ``receive`` calls, including both sides'
  checksums and the Ray call overhead (what the driver's broadcast stage would take).
- ``object store get+copy``: driver wall time of ``ray.put`` in the learner, then every sampler's ``ray.get`` and
  copy into its parameters (no verification), as a LoRA broadcast does today.
- ``checksum``: ``learner.weights.checksum`` over the payload on one rank (the verification each side pays).

Writes ``bench/results/broadcast.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")  # the project runs Ray with token auth; must precede `import ray`

import ray
import torch

from learner.collective import DEFAULT_BUCKET_BYTES, WeightGroup, free_port, node_ip
from learner.weights import checksum


def make_payload(mb: float, n_tensors: int, fill: float) -> dict[str, torch.Tensor]:
    """n_tensors float32 tensors of equal size, ``mb`` MiB in total."""
    numel = int(mb * 2**20) // 4 // n_tensors
    return {f"layer{i:03d}.weight": torch.full((numel,), fill + i, dtype=torch.float32) for i in range(n_tensors)}


@ray.remote(num_cpus=0)  # the actors wait on sockets; num_cpus=0 lets 1 + N of them start on a small machine
class BenchLearner:
    def __init__(self, mb: float, n_tensors: int):
        self.tensors = make_payload(mb, n_tensors, fill=1.0)
        self.group: WeightGroup | None = None

    def address(self) -> tuple[str, int]:
        ip = node_ip()
        return ip, free_port(ip)

    def join(self, world_size: int, addr: str, port: int, bucket_bytes: int) -> None:
        self.group = WeightGroup(0, world_size, addr, port, bucket_bytes=bucket_bytes)

    def send(self, version: int) -> dict:
        self.group.send(self.tensors, version=version)
        return self.group.last_stats

    def put(self) -> list:
        # Wrapped in a list so Ray hands the caller the reference, not the value.
        return [ray.put(self.tensors)]

    def checksum_s(self) -> float:
        t = time.perf_counter()
        checksum(self.tensors)
        return time.perf_counter() - t

    def close(self) -> None:
        self.group.close()


@ray.remote(num_cpus=0)
class BenchSampler:
    def __init__(self, mb: float, n_tensors: int):
        self.params = make_payload(mb, n_tensors, fill=0.0)
        self.source = make_payload(mb, n_tensors, fill=2.0)
        self.group: WeightGroup | None = None

    def join(self, rank: int, world_size: int, addr: str, port: int) -> None:
        self.group = WeightGroup(rank, world_size, addr, port)

    def receive(self) -> dict:
        self.group.receive(self.params)
        return self.group.last_stats

    def load_ref(self, wrapped: list) -> None:
        tensors = ray.get(wrapped[0])
        with torch.no_grad():
            for name, t in tensors.items():
                self.params[name].copy_(t)

    def raw_copy_s(self) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for name, src in self.source.items():
                self.params[name].copy_(src)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=64, help="payload size in MiB (float32)")
    ap.add_argument("--tensors", type=int, default=16, help="number of equal tensors the payload is split into")
    ap.add_argument("--samplers", type=int, default=2, help="number of sampler actors (group is 1 + this)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (after one warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20, help="WeightGroup bucket size")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "broadcast.json"))
    args = ap.parse_args()

    ray.init(num_cpus=2, include_dashboard=False)
    learner = BenchLearner.remote(args.mb, args.tensors)
    samplers = [BenchSampler.remote(args.mb, args.tensors) for _ in range(args.samplers)]
    addr, port = ray.get(learner.address.remote())
    world = 1 + args.samplers
    ray.get(
        [learner.join.remote(world, addr, port, int(args.bucket_mb * 2**20))]
        + [s.join.remote(rank, world, addr, port) for rank, s in enumerate(samplers, start=1)]
    )

    rows: dict[str, list[float]] = {}
    rows["raw copy"] = [ray.get(samplers[0].raw_copy_s.remote()) for _ in range(args.repeats + 1)][1:]

    version = iter(range(1, 10**6))
    transfer: list[float] = []

    def collective():
        v = next(version)
        stats = ray.get([learner.send.remote(version=v)] + [s.receive.remote() for s in samplers])
        transfer.append(max(s["transfer_s"] for s in stats[1:]))

    rows["collective send+receive"] = timed(collective, args.repeats)
    rows["collective transfer"] = transfer[1:]

    def object_store():
        (ref,) = ray.get(learner.put.remote())
        ray.get([s.load_ref.remote([ref]) for s in samplers])
        del ref

    rows["object store get+copy"] = timed(object_store, args.repeats)
    rows["checksum"] = [ray.get(learner.checksum_s.remote()) for _ in range(args.repeats + 1)][1:]

    ray.get([a.close.remote() for a in [learner, *samplers]])
    ray.shutdown()

    raw = statistics.median(rows["raw copy"])
    order = ["raw copy", "collective transfer", "collective send+receive", "object store get+copy", "checksum"]
    results = {
        name: {
            "median_s": statistics.median(rows[name]),
            "ratio_to_raw_copy": statistics.median(rows[name]) / raw,
            "GiB_per_s": args.mb / 1024 / statistics.median(rows[name]),
            "samples_s": rows[name],
        }
        for name in order
    }
    print(f"\npayload {args.mb:g} MiB float32 in {args.tensors} tensors, learner -> {args.samplers} samplers, "
          f"bucket {args.bucket_mb:g} MiB, median of {args.repeats} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'path':<26}{'median ms':>11}{'x raw copy':>12}{'GiB/s':>9}")
    for name in order:
        r = results[name]
        print(f"{name:<26}{r['median_s'] * 1e3:>11.1f}{r['ratio_to_raw_copy']:>12.1f}{r['GiB_per_s']:>9.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
              "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip
    out.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
