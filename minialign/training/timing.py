"""Where a command's time goes: named phases of `minialign sft|dpo`, written to ``summary.json`` and its last line.

A short run can spend more time loading and tokenizing than training; the phases show which, so a user knows
whether a faster GPU, the model cache (``minialign.modeling.cache``) or fewer steps would help.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from minialign.base import dist
from minialign.base.files import write_json

# Phases in the order they happen and are printed; ``train`` is the training loop's own time (train.py).
PHASES = ("load", "tokenize", "reference", "train", "save")


class Stopwatch:
    """Seconds per phase since the command began; what no phase covers (run folder, set-up) is ``other``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> dict[str, float]:
        """``<phase>_s`` for every phase timed, ``other_s`` and ``wall_s`` (their sum)."""
        wall = time.perf_counter() - self.start
        out = {f"{name}_s": round(self.seconds[name], 3) for name in PHASES if name in self.seconds}
        out["other_s"] = round(max(wall - sum(self.seconds.values()), 0.0), 3)
        out["wall_s"] = round(wall, 3)
        return out


def write_summary(run_dir: Path, last: dict, clock: Stopwatch | None = None) -> None:
    """``summary.json``: what the run cost (time per phase, tokens/s, peak memory, shapes) and its last held-out
    metrics. ``train_s`` is the training loop's time (held-out evaluation and checkpoints inside it: ``eval_s``,
    ``checkpoint_s``)."""
    if dist.rank() != 0:
        return
    summary = dict(last.get("summary", {}))
    if clock is not None:
        if "train_s" in summary:
            clock.add("train", summary["train_s"])
        summary.update(clock.summary())
    summary["eval"] = {k: v for k, v in last.items() if k.startswith("eval/")}
    summary["final_loss"] = last.get("loss")
    write_json(run_dir / "summary.json", summary, indent=1)


def done_line(kind: str, run_dir: Path) -> str:
    """The last line of `minialign sft|dpo`: the wall time, its phases, and where the results are."""
    final, metrics = run_dir / "final", run_dir / "metrics.jsonl"
    where = "adapter" if (final / "adapter").is_dir() else "model" if (final / "model").is_dir() else "results"
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"minialign {kind}: done; {where} in {final}, metrics in {metrics}"
    parts = [f"{name} {summary[f'{name}_s']:.1f} s" for name in (*PHASES, "other") if f"{name}_s" in summary]
    return (f"minialign {kind}: done in {summary.get('wall_s', 0.0):.1f} s ({', '.join(parts)}); {where} in "
            f"{final / where if where != 'results' else final}, metrics in {metrics}")
