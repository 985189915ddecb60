#!/usr/bin/env python3
"""Build the git-ignored folders the GPU calls carry, and check that each call fits before a machine is asked for.

    python benchmarks/gpu_carry.py build     # .carry/a, .carry/b (the GGUF in two pieces), .whl, .gl/smollm2
    python benchmarks/gpu_carry.py check     # every planned call's size against the device tool's 64 MiB

The device machine has no internet and a call carries the working tree plus the named folders, at most 64 MiB, so
the SmolLM2 GGUF (98 MB, ../shared/README.md) travels in two calls back to back and the wheels beside the first
piece. The tool counts what the files occupy on disk, not their byte lengths: a tree of many small files takes
more room than its bytes, and a call that fits by bytes can still be refused (it happened on 2026-12-07 with
``.carry/a .whl .gl``), so ``check`` counts both and fails on the larger. ``.whlu`` (Unsloth's wheels) is built by
``benchmarks/unsloth_wheels.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
PIECE = 50_000_000  # the first GGUF piece's bytes: it rides with the wheels, the rest alone
# Each planned call's carried folders (benchmarks/unsloth_gpu.sh and benchmarks/NOTES.md say what each runs).
CALLS = {"stage": [".carry/a", ".whl", ".gl"], "join": [".carry/b"], "lite": [".whl", ".gl"], "unsloth": [".whlu"],
         "lite+unsloth": [".whl", ".gl", ".whlu"]}
BUILT_BY = {".whlu": "unsloth_wheels.py"}  # a carried folder `build` does not make, and the script that does
WHEELS = ["trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "gguf==0.19.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
# The shared files the GPU rows read (hh_plan's four HH files); not the gpt-neox tokenizer, which none of them reads.
SHARED = ["data/hh-rlhf/LICENSE"] + [f"data/hh-rlhf/{f}/test.jsonl.gz" for f in
                                     ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")]


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def occupied(path: Path) -> tuple[int, int]:
    """(bytes, bytes on disk) of a file or of every file under a folder."""
    stats = [p.stat() for p in files_under(path)]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def tree_files(root: Path = ROOT) -> list[Path]:
    """What travels without being named: tracked files, untracked ones git does not ignore, and a shared/ folder."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    listed = {root / n for n in out.decode().split("\0") if n and (root / n).is_file()}
    return sorted(listed | (set(files_under(root / "shared")) if (root / "shared").is_dir() else set()))


def call_sizes(carried: list[str], root: Path = ROOT) -> dict[str, int]:
    """One call's bytes and bytes on disk: the tree plus the carried folders (a missing folder is an error)."""
    missing = [c for c in carried if not (root / c).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing under {root}: run " + " and ".join(
            sorted({f"`python benchmarks/{BUILT_BY.get(c, 'gpu_carry.py build')}`" for c in missing})))
    parts = [occupied(p) for p in tree_files(root)] + [occupied(root / c) for c in carried]
    return {"bytes": sum(a for a, _ in parts), "on_disk": sum(b for _, b in parts)}


def check(calls: dict[str, list[str]] = CALLS, root: Path = ROOT, limit: int = LIMIT) -> list[str]:
    """A line per call; the names of those over ``limit`` by either count come back (none: all fit)."""
    over = []
    for name, carried in calls.items():
        try:
            size = call_sizes(carried, root)
        except FileNotFoundError as e:
            print(f"{name:8s} {' '.join(carried)}: {e}")
            over.append(name)
            continue
        worst = max(size.values())
        print(f"{name:8s} {' '.join(carried):28s} {size['bytes'] / 2**20:6.1f} MiB, {size['on_disk'] / 2**20:6.1f} MiB "
              f"on disk: {'fits' if worst <= limit else 'OVER'} ({(limit - worst) / 2**20:+.1f} MiB)")
        if worst > limit:
            over.append(name)
    return over


def split(src: Path, first: Path, second: Path, piece: int = PIECE) -> str:
    """``src`` as two files (its first ``piece`` bytes, then the rest); the sha256 the joined pieces must give."""
    data = src.read_bytes()
    for path, chunk in ((first, data[:piece]), (second, data[piece:])):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(chunk)
        os.replace(tmp, path)
    digest = hashlib.sha256(first.read_bytes() + second.read_bytes()).hexdigest()
    if digest != hashlib.sha256(data).hexdigest():
        raise RuntimeError(f"the pieces of {src} do not join back to it")
    return digest


def gguf_file() -> Path:
    from minialign.base.errors import UserError
    from minialign.config.modelnames import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except UserError as e:
        sys.exit(f"gpu_carry: {e}")


def build(root: Path = ROOT, shared: Path = ROOT.parent / "shared") -> None:
    model = gguf_file()
    print(f"GGUF pieces of {model.name}: sha256 {split(model, root / '.carry/a/part_00', root / '.carry/b/part_01')}")
    whl = root / ".whl"
    whl.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(whl), *WHEELS], check=True)
    for rel in SHARED:
        if not (shared / rel).is_file():
            sys.exit(f"gpu_carry: {shared / rel} missing: the GPU rows read it (../shared beside the checkout)")
        (whl / "shared" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, whl / "shared" / rel)
    from transformers import AutoConfig, AutoTokenizer

    gl = root / ".gl" / "smollm2"  # the decoder rows' random SmolLM2: the GGUF's config and tokenizer, no weights
    AutoConfig.from_pretrained(model.parent, gguf_file=model.name).save_pretrained(gl)
    AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name).save_pretrained(gl)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("build", "check"))
    args = p.parse_args(argv)
    if args.action == "build":
        build()
    return 1 if check() else 0


if __name__ == "__main__":
    raise SystemExit(main())
