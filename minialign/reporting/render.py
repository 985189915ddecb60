"""Render a report — a list of sections made of a few block types — to Markdown and to self-contained HTML.

Markdown links the PNGs under ``plots/``; HTML embeds them as base64 data URIs and inlines its CSS, so the single
file can be mailed or attached to an issue. All text is escaped: samples are model output and user data.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Any

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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any, suffix: str = "") -> str:
    """Numbers for humans: thousands separators for counts, 4 significant digits otherwise."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not is_number(value):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}{suffix}"
    return (f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}") + suffix


def duration(seconds: Any) -> str:
    if not is_number(seconds):
        return str(seconds)
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"
