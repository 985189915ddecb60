"""--report-to: metrics reach trackers under the names TRL's trainers give them; a missing package is a clear error."""

import json
import re
from importlib.util import find_spec
from pathlib import Path

import pytest

from minialign import cli
from minialign.base.errors import UserError
from minialign.training import trackers

# What the loop's rows hold (train.py: loss, grad_norm, lr, epoch, tokens; DPOTask: rewards/*, logps/*) and the name
# TRL + transformers log for each (transformers' rewrite_logs prefixes train/ and turns eval_ into eval/).
TRL_NAMES = {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate", "epoch": "epoch", "tokens": "num_tokens",
             "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
             "rewards/accuracies": "rewards/accuracies", "rewards/margins": "rewards/margins",
             "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected"}


def test_names_follow_transformers_rewrite_logs():
    from transformers.integrations.integration_utils import rewrite_logs

    for ours, trl in TRL_NAMES.items():
        assert trackers.tracker_name(ours) == next(iter(rewrite_logs({trl: 0.0})))
        assert trackers.tracker_name(f"eval/{ours}") == next(iter(rewrite_logs({f"eval_{trl}": 0.0})))
    assert trackers.tracker_name("step") is None
    assert trackers.tracker_metrics({"step": 3, "loss": 1.5, "note": "x", "flag": True}) == {"train/loss": 1.5}


@pytest.mark.skipif(find_spec("trl") is None, reason="trl is not installed")
def test_dpo_metric_names_are_trls():
    """Every DPO metric TRL's DPOTrainer records under the same meaning is one minialign sends, by that name."""
    source = (Path(find_spec("trl").origin).parent / "trainer" / "dpo_trainer.py").read_text()
    trl_keys = set(re.findall(r'_metrics\[mode\]\["([^"]+)"\]', source))
    ours = {v for k, v in TRL_NAMES.items() if "/" in k}
    assert ours <= trl_keys, ours - trl_keys


def test_dpo_run_sends_trl_names_to_tensorboard(tmp_path):
    """A real DPO run (--max-length alone: the prompt length follows it) mirrors metrics.jsonl into TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "dpo"
    assert cli.main(["dpo", "--demo", "--out", str(out), "--max-length", "64", "--limit", "32", "--batch-size", "8",
                     "--max-steps", "2", "--eval-every", "2", "--eval-limit", "16", "--report-to", "tensorboard"]) == 0
    assert "max_prompt_length: 32\n" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {f"train/{name}" for name in TRL_NAMES.values()} | {"eval/loss", "eval/rewards/accuracies"}
    assert want <= tags, want - tags
    logged = {(tag, e.step): e.value for tag in tags for e in events.Scalars(tag)}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert logged[(trackers.tracker_name(key), row["step"])] == pytest.approx(value, rel=1e-6, abs=1e-6)


def test_missing_tracker_package_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.PACKAGES, "wandb", "minialign_no_such_tracker_package")
    out = tmp_path / "run"
    assert cli.main(["sft", "--demo", "--out", str(out), "--report-to", "tensorboard,wandb"]) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb" in err and "pip install minialign_no_such_tracker_package" in err
    assert not out.exists()  # refused before the run folder is written
    with pytest.raises(UserError, match="pip install"):
        trackers.Trackers("wandb", tmp_path, {})


def test_report_to_flag_forms():
    parser = cli.build_parser()
    assert parser.parse_args(["sft", "--report-to", "tensorboard, wandb"]).report_to == "tensorboard,wandb"
    assert parser.parse_args(["dpo", "--tensorboard"]).report_to == "tensorboard"  # the deprecated alias
    with pytest.raises(SystemExit):
        parser.parse_args(["sft", "--report-to", "comet"])
