"""The kill matrix: each role lost mid-run, and a whole node, on a localhost multi-node Ray cluster.

Usage::

    python bench/bench_faults.py                                  # every fault, 12 epochs of tiny-cpu each
    python bench/bench_faults.py --faults node learner --epochs 8
    python bench/bench_faults.py --smoke --faults node            # CI: the node fault, a short run

The cluster (``ray.cluster_utils.Cluster``, each node a raylet on this machine) gives each role its own node type
through custom resources, as a real deployment does (``runtime.<role>_resources``)::

    head       the driver only
    node "a"   {learner: 1, reward: 1, sampler: 1}   the learner, the reward actor and one sampler
    node "b"   {sampler: 1}                           the other sampler

Faults: ``none`` (the baseline), ``sampler`` / ``reward`` / ``learner`` (``ray.kill`` of that actor), ``node``
(a replacement node of type "a" joins, as an autoscaler would bring one, and node "a" is removed: the learner, the
reward actor and a sampler are lost at once). Each fault is injected once ``--kill-after`` epochs are done. Per
fault it prints and writes (``--out``): survived (the run finished every epoch, the accounting identity holds and
every sampler holds the final version), pairs lost by reason, the time to recover (from the fault to the next
epoch the run completes) and the wall time against the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAULTS = ("none", "sampler", "reward", "learner", "node")
ROLE_NODE = {"learner": 1, "reward": 1, "sampler": 1}
# fast failure detection: a removed node is declared dead within about 3 s instead of 30
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
RUN = [
    "runtime.sampler.count=2",
    "runtime.sampler.num_cpus=1",
    "runtime.learner.num_cpus=1",
    "runtime.reward.num_cpus=0.5",
    "runtime.sampler.resources={sampler: 1}",
    "runtime.reward.resources={reward: 1}",
    "runtime.learner.resources={learner: 1}",
    "train.pairs_per_epoch=16",
    "sampling.pairs_per_call=4",
    "sampling.num_steps=8",
    "train.checkpoint_every=4",
]


def start_cluster():
    """A head for the driver and one node of each role type; returns (cluster, {"a": node, "b": node})."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "_system_config": SYSTEM_CONFIG, "include_dashboard": False},
    )
    nodes = {
        "a": cluster.add_node(num_cpus=3, resources=dict(ROLE_NODE)),
        "b": cluster.add_node(num_cpus=1, resources={"sampler": 1}),
    }
    cluster.wait_for_nodes()
    return cluster, nodes


def inject(fault: str, cluster, nodes: dict) -> None:
    import ray

    if fault == "node":
        nodes["c"] = cluster.add_node(num_cpus=3, resources=dict(ROLE_NODE))  # the autoscaler's replacement
        cluster.wait_for_nodes()
        cluster.remove_node(nodes.pop("a"))
    elif fault != "none":
        ray.kill(
            ray.get_actor({"sampler": "fdfo/sampler/0", "reward": "fdfo/reward/0", "learner": "fdfo/learner"}[fault])
        )


def epochs_logged(history: Path) -> int:
    return history.read_text().count("\n") if history.exists() else 0


def run_fault(fault: str, epochs: int, kill_after: int, out_dir: Path, overrides: list[str], timeout_s: float) -> dict:
    """One run with ``fault`` injected after ``kill_after`` epochs, on a fresh cluster; its row of the matrix."""
    import ray

    from cluster.config import load_config
    from cluster.runtime import run_ray

    cluster, nodes = start_cluster()
    try:
        ray.init(address=cluster.address, namespace="fdfo", logging_level="WARNING", log_to_driver=False)
        cfg = load_config("tiny-cpu", RUN + [f"train.epochs={epochs}", f"output_dir={out_dir / fault}"] + overrides)
        result: dict = {}

        def target():
            try:
                result["out"] = run_ray(cfg)
            except BaseException as e:  # reported as not survived
                import traceback

                result["error"], result["traceback"] = repr(e), traceback.format_exc()

        t0 = time.perf_counter()
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        history = out_dir / fault / cfg.name / "history.jsonl"
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and epochs_logged(history) < kill_after and time.monotonic() < deadline:
            time.sleep(0.05)
        inject(fault, cluster, nodes)
        t_fault, logged = time.perf_counter(), epochs_logged(history)
        recovered = None
        while thread.is_alive() and time.monotonic() < deadline:
            if recovered is None and epochs_logged(history) > logged:
                recovered = time.perf_counter() - t_fault
            time.sleep(0.05)
        thread.join(timeout=max(deadline - time.monotonic(), 1.0))
        wall = time.perf_counter() - t0
        return row(fault, result, epochs, wall, recovered)
    finally:
        ray.shutdown()
        cluster.shutdown()


def row(fault: str, result: dict, epochs: int, wall: float, recovered: float | None) -> dict:
    """Survived or not, pairs lost by reason, recovery time, and the faults report of the run."""
    out = result.get("out")
    if out is None:
        return {
            "fault": fault,
            "survived": False,
            "error": result.get("error", "timed out"),
            "wall_s": wall,
            "traceback": result.get("traceback"),
        }
    ledger = out["ledger"]
    identity = (
        ledger["pairs_requested"]
        == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values()) + ledger["pairs_in_flight"]
    )
    synced = all(s["version"] == out["version"] for s in out["samplers"])
    return {
        "fault": fault,
        "survived": bool(identity and synced and len(out["history"]) == epochs),
        "pairs_lost": sum(ledger["pairs_dropped"].values()),
        "dropped": ledger["pairs_dropped"],
        "pairs_trained": ledger["pairs_trained"],
        "recover_s": recovered,
        "wall_s": wall,
        "version": out["version"],
        "faults": out["faults"],
        "heldout_gain": out["final"].get("heldout_reward_gain"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=None, help="epochs done before the fault (default: a third)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take before it counts as hung")
    ap.add_argument("--smoke", action="store_true", help="a short run (6 epochs, fault after 2)")
    ap.add_argument("--out", default="bench/results/faults.json")
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    epochs = 6 if args.smoke else args.epochs
    kill_after = args.kill_after or (2 if args.smoke else max(epochs // 3, 1))  # smoke: early enough to be noticed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fault in args.faults:
            rows.append(run_fault(fault, epochs, kill_after, Path(tmp), args.overrides, args.timeout))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "faults"}), flush=True)
    base = next((r["wall_s"] for r in rows if r["fault"] == "none"), None)
    print(f"\n{'fault':8} {'survived':8} {'pairs lost':>10} {'recover s':>9} {'wall s':>7} {'vs none':>7}  dropped")
    for r in rows:
        rec = "-" if r.get("recover_s") is None else f"{r['recover_s']:.1f}"
        ratio = f"{r['wall_s'] / base:.2f}" if base else "-"
        print(
            f"{r['fault']:8} {str(r['survived']):8} {r.get('pairs_lost', '-'):>10} {rec:>9} {r['wall_s']:7.1f} "
            f"{ratio:>7}  {r.get('dropped', r.get('error'))}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": epochs, "kill_after": kill_after, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
