"""The GPU benchmark's pieces, on the CPU with the tiny model and the built-in demo data (a few seconds).

The benchmark itself runs on a GPU (benchmarks/bench_gpu.py, see benchmarks/README.md); here we check that
every configuration runs, that TRL is fed exactly the batches minialign is fed, and that the script writes
the documented JSON.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minialign.modeling.models import load_model
from minialign.training.bench import measure
from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ROW_KEYS = {"trainer", "task", "mode", "batch_size", "tokens_per_s", "pairs_per_s", "peak_memory_mb", "final_loss"}
TOP_KEYS = {"device", "torch", "transformers", "trl", "peft", "command", "results"}


@pytest.fixture(scope="module")
def bench_gpu():
    return load_benchmark("bench_gpu")


@pytest.fixture(scope="module")
def trl_peer(bench_gpu):
    return sys.modules["trl_peer"]


@pytest.fixture(scope="module")
def runs(bench_gpu):
    """benchmarks/minialign_runs.py, as bench_gpu imported it."""
    return sys.modules["minialign_runs"]


@pytest.fixture(scope="module")
def mfu(bench_gpu):
    return sys.modules["mfu"]


@pytest.fixture(scope="module")
def workloads(trl_peer):
    return {task: trl_peer.load_workload(task, "demo", "demo", 512, 256) for task in ("sft", "dpo")}


@pytest.mark.parametrize("task", ["sft", "dpo"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_measure_tiny(runs, workloads, task, mode):
    batches = runs.build_batches(task, False, workloads[task], 2, 3, 512)
    m = measure(load_model("tiny"), batches, task=task, full=mode == "full", steps=2, warmup=1)
    assert m.tokens_per_s > 0 and m.peak_memory_mb > 0
    assert (m.pairs_per_s is not None and m.pairs_per_s > 0) == (task == "dpo")
    assert m.memory_kind == "cpu_peak_rss" and torch.isfinite(torch.tensor(m.final_loss))


def test_measure_calls_on_step_after_every_step(runs, workloads):
    """profile_step.py's profiler advances on this boundary, whether or not steps are CUDA-graph replays."""
    calls = []
    batches = runs.build_batches("sft", False, workloads["sft"], 2, 3, 512)
    measure(load_model("tiny"), batches, task="sft", full=True, steps=3, warmup=2, on_step=lambda: calls.append(1))
    assert len(calls) == 5


def test_packed_batches_hold_every_token_once(runs, trl_peer, workloads):
    items = workloads["sft"][1]
    batches = runs.build_batches("sft", True, workloads["sft"], 2, 10**6, 512)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    assert all(b["input_ids"].shape == (2, 512) for b in batches)
    total = sum(trl_peer.batch_stats(b)[0] for b in batches)
    assert total <= sum(len(ex.prompt_ids) + len(ex.response_ids) for ex in items)
    assert total > 0.9 * rows * 512  # dense rows


def test_batch_stats_documents():
    from trl_peer import batch_stats

    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert batch_stats(padded) == (5, 9 + 4)
    packed = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert batch_stats(packed) == (6, 9 + 4 + 1)


def test_shared_prompt_batches_count_the_whole_sequences(runs, trl_peer, workloads):
    """tokens/s counts what both trainers train on (two whole sequences a pair); MFU the positions computed."""
    from minialign.data import TokenizedPair, collate_pairs, tokens_in

    shared = runs.build_batches("dpo", False, workloads["dpo"], 2, 3, 512, flat=True, share_prompt=True)
    whole = runs.build_batches("dpo", False, workloads["dpo"], 2, 3, 512, flat=True)
    for s, w in zip(shared, whole, strict=True):
        assert tokens_in(s) == tokens_in(w) == trl_peer.batch_stats(w)[0]
        computed, attn = runs.computed_stats(s)
        assert computed < tokens_in(w) and attn < trl_peer.batch_stats(w)[1]
    # prompt 3, responses 2 and 4: shared 2 tokens, branches 3 and 5; causal key reads (5^2 + 7^2 - 2^2) / 2
    one = collate_pairs([TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9])], pad_id=0, flat=True, share_prompt=True)
    assert runs.computed_stats(one) == (10, 25 + 49 - 4)


def test_model_flops_formula(mfu):
    shape = {"matmul_params": 100, "lora_params": 10, "layers": 2, "hidden": 8}
    attn = 4 * 2 * 8 * 50  # forward attention FLOPs for sum(n^2) = 50
    assert mfu.model_flops("sft", "full", 7, 50, shape) == 6 * 100 * 7 + 3 * attn
    assert mfu.model_flops("sft", "lora", 7, 50, shape) == (4 * 100 + 6 * 10) * 7 + 3 * attn
    assert mfu.model_flops("dpo", "full", 7, 50, shape) == 6 * 100 * 7 + 3 * attn + 2 * 100 * 7 + attn


def test_a_failing_run_is_recorded_and_oom_is_named(bench_gpu):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row, was_oom = bench_gpu.guarded("x", oom, {"trainer": "minialign", "batch_size": 256}, torch.device("cpu"))
    assert was_oom and row["error"] == "out of memory" and row["tokens_per_s"] is None
    row, was_oom = bench_gpu.guarded("y", lambda: 1 / 0, {"trainer": "trl"}, torch.device("cpu"))
    assert not was_oom and row["error"].startswith("ZeroDivisionError")


def test_trl_peer_sees_the_same_batches(runs, trl_peer, workloads):
    pytest.importorskip("trl")
    row = trl_peer.run_trl("dpo", "lora", 2, 2, 1, "demo", "demo", 512, "cpu", model_name="tiny",
                           workload=workloads["dpo"])
    assert ROW_KEYS <= set(row) and row["trainer"] == "trl"
    assert row["tokens_per_s"] > 0 and row["pairs_per_s"] > 0 and row["peak_memory_mb"] > 0
    assert row["final_loss"] == pytest.approx(0.693, abs=0.05) and not row["gradient_checkpointing"]
    # TRL trained on exactly minialign's batches 1 and 2 (after one warm-up batch): same real tokens.
    ours = runs.build_batches("dpo", False, workloads["dpo"], 2, 3, 512)[1:3]
    assert row["tokens"] == sum(trl_peer.batch_stats(b)[0] for b in ours)
    assert row["attn_sq"] == sum(trl_peer.batch_stats(b)[1] for b in ours)


def test_bench_gpu_small_writes_the_documented_json(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "small.json"
    cmd = [sys.executable, str(BENCH / "bench_gpu.py"), "--small", "--device", "cpu", "--out", str(out),
           "--configs", "sft-full", "--batch-sizes", "2", "--trl-batch-sizes", "2", "--steps", "1", "--variants", "eager,flat"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert TOP_KEYS <= set(doc) and doc["small"] is True
    assert {r["trainer"] for r in doc["results"]} == {"trl", "minialign"}
    for r in doc["results"]:
        assert ROW_KEYS | {"mfu", "mfu_6n"} <= set(r), r
        assert not r.get("error"), r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
    trl_row, ours, flat = doc["results"]
    assert trl_row["tokens"] == ours["tokens"] == flat["tokens"]  # the same batches in the same order
    assert flat["padding_free"] and not ours["padding_free"]
    assert flat["final_loss"] == pytest.approx(ours["final_loss"], rel=1e-4)  # padding-free: the same numbers
    assert "| sft full | 2 |" in out.with_suffix(".md").read_text()
    assert "no CUDA GPU" in proc.stdout or torch.cuda.is_available()

    # --append adds this call's rows and command, and keeps what was written into the file by hand
    doc["code_by_call"] = {"0": "abc1234"}
    out.write_text(json.dumps(doc))
    more = [*cmd[:cmd.index("--variants")], "--variants", "eager", "--no-trl", "--process-warmup-s", "0", "--append"]
    proc = subprocess.run(more, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    appended = json.loads(out.read_text())
    assert appended["code_by_call"] == {"0": "abc1234"} and len(appended["commands"]) == 2
    assert appended["results"][:3] == doc["results"] and len(appended["results"]) == 4


def test_the_batch_ladder_stops_at_the_first_oom(bench_gpu, tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM"):  # main() sets them
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    tried = []

    def fake_run(task, mode, packing, b, workload, args, device, variant="eager"):
        tried.append(b)
        if b >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"trainer": "minialign", "task": task, "mode": mode, "batch_size": b, "tokens_per_s": 10.0,
                "pairs_per_s": None, "peak_memory_mb": 1.0, "final_loss": 1.0, "tokens": 20, "attn_sq": 200,
                "elapsed_s": 2.0, "packing": packing}

    monkeypatch.setattr(bench_gpu, "run_minialign", fake_run)
    out = tmp_path / "ladder.json"
    assert bench_gpu.main(["--small", "--device", "cpu", "--no-trl", "--configs", "sft-full,dpo-lora",
                           "--batch-sizes", "2,4,8", "--variants", "eager", "--ladder-variants", "eager", "--out", str(out)]) == 0
    assert tried == [2, 2, 4, 4]  # equal-batch runs first, then each ladder up to its OOM
    rows = json.loads(out.read_text())["results"]
    assert [(r["task"], r["batch_size"], r.get("error")) for r in rows] == [
        ("sft", 2, None), ("dpo", 2, None), ("sft", 4, "out of memory"), ("dpo", 4, "out of memory")]
    assert rows[0]["mfu"] > 0


# ----------------------------------------------------------------------------- `minialign bench`


def test_minialign_bench_without_a_gpu_says_so_and_offers_small(capsys):
    from minialign import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "No CUDA GPU is visible" in err and "--small" in err and "Traceback" not in err


@pytest.mark.parametrize("variant", ["eager", "graphs"])
def test_minialign_bench_small_runs_each_variant(capsys, variant):
    from minialign import cli

    assert cli.main(["bench", "--small", "--json", "--tasks", "sft", "--modes", "full", "--steps", "2",
                     "--variant", variant]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["mode"], r["batch_size"]) for r in rows] == [("sft", "full", 8)]
    assert rows[0]["tokens_per_s"] > 0 and math.isfinite(rows[0]["final_loss"])
