"""How a generation comparison (``evaluation.geneval``) reads: the metric table, win rates beside the judge's own
accuracy and rows, the first answers side by side; as report blocks (Markdown/HTML) or terminal text."""

from __future__ import annotations

from typing import Any

from minialign.evaluation.geneval import SIDES
from minialign.reporting.render import Block, Heading, Note, Samples, Table, fmt

NO_GENERATION = "No generation metrics recorded (eval_prompts was 0, or the eval stage did not finish)."

METRICS = (("loop_share", "loop share (4-gram x3)"), ("evasion_share", "evasion share (declines/deflects)"),
           ("distinct_2", "distinct-2"),
           ("finished_share", "EOS/stop share"), ("mean_tokens", "mean length (tokens)"),
           ("judge_score", "mean judge score"))


def metrics_table(results: dict[str, Any]) -> Table:
    """Reference and policy side by side, greedy then sampled."""
    modes = list(results.get("modes", {}))
    headers = ["metric"] + [f"{mode} {side}" for mode in modes for side in SIDES]
    rows = []
    for key, label in METRICS:
        cells = [results["modes"][mode][side].get(key) for mode in modes for side in SIDES]
        if any(c is not None for c in cells):
            rows.append([label, *(fmt(c) for c in cells)])
    return Table(headers, rows)


def win_table(results: dict[str, Any]) -> Table | None:
    """Every win rate, with the judge's held-out accuracy and the rows judge and policy trained on beside it."""
    rows = []
    for mode, entry in results.get("modes", {}).items():
        w = entry.get("win_rate")
        if not w:
            continue
        j = w.get("judge", {})
        checks = (("judge/policy train rows", j.get("overlap_policy")),
                  ("judge train/eval prompts", j.get("overlap_prompts")))
        flags = [name for name, bad in checks if bad]
        unknown = [name for name, bad in checks if bad is None and j]
        rows.append([mode, f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]",
                     f"{w['wins']}/{w['ties']}/{w['losses']}", fmt(j.get("heldout_accuracy")),
                     str(j.get("judge_rows", "?")), str(j.get("policy_rows", "?")),
                     ("OVERLAP: " + ", ".join(flags)) if flags else
                     ("not known: " + ", ".join(unknown)) if unknown else "none"])
    if not rows:
        return None
    return Table(["decoding", "policy win rate [95% CI]", "wins/ties/losses", "judge held-out accuracy",
                  "judge trained on", "policy trained on", "overlap"], rows)


def sample_items(results: dict[str, Any], show: int) -> list[dict[str, str]]:
    """The first ``show`` prompts, greedy answers side by side, each headed by its flags."""
    items = []
    for record in results.get("prompts", [])[:show]:
        item = {"prompt": f"[row {record['row']}]\n{record['prompt']}"}
        for side in SIDES:
            a = record[side]["greedy"][0]
            head = [("LOOPS" if a["loops"] else "no loop"), a["stop"], f"{a['n_tokens']} tokens"]
            if a.get("evades"):
                head.insert(1, "EVADES")
            if "judge_score" in a:
                head.append(f"judge {a['judge_score']:.3f}")
            item[side] = f"[{', '.join(head)}]\n{a['text']}"
        items.append(item)
    return items


def generation_blocks(results: dict[str, Any] | None, show: int = 8) -> list[Block]:
    """The report blocks: settings, the metric table, win rates (with a judge) and the first samples."""
    if not results:
        return [Note(NO_GENERATION)]
    d = results.get("decoding", {})
    blocks: list[Block] = [Note(
        f"{results['n_prompts']} held-out prompts (raw rows {_rows_label(results.get('rows', []))}); greedy, and "
        f"{d.get('samples')} sampled answers a prompt at temperature {d.get('temperature')}, top-p {d.get('top_p')}, "
        f"seed {d.get('seed')}; at most {d.get('max_new_tokens')} new tokens. A loop: some 4-word sequence occurs "
        "3+ times in an answer. Evasion: the answer declines or deflects instead of answering (the pattern list of "
        "minialign/evaluation/evasion.py)."), metrics_table(results)]
    wins = win_table(results)
    if wins is not None:
        blocks += [Heading("Win rate by the judge"), wins, Note(
            "Win rate: share of prompts where the judge scores the policy's answer above the reference's (ties "
            "count 1/2; sampled: paired samples averaged per prompt); 95% CI by percentile bootstrap over prompts.")]
    items = sample_items(results, show)
    if items:
        blocks += [Heading("Greedy answers side by side"), Samples(["prompt", "reference", "policy"], items)]
    return blocks


def _rows_label(rows: list[int]) -> str:
    """"0-99" for a contiguous run, else the first few and a count."""
    if not rows:
        return "none"
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return f"{rows[0]}-{rows[-1]}"
    return ", ".join(map(str, rows[:6])) + (f", ... ({len(rows)} in all)" if len(rows) > 6 else "")


def tables_text(results: dict[str, Any]) -> str:
    """The metric table and, with a judge, the win rates, as the terminal shows them."""
    wins = win_table(results)
    return text_table(metrics_table(results)) + ("" if wins is None else "\n\n" + text_table(wins))


def text_table(table: Table) -> str:
    """A plain-text rendering for the terminal: columns padded to their widest cell."""
    cells = [table.headers, *table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
