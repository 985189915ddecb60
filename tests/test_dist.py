"""Data parallelism on CPU (gloo): torchrun with 2 processes against one process with the same global batch.

Each 2-process run (batch 4 per rank) must log the same per-step losses as one process with batch 8, for DDP
and FSDP2, SFT and DPO; its checkpoints must resume in one process (and the other way round); a failing rank
must end the job; bad settings must be refused with exit code 2. Every launch is a real
``python -m torch.distributed.run``; the single-process references run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from cli_runs import _one_thread  # noqa: F401 (autouse fixture; the subprocesses run OMP_NUM_THREADS=1 too)
from safetensors.torch import load_file

from minialign import cli
from minialign.base import dist
from minialign.base.errors import UserError

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# 64 demo pairs at a global batch of 8: 8 steps an epoch, so 6 steps stay in one epoch; checkpoints at 3 and 6.
SMALL = ["--demo", "--limit", 64, "--eval-limit", 8, "--max-steps", 6, "--save-every", 3, "--eval-every", 6]
GLOBAL_BATCH, WORLD = 8, 2
TIMEOUT = 120  # seconds for one launch; a hang fails the test instead of blocking CI


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list, log: Path, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a hung job and all its workers can be killed together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as fh:
        return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"timed out after {timeout} s (a hang?):\n{log.read_text()[-3000:]}")


def torchrun(args: list, log: Path, *, script: Path | None = None, timeout: float = TIMEOUT) -> tuple[int, str]:
    """``python -m torch.distributed.run --nproc_per_node 2 -m minialign ARGS``: (exit status, output)."""
    target = ["-m", "minialign"] if script is None else [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", WORLD, "--master_port", free_port(),
           *target, *args]
    status = finish(launch(cmd, log), log, timeout)
    return status, log.read_text()


def run_2(kind: str, out: Path, *flags) -> Path:
    status, output = torchrun([kind, *SMALL, "--batch-size", GLOBAL_BATCH // WORLD, "--out", out, *flags],
                              out.with_suffix(".log"))
    assert status == 0, output[-3000:]
    return out


def run_1(kind: str, out: Path, *flags) -> Path:
    assert cli.main([str(a) for a in (kind, *SMALL, "--batch-size", GLOBAL_BATCH, "--out", out, *flags)]) == 0
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steps(rows: list[dict]) -> dict[int, dict]:
    """Training rows by step; a later row for a step (after a resume) replaces an earlier one."""
    return {r["step"]: r for r in rows if "loss" in r}


def resumed_steps(run_dir: Path) -> dict[int, dict]:
    """The rows a resume from step 3 appended (the original run logged steps 1-6 first)."""
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    return steps(rows[6:])


def assert_same_steps(got: dict[int, dict], want: dict[int, dict], which) -> None:
    for step in which:
        g, w = got[step], want[step]
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-5), f"step {step}: loss {g['loss']} != {w['loss']}"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), f"step {step}: grad norm"
        assert (g["tokens"], g["lr"], g["epoch"]) == (w["tokens"], w["lr"], w["epoch"]), f"step {step}"


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], atol=atol, rtol=0, msg=name)


def latest_checkpoint_only_at(run_dir: Path, step: int) -> None:
    """Make ``run_dir`` look like a run stopped after ``step``: later checkpoints and the final output go."""
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "final")


# ----------------------------------------------------------------------------- single-process references


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 8: SFT (full fine-tuning, the demo preset) and DPO (LoRA, the adapter reference)."""
    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    root = tmp_path_factory.mktemp("single")
    return {kind: run_1(kind, root / kind) for kind in ("sft", "dpo")}


# ----------------------------------------------------------------------------- 2 processes = 1 process


# 2 x 2 ranks x 2 = 8, gradients synchronised once a step. SFT only: DPO groups pairs by length in units of
# batch size x ranks, so accumulation there changes which pairs share a step (in one process too).
ACCUMULATE = ["--batch-size", 2, "--grad-accum", 2]


@pytest.mark.parametrize("kind,mode,flags", [
    ("sft", "ddp", ACCUMULATE),
    ("sft", "fsdp", ACCUMULATE),
    ("dpo", "ddp", ["--precompute-ref"]),  # each rank scores its share of the reference table
    ("dpo", "fsdp", []),  # the LoRA reference (adapters off) runs through the sharded model
])
def test_two_processes_match_one(single, tmp_path, kind, mode, flags):
    two = run_2(kind, tmp_path / "two", "--dist", mode, *flags)
    one = single[kind]
    got, want = steps(metrics(two)), steps(metrics(one))
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert_same_steps(got, want, range(1, 7))
    # Held-out metrics too (each rank scored half of the eval batches; cached references cover them as well).
    [ev_two], [ev_one] = ([r for r in metrics(d) if "eval/loss" in r] for d in (two, one))
    assert ev_two["eval/loss"] == pytest.approx(ev_one["eval/loss"], abs=1e-5)
    # Only rank 0 wrote, and in the single-process format: the same files, the same weights.
    for step in ("step-000003", "step-000006"):
        a, b = (d / "checkpoints" / step for d in (two, one))
        assert sorted(p.name for p in a.iterdir()) == ["optimizer.pt", "progress.json", "trainable.safetensors"]
        assert_same_tensors(load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors")))
    final = "model/model.safetensors" if kind == "sft" else "adapter/adapter_model.safetensors"
    assert_same_tensors(load_file(str(two / "final" / final)), load_file(str(one / "final" / final)))
    if "--precompute-ref" in flags:
        table = load_file(str(two / "ref_logps.safetensors"))["logps"]
        assert table.shape == (64 + 8, 2) and (table < 0).all(), "every pair's reference log-probs, train and held-out"


def test_fsdp_checkpoint_resumes_in_one_process(single, tmp_path):
    """A checkpoint written by 2 FSDP processes continues in 1 process exactly like the uninterrupted run."""
    two = run_2("sft", tmp_path / "two", "--dist", "fsdp")
    latest_checkpoint_only_at(two, 3)
    assert cli.main(["sft", "--resume", str(two)]) == 0
    assert_same_steps(resumed_steps(two), steps(metrics(single["sft"])), [4, 5, 6])
    progress = json.loads((two / "checkpoints" / "step-000006" / "progress.json").read_text())
    assert progress["global_batch"] == GLOBAL_BATCH  # one process took batch 8 to keep the global batch


def test_single_process_checkpoint_resumes_under_fsdp(single, tmp_path):
    """And the other way round: a 1-process checkpoint is cut into FSDP shards and continues the same."""
    run = tmp_path / "run"
    shutil.copytree(single["dpo"], run)
    latest_checkpoint_only_at(run, 3)
    status, output = torchrun(["dpo", "--resume", run, "--dist", "fsdp"], tmp_path / "resume.log")
    assert status == 0, output[-3000:]
    assert "per-device batch 8 -> 4" in output
    assert_same_steps(resumed_steps(run), steps(metrics(single["dpo"])), [4, 5, 6])


# ----------------------------------------------------------------------------- failures


def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises in its third forward pass; rank 0 is then inside a collective and must not wait forever."""
    hook = tmp_path / "fail_on_rank_1.py"
    hook.write_text(
        "import os, sys\n"
        "from minialign import cli\nfrom minialign.ops import losses\n"
        "calls, good = [0], losses.sft_loss\n"
        "def sft_loss(logps):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        raise RuntimeError('rank 1 failed on purpose')\n"
        "    return good(logps)\n"
        "if os.environ['RANK'] == '1':\n"
        "    losses.sft_loss = sft_loss\n"
        "sys.exit(cli.main())\n"
    )
    for mode in ("ddp", "fsdp"):
        start = time.monotonic()
        status, output = torchrun(["sft", *SMALL, "--batch-size", 4, "--out", tmp_path / mode, "--dist", mode],
                                  tmp_path / f"{mode}.log", script=hook, timeout=60)
        assert status != 0 and "rank 1 failed on purpose" in output, output[-3000:]
        assert time.monotonic() - start < 60
        assert not (tmp_path / mode / "final").exists()


def test_ranks_with_different_configs_are_refused(tmp_path):
    """Two processes joined as torchrun would join them, but given different --lr: both stop with exit code 2."""
    port = free_port()
    procs = []
    for rank, lr in enumerate(("0.001", "0.002")):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        log = tmp_path / f"rank{rank}.log"
        procs.append((launch([sys.executable, "-m", "minialign", "sft", "--demo", "--max-steps", 2, "--lr", lr,
                              "--out", tmp_path / "run"], log, env), log))
    for proc, log in procs:
        assert finish(proc, log) == 2, log.read_text()[-3000:]
        output = log.read_text()
        assert "error: The processes of this torchrun job were given different configurations" in output
        assert "rank 1 has lr=0.002 where rank 0 has 0.001" in output and "Traceback" not in output


@pytest.mark.parametrize("flags,message", [
    (["--dist", "fsdp"], "--dist fsdp needs several processes"),
    (["--dist", "ddp"], "--dist ddp needs several processes"),
    (["--dist", "bogus"], "argument --dist: invalid choice: 'bogus'"),  # refused by argparse (the flag's choices)
])
def test_bad_dist_settings_exit_2(tmp_path, capsys, flags, message):
    try:
        code = cli.main(["sft", "--demo", "--max-steps", "1", "--out", str(tmp_path / "run"), *flags])
    except SystemExit as exc:  # argparse prints usage and the error, exit status 2
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_distribution_modes():
    assert dist.resolve_mode("auto", 1) == "none" and dist.resolve_mode("auto", 4) == "ddp"
    assert dist.resolve_mode("fsdp", 2) == "fsdp" and dist.resolve_mode("none", 1) == "none"
    with pytest.raises(UserError, match="every one would train its own copy"):
        dist.resolve_mode("none", 2)


def test_reward_model_under_fsdp_matches_one_process(tmp_path):
    """`minialign rm` (full, the demo preset): 2 FSDP2 processes at batch 4 log the losses of one process at batch 8
    and save the same sequence-classification model (gathered from the shards)."""
    small = ["rm", "--demo", "--limit", 64, "--eval-limit", 8, "--max-steps", 4]
    assert cli.main([str(a) for a in (*small, "--batch-size", 8, "--out", tmp_path / "one")]) == 0
    status, output = torchrun([*small, "--batch-size", 4, "--dist", "fsdp", "--out", tmp_path / "two"],
                              tmp_path / "two.log")
    assert status == 0, output[-3000:]
    one, two = steps(metrics(tmp_path / "one")), steps(metrics(tmp_path / "two"))
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
    a = load_file(str(tmp_path / "one" / "final" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model" / "model.safetensors"))
    # The final norm's bias adds the same amount to every reward, which the loss (a function of reward differences)
    # does not see: its gradient is zero up to rounding, which AdamW's normalisation turns into steps of any sign.
    bias = "gpt_neox.final_layer_norm.bias"
    assert "score.weight" in a and bias in b
    assert_same_tensors({k: v for k, v in a.items() if k != bias}, {k: v for k, v in b.items() if k != bias}, atol=1e-4)
