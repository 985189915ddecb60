"""The shell scripts that run benchmarks on the device tool's GPU machine, checked where CI can: every *_gpu.sh parses,
and their shared daemon helpers (benchmarks/recipes/gpu_daemon.sh) launch work detached, follow it to its exit code,
pack its small files, and say at once when the machine came back bare."""

import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").rglob("*_gpu.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_gpu_script_parses_and_uses_the_shared_helpers(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert ". benchmarks/recipes/gpu_daemon.sh" in script.read_text()


def _bash(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "OUT": str(tmp_path / "out"), "WAIT_S": "30"}
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", "-c", f". benchmarks/recipes/gpu_daemon.sh; {code}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_launch_follow_and_pack(tmp_path):
    w = tmp_path / "w"
    done = _bash(f'launch {w} "echo [x] one; echo noise; echo [x] two; exit 4"; follow {w} "^\\[x\\]"', tmp_path)
    assert done.stdout.splitlines() == ["[x] one", "[x] two", "exit code 4"], done.stderr
    (w / "run").mkdir()
    (w / "run" / "metrics.jsonl").write_text("{}\n")
    (w / "run" / "model.safetensors").write_bytes(b"\0" * 8)
    assert _bash(f"pack {w} runs", tmp_path).returncode == 0
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        names = set(tar.getnames())
    assert {"./log.txt", "./run/metrics.jsonl", "./DONE"} <= names and "./run/model.safetensors" not in names


def test_follow_on_a_bare_machine_says_so_at_once(tmp_path):
    gone = _bash(f"follow {tmp_path / 'gone'} x", tmp_path)
    assert gone.returncode == 3 and "it was handed back; start again" in gone.stdout


def test_until_lines_returns_once_the_awaited_step_has_ended_with_the_rest_still_running(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "DONE").write_text("0\n")  # an earlier run's exit code: launching again must not leave it to end the wait
    got = _bash(f'launch {w} "echo [rows] a; sleep 1; echo [rows] b; sleep 20; echo [rows] c"; '
                f'until_lines {w} "^\\[rows\\] " 2', tmp_path)
    assert got.stdout.splitlines() == ["[rows] a", "[rows] b"], got.stderr
    assert not (w / "DONE").exists()  # the third step runs on, detached
    finished = _bash(f'launch {tmp_path / "v"} "echo [rows] only"; until_lines {tmp_path / "v"} "^\\[rows\\] " 2',
                     tmp_path)
    assert finished.stdout.splitlines() == ["[rows] only"]  # fewer lines than asked for: it ends with the work
    gone = _bash(f"until_lines {tmp_path / 'gone'} x 1", tmp_path)
    assert gone.returncode == 3 and "it was handed back; start again" in gone.stdout
