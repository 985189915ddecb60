"""Files that readers never see half-written: every result, config and summary goes through here.

A file is written beside its place under a temporary name, then renamed over it (``os.replace`` is atomic on one
file system), so a crash or Ctrl-C leaves either the old file or the new one. Folders (adapters, checkpoints, cache
entries) are built the same way in a temporary sibling folder: ``staged_dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename; the temporary is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary per process and thread, so writers of one file never rename each other's; plain open: umask
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    """``write_atomic`` of ``data`` as JSON."""
    return write_atomic(path, json.dumps(data, indent=indent))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``{}`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk, so a rename that follows cannot land before it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(directory: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``directory`` to fill; removed if the body fails. The caller renames it into
    place (it knows what an existing ``directory`` means: replace, keep aside, refuse)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(staged: Path, directory: Path) -> None:
    """Rename a filled ``staged`` folder to ``directory``. A folder cannot be renamed over a non-empty one, so an
    existing ``directory`` is first moved aside (a rename, also atomic) and removed once the new one is in place."""
    directory = Path(directory)
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        try:
            os.replace(directory, old / directory.name)
        except FileNotFoundError:  # another process set it aside first
            pass
        os.replace(staged, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, directory)
