"""One local Ray instance (token auth on, loopback only) for every test that needs Ray: a process can hold
only one, so tests take this fixture instead of calling ray.init themselves."""

import os
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    port = free_port()
    ray.init(num_cpus=8, namespace="fdfo", include_dashboard=False, _metrics_export_port=port,
             logging_level="WARNING", log_to_driver=False)
    yield {"metrics_port": port}
    ray.shutdown()
