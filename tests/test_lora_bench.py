"""`minialign run`'s LoRA-vs-full benchmark: alternating, repeated runs in one process, on training's own path, with
the method stated; and the bench/train import circle gone."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

from minialign.commands.experiment import _bench_batches, run
from minialign.config.evaluation import RunConfig
from minialign.config.presets import build, load_yaml, preset
from minialign.config.schema import SFTConfig
from minialign.data import load_preference_pairs, tokenize_sft
from minialign.modeling.models import load_model, load_tokenizer
from minialign.reporting.render import render_markdown
from minialign.reporting.report import lora_section
from minialign.training import bench

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_warms_each_mode_then_alternates():
    assert bench.alternating_schedule(("lora", "full"), 3) == [
        ("lora", False), ("full", False), ("lora", True), ("full", True), ("lora", True), ("full", True),
        ("lora", True), ("full", True)]


def test_fast_path_batches_are_laid_out_as_training_lays_them_out():
    cfg = build(SFTConfig, load_yaml(preset("sft-demo"), SFTConfig), {"fast": "on"})
    cfg.apply_fast("cpu", 1)
    tok = load_tokenizer("demo")
    examples = tokenize_sft(load_preference_pairs("demo", limit=12), tok, max_length=128, max_prompt_length=64)
    batches, settings, path = _bench_batches(cfg, examples, 4, tok.pad_token_id, bench.torch.device("cpu"))
    assert all(b["input_ids"].shape[0] == 1 and "n_sequences" in b for b in batches)  # padding-free rows
    assert settings["shapes"] is not None and not settings["cuda_graphs"]  # planned shapes; no graphs on a CPU
    assert "padding-free batches, shapes planned up front" in path
    m = bench.measure(load_model("tiny"), batches, task="sft", full=False, steps=1, warmup=1, **settings)
    assert m.tokens_per_s > 0


def test_run_alternates_repeats_and_states_the_method_in_results_and_report(tmp_path, capsys):
    cfg = build(RunConfig, load_yaml(preset("run-demo"), RunConfig),
                {"out": str(tmp_path / "run"), "stages": ["lora"], "bench_steps": 1, "bench_repeats": 2,
                 "bench_batch_size": 2})
    run(cfg)
    lora = json.loads((tmp_path / "run" / "results.json").read_text())["lora"]
    runs = lora["benchmark_runs"]
    assert [(r["mode"], r["timed"]) for r in runs] == bench.alternating_schedule(("lora", "full"), 2)
    assert [b["mode"] for b in lora["benchmark"]] == ["lora", "full"]
    for row in lora["benchmark"]:
        assert row["repeats"] == 2
        for key in ("tokens_per_s", "peak_memory_mb"):
            values = [r[key] for r in runs if r["mode"] == row["mode"] and r["timed"]]
            assert row[key] == statistics.median(values)
            assert (row[f"{key}_min"], row[f"{key}_max"]) == (min(values), max(values))
    # every run started from the same weights on the same batches (LoRA's adapters are drawn afresh)
    assert len({r["final_loss"] for r in runs if r["mode"] == "full"}) == 1
    method = lora["benchmark_method"]
    assert "L F L F" in method and "median" in method and "one process" in method and "padded batches, eager" in method
    printed = capsys.readouterr().out
    assert method in printed and "median of 2" in printed
    assert printed.count("warm-up lora:") == printed.count("warm-up full:") == 1
    text = render_markdown("r", [lora_section(lora)])
    assert f"Method: {method}" in text and "tokens/s (min-max)" in text


def test_bench_and_train_import_without_a_circle():
    """train.py no longer imports bench.py (their shared helpers are in devices.py), so either imports first."""
    code = ("import sys, minialign.training.train; assert 'minialign.training.bench' not in sys.modules; "
            "import minialign.training.bench")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bench" not in (ROOT / "minialign" / "training" / "train.py").read_text()
