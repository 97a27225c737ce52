"""The docs are checked: ``mkdocs build --strict`` fails on a broken link, a missing anchor or a page left out of the
nav; the configuration page is the config's own field documentation, regenerated; the README stays short and its
links resolve; and every command the quickstart shows is run by a test (here, or the one named)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config_docs import REGENERATE, markdown, section_doc, sections

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_mkdocs_build_strict(tmp_path):
    build = mkdocs_build(ROOT, tmp_path / "site")
    assert build.returncode == 0, build.stderr[-3000:]
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {p.parent.name for p in (tmp_path / "site").glob("*/index.html")} == pages - {"index"}


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build really fails on what it is meant to catch (a copy of the docs with two bad links)."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    with open(tmp_path / "docs" / "index.md", "a") as f:
        f.write("\n[gone](nowhere.md) and [no anchor](rewards.md#no-such-section)\n")
    build = mkdocs_build(tmp_path, tmp_path / "site")
    assert build.returncode == 1
    assert "contains a link 'nowhere.md', but the target is not found" in build.stderr
    assert "does not contain an anchor '#no-such-section'" in build.stderr


def test_configuration_page_is_generated_from_the_config():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == markdown(), f"docs/configuration.md is out of date with cluster/config.py: run `{REGENERATE}`"


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/quickstart.md" in local and "tests/README.md" in local
    assert [link for link in local if not (ROOT / link).exists()] == []


# Every command in the quickstart's code blocks, and what runs it: "README" (the README's main command), "here"
# (test_quickstart_commands_run below), or a test file with fragments its source passes to the same program.
QUICKSTART = {
    "bash .ci/setup.sh": ("README", ()),
    ".venv/bin/fdfo presets": ("here", ()),
    ".venv/bin/fdfo config --explain runtime": ("here", ()),
    ".venv/bin/fdfo plan --gpus 8 --config sd35m-combined": ("here", ()),
    ".venv/bin/fdfo train --config tiny-cpu --local": (
        "tests/cluster/test_debug_loop.py",
        ('load_config("tiny-cpu", ["runtime.local=true"', "run_local(cfg)"),
    ),
    ".venv/bin/ray get-auth-token --generate": (
        "tests/cluster/test_job_submit.py",
        ('"get-auth-token", "--generate"',),
    ),
    "export RAY_AUTH_MODE=token": ("tests/cluster/test_job_submit.py", ('"RAY_AUTH_MODE": "token"',)),
    ".venv/bin/ray start --head --dashboard-host 127.0.0.1": (
        "tests/cluster/test_job_submit.py",
        ('"start", "--head"', '"--dashboard-host=127.0.0.1"'),
    ),
    ".venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m cluster.cli train "
    "--config tiny-cpu": (
        "tests/cluster/test_job_submit.py",
        (
            '"job", "submit", "--address", address, "--working-dir", str(ROOT)',
            '"python", "-m", "cluster.cli", "train", "--config", "tiny-cpu"',
        ),
    ),
    ".venv/bin/ray job logs --address http://127.0.0.1:8265 <submission-id>": (
        "tests/cluster/test_job_submit.py",
        ('"job", "logs", "--address", address, job_id',),
    ),
}


def quickstart_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "quickstart.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_every_quickstart_command_is_run_by_a_test():
    assert quickstart_commands() == list(QUICKSTART)
    readme = (ROOT / "README.md").read_text()
    for command, (runner, fragments) in QUICKSTART.items():
        if runner == "README":
            assert f"```bash\n{command} && .venv/bin/fdfo train\n```" in readme
        elif runner != "here":
            source = re.sub(r"\s+", "", (ROOT / runner).read_text())  # however the formatter wraps the call
            missing = [f for f in fragments if re.sub(r"\s+", "", f) not in source]
            assert missing == [], f"{command!r}: {runner} no longer runs it ({missing})"


@pytest.mark.parametrize("command", [c for c, (runner, _) in QUICKSTART.items() if runner == "here"])
def test_quickstart_commands_run(command):
    args = command.split()
    run = subprocess.run([BIN / Path(args[0]).name, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shown = {
        "presets": "sd35m-combined ",
        "config": "runtime.sampler.count = 1    (int or auto)",
        "plan": "8 GPUs: runtime.overlap=false runtime.sampler.count=2",
    }[args[1]]
    assert shown in run.stdout and len(run.stdout.splitlines()) > 3


def test_config_keys_named_in_the_docs_exist():
    """Every ``section.key`` the README or a docs page names in inline code is a key of the config tree, so renaming a
    field without updating the prose fails here (the configuration page itself is regenerated, above)."""
    known = {r.key for name in sections() if name != "run" for r in section_doc(name)[1]} | set(sections())
    top = [n for n in sections() if n != "run" and "." not in n]
    named = re.compile(r"(?<![\w./-])((?:" + "|".join(top) + r")(?:\.[a-z_][a-z0-9_]*)+)(?![\w(])")
    unknown = []
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "configuration.md"]  # generated: above
    for page in [ROOT / "README.md", *pages]:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            unknown += [
                f"{page.name}: {key}"
                for key in named.findall(span)
                if key not in known and not key.endswith((".py", ".yaml", ".md", ".json"))
            ]
    assert unknown == []
