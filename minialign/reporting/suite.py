"""How a suite eval (several axes) reads: one table per axis and the combined two-axis table."""

from __future__ import annotations

from minialign.reporting.generation import generation_blocks, tables_text, text_table
from minialign.reporting.render import Heading, Note, Section, Table, fmt


def summary_table(results: dict) -> Table:
    """One row per axis: the policy's greedy win rate beside its judge, and reference -> policy for the metrics."""
    rows = []
    for name, s in results["summary"].items():
        ref = s["reference"]
        win = "no judge" if s["win_rate"] is None else f"{s['win_rate']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
        e = s.get("win_engaged")  # absent from results written before it was kept
        engaged = "-" if not e else f"{e['rate']:.3f} [{e['low']:.3f}, {e['high']:.3f}] ({e['n']})"
        rows.append([name, str(s["n"]), win, engaged, fmt(s["judge_accuracy"]), str(s["judge_rows"] or "-"),
                     *(f"{fmt(ref[k])} -> {fmt(s[k])}" for k in ("evasion", "loops", "eos", "mean_tokens"))])
    return Table(["axis", "prompts", "policy win rate [95% CI]", "where it engages (prompts)", "judge held-out accuracy",
                  "judge trained on", "evasion share", "loop share", "EOS/stop share", "mean length (tokens)"], rows)



def suite_sections(results: dict, show: int) -> list[Section]:
    """A combined section (one row per axis), then one section per axis: its tables and samples."""
    sections = [Section("All axes", [summary_table(results), Note(SUMMARY_NOTE)])]
    for name, one in results["axes"].items():
        head = Note(f"Prompts: {one.get('prompt_source')}. Judge: {(one.get('axis') or {}).get('judge') or 'none'}.")
        sections.append(Section(f"Axis: {name}", [head, *generation_blocks(one, show)]))
    return sections



def suite_blocks(results: dict, show: int = 8) -> list:
    """``suite_sections`` as blocks of one section (the run report's Generation section)."""
    blocks: list = [summary_table(results), Note(SUMMARY_NOTE)]
    for name, one in results["axes"].items():
        blocks += [Heading(f"Axis: {name} ({one.get('prompt_source')})"), *generation_blocks(one, show)]
    return blocks



def suite_text(results: dict) -> str:
    """The terminal's view: the combined table, then each axis's tables."""
    parts = [text_table(summary_table(results))]
    parts += [f"axis {name}:\n{tables_text(one)}" for name, one in results["axes"].items()]
    return "\n\n".join(parts)


SUMMARY_NOTE = ("Greedy answers, reference -> policy. Each axis's win rate is by its own judge: share of prompts where "
                "it scores the policy's answer above the reference's (ties 1/2), 95% CI by bootstrap over prompts; "
                "'where it engages' is the same over only the prompts whose policy answer does not evade, so a win "
                "bought by declining shows as a gap between the two. Evasion: the answer declines or deflects "
                "instead of answering (minialign/evaluation/evasion.py).")
