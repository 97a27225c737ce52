"""The package metadata installs without a deprecation banner of fdfo's own (setuptools reads pyproject.toml)."""

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"  # an SPDX string, not the deprecated table
