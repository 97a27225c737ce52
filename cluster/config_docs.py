"""The configuration reference, read from the config's own field documentation (``cluster/config.py`` and
``cluster/runtime_config.py``).

Usage::

    fdfo config --explain train            # one section (or train.lr: one key; no argument: every section)
    fdfo config --explain runtime.sampler  # a block within a section (the sampler pool's keys)
    python -m cluster.config_docs docs/configuration.md    # rewrite the docs page (tests/test_docs.py checks it)

Each field of a config section is documented by the string on the line(s) below it (an attribute docstring, as
PEP 257 and Sphinx read them); each section by its class docstring. This module reads both from the source with
``ast``, so ``fdfo config --explain``, the docs page and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.config import RENAMED, RunConfig

TOP = "run"  # the name ``--explain`` gives RunConfig's own scalar keys (name, seed, output_dir, ...)
PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m cluster.config_docs docs/configuration.md"


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted, as an override names it: train.lr
    type: str  # as YAML takes it: "float", "one of constant, cosine, linear", "int or null"
    default: str  # as YAML writes it
    doc: str  # one paragraph


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its attribute docstring}`` of dataclass ``cls`` (whitespace folded to one paragraph)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "`").split())
    return docs


def sections() -> dict[str, type]:
    """Section name -> its dataclass: ``run`` (RunConfig's scalar keys) and every nested section, in file order,
    each followed by the blocks within it (``runtime``, then ``runtime.sampler``, ...)."""
    return {TOP: RunConfig, **_nested(RunConfig, "")}


def _nested(cls: type, prefix: str) -> dict[str, type]:
    found = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            found[prefix + f.name] = tp
            found.update(_nested(tp, prefix + f.name + "."))
    return found


def section_doc(name: str) -> tuple[str, list[FieldDoc]]:
    """A section's one-line summary and its documented keys. Raises ValueError naming the sections."""
    known = sections()
    if name not in known:
        raise ValueError(f"no config section {name!r}; sections: {', '.join(known)}")
    cls, prefix = known[name], "" if name == TOP else name + "."
    docs, hints = field_docs(cls), _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        if f.name not in docs:
            raise ValueError(
                f"config field {prefix + f.name} has no documentation: add a docstring on the line(s) "
                f"below it in {Path(inspect.getsourcefile(cls)).relative_to(PAGE.parent.parent)}"
            )
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(FieldDoc(prefix + f.name, type_name(hints[f.name]), yaml_value(default), docs[f.name]))
    return " ".join((inspect.getdoc(cls) or "").replace("``", "`").split()), rows


def explain(target: str | None = None) -> str:
    """``fdfo config --explain [target]``: every section, one section (``train``; ``runtime`` with its blocks
    ``runtime.sampler``, ...), one block (``runtime.sampler``) or one key (``train.lr``) as text."""
    known = sections()
    if target in RENAMED:
        raise ValueError(f"{target} was renamed: use {RENAMED[target]}")
    if target is None:
        return "\n\n".join(explain(name) for name in known if "." not in name)
    if target in known:
        within = [name for name in known if name.startswith(target + ".")]
        return "\n\n".join([_explain(target, ""), *(_explain(name, "") for name in within)])
    elif "." in target:  # a key: of the section its dotted prefix names (runtime.sampler.count: runtime.sampler)
        section, key = target.rpartition(".")[0], target
    else:  # a top-level key (seed), else an unknown section named in the error
        section, key = (TOP, target) if target in {r.key for r in section_doc(TOP)[1]} else (target, "")
    return _explain(section, key)


def _explain(section: str, key: str) -> str:
    """One section's text, or (``key``: a dotted key) one key's."""
    summary, rows = section_doc(section)
    if key:
        rows = [r for r in rows if r.key == key]
        if not rows:
            raise ValueError(
                f"no config key {key!r}; keys of {section}: {', '.join(r.key for r in section_doc(section)[1])}"
            )
    lines = textwrap.wrap(f"{section}: {summary}", width=120, break_on_hyphens=False) if not key else []
    for r in rows:
        lines += ["", f"{r.key} = {r.default}    ({r.type})"]
        lines += textwrap.wrap(
            r.doc,
            width=116,
            initial_indent="    ",
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(lines).lstrip("\n")


def markdown() -> str:
    """The docs page ``docs/configuration.md``: every section and key, from the same source as ``explain``."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- generated by `{REGENERATE}` from cluster/config.py and cluster/runtime_config.py: edit the field "
        "documentation there -->",
        "",
        "Every run is one typed config tree: a YAML preset (`cluster/configs/`, listed by `fdfo presets`) filled in "
        "with `section.key=value` overrides on the command line (`fdfo train --config tiny-cpu train.lr=3e-3 "
        "runtime.sampler.count=2`; values are read as YAML). Unknown keys, wrong types, bad batch arithmetic "
        "(`2 x pairs_per_epoch x num_steps` rows must split evenly into `updates_per_epoch` updates) and bad reward "
        "specs fail before any Ray resource is taken, with the fix named in the message. A run's config is written to "
        "`runs/<name>/config.json` and into every checkpoint (secrets redacted), and `--resume` continues the run "
        "from its last checkpoint.",
        "",
        "The same text is printed by `fdfo config --explain [section]` (or `section.key` for one key); "
        "`fdfo config --config PRESET [overrides]` prints a preset as it resolves.",
        "",
    ]
    for name in sections():
        summary, rows = section_doc(name)
        out += [
            f"## {name}",
            "",
            summary
            + (
                " These keys sit at the top level of a preset (`name: shapes`), under no section."
                if name == TOP
                else ""
            ),
            "",
        ]
        for r in rows:
            out.append(f"- **`{r.key}`** ({r.type}; default `{r.default}`): {r.doc}")
        out.append("")
    out += [
        "## Renamed keys",
        "",
        "A preset or override that sets an old key is refused with its new name (`runtime.sampler_num_gpus was "
        "renamed: use runtime.sampler.num_gpus`); a checkpoint's saved config is read with each moved.",
        "",
        "| old key | new key |",
        "| --- | --- |",
        *(f"| `{old}` | `{new}` |" for old, new in RENAMED.items()),
        "",
    ]
    return "\n".join(out)


def type_name(tp: Any) -> str:
    """A field's annotation as a YAML user reads it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else ("auto" if a == Literal["auto"] else type_name(a)) for a in args
        )
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    return {dict: "mapping", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def yaml_value(value: Any) -> str:
    """A default as a YAML preset or an override writes it (``null``, ``3.0e-05``, ``[0.9, 0.999]``, ``{}``)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    target.write_text(markdown())
    print(f"wrote {target}")
