"""The judge server's URL on a Ray cluster launcher cluster (cluster/deploy/ray-cluster.yaml): the judge node
advertises the custom resource ``judge`` and runs vLLM's OpenAI server on its private address.

Usage (inside a job on that cluster)::

    python cluster/deploy/judge_url.py [--port 8000]       # prints http://<judge node address>:8000
"""

from __future__ import annotations

import argparse


def judge_url(nodes: list[dict], port: int) -> str:
    """``http://<address>:<port>`` of the live node with a ``judge`` resource (``ray.nodes()`` rows); the first by
    address when several do. No such node raises, naming the fix."""
    hosts = sorted(
        n["NodeManagerAddress"] for n in nodes if n.get("Alive") and n.get("Resources", {}).get("judge", 0) > 0
    )
    if not hosts:
        raise SystemExit(
            "no live Ray node advertises the `judge` resource: start the judge_gpu node type of "
            "cluster/deploy/ray-cluster.yaml (min_workers: 1), or set FDFO_JUDGE_URL to the judge's url"
        )
    return f"http://{hosts[0]}:{port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="the port vLLM listens on (ray-cluster.yaml: 8000)")
    args = p.parse_args(argv)
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        print(judge_url(ray.nodes(), args.port))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
