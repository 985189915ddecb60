"""`minialign run --demo` end to end (small step counts), resume after a failed stage, and bad input."""

import json
from html.parser import HTMLParser

import pytest

from minialign import cli
from minialign.commands import experiment

SMALL = ["--bench-steps", "2", "--samples", "2", "--max-new-tokens", "8", "--eval-pairs", "100"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    assert cli.main(["run", "--demo", "--out", str(out), *SMALL]) == 0
    return out


def test_demo_run_writes_every_section(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert [r["rank"] for r in results["lora"]["ranks"]] == [2, 4, 8, 16]
    assert {b["mode"] for b in results["lora"]["benchmark"]} == {"lora", "full"}
    assert all(b["tokens_per_s"] > 0 and b["peak_memory_mb"] > 0 for b in results["lora"]["benchmark"])
    sft = results["sft"]
    assert sft["eval_loss_after"] < sft["eval_loss_before"]
    assert len(sft["samples"]) == 2 and set(sft["samples"][0]) == {"prompt", "expected", "model"}
    ev = results["dpo"]["eval"]
    assert ev["policy_accuracy"] > ev["reference_accuracy"], ev
    assert ev["reward_accuracy"] > 0.5 and ev["reward_margin"] > 0
    assert set(results["dpo"]["samples"][0]) == {"prompt", "chosen", "rejected", "reference", "policy"}
    # The samples are the first held-out pairs in dataset order.
    from minialign.data import load_preference_pairs

    first = load_preference_pairs("demo", split="test", limit=2)
    assert [s["prompt"] for s in results["dpo"]["samples"]] == [p.prompt for p in first]
    md = (demo_run / "report.md").read_text()
    for heading in ("LoRA", "SFT", "DPO", "PROMPT", "REFERENCE", "POLICY"):
        assert heading in md
    assert (demo_run / "sft/final/adapter").is_dir() or (demo_run / "sft/final/model").is_dir()
    assert (demo_run / "dpo/final/adapter/adapter_config.json").is_file()


def test_report_html_self_contained(demo_run):
    class Imgs(HTMLParser):
        srcs: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Imgs()
    parser.feed((demo_run / "report.html").read_text())
    assert len(parser.srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)


def test_existing_run_refused_and_resume_skips_done_stages(demo_run, capsys):
    assert cli.main(["run", "--demo", "--out", str(demo_run), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(demo_run)]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 5


def test_failed_stage_keeps_earlier_results_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    real_eval = experiment.stage_eval
    monkeypatch.setattr(experiment, "stage_eval", lambda ctx: (_ for _ in ()).throw(RuntimeError("boom")))
    quick = tmp_path / "quick.yaml"  # layered over the demo preset: a few steps per stage is enough here
    quick.write_text("sft: {full: true, max_steps: 3, eval_every: 0}\ndpo: {max_steps: 3, eval_every: 0}\n")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["run", "--demo", "--config", str(quick), "--out", str(out), *SMALL])
    stages = json.loads((out / "stages.json").read_text())["done"]
    assert stages == ["lora", "sft", "dpo"]
    adapter = (out / "dpo/final/adapter/adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(experiment, "stage_eval", real_eval)
    assert cli.main(["run", "--resume", str(out)]) == 0
    assert json.loads((out / "stages.json").read_text())["done"] == list(experiment.STAGES)
    assert (out / "dpo/final/adapter/adapter_model.safetensors").read_bytes() == adapter
    assert "policy_accuracy" in json.loads((out / "results.json").read_text())["dpo"]["eval"]


def test_another_command_never_writes_into_or_resumes_a_run_folder(demo_run, capsys):
    """The repros: `rm --out RUN` wrote a reward model into the experiment (its kind file then said rm); `sft
    --resume` of its DPO stage trained SFT there; `run --resume` with flags dropped them."""
    from test_folders import snapshot

    before = snapshot(demo_run)
    for argv, match in [(["rm", "--demo", "--out", demo_run], "holds a `minialign run` experiment"),
                        (["sft", "--demo", "--out", demo_run], "holds a `minialign run` experiment"),
                        (["eval", "--policy", demo_run, "--out", demo_run], "holds a `minialign run` experiment"),
                        (["sft", "--resume", demo_run], f"resume it with `minialign run --resume {demo_run}`"),
                        (["sft", "--resume", demo_run / "dpo"], "holds a `minialign dpo` run"),
                        (["run", "--resume", demo_run, "--samples", "3"], "samples 2 -> 3"),
                        (["run", "--resume", demo_run, "--overwrite"], "--overwrite starts a new one")]:
        assert cli.main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
    assert snapshot(demo_run) == before


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a minialign run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    capsys.readouterr()
    assert cli.main(["run", "--out", str(tmp_path / "x"), "--model", "pythia-70m", "--tokenizer", "demo",
                     "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--demo" in err and "Traceback" not in err
