"""Issue 29's rough edges of first use: a quick and quiet start (no torch for --help, Ctrl-C at any moment is one
line and exit 130), negative numbers as flag values, --resume refusing --demo / --config, one list of built-in
model names everywhere, the 10% hold-out said out loud, and a saved adapter PEFT users can load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch

from minialign import cli
from minialign.config.modelnames import builtin_names
from minialign.data import load_preference_pairs, split_pairs
from minialign.data.readers import read_rows
from minialign.modeling.adapters import load_adapter
from minialign.modeling.models import load_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def minialign(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minialign", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ----------------------------------------------------------------------------- a quick, quiet start


def test_the_cli_modules_import_neither_torch_nor_transformers():
    """What `--help` needs (cli, cli_help, config, presets, modelnames, __main__) stays free of torch and transformers:
    the issue measured 4-5 s for `minialign --help`, all of it their import."""
    code = ("import sys, minialign.cli, minialign.__main__, minialign.config.cli_help, minialign.config.schema, "
            "minialign.config.presets, "
            "minialign.config.modelnames; minialign.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["sft", "--help"], ["eval", "--help"]])
def test_help_answers_quickly(argv):
    """A loose bound (importing torch alone takes seconds here); 0.3 s was measured on 2 CPU cores."""
    start = time.perf_counter()
    proc = minialign(*argv)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "usage: minialign" in out and not err
    assert time.perf_counter() - start < 2.0


def _wait_for_torch(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until torch's shared library is mapped into ``proc``: the command is running and importing torch."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"minialign exited early: {proc.communicate()}")
        time.sleep(0.005)
    pytest.fail("torch was never loaded")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch being loaded")
@pytest.mark.parametrize("after", [0.0, 0.6, 1.5])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path, after):
    """SIGINT during torch's and transformers' imports (the issue: a 29-95 line traceback, or an abort from torch's
    C++ start-up): one line on stderr, exit code 130, no run folder."""
    # started as from a terminal, where SIGINT is not ignored: a background job of a non-interactive shell ignores it,
    # and minialign then leaves it ignored, as it does under nohup
    proc = minialign("sft", "--demo", "--out", tmp_path / "run",
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_torch(proc)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.startswith("minialign: interrupted") and err.count("\n") == 1, err
    if after == 0.0:  # torch still loading: nothing was written
        assert err == "minialign: interrupted\n" and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(("argv", "reached"), [
    (["sft", "--lr", "-1e-3"], "lr must be > 0"),
    (["sft", "--lr=-1e-3"], "lr must be > 0"),
    (["dpo", "--beta", "-0.1"], "beta must be > 0"),
    (["dpo", "--rpo-alpha", "-1E+0"], "rpo_alpha must be >= 0"),
    (["sft", "--warmup-ratio", "-.5"], "warmup_ratio must be in [0, 1)"),
])
def test_negative_numbers_are_values_that_reach_validation(argv, reached, tmp_path, capsys):
    """The issue: `--lr -1e-3` was "expected one argument"; only `--lr=-1e-3` reached the real check."""
    assert cli.main([*argv, "--demo", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert reached in err and "expected one argument" not in err
    assert not (tmp_path / "run").exists()


def test_negative_integers_and_lists_parse():
    args = cli.build_parser().parse_args(["run", "--seed", "-3", "--ranks", "-4", "8", "--eval-top-p", "-2e-1"])
    assert (args.seed, args.ranks, args.eval_top_p) == (-3, [-4, 8], -0.2)
    with pytest.raises(SystemExit):  # a real option still is one
        cli.build_parser().parse_args(["sft", "--lr", "--demo"])


@pytest.mark.parametrize("command", ["sft", "dpo", "rm", "run"])
@pytest.mark.parametrize("other", [["--demo"], ["--config", "my.yaml"], ["--demo", "--config", "my.yaml"]])
def test_resume_with_demo_or_config_is_refused(command, other, tmp_path, capsys):
    """--resume RUN_DIR continues a run from its own config: --demo / --config are alternatives (the usage line
    says so), and were silently ignored."""
    assert cli.main([command, "--resume", str(tmp_path / "old"), *other]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume and ") and "are alternatives" in err
    assert all(flag in err for flag in other if flag.startswith("--"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- built-in model names


def test_builtin_names_are_one_list_in_help_readme_and_docs(capsys):
    names = builtin_names()
    assert {"tiny", "tiny-llama", "pythia-70m", "llama-1b", "smollm2-135m-instruct", "tiny-phi3"} <= set(names)
    for command in ("sft", "dpo", "rm", "run", "generate", "lora-params", "bench"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"built-in name ({', '.join(names)})" in text, command
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"built-in name\s*\(([^)]*)\)", readme).group(1)
    assert re.findall(r"`([^`]+)`", listed) == names
    docs = (ROOT / "docs" / "models-and-data.md").read_text(encoding="utf-8")
    section = docs[docs.index("* a built-in name"):docs.index("## Tokenizers")]
    shown = {n for n in re.findall(r"`([a-z0-9.-]+)`", section) if n.startswith(("tiny", "pythia", "llama", "smollm"))}
    assert shown == set(names)


# ----------------------------------------------------------------------------- a local file: hold-out, adapter


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, str]:
    """LoRA SFT of `tiny` for one step on one local .jsonl file (the demo train rows): (run folder, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("local")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _, row in read_rows("demo", split="train")), encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["sft", "--model", "tiny", "--tokenizer", "demo", "--dataset", str(data), "--max-steps", "1",
                         "--batch-size", "4", "--eval-limit", "8", "--lr", "1e-2", "--seed", "3",
                         "--out", str(root / "sft")]) == 0
    return root, out.getvalue()


def test_one_local_file_says_it_holds_out_ten_percent(local_run):
    """The issue: training on one local file silently held 10% of it out (only `minialign eval` said so)."""
    root, printed = local_run
    pairs = load_preference_pairs(str(root / "pairs.jsonl"))
    train, held = split_pairs(pairs, 0.1, seed=3)
    line = next(line for line in printed.splitlines() if "held out" in line)
    assert str(root / "pairs.jsonl") in line and "10%" in line and "--eval-data or --eval-rows" in line
    assert f"held out for evaluation, {len(held)} chosen at random (--seed 3; --eval-limit scores 8)" in line
    assert f"{len(train)} are left to train on" in line and len(held) == 40


def test_saved_adapter_loads_in_peft_as_in_minialign(local_run):
    """PEFT's own loader on the saved folder gives minialign's logits; the folder says there is no hub base."""
    root, _ = local_run
    folder = root / "sft" / "final" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    base = json.loads((folder / "minialign_base.json").read_text())
    assert config["base_model_name_or_path"] == base["minialign_model"] == "tiny"
    assert "no hub model holds this base" in base["note"] and "load_model('tiny'" in (folder / "README.md").read_text()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(load_model("tiny", seed=3), folder).eval()
    theirs = peft.PeftModel.from_pretrained(load_model("tiny", seed=3), folder).eval()
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        plain = load_model("tiny", seed=3).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (expected - plain).abs().max() > 1e-4  # the adapter acts
