"""``fdfo config --explain``: the config's field documentation, read from cluster/config.py and
cluster/runtime_config.py, printed by section."""

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from cluster import config_docs
from cluster.cli import cli
from cluster.config import RunConfig
from cluster.config_docs import explain, field_docs, section_doc, sections, type_name, yaml_value

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


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
        "runtime, runtime.sampler, runtime.reward, runtime.learner, eval\n"
    ) in capsys.readouterr().err
    assert cli(["config", "--explain", "grpo.group"]) == 1
    assert "no config key 'grpo.group'; keys of grpo: grpo.group_size, grpo.noise_level," in capsys.readouterr().err
    assert cli(["config", "--explain", "runtime.sampler.gpus"]) == 1
    assert (
        "no config key 'runtime.sampler.gpus'; keys of runtime.sampler: runtime.sampler.count, "
        "runtime.sampler.max_count, runtime.sampler.num_cpus, runtime.sampler.num_gpus, runtime.sampler.resources\n"
    ) in capsys.readouterr().err
    assert cli(["config", "--explain", "runtime.num_learners"]) == 1
    assert "fdfo: error: runtime.num_learners was renamed: use runtime.learner.count\n" in capsys.readouterr().err


def test_explain_a_role_block_and_its_key(capsys):
    """``runtime.sampler`` is a block of its own; ``--explain runtime`` prints the section, then each block."""
    assert cli(["config", "--explain", "runtime.learner.num_gpus"]) == 0
    assert capsys.readouterr().out == "runtime.learner.num_gpus = 0.0    (float)\n    GPUs per learner rank\n"
    text = explain("runtime")
    heads = [line.split(":")[0] for line in text.splitlines() if line.startswith("runtime") and " = " not in line]
    assert heads == ["runtime", "runtime.sampler", "runtime.reward", "runtime.learner"]
    assert text.index("runtime.storage_path = ") < text.index("runtime.sampler.count = ")


def test_every_key_of_every_section_is_explained_once():
    """The whole explanation covers each leaf key of the tree exactly once (no section or field forgotten)."""

    def leaves(cls=RunConfig, prefix=""):
        for f in dataclasses.fields(cls):
            section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(section):
                yield from leaves(section, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

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
        "runtime.sampler",
        "runtime.reward",
        "runtime.learner",
        "eval",
    ]


def test_field_docs_sit_on_their_own_lines():
    """No config field carries an end-of-line comment any more: its documentation is the string below it."""
    in_section, offenders = False, []
    for path in (CLUSTER / "config.py", CLUSTER / "runtime_config.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("class "):
                in_section = re.match(r"class \w+(Config|Settings)\b", line) is not None
            if in_section and re.match(r"    \w+: .*#", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            assert len(line) <= 120 or not in_section, f"{path.name}:{n} is {len(line)} columns"
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
        r"line\(s\) below it in tests/cluster/test_config_docs.py$",  # the file the section's class is in
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
