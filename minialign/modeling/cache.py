"""Converted models kept on disk, so that a restart reads them instead of converting again.

A GGUF file is dequantised through transformers on every load: SmolLM2-135M takes ~14 s on 2 CPU cores and its
tokenizer ~3 s more, while the same weights saved with ``save_pretrained`` load in well under a second. Each part
(``model``, ``tokenizer``) is kept under ``cache_root()/gguf/<sha256 of the GGUF file>/<part>/``: keyed by the
file's bytes, so a replaced file never meets a stale entry. Hashing the 98 MB file takes ~0.1 s, so the hash
itself is not cached.

A part is written into a temporary folder beside its place, with a manifest of its files and their sizes written
last, flushed to disk, and then renamed into place: a process sees a whole entry or none. An entry without its
manifest, with a file of another size, or that fails to load is converted again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from minialign.base.files import fsync_path, publish_dir, staged_dir

ENV = "MINIALIGN_CACHE"
MANIFEST = "minialign-cache.json"
T = TypeVar("T")


def cache_root() -> Path:
    """``$MINIALIGN_CACHE``, else ``$XDG_CACHE_HOME/minialign``, else ``~/.cache/minialign``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minialign"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_entry(gguf: Path, part: str) -> Path:
    return cache_root() / "gguf" / file_sha256(gguf) / part


def cached_gguf(gguf: Path, part: str, convert: Callable[[], T], load: Callable[[Path], T], *,
                enabled: bool = True) -> T:
    """``part`` of ``gguf``: read from its cache entry, or made by ``convert()`` and then saved there
    (``enabled`` False: only converted, nothing read or written).

    ``convert()`` makes a transformers model or tokenizer; its ``save_pretrained(folder)`` writes what
    ``load(folder)`` reads back. A cache that cannot be written (read-only home, full disk) costs only the
    speed-up: the converted object is returned all the same.
    """
    if not enabled:
        return convert()
    entry = gguf_entry(gguf, part)
    replace = entry.exists()
    if complete(entry):
        try:
            obj = load(entry)
            _say(f"{part} of {gguf.name} read from the cache in {entry}")
            return obj
        except Exception as exc:  # noqa: BLE001 - whatever the loader raises on damaged files
            _say(f"the cached {part} in {entry} could not be read ({_first_line(exc)}); converting {gguf.name} again")
    obj = convert()
    try:
        _publish(entry, lambda folder: obj.save_pretrained(str(folder)), gguf, replace=replace)
        _say(f"{part} of {gguf.name} converted and cached in {entry} (--no-cache skips the cache)")
    except OSError as exc:
        _say(f"could not cache the converted {part} in {entry} ({exc}); the next start converts it again. Set "
             f"{ENV} to a writable folder, or pass --no-cache.")
    return obj


def complete(entry: Path) -> bool:
    """The entry's manifest is there and every file it lists has the size it was written with."""
    try:
        files = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))["files"]
        return bool(files) and all((entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _publish(entry: Path, write: Callable[[Path], None], gguf: Path, *, replace: bool) -> None:
    with staged_dir(entry) as tmp:
        write(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"source": str(gguf), "sha256": entry.parent.name, "part": entry.name, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for name in [*files, MANIFEST]:
            fsync_path(tmp / name)
        try:
            if replace:  # a damaged entry: set it aside (another process may have done so already), take its place
                publish_dir(tmp, entry)
            else:
                os.rename(tmp, entry)
        except OSError:
            if not complete(entry):  # not another process's finished entry: a real failure
                raise
        shutil.rmtree(tmp, ignore_errors=True)  # still there when another process's entry won the race


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _say(message: str) -> None:
    print(f"minialign: {message}", file=sys.stderr)
