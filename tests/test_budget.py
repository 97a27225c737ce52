"""The suite's time budget keeps itself (tests/conftest.py): a test marked slow by hand must say why, a test on the
session's Ray instance is slow unless it is a ``ray_unit`` test of a part, and a test past the limit without the mark
is named at the end. Each case runs an inner pytest session with the project's conftest."""

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
MARKERS = "[pytest]\nmarkers =\n    slow: slow\n    ray_unit: ray unit\n"


def inner(pytester, tests: str, limit_s: float | None = None):
    conftest = CONFTEST if limit_s is None else CONFTEST.replace("SLOW_S = 60.0", f"SLOW_S = {limit_s}")
    assert conftest != CONFTEST or limit_s is None, "the limit's line moved: update this test"
    pytester.makeconftest(conftest)
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_inner=tests)


def test_a_slow_mark_without_a_docstring_stops_collection(pytester):
    inner(
        pytester,
        "import pytest\n\n@pytest.mark.slow\ndef test_quiet():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_said():\n    '''It needs the time: a whole run.'''\n",
    )
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret != 0
    result.stderr.fnmatch_lines(
        ["*tests marked slow without a docstring saying why they need the time*test_inner.py::test_quiet"]
    )
    assert "test_said" not in result.stderr.str()


def test_the_ray_fixture_makes_a_test_slow_unless_it_is_a_ray_unit_test(pytester):
    inner(
        pytester,
        "import pytest\n\ndef test_run(ray_local):\n    pass\n\n"
        "@pytest.mark.ray_unit\ndef test_part(ray_local):\n    pass\n\ndef test_plain():\n    pass\n",
    )
    result = pytester.runpytest("--collect-only", "-q", "-m", "not slow")
    assert result.ret == 0
    collected = {line.split("::")[-1] for line in result.outlines if "::" in line}
    assert collected == {"test_part", "test_plain"}  # nothing starts Ray: collection only


def test_a_test_past_the_limit_without_the_mark_is_named(pytester):
    inner(
        pytester,
        "import time, pytest\n\ndef test_long():\n    time.sleep(0.2)\n\n"
        "@pytest.mark.slow\ndef test_long_marked():\n    '''Marked.'''\n    time.sleep(0.2)\n\n"
        "def test_short():\n    pass\n",
        limit_s=0.1,
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*over 0 s without the slow mark*", "*s test_inner.py::test_long"])
    tail = result.stdout.str().split("without the slow mark")[1]
    assert "test_long_marked" not in tail and "test_short" not in tail
