"""Behaviour of minialign.reporting.report on run folders written by the tests themselves."""

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest

from minialign.base.errors import UserError
from minialign.reporting.report import read_metrics, series, write_report

SFT_SAMPLE = {
    "prompt": "\n\nHuman: How do I print in Python?\n\nAssistant:",
    "expected": " Use print():\n\n    print('hi')",
    "model": " Try <script>alert('x')</script> & see ```",
}
DPO_SAMPLE = {
    "prompt": "\n\nHuman: Say something nice.\n\nAssistant:",
    "chosen": " You are doing great.",
    "rejected": " No.",
    "reference": " Nice <b>things</b>.",
    "policy": "",
}


def full_results() -> dict:
    return {
        "lora": {
            "model": "pythia-14m",
            "ranks": [{"rank": r, "trainable": 1024 * r, "total": 14_067_712, "percent": 0.0073 * r}
                      for r in (4, 8, 16)],
            "benchmark": [
                {"mode": "full", "tokens_per_s": 1520.5, "peak_memory_mb": 612.0,
                 "memory_kind": "cpu_peak_rss", "device": "cpu"},
                {"mode": "lora", "tokens_per_s": 2210.25, "peak_memory_mb": 401.5,
                 "memory_kind": "cpu_peak_rss", "device": "cpu"},
            ],
        },
        "sft": {"eval_loss_before": 3.2, "eval_loss_after": 2.1, "eval_ppl_before": 24.5,
                "eval_ppl_after": 8.17, "samples": [SFT_SAMPLE]},
        "dpo": {"eval": {"reference_accuracy": 0.5, "policy_accuracy": 0.62, "reward_accuracy": 0.66,
                         "reward_margin": 0.31, "n_pairs": 50},
                "samples": [DPO_SAMPLE]},
        "config": {"model": "pythia-14m", "sft": {"lr": 1e-4}},
        "timings": {"sft": 12.5, "dpo": 95.0},
    }


def write_metrics(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def sft_rows() -> list[dict]:
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-4, "unknown/key": "x"} for s in range(1, 11)]
    return rows + [{"step": 5, "eval/loss": 2.6}, {"step": 10, "eval/loss": 2.2}]


def dpo_rows() -> list[dict]:
    rows = [{"step": s, "loss": 0.69 - 0.02 * s, "lr": 5e-6, "rewards/chosen": 0.01 * s,
             "rewards/rejected": -0.01 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.03 * s,
             "logps/chosen": -50.0, "logps/rejected": -55.0} for s in range(1, 11)]
    return rows + [{"step": 10, "eval/loss": 0.6, "eval/rewards/margins": 0.2, "eval/rewards/accuracies": 0.7}]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "results.json").write_text(json.dumps(full_results()))
    write_metrics(tmp_path / "sft" / "metrics.jsonl", sft_rows())
    # The run was killed while writing its last DPO row.
    write_metrics(tmp_path / "dpo" / "metrics.jsonl", dpo_rows(), tail='{"step": 11, "loss": 0.4')
    return tmp_path


class Page(HTMLParser):
    """Collects what the checks need and fails on tags that are closed out of order."""

    VOID: ClassVar[set[str]] = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href"):
            if name in attrs and not attrs[name].startswith("data:"):
                self.external.append(attrs[name])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    assert not page.open, f"unclosed tags: {page.open}"
    return page


def test_full_report_has_every_section_and_self_contained_html(run_dir):
    written = write_report(run_dir)
    assert set(written) == {"report.md", "report.html", "plots/lora_vs_full.png", "plots/sft_loss.png",
                            "plots/dpo_loss.png", "plots/dpo_rewards.png"}
    assert all(path.is_file() and path.parent.is_relative_to(run_dir) for path in written.values())
    assert not list(run_dir.rglob("*.tmp")), "temporary files must be renamed away"

    md = (run_dir / "report.md").read_text()
    for heading in ("## Run", "## LoRA", "## SFT", "## DPO"):
        assert heading in md
    for field in ("PROMPT", "EXPECTED", "MODEL", "CHOSEN", "REJECTED", "REFERENCE", "POLICY"):
        assert f"**{field}**" in md
    assert "| 16 | 16,384 | 14,067,712 | 0.1168% |" in md  # rank table, human-formatted
    assert "| full | 1,520.5 | 612 | CPU peak RSS | cpu |" in md
    assert "| held-out perplexity | 24.5 | 8.17 |" in md and "| policy accuracy | 0.62 |" in md
    assert "not run" not in md.lower()
    for name in ("lora_vs_full", "sft_loss", "dpo_loss", "dpo_rewards"):
        assert f"(plots/{name}.png)" in md
    # A sample holding ``` gets a longer fence, so the block cannot end early.
    assert "````text\n" + SFT_SAMPLE["model"] + "\n````" in md
    assert "Skipped 1 unreadable line(s) of dpo/metrics.jsonl (line 12)" in md

    raw = (run_dir / "report.html").read_text()
    page = parse(raw)
    assert len(page.images) == 4 and not page.external
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):], validate=True).startswith(b"\x89PNG")
    text = "".join(page.text)
    assert "<script>" not in raw.split("</style>")[1]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; see" in raw
    assert SFT_SAMPLE["model"] in text and SFT_SAMPLE["expected"] in text  # whitespace kept
    assert "(empty)" in text  # the DPO policy wrote nothing, and the report says so
    for png in written.values():
        if png.suffix == ".png":
            assert png.read_bytes().startswith(b"\x89PNG")


def test_missing_stages_say_not_run(tmp_path):
    results = full_results()
    del results["sft"], results["dpo"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    written = write_report(tmp_path)
    assert "plots/sft_loss.png" not in written and "plots/dpo_loss.png" not in written
    md = (tmp_path / "report.md").read_text()
    sft, dpo = md.split("## SFT")[1].split("## DPO")
    assert "Not run" in sft and "Not run" in dpo
    assert "Not run" in (tmp_path / "report.html").read_text()

    (tmp_path / "results.json").write_text("{}")
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.count("Not run") == 3  # LoRA, SFT, DPO
    parse((tmp_path / "report.html").read_text())


def test_training_curves_without_evaluation(tmp_path):
    """A run killed after SFT training but before its evaluation still shows the curve."""
    (tmp_path / "results.json").write_text(json.dumps({"timings": {"sft": 3.0}}))
    write_metrics(tmp_path / "sft" / "metrics.jsonl", sft_rows())
    written = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    sft = md.split("## SFT")[1].split("## DPO")[0]
    assert "plots/sft_loss.png" in written and "Evaluation not run." in sft
    assert "No samples recorded." in sft


def test_not_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="not a minialign run folder"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"sft": [1, 2]}))
    with pytest.raises(UserError, match='"sft" must be an object'):
        write_report(tmp_path)


def test_metrics_reader_tolerates_truncation_and_keeps_last_value_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 9.9},
            {"step": 2, "loss": 1.4}, {"step": 3, "loss": 1.2, "eval/loss": 1.3}, {"step": 4, "loss": math.nan}]
    write_metrics(path, rows[:3], tail='{"step": 4, "lo\n')  # killed, then resumed from step 1
    with path.open("a") as file:
        file.write("".join(json.dumps(r) + "\n" for r in rows[3:]) + "[1, 2]\n\n")
    read, bad = read_metrics(path)
    assert bad == [4, 8] and len(read) == 6
    steps, values = series(read, "loss")
    assert steps == [1, 2, 3, 4] and values[:3] == [2.0, 1.4, 1.2] and math.isnan(values[3])
    assert series(read, "eval/loss") == ([3], [1.3])
    assert read_metrics(tmp_path / "absent.jsonl") == ([], [])
