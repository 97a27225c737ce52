"""The judge server's URL for a job on a cluster, once the server answers: the node with the custom resource
``judge`` on a Ray cluster launcher cluster (cluster/deploy/ray-cluster.yaml; vLLM's OpenAI server on its private
address), or the URL given (KubeRay: the fdfo-judge Service). The job waits for the server's ``/health``, so no pair
is scored against a judge still loading its model (each such request would fail and its pairs be dropped).

Usage (inside a job on that cluster)::

    python cluster/deploy/judge_url.py [--port 8000] [--url URL] [--wait SECONDS]   # prints the URL
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


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


def wait_healthy(url: str, timeout_s: float, poll_s: float = 5.0, log=sys.stderr) -> float:
    """Poll ``<url>/health`` (vLLM's OpenAI server: 200 once the model is loaded; it needs no API key) until it
    answers 200; the seconds waited. Not within ``timeout_s`` raises, naming the URL and where the server logs."""
    start = time.monotonic()
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=min(10.0, max(poll_s, 1.0))) as r:
                if r.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, urllib.error.URLError) as e:
            last = str(getattr(e, "reason", e))
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise SystemExit(
                f"the judge at {url} did not answer /health within {timeout_s:g} s (last: {last}): see its log "
                "(launcher: /tmp/fdfo-judge.log on the judge node; KubeRay: kubectl logs deploy/fdfo-judge), "
                "or wait longer with FDFO_JUDGE_WAIT_S"
            )
        print(f"waiting for the judge at {url}/health ({waited:.0f} s, {last})", file=log, flush=True)
        time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="the port vLLM listens on (ray-cluster.yaml: 8000)")
    p.add_argument("--url", default=None, help="the judge's URL (no lookup of the `judge` node)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for /health (0: do not wait)")
    args = p.parse_args(argv)
    url = args.url
    if not url:
        import ray

        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        try:
            url = judge_url(ray.nodes(), args.port)
        finally:
            ray.shutdown()
    url = url.rstrip("/")
    if args.wait > 0:
        wait_healthy(url, args.wait)
    print(url)


if __name__ == "__main__":
    main()
