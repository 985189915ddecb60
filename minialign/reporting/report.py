"""Turn a finished run folder into ``report.md``, a self-contained ``report.html`` and ``plots/*.png``.

Inputs are the files a run leaves behind: ``results.json`` (LoRA sizes and benchmark, evaluation
numbers, samples, config, timings) and the ``sft/metrics.jsonl`` / ``dpo/metrics.jsonl`` logs.
A stage that did not run is reported as "not run" rather than failing, because partial runs
(stopped after SFT, killed mid-DPO) are exactly the ones people want to look at.

The report is first built as a list of sections made of a few block types (table, plot, samples,
note, code), then rendered twice: to Markdown, which links the PNGs, and to HTML, which embeds
them as base64 so the single file can be mailed or attached to an issue. Plots use matplotlib's
object-oriented API on the Agg canvas: no display, no pyplot global figure registry.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minialign.base.errors import UserError, kind_of
from minialign.base.files import write_atomic
from minialign.reporting.render import (
    Block,
    Code,
    Heading,
    Note,
    Plot,
    Samples,
    Section,
    Table,
    duration,
    fmt,
    is_number,
    render_html,
    render_markdown,
)

NOT_RUN = "Not run: this stage has no results and no metrics in the run folder."

# ----------------------------------------------------------------------------- entry point


def write_report(run_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png into ``run_dir``; return them by relative name."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    sft_rows, sft_bad = read_metrics(run_dir / "sft" / "metrics.jsonl")
    dpo_rows, dpo_bad = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    sections = [
        run_section(results),
        lora_section(_stage(results, "lora")),
        sft_section(_stage(results, "sft"), sft_rows, sft_bad),
        dpo_section(_stage(results, "dpo"), dpo_rows, dpo_bad),
        generation_section(_stage(results, "generation")),
    ]
    title = f"minialign report: {run_dir.resolve().name}"
    written: dict[str, Path] = {}
    for plot in (b for s in sections for b in s.blocks if isinstance(b, Plot)):
        relative = f"plots/{plot.name}.png"
        written[relative] = write_atomic(run_dir / relative, plot.png)
    written["report.md"] = write_atomic(run_dir / "report.md", render_markdown(title, sections).encode())
    written["report.html"] = write_atomic(run_dir / "report.html", render_html(title, sections).encode())
    return written


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read ``results.json``; its absence means this is not a (finished enough) run folder."""
    path = run_dir / "results.json"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist or is not a folder; pass the folder a minialign run wrote.")
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a minialign run folder, or its run has not reached the report stage: "
            "there is no results.json in it. Pass the output folder of a minialign run, or let the "
            "run finish (or re-run it) so that it writes results.json."
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}). Re-run the stage that writes it.") from exc
    if not isinstance(results, dict):
        raise UserError(f"{path} must hold a JSON object with stage names as keys, not {kind_of(results)}.")
    return results


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a metrics.jsonl file and the numbers of lines that could not be read.

    Unreadable lines are skipped, not fatal: a run killed while writing leaves a truncated last
    line, and a resumed run appends after it. The report lists them so nothing is hidden.
    """
    if not path.is_file():
        return [], []
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and is_number(row.get("step")):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step, keeping the last value logged for a step.

    After a resume, steps between the checkpoint and the crash are logged twice; the later row is
    the one the finished model descends from.
    """
    by_step = {row["step"]: row[key] for row in rows if is_number(row.get(key))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# ----------------------------------------------------------------------------- sections


def run_section(results: dict[str, Any]) -> Section:
    blocks: list = []
    timings = results.get("timings")
    if isinstance(timings, dict) and timings:
        rows = [[str(stage), duration(sec)] for stage, sec in timings.items()]
        blocks.append(Table(["stage", "wall time"], rows))
    if "config" in results:
        blocks.append(Code("Configuration", json.dumps(results["config"], indent=2, default=str)))
    return Section("Run", blocks or [Note("No timings or configuration were recorded.")])


def lora_section(lora: dict[str, Any] | None) -> Section:
    if lora is None:
        return Section("LoRA", [Note(NOT_RUN)])
    blocks: list = [Note(f"Model: {lora.get('model', 'unknown')}")]
    ranks = _records(lora, "ranks", "lora")
    if ranks:
        rows = [[fmt(r.get("rank")), fmt(r.get("trainable")), fmt(r.get("total")),
                 fmt(r.get("percent"), suffix="%")] for r in ranks]
        blocks.append(Table(["rank", "trainable parameters", "total parameters", "trainable %"], rows))
    else:
        blocks.append(Note("No rank table recorded."))
    bench = _records(lora, "benchmark", "lora")
    if not bench:
        blocks.append(Note("Speed and memory benchmark not run."))
    else:
        method = lora.get("benchmark_method")
        blocks.append(Note(f"Method: {method}" if method else "Method not recorded: each mode timed once (an older "
                                                              "run), so the numbers may hold a cold start."))
        spread = any("tokens_per_s_min" in b for b in bench)
        rows = [[fmt(b.get("mode")), fmt(b.get("tokens_per_s")), fmt(b.get("peak_memory_mb")),
                 _memory_kind(b), fmt(b.get("device"))] for b in bench]
        head = ["mode", "tokens/s", "peak memory (MB)", "memory measured as", "device"]
        if spread:
            head = ["mode", "runs", "tokens/s (median)", "tokens/s (min-max)", "peak memory (MB, median)",
                    "peak memory (min-max)", "memory measured as", "device"]
            rows = [[fmt(b.get("mode")), fmt(b.get("repeats")), fmt(b.get("tokens_per_s")), _span(b, "tokens_per_s"),
                     fmt(b.get("peak_memory_mb")), _span(b, "peak_memory_mb"), _memory_kind(b), fmt(b.get("device"))]
                    for b in bench]
        blocks.append(Table(head, rows))
        caption = "Training throughput and peak memory, LoRA vs full fine-tuning" + (" (medians)" if spread else "")
        blocks.append(Plot("lora_vs_full", benchmark_chart(bench), caption))
    return Section("LoRA", blocks)


def _span(row: dict[str, Any], key: str) -> str:
    return f"{fmt(row.get(f'{key}_min'))}-{fmt(row.get(f'{key}_max'))}"


def sft_section(sft: dict[str, Any] | None, rows: list[dict], bad: list[int]) -> Section:
    if sft is None and not rows:
        return Section("SFT", [Note(NOT_RUN)])
    blocks: list = [Heading("Training curves"), *_metrics_notes("sft/metrics.jsonl", rows, bad)]
    if rows:
        panel = ("loss", "loss", _train_and_eval(rows, "loss"))
        blocks.append(Plot("sft_loss", curves([panel]), "SFT loss (train and held-out)"))
    sft = sft or {}
    blocks.append(Heading("Evaluation"))
    if any(k.startswith("eval_") for k in sft):
        blocks.append(Table(["metric", "before SFT", "after SFT"], [
            ["held-out loss", fmt(sft.get("eval_loss_before")), fmt(sft.get("eval_loss_after"))],
            ["held-out perplexity", fmt(sft.get("eval_ppl_before")), fmt(sft.get("eval_ppl_after"))],
        ]))
    else:
        blocks.append(Note("Evaluation not run."))
    return Section("SFT", blocks + _samples(sft, "sft", ["prompt", "expected", "model"]))


def dpo_section(dpo: dict[str, Any] | None, rows: list[dict], bad: list[int]) -> Section:
    if dpo is None and not rows:
        return Section("DPO", [Note(NOT_RUN)])
    blocks: list = [Heading("Training curves"), *_metrics_notes("dpo/metrics.jsonl", rows, bad)]
    if rows:
        loss = ("loss", "loss", _train_and_eval(rows, "loss"))
        blocks.append(Plot("dpo_loss", curves([loss]), "DPO loss (train and held-out)"))
        panels = [("reward margin (chosen - rejected)", "margin", _train_and_eval(rows, "rewards/margins")),
                  ("reward accuracy (chosen > rejected)", "accuracy", _train_and_eval(rows, "rewards/accuracies"))]
        blocks.append(Plot("dpo_rewards", curves(panels), "DPO implicit reward margin and accuracy"))
    evaluation = (dpo or {}).get("eval")
    blocks.append(Heading("Evaluation"))
    if isinstance(evaluation, dict) and evaluation:
        labels = {"reference_accuracy": "reference accuracy", "policy_accuracy": "policy accuracy",
                  "reward_accuracy": "reward accuracy", "reward_margin": "reward margin",
                  "n_pairs": "held-out pairs"}
        keys = [k for k in labels if k in evaluation] + [k for k in evaluation if k not in labels]
        blocks.append(Table(["metric", "value"], [[labels.get(k, k), fmt(evaluation[k])] for k in keys]))
    else:
        blocks.append(Note("Evaluation not run."))
    fields = ["prompt", "chosen", "rejected", "reference", "policy"]
    return Section("DPO", blocks + _samples(dpo or {}, "dpo", fields))


def generation_section(generation: dict[str, Any] | None) -> Section:
    """Reference vs DPO policy answers on held-out prompts: loops, distinct-2, EOS share, length, samples."""
    from minialign.reporting.generation import generation_blocks

    if generation and "axes" in generation:
        from minialign.reporting.suite import suite_blocks

        return Section("Generation", suite_blocks(generation))
    return Section("Generation", generation_blocks(generation))


def _samples(stage: dict[str, Any], name: str, fields: list[str]) -> list[Block]:
    samples = _records(stage, "samples", name)
    return [Heading("Samples"), Samples(fields, samples) if samples else Note("No samples recorded.")]


def _train_and_eval(rows: list[dict], key: str) -> list[tuple[str, list, list]]:
    """The training curve of ``key`` and its held-out counterpart ``eval/<key>``."""
    return [("train", *series(rows, key)), ("eval", *series(rows, f"eval/{key}"))]


def _metrics_notes(name: str, rows: list[dict], bad: list[int]) -> list:
    notes = [] if rows else [Note(f"No training metrics: {name} is missing or empty.")]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.append(Note(f"Skipped {len(bad)} unreadable line(s) of {name} (line {shown}); "
                          "a run stopped while writing leaves a truncated last line."))
    return notes


def _stage(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = results.get(name)
    if section is not None and not isinstance(section, dict):
        raise UserError(f"results.json: \"{name}\" must be an object, not {kind_of(section)}.")
    return section


def _records(section: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    records = section.get(key) or []
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"results.json: \"{where}.{key}\" must be a list of objects.")
    return records


# ----------------------------------------------------------------------------- plots


def benchmark_chart(bench: list[dict[str, Any]]) -> bytes:
    """Two bar panels, tokens/s and peak memory, one bar per benchmark row.

    Device and memory kind are part of the labels because CUDA "max allocated" and CPU peak RSS
    measure different things: bars are only comparable when those labels match.
    """
    devices = sorted({str(b.get("device")) for b in bench})
    kinds = sorted({_memory_kind(b) for b in bench})
    ticks = [_bar_label(b, show_device=len(devices) > 1, show_kind=len(kinds) > 1) for b in bench]
    colours = ["#4c72b0" if b.get("mode") == "full" else "#dd8452" for b in bench]
    memory_label = "peak memory (MB)" + (f"\n{kinds[0]}" if len(kinds) == 1 else "")
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    panels = [("tokens_per_s", "tokens / second"), ("peak_memory_mb", memory_label)]
    for ax, (key, label) in zip(fig.subplots(1, 2), panels, strict=True):
        values = [float(b[key]) if is_number(b.get(key)) else math.nan for b in bench]
        bars = ax.bar(ticks, values, color=colours)
        ax.bar_label(bars, labels=[fmt(b.get(key)) for b in bench], padding=2)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("LoRA vs full fine-tuning" + (f" on {devices[0]}" if len(devices) == 1 else ""))
    return _png(fig)


def _bar_label(row: dict[str, Any], show_device: bool, show_kind: bool) -> str:
    parts = [str(row.get("mode")), str(row.get("device")) if show_device else "",
             _memory_kind(row) if show_kind else ""]
    return "\n".join(p for p in parts if p)


def _memory_kind(row: dict[str, Any]) -> str:
    kind = row.get("memory_kind")
    return {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS"}.get(kind, fmt(kind))


def curves(panels: list[tuple[str, str, list[tuple[str, list, list]]]], xlabel: str = "optimizer step") -> bytes:
    """One panel per (title, y label, lines); each line is (label, steps, values)."""
    fig = Figure(figsize=(9 if len(panels) > 1 else 7, 3.6), layout="constrained")
    for ax, (title, ylabel, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for label, steps, values in lines:
            if steps:
                is_eval = label == "eval"
                ax.plot(steps, values, label=label, marker="o" if is_eval or len(steps) < 30 else None,
                        markersize=4, linewidth=1.8 if is_eval else 1.2)
        if not any(steps for _, steps, _ in lines):
            ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()

