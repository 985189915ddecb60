"""benchmarks/bench_e2e.py end to end on the CPU: TRL's user script and minialign's CLI on the same rows of the real
HH-RLHF file, the tiny model, one epoch (~30 s on 2 cores). The numbers mean nothing on a CPU; what is checked is
that every part runs and measures what it says: wall clocks, tokens, the shared held-out evaluator, the ratios."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BENCHMARKS as BENCH
from tests.conftest import HH, load_benchmark

ROOT = BENCH.parent


def test_trl_and_minialign_race_on_the_same_run(tmp_path, shared_dir):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(BENCH / "bench_e2e.py"), "--task", "dpo", "--mode", "lora", "--model", "tiny",
           "--tokenizer", "demo", "--data", str(shared_dir / HH), "--train-rows", "300:340", "--eval-rows", "0:16",
           "--epochs", "1", "--batch-size", "8", "--runners", "trl,minialign-eager", "--label", "tiny-dpo",
           "--work", str(tmp_path / "work"), "--out", str(out), "--timeout-s", "120", "--no-warm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["versions"]["trl"] and doc["commands"] == [doc["command"]]
    trl, ours = doc["runs"]
    assert (trl["runner"], ours["runner"]) == ("trl", "minialign-eager")
    for row in (trl, ours):
        assert row["returncode"] == 0 and not row["timed_out"], row.get("log_tail")
        assert Path(row["log"]).is_file() and row["config"]["train_rows"] == "300:340"
        assert row["wall_s"] > row["train_s"] > 0  # the command holds start-up, loading and evaluation too
        assert row["steps"] == 5 and row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["steady_tokens_per_s"] > 0
        assert row["peak_memory_mb"] > 0 and row["memory_kind"] == "cpu_peak_rss"
        held = row["heldout"]
        assert held["n_pairs"] == 16, held
        for key in ("reward_accuracy", "policy_accuracy", "reference_accuracy"):
            assert 0.0 <= held[key] <= 1.0
    assert trl["wall_s"] <= trl["elapsed_s"]  # TRL's t_done comes before its save and exit
    assert ours["wall_s"] == ours["elapsed_s"] and ours["wall_to_eval_s"] <= ours["wall_s"]
    assert trl["own_eval"]["eval_rewards/accuracies"] is not None and not trl["gradient_checkpointing"]
    # The shared evaluator scores minialign's adapter exactly as minialign's own final evaluation did ...
    assert ours["heldout"]["reward_accuracy"] == pytest.approx(ours["own_eval"]["eval/rewards/accuracies"])
    assert ours["heldout"]["reward_margin"] == pytest.approx(ours["own_eval"]["eval/rewards/margins"], rel=1e-3, abs=1e-5)
    # ... and reads TRL's PEFT adapter: an adapter left at its initialisation (B = 0) would give a zero margin.
    assert trl["heldout"]["reward_margin"] != 0.0
    (ratio,) = doc["ratios"]
    assert ratio["runner"] == "minialign-eager" and ratio["label"] == "tiny-dpo"
    assert ratio["wall_speedup_vs_trl"] == pytest.approx(trl["wall_s"] / ours["wall_s"])
    assert ratio["steady_speedup_vs_trl"] == pytest.approx(ours["steady_tokens_per_s"] / trl["steady_tokens_per_s"])
    assert ratio["memory_ratio_vs_trl"] == pytest.approx(ours["peak_memory_mb"] / trl["peak_memory_mb"])
    assert ratio["reward_accuracy_delta"] == pytest.approx(
        ours["heldout"]["reward_accuracy"] - trl["heldout"]["reward_accuracy"])
    table = out.with_suffix(".md").read_text()
    assert "| tiny-dpo | trl | 0 |" in table and "| tiny-dpo | minialign-eager |" in table


def test_a_failed_or_overlong_run_is_recorded(e2e, tmp_path):
    failed = e2e.run_timed([sys.executable, "-c", "print('x' * 5000); raise SystemExit(3)"], tmp_path / "f.log", 60)
    assert failed["returncode"] == 3 and not failed["timed_out"]
    assert len(failed["log_tail"]) == e2e.LOG_TAIL and failed["t_exit"] > failed["t_spawn"]
    slow = e2e.run_timed([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log", 0.5)
    assert slow["timed_out"] and slow["returncode"] != 0 and slow["t_exit"] - slow["t_spawn"] < 30
    # Ratios only pair rows that succeeded.
    rows = [{"runner": "trl", "label": "a", "returncode": 0, "wall_s": 10.0, "call": 0},
            {"runner": "minialign", "label": "a", "returncode": 1, "wall_s": None, "call": 0}]
    assert e2e.ratios(rows) == []


def test_the_steady_window_starts_where_minialigns_does():
    """steady tokens/s of both trainers covers the same steps (minialign's summary.json picks them in train.py)."""
    from minialign.training.train import _steady_from

    trl_e2e = load_benchmark("trl_e2e")
    assert [trl_e2e.steady_from(n) for n in range(1, 400)] == [_steady_from(0, n) for n in range(1, 400)]


def test_a_builtin_model_is_saved_once_and_loaded_as_a_checkpoint(e2e, tmp_path):
    """--checkpoint: the runners load the built-in's random weights from disk (bf16), as a pretrained model, with the
    tokenizer in the same folder (Unsloth reads both from there)."""
    import os

    import torch

    from minialign.modeling.models import load_model

    path = tmp_path / "tiny-ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert e2e.save_checkpoint("tiny", "demo", path, 3, env) == str(path)
    first = (path / "config.json").stat().st_mtime_ns
    e2e.save_checkpoint("tiny", "demo", path, 3, env)  # already there: not written again
    assert (path / "config.json").stat().st_mtime_ns == first
    saved, built = load_model(str(path)), load_model("tiny", seed=3)
    for (name, a), (_, b) in zip(saved.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16).float()), name
    assert e2e.RUNNERS["minialign-bf16"][-2:] == ["--base-dtype", "bfloat16"]
    from minialign.modeling.models import load_tokenizer

    assert load_tokenizer(str(path)).get_vocab() == load_tokenizer("demo").get_vocab()


def test_trl_trains_on_minialigns_tokens_or_in_minialigns_order_when_asked(tmp_path, shared_dir):
    # The learning-gap diagnosis: TRL's trainer on minialign's token ids and loss mask. With prompts cut to 32 of 64
    # tokens, TRL's own tokenization keeps sequence starts and drops prompt-only rows; minialign's keeps every row.
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from minialign.data import load_preference_pairs
    from minialign.data.batching import batch_indices
    from minialign.data.tokenize import tokenize_sft
    from minialign.modeling.models import load_tokenizer

    data, rows = shared_dir / HH, "300:340"
    ours = tokenize_sft(load_preference_pairs(data, rows=rows), load_tokenizer("demo"), max_length=64,
                        max_prompt_length=32)
    assert ours.truncated > 0
    want = sum(len(ex.prompt_ids) + len(ex.response_ids) for ex in ours)

    def run(*flags):
        out = tmp_path / f"trl{len(flags)}.json"
        cmd = [sys.executable, str(BENCH / "trl_e2e.py"), "--task", "sft", "--mode", "lora", "--model", "tiny",
               "--tokenizer", "demo", "--data", str(data), "--train-rows", rows, "--eval-rows", "0:8", "--batch-size",
               "8", "--max-length", "64", "--max-prompt-length", "32", "--out-json", str(out), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    mixed = run("--minialign-data")
    assert mixed["tokens"] == want and mixed["train_rows_after_trl_filter"] == len(ours) == mixed["train_pairs"]
    assert mixed["steps"] == -(-len(ours) // 8)
    assert mixed["train_loss_tokens"] == sum(len(ex.response_ids) for ex in ours)  # the loss mask is minialign's too
    own = run("--minialign-order", "--epochs", "2")  # TRL's own examples, in minialign's order
    assert own["tokens"] != 2 * want  # TRL's own tokenization differs here, so the flag is what changed the data
    # the other half of the diagnosis: TRL's examples (after its filter: the ones minialign's keep-start keeps), batch
    # for batch in minialign's order, every epoch
    kept = tokenize_sft(load_preference_pairs(data, rows=rows), load_tokenizer("demo"), max_length=64,
                        max_prompt_length=32, truncation="keep-start")
    n = own["train_rows_after_trl_filter"]
    assert n == len(kept) < 40
    order = {str(e): [i for b in batch_indices(n, 8, seed=0, epoch=e) for i in b] for e in (0, 1)}
    fingerprint = {e: hashlib.sha256(",".join(map(str, o)).encode()).hexdigest()[:16] for e, o in order.items()}
    assert own["minialign_order"] == {"n": n, "sha256": fingerprint, "head": {e: o[:8] for e, o in order.items()}}
    assert order["0"] != order["1"] and own["steps"] == 2 * -(-n // 8)
    bad = subprocess.run([sys.executable, str(BENCH / "trl_e2e.py"), "--task", "dpo", "--mode", "lora", "--model",
                          "tiny", "--tokenizer", "demo", "--data", str(data), "--out-json", str(tmp_path / "x.json"),
                          "--minialign-data"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--task sft only" in bad.stderr

