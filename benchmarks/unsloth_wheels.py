#!/usr/bin/env python3
"""Fetch the wheels the Unsloth peer needs on the GPU machine (which has no internet) into ``.whlu/``, trimmed so they
travel with the working tree in one device call (64 MiB): ``python benchmarks/unsloth_wheels.py``.

Its needs beyond that machine's image (torch 2.11+cu130, transformers 5.17, peft 0.21, accelerate): unsloth and
unsloth-zoo, trl <= 1.15 and datasets < 5 (Unsloth pins both; they go in their own folder, ``UNSLOTH_SITE``, so the
TRL peer keeps trl 1.16), dill and multiprocess for datasets, and bitsandbytes, which Unsloth imports even for 16-bit
LoRA. Two wheels are trimmed of files no training run reads: Unsloth's ``studio/`` web app (the 29 MB wheel is 2 MB
without it) and bitsandbytes' libraries for other CUDA versions than the machine's 13.x, ROCm and XPU (43 MB -> 4). A
trimmed wheel's RECORD lists exactly the files left, so pip installs it as any other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = ["unsloth==2026.10.9", "unsloth-zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5", "dill==0.4.1",
          "multiprocess==0.70.19", "bitsandbytes==0.50.2"]
PLATFORMS = ["manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64", "any"]


def drop(name: str) -> bool:
    """Whether a file of a wheel is left out: Unsloth's web studio, bitsandbytes' libraries for other GPUs."""
    if name.startswith("studio/"):
        return True
    base = name.rsplit("/", 1)[-1]
    return base.startswith("libbitsandbytes_") and not base.startswith(("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))


def trim(wheel: Path) -> int:
    """Rewrite ``wheel`` without the dropped files (and their RECORD lines); the bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not drop(n)]
        if len(names) == len(src.namelist()):
            return 0
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for n in names:
                data = src.read(n)
                if n.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(x for x in lines if not drop(x.split(",", 1)[0])) + "\n").encode()
                dst.writestr(src.getinfo(n), data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".whlu", help="folder for the wheels (git-ignored; name it in the device call's carry)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for old in out.glob("*.whl"):  # two versions of one package would stop the install on the GPU machine
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[f"--platform={x}" for x in PLATFORMS], "-d", tmp, *WHEELS]
        subprocess.run(cmd, check=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            saved = trim(wheel)
            dest = wheel.replace(out / wheel.name)
            print(f"{dest.name}: {dest.stat().st_size / 2**20:.1f} MiB" + (f" (trimmed {saved / 2**20:.1f})" if saved else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
