"""What `minialign online` derives from its complete rounds: ``rounds.jsonl``, ``metrics.jsonl`` (every round's DPO
rows tagged with ``round``), ``summary.json``, ``report.md`` / ``report.html`` with per-round curves.

Everything here is rebuilt from the ``round-K/`` folders that hold the completion marker (``round.json``), and written
atomically, so a round killed half-way never shows in them and a resumed run cannot count a round twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from minialign.base.files import write_atomic
from minialign.reporting.render import Note, Plot, Section, Table, duration, fmt, render_html, render_markdown
from minialign.reporting.report import curves

ROUND_DONE = "round.json"  # a round's statistics, written last: the round is complete when it exists


def round_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"round-{k}"


def completed_rounds(run_dir: Path) -> int:
    """How many rounds are complete: rounds 1..K all hold their marker (a later one without it is redone)."""
    k = 0
    while (round_dir(run_dir, k + 1) / ROUND_DONE).is_file():
        k += 1
    return k


def round_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The statistics of every complete round, in order."""
    return [json.loads((round_dir(run_dir, k) / ROUND_DONE).read_text()) for k in range(1, completed_rounds(run_dir) + 1)]


def tagged_metrics(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    """The DPO metrics rows of rounds 1..``rounds`` (steps count from 1 in each round), each with its ``round``.
    A line a kill cut short is skipped."""
    rows = []
    for k in range(1, rounds + 1):
        path = round_dir(run_dir, k) / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rows.append({"round": k, **json.loads(line)})
            except ValueError:
                continue
    return rows


def rebuild_outputs(run_dir: Path, cfg, models: list[dict], clock: dict[str, float]) -> dict[str, Any]:
    """rounds.jsonl, metrics.jsonl, summary.json and the report from the complete rounds; returns the summary.

    ``clock``: this process's phase times (``Stopwatch.summary``); generation, scoring and training times are the
    rounds' own, summed over every complete round (a resumed run counts the rounds done before it too).
    """
    stats = round_stats(run_dir)
    write_atomic(run_dir / "rounds.jsonl", "".join(json.dumps(s) + "\n" for s in stats).encode())
    rows = tagged_metrics(run_dir, len(stats))
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    time = {f"{key}_s": round(sum(s[f"{key}_s"] for s in stats), 3) for key in ("generate", "score", "train")}
    time.update({k: v for k, v in clock.items() if k in ("load_s", "tokenize_s", "save_s", "wall_s")})
    routes = {"routes": {"field": cfg.route_field, "values": cfg.routes()}} if cfg.combine == "route" else {}
    summary = {
        "kind": "online", "completed_rounds": len(stats), "rounds": cfg.rounds, "reward_models": models,
        "combine": cfg.combine, **routes, "time": time, "per_round": stats, "final": stats[-1] if stats else None,
        "final_weights": str(run_dir / "final") if (run_dir / "final").is_dir() else None,
    }
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1).encode())
    write_report(run_dir, summary, dataclasses.asdict(cfg))
    return summary


def write_report(run_dir: Path, summary: dict[str, Any], config: dict[str, Any]) -> None:
    """report.md (plots linked), report.html (plots embedded) and plots/*.png."""
    sections = [run_section(summary, config), rounds_section(summary["per_round"])]
    title = f"minialign online: {run_dir.resolve().name}"
    for plot in (b for s in sections for b in s.blocks if isinstance(b, Plot)):
        write_atomic(run_dir / "plots" / f"{plot.name}.png", plot.png)
    write_atomic(run_dir / "report.md", render_markdown(title, sections).encode())
    write_atomic(run_dir / "report.html", render_html(title, sections).encode())


def run_section(summary: dict[str, Any], c: dict[str, Any]) -> Section:
    start = c["model"] + (f" + adapter {c['adapter']}" if c["adapter"] else "")
    if c["sft"]:
        start = f"SFT run {c['sft']}"
    method = "full fine-tuning" if c["full"] else f"LoRA r={c['lora_r']}"
    t = summary["time"]
    note = Note(
        f"Policy and fixed reference: {start} ({method}). Prompts: {c['dataset']} rows {c['train_rows'] or 'all'}"
        f"{' (chat template)' if c['chat_template'] else ''}, {c['prompts_per_round'] or 'all'} a round; "
        f"{c['samples']} answers a prompt at temperature {c['temperature']}, top-p {c['top_p']}, at most "
        f"{c['max_new_tokens']} new tokens. Pairs: best vs worst by the {summary['combine']} of the reward models' "
        f"scores, min gap {c['min_gap']}. DPO per round: beta {c['beta']}, loss {c['loss_type']}, rpo_alpha "
        f"{c['rpo_alpha']}, lr {c['lr']}, {c['epochs']} epoch(s), batch {c['batch_size']}; the optimizer restarts each "
        f"round. {summary['completed_rounds']} of {summary['rounds']} rounds complete; generate {duration(t['generate_s'])}, "
        f"score {duration(t['score_s'])}, train {duration(t['train_s'])}.")
    table = Table(["reward model", "weight (or route)", "trained on", "held-out accuracy"],
                  [[m["run_dir"], fmt(m["weight"]) if m.get("route") is None else f"{c['route_field']} = {m['route']}",
                    m["train_rows_label"], fmt(m["heldout_accuracy"])]
                   for m in summary["reward_models"]])
    return Section("Run", [note, table])


def rounds_section(stats: list[dict[str, Any]]) -> Section:
    if not stats:
        return Section("Rounds", [Note("No round has completed yet.")])
    names = list(stats[0]["rm_scores"])
    short = [Path(n).name for n in names]
    headers = ["round", "pairs / prompts", *[f"score {n}" for n in short], "loops", "EOS", "tokens", "DPO loss",
               "generate s", "score s", "train s"]
    rows = [[str(s["round"]), f"{s['pairs']} / {s['prompts']}", *[fmt(s["rm_scores"][n]) for n in names],
             fmt(s["loop_share"]), fmt(s["eos_share"]), fmt(s["mean_tokens"]), fmt(s["loss"]),
             fmt(s["generate_s"]), fmt(s["score_s"]), fmt(s["train_s"])] for s in stats]
    x = [s["round"] for s in stats]

    def line(label: str, key: str) -> tuple[str, list, list]:
        return label, x, [s[key] for s in stats]

    scores = curves([("mean reward-model score of the samples", "score",
                      [(n, x, [s["rm_scores"][name] for s in stats]) for n, name in zip(short, names, strict=True)]),
                     ("pairs kept", "prompts", [line("pairs", "pairs"), line("below min-gap", "below_gap")])],
                    xlabel="round")
    text = curves([("answers", "share", [line("loop share", "loop_share"), line("EOS share", "eos_share")]),
                   ("mean length", "tokens", [line("mean tokens", "mean_tokens")])], xlabel="round")
    time = curves([("time per round", "seconds", [line("generate", "generate_s"), line("score", "score_s"),
                                                   line("train", "train_s")])], xlabel="round")
    return Section("Rounds", [
        Table(headers, rows),
        Note("Scores are each reward model's raw mean over the round's samples it scored: all of them, or under "
             "--combine route those routed to it (the combination is 0 on average by construction). A loop: some "
             "4-word sequence 3+ times in an answer; EOS: the answer ended on the end-of-sequence token."),
        Plot("online-scores", scores, "mean reward-model scores and pairs kept per round"),
        Plot("online-answers", text, "loops, EOS share and length of the sampled answers"),
        Plot("online-time", time, "time per round: generation, scoring, DPO training"),
    ])
