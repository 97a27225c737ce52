"""``fdfo eval --suite`` draws its progress bar on a terminal only: in a log (``ray job logs``, a file) it is noise."""

import sys
import types

import numpy as np

from cluster.eval_suite import evaluate_part


def _evaluate(tmp_path):
    spec = types.SimpleNamespace(name="hpdv2", images_per_prompt=1, metrics=())
    part = types.SimpleNamespace(spec=spec, chosen=["a", "b"], prompts=["a", "b"], seeds=[0, 1])
    source = types.SimpleNamespace(chunks=lambda part, steps: [((0, 2), np.zeros((2, 4, 4, 3), np.uint8))])
    return evaluate_part(part, source, {}, 2, tmp_path / "grid.png")


def test_no_bar_in_a_log(tmp_path, capsys):
    assert _evaluate(tmp_path) == ({}, {})
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _evaluate(tmp_path)
    assert "hpdv2 images: 100%" in capsys.readouterr().err
