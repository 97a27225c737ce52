"""Where a run's outputs live: a local folder, or an object store that outlives the cluster (``runtime.storage_path``).

Usage::

    store = Storage("s3://bucket/runs/shapes")          # or gs://..., or a local folder (plain files, as always)
    store.write_text("checkpoints/latest", "v000004")
    store.upload("/tmp/stage/v000004", "checkpoints/v000004")      # a local file or folder tree
    store.download("checkpoints/v000004", "/tmp/resume/v000004")
    store.uri("checkpoints", "v000004")                  # s3://bucket/runs/shapes/checkpoints/v000004: a Storage again

Anything ``pyarrow.fs.FileSystem.from_uri`` opens works. A URI's query is kept on every location derived from it
(``s3://bucket/runs?endpoint_override=http://127.0.0.1:9000&scheme=http``), so a learner actor on another node opens
the same store from the string it is handed. Credentials come from the environment of every process that writes
or reads (the driver and the learner actor): ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (an instance role or
IRSA needs none), the endpoint of an S3-compatible server from ``AWS_ENDPOINT_URL`` or the URI's
``endpoint_override``; Google Cloud Storage from ``GOOGLE_APPLICATION_CREDENTIALS`` or the node's service account.
Never put a key in the URI: it is written to ``config.json`` (redacted there) and shown in logs.

Object stores have no rename: a writer uploads a checkpoint's files first and its marker (``checkpoints/latest``,
``best/best.json``) last, so a reader that follows markers never sees half a checkpoint. No pickle: bytes only.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@]+@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&][^=&]*(key|secret|token|signature|credential|password)[^=&]*)=[^&]*", re.IGNORECASE
)


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``s3://...``, ``gs://...``, ``file:///...``) rather than a local path."""
    return bool(_SCHEME.match(str(location)))


def shown(location: str | Path) -> str:
    """``location`` as an error or a log may show it: credentials in the URI (user info, secret-named query
    parameters) replaced by ``<redacted>``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}<redacted>@", str(location))
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}=<redacted>", text)


def join(location: str | Path, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path; a URI keeps its query (``?endpoint_override=...``)."""
    parts = tuple(str(p).strip("/") for p in parts if str(p).strip("/"))
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


class Storage:
    """A folder on a ``pyarrow.fs`` filesystem; every method takes a path relative to it (``/``-separated)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        if is_uri(self.location):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError depending on the scheme
                raise ValueError(
                    f"storage {shown(self.location)!r} cannot be opened by pyarrow.fs ({e}); give a local folder "
                    "or a URI it opens, e.g. s3://bucket/prefix (credentials from AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, an S3-compatible server from AWS_ENDPOINT_URL) or "
                    "gs://bucket/prefix"
                ) from e
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(self.location).absolute())
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({shown(self.location)!r})"

    def check(self) -> None:
        """Fail now, naming the fix, when the run cannot write here (no bucket, wrong credentials or endpoint): a
        probe file is written and deleted."""
        try:
            self.write_bytes(".fdfo-write-check", b"")
            self.remove(".fdfo-write-check")
        except OSError as e:
            raise ValueError(
                f"storage {shown(self.location)!r} is not reachable ({e}); check that the bucket exists, "
                "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the node's role) and, "
                "for an S3-compatible server, its endpoint (AWS_ENDPOINT_URL or ?endpoint_override=)"
            ) from e

    def uri(self, *parts: str) -> str:
        """The location of ``parts`` under this folder, as a string ``Storage`` opens (a local path stays a path)."""
        return join(self.location, *parts)

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri(*parts))

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``self.fs`` takes)."""
        return posixpath.join(self.root, rel.strip("/")) if rel.strip("/") else self.root

    # -- files -------------------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.uri(rel)} does not exist") from e

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` whole (parents created); returns its location."""
        self._parent(rel)
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)
        return self.uri(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def listdir(self, rel: str = "") -> list[str]:
        """The names directly under ``rel`` (files and folders), sorted; empty when it does not exist."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def remove(self, rel: str) -> None:
        """Delete the file or folder tree ``rel``; nothing when it does not exist."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    # -- trees -------------------------------------------------------------------------------------------------
    def upload(self, local: str | Path, rel: str) -> str:
        """Copy the local file or folder tree ``local`` to ``rel`` (overwriting); returns its location."""
        local = Path(local)
        if not local.exists():
            raise FileNotFoundError(f"cannot upload {local}: it does not exist")
        if local.is_file():
            self._parent(rel)
        else:
            self._mkdir(rel)
        pafs.copy_files(
            str(local.absolute()),
            self.path(rel),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        return self.uri(rel)

    def download(self, rel: str, local: str | Path) -> Path:
        """Copy the file or folder tree ``rel`` to the local path ``local``; returns it."""
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri(rel)} does not exist")
        local = Path(local)
        (local.parent if not self.is_dir(rel) else local).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path(rel),
            str(local.absolute()),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return local

    def copy_from(self, source: Storage, rel: str) -> str:
        """Copy the folder tree ``source`` (on this store's filesystem: server-side there) to ``rel``."""
        self._mkdir(rel)
        pafs.copy_files(source.root, self.path(rel), source_filesystem=source.fs, destination_filesystem=self.fs)
        return self.uri(rel)

    def _mkdir(self, rel: str) -> None:
        if self.local:  # object stores have no folders: a key's prefix is enough
            self.fs.create_dir(self.path(rel), recursive=True)

    def _parent(self, rel: str) -> None:
        self._mkdir(posixpath.dirname(rel.strip("/")))


class Mirror:
    """Local files kept in step with a store: ``sync`` uploads those that are new or changed since the last call
    (TensorBoard event files grow; history.jsonl is appended to). With a local store that is the same folder,
    a no-op."""

    def __init__(self, local_dir: str | Path, store: Storage):
        self.local_dir, self.store = Path(local_dir), store
        self.same = store.local and Path(store.root) == self.local_dir.absolute()
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded

    def sync(self, *rels: str) -> list[str]:
        """Upload the files (or every file under the folders) ``rels`` that changed; returns the paths uploaded."""
        if self.same:
            return []
        done = []
        for rel in rels:
            top = self.local_dir / rel
            files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
            for f in files:
                key, st = f.relative_to(self.local_dir).as_posix(), f.stat()
                if self.sent.get(key) != (st.st_size, st.st_mtime_ns):
                    self.store.upload(f, key)
                    self.sent[key] = (st.st_size, st.st_mtime_ns)
                    done.append(key)
        return done
