"""--tensorboard writes the same per-step scalars as metrics.jsonl."""

import json

from minialign import cli


def test_tensorboard_scalars_match_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert cli.main(["sft", "--demo", "--out", str(out), "--max-steps", "3", "--tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged and all(abs(logged[r["step"]] - r["loss"]) < 1e-5 for r in rows if "eval/loss" not in r)
