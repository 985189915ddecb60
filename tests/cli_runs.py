"""Helpers the CLI-level tests share: small demo runs in process or as subprocesses, their metrics, user errors.

A module of its own, not a test file: nine test files use them, and importing a test file for its helpers made
test_train.py both a suite and a library."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minialign import cli
from minialign.config.presets import build, load_yaml, preset
from minialign.data import load_preference_pairs
from minialign.modeling.models import load_tokenizer
from minialign.training import checkpoint

# Small runs: a handful of steps of the tiny model on a slice of the demo data.
SMALL = ["--demo", "--batch-size", "4", "--limit", "32", "--eval-limit", "8"]

# The tiny model runs as fast on one thread as on two, and one thread cannot stall at OpenMP barriers when
# other processes share the two cores (that made runs up to 50x slower). Subprocesses get the same count.
THREADS = 1


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- helpers


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl; each line must be valid JSON."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(rows: list[dict]) -> dict[int, float]:
    """Training loss per step; a later row for a step (logged again after a resume) overrides an earlier one."""
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def evals(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


def step_of(path: Path | None) -> int:
    return -1 if path is None else int(path.name.removeprefix(checkpoint.PREFIX))


def demo_config(cls, kind: str, **overrides):
    return build(cls, load_yaml(preset(f"{kind}-demo"), cls), overrides)


def demo_pairs(cfg):
    """The first ``cfg.limit`` demo training pairs, tokenized with the demo tokenizer."""
    tokenizer = load_tokenizer("demo")
    pairs = load_preference_pairs("demo", split="train", limit=cfg.limit)
    return tokenizer, {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}, pairs


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


@contextlib.contextmanager
def launched(args: list, log: Path):
    """``python -m minialign ...`` in a subprocess, with the thread count of the in-process runs (same floats).

    Output goes to ``log``; the process is killed on the way out if a failed assertion left it running.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "minialign", *map(str, args)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited (status {proc.returncode}) before {what}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def n_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def expect_user_error(capsys, *args, match: str) -> str:
    status = run_cli(*args)
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err
    return errors[0]
