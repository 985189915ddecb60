"""Raw rows of a preference source: local files, a hub dataset or the built-in demo set, each as (where, row).

"where" names the file and line (or item, or row) of every row, so an error found anywhere downstream can say
exactly which row to fix. Nothing here knows what a row means; ``minialign.data.sources`` turns rows into pairs.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from minialign.base.errors import UserError, kind_of

EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet")
GLOB_CHARS = "*?["
ALTERNATIVES = (
    "local files (.jsonl, .jsonl.gz, .json holding a list of objects, or .parquet; one path, a list "
    "of paths or a glob such as 'data/*.jsonl.gz') with rows {'chosen', 'rejected'} (HH dialogues) or "
    "{'prompt', 'chosen', 'rejected'}, or 'demo' for the built-in offline set"
)


Rows = Iterator[tuple[str, Any]]  # (where, row): "where" names the file and line for error messages


def _not_utf8(where: str, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start}). Re-save the file as UTF-8.")


def _not_json(where: str, exc: json.JSONDecodeError, hint: str) -> UserError:
    return UserError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}). {hint}")


def _read_jsonl(path: Path) -> Rows:
    """JSON lines, decoded line by line so every error can name its line number."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path} line {number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(where, exc) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _not_json(where, exc, "Each line of a .jsonl file must hold one complete JSON object; "
                                    "fix or remove that line.") from None
                yield where, row
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {exc}. Check that the file is complete and not corrupted.") from None


def _read_json(path: Path) -> Rows:
    """A .json file holding one list of row objects."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _not_utf8(f"{path} line {line}", exc) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _not_json(f"{path} line {exc.lineno}", exc, "A .json source must hold one list of objects; use .jsonl "
                        "for one object per line.") from None
    if not isinstance(rows, list):
        raise UserError(
            f"{path} holds {kind_of(rows)}, but a .json source must hold a list of row "
            "objects (or use .jsonl with one object per line)."
        )
    for i, row in enumerate(rows):
        yield f"{path} item {i}", row


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq  # comes with `datasets`; imported here to keep `import minialign` fast

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"cannot read {path} as Parquet: {exc}. Check that the file is complete.") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _read_hub(name: str, *, split: str, data_dir: str | None) -> Rows:
    import datasets

    from minialign.base.hub import hub_reachable

    try:
        if not hub_reachable():  # fail in seconds, not after minutes of retries, unless it is cached
            with _hub_offline():
                ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
        else:
            ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split: all mean "use something else"
        where = f"{name!r} (data_dir={data_dir!r}, split={split!r})"
        raise UserError(
            f"could not load the hub dataset {where}: {type(exc).__name__}: {exc}. No local file of "
            f"that name exists either. Without internet access use {ALTERNATIVES}. (Setting "
            "HF_HUB_OFFLINE=1 makes offline failures immediate instead of retrying.)"
        ) from None
    for i, row in enumerate(ds):
        yield f"hub dataset {name} ({split}) row {i}", row


@contextlib.contextmanager
def _hub_offline():
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _read_demo(split: str) -> Rows:
    from minialign.data.demo import demo_rows

    if split not in ("train", "test"):
        raise UserError(f"the demo set has splits 'train' and 'test', not {split!r}.")
    for i, row in enumerate(demo_rows(split)):
        yield f"demo ({split}) row {i}", row


def _has_extension(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def source_items(source: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """A source as a list; a string "a.jsonl,b.jsonl" (as typed on a command line) lists several files."""
    if isinstance(source, Path):
        return [source]
    if isinstance(source, str):
        return source.split(",") if "," in source and not Path(source).exists() else [source]
    return list(source)


def resolve_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Local files named by a path, a glob, or a list of either, in the order given (globs sorted)."""
    items = [item for item in source_items(source) if str(item).strip()]
    if not items:
        raise UserError("the list of source files is empty; name at least one file.")
    paths: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if any(c in text for c in GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UserError(f"the glob {text!r} matches no files. Check the folder and the pattern.")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(text))
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path} is a folder; name its files, e.g. with a glob like '{path}/*.jsonl.gz'.")
        if not _has_extension(path.name):
            raise UserError(
                f"{path} has an unknown extension; minialign reads {', '.join(EXTENSIONS)}. Convert the "
                "file or rename it if its contents already match one of these."
            )
        if not path.is_file():
            raise UserError(f"the file {path} does not exist.")
    return paths


def is_local(source: str | Path | Sequence[str | Path]) -> bool:
    """Decide between local files and a hub id: anything path-like or with a known extension is local."""
    if not isinstance(source, str) or "," in source:
        return True
    text = source
    return (
        _has_extension(text)
        or any(c in text for c in GLOB_CHARS)
        or text.startswith((".", "/", "~"))
        or Path(text).exists()
    )


def read_rows(
    source: str | Path | Sequence[str | Path], *, split: str = "train", data_dir: str | None = None
) -> Rows:
    """All raw rows of a source as (where, row), lazily, in file order."""
    if isinstance(source, str) and source == "demo":
        return _read_demo(split)
    if not is_local(source):
        return _read_hub(str(source), split=split, data_dir=data_dir)
    readers = {".parquet": _read_parquet, ".json": _read_json}
    paths = resolve_paths(source)
    return itertools.chain.from_iterable(
        readers.get(p.suffix.lower(), _read_jsonl)(p) for p in paths  # .jsonl and .jsonl.gz
    )
