"""One local Ray instance (token auth on, loopback only) for every test that needs Ray: a process can hold
only one, so tests take this fixture instead of calling ray.init themselves. Also the suite's time budget
(tests/README.md): a test marked ``slow`` says in its docstring why it needs its time, and a test that ran past
``SLOW_S`` seconds without the mark is named at the end of the run."""

import os
import socket

import pytest

SLOW_S = 60.0  # a test that needs more than this is marked slow (pytest -m "not slow" is the 5-minute tier)

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
    ray.init(
        address="local",
        num_cpus=8,
        namespace="fdfo",
        include_dashboard=False,
        _metrics_export_port=port,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield {"metrics_port": port}
    ray.shutdown()


def _why_slow(item) -> str | None:
    """A slow test's justification: its function's docstring, or its module's where the module marks every test."""
    marks = getattr(item.module, "pytestmark", [])
    module_slow = any(m.name == "slow" for m in (marks if isinstance(marks, list) else [marks]))
    return (item.module.__doc__ if module_slow else None) or getattr(getattr(item, "function", None), "__doc__", None)


# Fixtures that put a test in the slow tier by themselves, with the reason (tests/README.md, "Tiers")
SLOW_FIXTURES = {
    "ray_local": "it runs actors on the session's Ray instance (starting it and each actor's imports "
    "cost 10-30 s on 2 cores)"
}


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects by mark
def pytest_collection_modifyitems(config, items):
    """Tests that take a slow fixture are marked slow, except unit tests of a runtime part on stand-in actors (marked
    ``ray_unit``: about a second each once the instance is up); a test marked slow by hand must say why."""
    for item in items:
        if item.get_closest_marker("ray_unit") is None and any(
            name in SLOW_FIXTURES for name in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.slow)
            item.user_properties.append(("slow_because", "fixture"))
    unjustified = sorted(
        {
            item.nodeid.split("[")[0]
            for item in items
            if item.get_closest_marker("slow")
            and not _why_slow(item)
            and ("slow_because", "fixture") not in item.user_properties
        }
    )
    if unjustified:
        raise pytest.UsageError(
            "tests marked slow without a docstring saying why they need the time (tests/README.md, "
            "'Tiers'): " + ", ".join(unjustified)
        )


_over_budget: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
    """Runs where the results are reported (also the controller of a pytest-xdist run), so the list covers every
    test however the run is split."""
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _over_budget.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _over_budget:
        terminalreporter.section(f"over {SLOW_S:.0f} s without the slow mark (mark them, or make them cheaper)")
        for seconds, nodeid in sorted(_over_budget, reverse=True):
            terminalreporter.write_line(f"{seconds:8.1f}s {nodeid}")
