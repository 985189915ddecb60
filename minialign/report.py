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

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minialign.errors import UserError

# ----------------------------------------------------------------------------- document blocks


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    name: str  # file stem under plots/
    png: bytes
    caption: str


@dataclass
class Samples:
    fields: list[str]  # the first field (the prompt) spans the width; the others sit side by side
    items: list[dict[str, Any]]


@dataclass
class Note:
    text: str


@dataclass
class Heading:
    text: str


@dataclass
class Code:
    summary: str
    text: str


@dataclass
class Section:
    title: str
    blocks: list[Block]


Block = Table | Plot | Samples | Note | Heading | Code


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
    ]
    title = f"minialign report: {run_dir.resolve().name}"
    written: dict[str, Path] = {}
    for plot in (b for s in sections for b in s.blocks if isinstance(b, Plot)):
        relative = f"plots/{plot.name}.png"
        written[relative] = _write_atomic(run_dir / relative, plot.png)
    written["report.md"] = _write_atomic(run_dir / "report.md", render_markdown(title, sections).encode())
    written["report.html"] = _write_atomic(run_dir / "report.html", render_html(title, sections).encode())
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
        raise UserError(f"{path} must hold a JSON object with stage names as keys, not {type(results).__name__}.")
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
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step, keeping the last value logged for a step.

    After a resume, steps between the checkpoint and the crash are logged twice; the later row is
    the one the finished model descends from.
    """
    by_step = {row["step"]: row[key] for row in rows if _is_number(row.get(key))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# ----------------------------------------------------------------------------- sections


def run_section(results: dict[str, Any]) -> Section:
    blocks: list = []
    timings = results.get("timings")
    if isinstance(timings, dict) and timings:
        rows = [[str(stage), _duration(sec)] for stage, sec in timings.items()]
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
        rows = [[_fmt(r.get("rank")), _fmt(r.get("trainable")), _fmt(r.get("total")),
                 _fmt(r.get("percent"), suffix="%")] for r in ranks]
        blocks.append(Table(["rank", "trainable parameters", "total parameters", "trainable %"], rows))
    else:
        blocks.append(Note("No rank table recorded."))
    bench = _records(lora, "benchmark", "lora")
    if not bench:
        blocks.append(Note("Speed and memory benchmark not run."))
    else:
        rows = [[_fmt(b.get("mode")), _fmt(b.get("tokens_per_s")), _fmt(b.get("peak_memory_mb")),
                 _memory_kind(b), _fmt(b.get("device"))] for b in bench]
        blocks.append(Table(["mode", "tokens/s", "peak memory (MB)", "memory measured as", "device"], rows))
        caption = "Training throughput and peak memory, LoRA vs full fine-tuning"
        blocks.append(Plot("lora_vs_full", benchmark_chart(bench), caption))
    return Section("LoRA", blocks)


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
            ["held-out loss", _fmt(sft.get("eval_loss_before")), _fmt(sft.get("eval_loss_after"))],
            ["held-out perplexity", _fmt(sft.get("eval_ppl_before")), _fmt(sft.get("eval_ppl_after"))],
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
        blocks.append(Table(["metric", "value"], [[labels.get(k, k), _fmt(evaluation[k])] for k in keys]))
    else:
        blocks.append(Note("Evaluation not run."))
    fields = ["prompt", "chosen", "rejected", "reference", "policy"]
    return Section("DPO", blocks + _samples(dpo or {}, "dpo", fields))


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
        raise UserError(f"results.json: \"{name}\" must be an object, not {type(section).__name__}.")
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
        values = [float(b[key]) if _is_number(b.get(key)) else math.nan for b in bench]
        bars = ax.bar(ticks, values, color=colours)
        ax.bar_label(bars, labels=[_fmt(b.get(key)) for b in bench], padding=2)
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
    return {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "CPU peak RSS"}.get(kind, _fmt(kind))


def curves(panels: list[tuple[str, str, list[tuple[str, list, list]]]]) -> bytes:
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
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- renderers


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _markdown_block(block) + [""]
    return "\n".join(out)


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Note):
        return [block.text]
    if isinstance(block, Heading):
        return [f"### {block.text}"]
    if isinstance(block, Code):
        return [f"**{block.summary}**", "", *_fenced(block.text, "json")]
    if isinstance(block, Plot):
        return [f"![{block.caption}](plots/{block.name}.png)"]
    if isinstance(block, Table):
        lines = [_markdown_row(block.headers), "|" + "---|" * len(block.headers)]
        return lines + [_markdown_row(row) for row in block.rows]
    lines = []
    for number, item in enumerate(block.items, 1):
        lines += [f"#### Sample {number}", ""]
        for field in block.fields:
            text = item.get(field)
            body = ["_(missing)_"] if text is None else ["_(empty)_"] if text == "" else _fenced(str(text), "text")
            lines += [f"**{field.upper()}**", "", *body, ""]
    return lines


def _markdown_row(cells: list[str]) -> str:
    """One table row; pipes and newlines would break the table, raw HTML would be rendered."""
    escaped = (html.escape(c, quote=False).replace("|", "\\|").replace("\n", " ") for c in cells)
    return "| " + " | ".join(escaped) + " |"


def _fenced(text: str, language: str) -> list[str]:
    """A code fence longer than any run of backticks inside ``text``, so it cannot end early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, text, fence]


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1f2328; max-width: 1150px; margin: 0 auto; padding: 24px; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 6px; } h2 { margin-top: 36px; }
h3 { margin: 26px 0 8px; } h4 { margin: 18px 0 6px; color: #57606a; }
table { border-collapse: collapse; margin: 12px 0; } th { background: #f6f8fa; }
th, td { border: 1px solid #d0d7de; padding: 5px 12px; text-align: left; font-variant-numeric: tabular-nums; }
figure { margin: 16px 0; } figure img { max-width: 100%; } figcaption, .note { color: #57606a; }
.note { font-style: italic; } .empty { color: #8c959f; font-style: italic; }
.sample { display: grid; gap: 8px; margin-bottom: 18px; }
.cell { border: 1px solid #d0d7de; border-radius: 6px; overflow: hidden; min-width: 0; }
.cell.wide { grid-column: 1 / -1; } .cell.wide pre { max-height: 22em; overflow: auto; }
.label { background: #f6f8fa; font-size: 12px; font-weight: 600; padding: 3px 8px;
         border-bottom: 1px solid #d0d7de; }
pre { margin: 0; padding: 8px; white-space: pre-wrap; overflow-wrap: anywhere;
      font: 13px/1.45 ui-monospace, monospace; }
details pre { background: #f6f8fa; border-radius: 6px; }
"""


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [_html_block(block) for block in section.blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Note):
        return f'<p class="note">{esc(block.text)}</p>'
    if isinstance(block, Heading):
        return f"<h3>{esc(block.text)}</h3>"
    if isinstance(block, Code):
        return f"<details><summary>{esc(block.summary)}</summary><pre>{esc(block.text)}</pre></details>"
    if isinstance(block, Plot):
        data = base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption)}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    columns = f"grid-template-columns: repeat({max(1, len(block.fields) - 1)}, minmax(0, 1fr))"
    out = []
    for number, item in enumerate(block.items, 1):
        cells = [_html_cell(field, item.get(field), wide=i == 0) for i, field in enumerate(block.fields)]
        out.append(f"<h4>Sample {number}</h4>\n<div class=\"sample\" style=\"{columns}\">{''.join(cells)}</div>")
    return "\n".join(out)


def _html_cell(field: str, text: Any, wide: bool) -> str:
    if text is None or text == "":
        content = f'<pre class="empty">({"missing" if text is None else "empty"})</pre>'
    else:
        content = f"<pre>{html.escape(str(text))}</pre>"
    return f'<div class="cell{" wide" if wide else ""}"><div class="label">{field.upper()}</div>{content}</div>'


# ----------------------------------------------------------------------------- small helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, suffix: str = "") -> str:
    """Numbers for humans: thousands separators for counts, 4 significant digits otherwise."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}{suffix}"
    return (f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}") + suffix


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return str(seconds)
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write to a temporary file next to ``path`` and rename it over: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: honours the umask
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
