"""Loading weights by hub id or local path, with errors that say how to fix a bad path.

Usage::

    model = load_pretrained(CLIPModel.from_pretrained, "yuvalkirstain/PickScore_v1", "PickScore model")

A name that looks like a filesystem path (starts with '/', '.', '~') must exist; anything else is a hub id,
resolved by transformers' cache (offline machines need it pre-downloaded, or HF_HUB_OFFLINE=1 and a path).
"""

from __future__ import annotations

import os
from typing import Any, Callable


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~"))


def check_path(name: str, what: str) -> str:
    """Raise FileNotFoundError naming the fix when ``name`` is a path that does not exist; return it expanded."""
    if looks_like_path(name):
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{what}: {name!r} does not exist. Point it at a downloaded copy (e.g. `huggingface-cli download "
                f"<repo> --local-dir {name}`) or pass the hub id instead of a path"
            )
        return path
    return name


def load_pretrained(loader: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """``loader(name, **kwargs)`` with a path check first and an error naming the fix if loading fails."""
    name = check_path(name, what)
    try:
        return loader(name, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load {what} from {name!r}: {e}\nOn a machine without hub access, download it beforehand "
            "and pass the local directory (or set HF_HOME to a cache that has it)"
        ) from e


def require_file(path: str | os.PathLike, what: str) -> str:
    """A local weights file that must exist (no hub fallback); raise FileNotFoundError naming the fix."""
    full = os.path.expanduser(str(path))
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{what}: no file at {str(path)!r}; download it and pass its path")
    return full
