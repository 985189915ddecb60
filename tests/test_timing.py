"""Where a command's time goes: summary.json's phases and the final line of `minialign sft|dpo` (demo runs)."""

import json

import pytest

from minialign.cli import main
from minialign.training.timing import Stopwatch

PHASES = ("load_s", "tokenize_s", "train_s", "save_s", "other_s")


@pytest.mark.parametrize("kind, extra", [("sft", []), ("dpo", ["--precompute-ref"])])
def test_summary_and_final_line_split_the_wall_time(tmp_path, capsys, kind, extra):
    out = tmp_path / kind
    args = ["--out", str(out), "--max-steps", "2", "--limit", "32", "--eval-limit", "8", *extra]
    assert main([kind, "--demo", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    phases = [*PHASES, "reference_s"] if kind == "dpo" else list(PHASES)
    assert all(summary[k] >= 0 for k in phases)
    assert summary["train_s"] > 0 and summary["load_s"] > 0 and summary["tokenize_s"] > 0
    assert sum(summary[k] for k in phases) == pytest.approx(summary["wall_s"], abs=0.01)
    assert summary["eval_s"] + summary["checkpoint_s"] <= summary["train_s"]  # parts of the loop's time
    assert summary["steps"] == 2 and "eval/loss" in summary["eval"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"minialign {kind}: done in {summary['wall_s']:.1f} s (load {summary['load_s']:.1f} s, "
                           f"tokenize {summary['tokenize_s']:.1f} s, ")
    assert f"train {summary['train_s']:.1f} s, save {summary['save_s']:.1f} s" in last
    assert str(out / "final" / ("adapter" if kind == "dpo" else "model")) in last  # the demo SFT is full fine-tuning


def test_stopwatch_counts_what_no_phase_covers_as_other(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 3.5, 4.0, 10.0])  # start; load 1-3; tokenize 3.5-4; summary at 10
    monkeypatch.setattr("minialign.training.timing.time.perf_counter", lambda: next(now))
    clock = Stopwatch()
    with clock.phase("load"):
        pass
    with clock.phase("tokenize"):
        pass
    clock.add("train", 4.0)
    assert clock.summary() == {"load_s": 2.0, "tokenize_s": 0.5, "train_s": 4.0, "other_s": 3.5, "wall_s": 10.0}
