"""The Unsloth peer of bench_e2e.py, on the CPU: Unsloth itself needs a GPU, so what is checked here is the plumbing
that a GPU run depends on: which script and settings each runner gets, that Unsloth's pinned packages are found
first, that a missing package is named in the result JSON (never a silent skip), that minialign's low-memory flags
are a valid configuration, and the ratios against several peers."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BENCHMARKS as BENCH
from tests.conftest import HH, load_benchmark

ROOT = BENCH.parent


def _args(e2e, *extra: str):
    return e2e.parse_args(["--task", "sft", "--mode", "lora", "--model", "m", "--tokenizer", "t", "--data", "d",
                           *extra])


def test_each_unsloth_runner_gets_its_script_and_settings(e2e, tmp_path):
    args = _args(e2e)
    ours = e2e.runner_command(args, "unsloth-ours", tmp_path)
    default = e2e.runner_command(args, "unsloth", tmp_path)
    assert Path(ours[1]).name == Path(default[1]).name == "unsloth_peer.py"
    assert default[-6:] == ["--runner", "unsloth", "--grad-checkpointing", "unsloth", "--optim", "adamw_8bit"]
    assert ours[-6:] == ["--runner", "unsloth-ours", "--grad-checkpointing", "off", "--optim", "adamw_torch_fused"]
    # The same run as TRL's: every shared flag is identical, only the script and its own settings differ.
    trl = e2e.runner_command(args, "trl", tmp_path)
    assert default[2:-6] == trl[2:]
    # Unsloth's pins (trl <= 1.15, datasets < 5) come first on its PYTHONPATH only.
    env = e2e.child_env(tmp_path, False, "/opt/usite")
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT), "/opt/usite"]
    assert "/opt/usite" not in e2e.child_env(tmp_path, False)["PYTHONPATH"]


@pytest.mark.parametrize(("runner", "mode"), [("minialign-lowmem", "lora"), ("minialign-lowmem", "full"),
                                              ("minialign-lowmem-unclipped", "lora"), ("minialign-lowmem-bf16", "full")])
def test_minialigns_low_memory_runners_are_valid_configurations(e2e, tmp_path, runner, mode):
    from minialign.cli import _config, build_parser
    from minialign.config.schema import SFTConfig

    cmd = e2e.runner_command(_args(e2e, "--mode", mode), runner, tmp_path)
    assert cmd[1:3] == ["-m", "minialign"]
    cfg = _config(build_parser().parse_args(cmd[3:]), SFTConfig)
    cfg.validate(1)
    assert cfg.grad_checkpointing and cfg.compile and cfg.full == (mode == "full")
    if runner.startswith("minialign-lowmem-u"):  # as measured before AdamW inside backward could clip
        assert cfg.optim_in_backward and cfg.max_grad_norm == 0
    elif runner == "minialign-lowmem":  # clipped as the peers are (by the previous step's norm)
        assert cfg.optim_in_backward and cfg.max_grad_norm == 1.0
    else:  # bf16 weights step their own AdamW after backward
        assert cfg.base_dtype == "bfloat16" and not cfg.optim_in_backward


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")
def test_a_missing_unsloth_package_is_named_in_the_results(tmp_path, shared_dir):
    """A stand-in `unsloth` on --unsloth-site raises what the real one raises without bitsandbytes; the benchmark
    records that message for the Unsloth row and still runs minialign."""
    site = tmp_path / "usite" / "unsloth"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("raise ImportError(\"Unsloth: No module named 'bitsandbytes'\")\n")
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(BENCH / "bench_e2e.py"), "--task", "sft", "--mode", "lora", "--model", "tiny",
           "--tokenizer", "demo", "--data", str(shared_dir / HH), "--train-rows", "300:316", "--eval-rows", "0:8",
           "--epochs", "1", "--batch-size", "8", "--runners", "unsloth,minialign-eager", "--label", "tiny-sft",
           "--work", str(tmp_path / "work"), "--out", str(out), "--timeout-s", "120", "--no-warm", "--no-heldout",
           "--unsloth-site", str(tmp_path / "usite")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    unsloth, ours = json.loads(out.read_text())["runs"]
    assert unsloth["runner"] == "unsloth" and unsloth["returncode"] == 3
    assert unsloth["error"] == "import unsloth: ImportError: Unsloth: No module named 'bitsandbytes'"
    assert "bitsandbytes" in unsloth["log_tail"]
    assert ours["returncode"] == 0 and ours["steps"] == 2 and ours["final_train_loss"] > 0
    assert "| tiny-sft | unsloth | 3 |" in out.with_suffix(".md").read_text()


def test_ratios_pair_each_minialign_row_with_each_peer(e2e):
    def row(runner, wall, steady, mem, loss, call=0):
        return {"runner": runner, "label": "a", "task": "sft", "returncode": 0, "wall_s": wall, "call": call,
                "steady_tokens_per_s": steady, "tokens_per_s": steady / 2, "peak_memory_mb": mem,
                "final_train_loss": loss, "heldout": {"loss": loss + 1}}

    runs = [row("unsloth", 100.0, 1000.0, 4000.0, 2.0), row("minialign", 25.0, 5000.0, 3000.0, 1.9),
            row("trl", 80.0, 800.0, 8000.0, 2.1), row("unsloth", 90.0, 1100.0, 4000.0, 2.0, call=1)]
    out = e2e.ratios(runs)
    assert [(q["runner"], q["peer"]) for q in out] == [("minialign", "unsloth"), ("minialign", "trl")]
    vs_unsloth, vs_trl = out
    assert vs_unsloth["peer_call"] == 0  # the peer of the same call, not the later one
    assert vs_unsloth["wall_speedup_vs_unsloth"] == pytest.approx(4.0)
    assert vs_unsloth["steady_speedup_vs_unsloth"] == pytest.approx(5.0)
    assert vs_unsloth["memory_ratio_vs_unsloth"] == pytest.approx(0.75)
    assert vs_unsloth["final_train_loss_delta"] == pytest.approx(-0.1)
    assert vs_unsloth["heldout_loss_delta"] == pytest.approx(-0.1)
    assert vs_trl["wall_speedup_vs_trl"] == pytest.approx(3.2) and vs_trl["trl_call"] == 0
    table = load_benchmark("e2e_table").markdown({"device": "cpu", "runs": runs, "ratios": out})
    assert "| a | minialign | unsloth | 4.00x" in table and "| a | minialign | trl | 3.20x" in table


def test_an_sft_ratio_carries_the_paired_interval_of_the_heldout_loss_difference(e2e):
    from minialign.evaluation.evaluate import loss_difference

    torch.manual_seed(0)
    tokens = torch.randint(5, 60, (40,)).double()
    peer = torch.stack([tokens * (2 + torch.rand(40)), tokens], 1)
    mine = torch.stack([peer[:, 0] + tokens * 0.05 * torch.randn(40), tokens], 1)

    def row(runner, per):
        return {"runner": runner, "label": "a", "task": "sft", "returncode": 0, "wall_s": 10.0, "call": 0,
                "heldout": {"loss": (per[:, 0].sum() / per[:, 1].sum()).item(), "per_example": per.tolist()}}

    (q,) = e2e.ratios([row("trl", peer), row("minialign", mine)])
    want = loss_difference(peer, mine)
    assert q["heldout_loss_delta"] == pytest.approx(want["delta"])
    assert q["heldout_loss_delta_ci"] == pytest.approx([want["low"], want["high"]])
    assert want["low"] < want["delta"] < want["high"]
    table = load_benchmark("e2e_table").markdown({"device": "cpu", "runs": [], "ratios": [q]})
    assert "loss {:+.4f} [{:+.4f}, {:+.4f}]".format(q["heldout_loss_delta"], *q["heldout_loss_delta_ci"]) in table
    other = row("minialign", torch.stack([mine[:, 0], tokens + 1], 1))  # scored on other tokens: no interval
    assert e2e.ratios([row("trl", peer), other])[0]["heldout_loss_delta_ci"] is None


def test_trimmed_wheels_keep_every_file_a_run_reads_and_a_matching_record(tmp_path):
    """unsloth_wheels.trim: Unsloth's studio/ and bitsandbytes' libraries for other GPUs leave the wheel and its
    RECORD; the CUDA 13 and CPU libraries and the package code stay, byte for byte."""
    import zipfile

    wheels = load_benchmark("unsloth_wheels")
    keep = {"bitsandbytes/__init__.py": b"x = 1\n", "bitsandbytes/libbitsandbytes_cuda130.so": b"\0" * 64,
            "bitsandbytes/libbitsandbytes_cpu.so": b"\1" * 8, "unsloth/models/llama.py": b"# code\n"}
    drop = {"bitsandbytes/libbitsandbytes_cuda124.so": b"\2" * 4096, "bitsandbytes/libbitsandbytes_rocm70.so": b"\3",
            "studio/frontend/dist/app.js": b"js" * 1000}
    files = {**keep, **drop}
    record = "pkg-1.0.dist-info/RECORD"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record, "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items()) + f"{record},,\n")
    saved = wheels.trim(wheel)
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted([*keep, record])
        assert all(z.read(n) == d for n, d in keep.items())
        listed = [line.split(",")[0] for line in z.read(record).decode().splitlines()]
    assert sorted(listed) == sorted([*keep, record])
    assert wheels.trim(wheel) == 0  # nothing left to drop: the file is not rewritten
