"""Prompt lists: ``load_prompts("builtin:tiny")`` or a text file with one prompt per line."""

from __future__ import annotations

from pathlib import Path

TINY = (
    "a red circle",
    "a blue square",
    "a green triangle on white",
    "a yellow sun over the sea",
    "a black cat",
    "two white birds",
    "a purple flower in a pot",
    "an orange car on a road",
)


def load_prompts(source: str) -> list[str]:
    if source == "builtin:tiny":
        return list(TINY)
    if source.startswith("builtin:shapes"):
        from tasks.shapes import world

        split = source.split("-", 1)[1] if "-" in source else "train"
        return world.prompts(split)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts.source {source!r} is neither builtin:tiny, builtin:shapes-train|heldout nor a file"
        )
    try:  # UTF-8 whatever the locale; utf-8-sig also drops the byte-order mark some editors write
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = e.object[: e.start].count(b"\n") + 1
        raise ValueError(
            f"prompt file {source} is not UTF-8 text (byte {e.object[e.start]:#04x} on line {lineno}); save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {source} has no prompts (one per line)")
    return prompts
