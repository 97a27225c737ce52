"""One local Ray instance (token auth on, loopback only) for every test that needs Ray: a process can hold
only one, so tests take this fixture instead of calling ray.init themselves."""

import os
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
# Serve's autoscaler sees queue depth as replicas and handles report it (every 10 s by default): twice a second here,
# so the reward pool's scaling tests take seconds
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    port = free_port()
    # address="local": always a new instance, never a cluster another test or a `ray start` left on this machine
    ray.init(address="local", num_cpus=8, namespace="fdfo", include_dashboard=False, _metrics_export_port=port,
             logging_level="WARNING", log_to_driver=False)
    yield {"metrics_port": port}
    ray.shutdown()
