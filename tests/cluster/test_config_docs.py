"""``fdfo config --explain``: the config's field documentation, read from cluster/config.py, printed by section."""

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from cluster import config_docs
from cluster.cli import cli
from cluster.config import RunConfig
from cluster.config_docs import explain, field_docs, section_doc, sections, type_name, yaml_value

CONFIG_PY = Path(__file__).resolve().parents[2] / "cluster" / "config.py"


def test_explain_prints_a_section_exactly(capsys):
    assert cli(["config", "--explain", "prompts"]) == 0
    assert capsys.readouterr().out == (
        "prompts: Where the training and held-out prompts come from.\n"
        "\n"
        "prompts.source = builtin:tiny    (str)\n"
        "    builtin:<name> or a text file with one prompt per line\n"
        "\n"
        "prompts.eval_source = null    (str or null)\n"
        "    held-out prompts for evaluation (same forms); None = source\n"
    )


def test_explain_one_key_and_a_top_level_key(capsys):
    assert cli(["config", "--explain", "train.lr"]) == 0
    assert (
        capsys.readouterr().out
        == "train.lr = 3.0e-05    (float)\n    AdamW learning rate: the main knob (ALGORITHM.md §9)\n"
    )
    assert cli(["config", "--explain", "seed"]) == 0
    assert capsys.readouterr().out == "seed = 0    (int)\n    run seed: pair noise, shuffles\n"


def test_explain_names_what_exists_when_asked_for_what_does_not(capsys):
    assert cli(["config", "--explain", "trian"]) == 1
    assert (
        "fdfo: error: no config section 'trian'; sections: run, model, lora, sampling, reward, prompts, train, grpo, "
        "runtime, eval\n"
    ) in capsys.readouterr().err
    assert cli(["config", "--explain", "grpo.group"]) == 1
    assert "no config key 'grpo.group'; keys of grpo: grpo.group_size, grpo.noise_level," in capsys.readouterr().err


def test_every_key_of_every_section_is_explained_once():
    """The whole explanation covers each leaf key of the tree exactly once (no section or field forgotten)."""

    def leaves():
        for f in dataclasses.fields(RunConfig):
            section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(section):
                yield from (f"{f.name}.{g.name}" for g in dataclasses.fields(section))
            else:
                yield f.name

    text = explain()
    shown = re.findall(r"^(\S+) = ", text, flags=re.M)
    assert sorted(shown) == sorted(leaves())
    assert len(shown) == len(set(shown)) > 100
    assert list(sections()) == [
        "run",
        "model",
        "lora",
        "sampling",
        "reward",
        "prompts",
        "train",
        "grpo",
        "runtime",
        "eval",
    ]


def test_field_docs_sit_on_their_own_lines():
    """No config field carries an end-of-line comment any more: its documentation is the string below it."""
    in_section, offenders = False, []
    for n, line in enumerate(CONFIG_PY.read_text().splitlines(), 1):
        if line.startswith("class "):
            in_section = re.match(r"class \w+(Config|Settings)\b", line) is not None
        if in_section and re.match(r"    \w+: .*#", line):
            offenders.append(f"config.py:{n}: {line.strip()}")
        assert len(line) <= 120 or not in_section, f"config.py:{n} is {len(line)} columns"
    assert offenders == []


def test_a_field_without_documentation_is_named(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        documented: int = 1
        """what it is"""
        bare: int = 2

    assert field_docs(Undocumented) == {"documented": "what it is"}
    monkeypatch.setattr(config_docs, "sections", lambda: {"extra": Undocumented})
    with pytest.raises(
        ValueError,
        match=r"^config field extra.bare has no documentation: add a docstring on the "
        r"line\(s\) below it in cluster/config.py$",
    ):
        section_doc("extra")


def test_types_and_defaults_read_as_yaml():
    assert type_name(int | Literal["auto"]) == "int or auto"
    assert type_name(tuple[float, float]) == "[float, float]"
    assert type_name(tuple[dict, ...]) == "list of mapping"
    assert type_name(Literal["a", "b"] | None) == "one of a, b or null"
    assert [yaml_value(v) for v in (None, 3e-5, (0.9, 0.999), {}, True, "builtin:tiny")] == [
        "null",
        "3.0e-05",
        "[0.9, 0.999]",
        "{}",
        "true",
        "builtin:tiny",
    ]


def test_section_summary_and_rows():
    summary, rows = section_doc("lora")
    assert summary.startswith("What trains: LoRA factors")
    assert [r.key for r in rows][:3] == ["lora.enabled", "lora.rank", "lora.alpha"]
    assert rows[1].type == "int" and rows[1].default == "32" and rows[1].doc == "LoRA rank r"


def test_explain_refuses_a_preset_and_prints_one_without(capsys):
    assert cli(["config", "--explain", "train", "--config", "tiny-cpu"]) == 1
    assert "--explain documents the keys themselves" in capsys.readouterr().err
    assert cli(["config", "--config", "tiny-cpu", "train.lr=0.002"]) == 0
    out = capsys.readouterr().out
    assert "\n  lr: 0.002\n" in out and out.startswith("eval:\n")


@pytest.mark.parametrize("name", ["model", "runtime"])
def test_long_docs_wrap_at_120_columns(name):
    assert max(map(len, explain(name).splitlines())) <= 120
