#!/usr/bin/env python3
"""The recipe sweeps' results read and shown (``recipe_sweep.py`` round 1, ``recipe_round2.py`` round 2): one eval.json
as a table row (``headline``), the candidates' lines, the Markdown summary and the sweep's plot."""

from __future__ import annotations

from pathlib import Path


def headline(ev: dict, keep_samples: bool = False) -> dict:
    """The numbers a sweep row shows, from one eval.json (``minialign.evaluation.geneval.compare``'s output).

    ``win_rate``: the policy's win rate over the reference by the judge, greedy and sampled answers pooled by
    prompt count (each decoding's rate weighted equally); ``greedy_loop_share``: the policy's greedy answers.
    """
    if "modes" not in ev:
        return ev
    out: dict = {"n_prompts": ev.get("n_prompts"), "judge": ev.get("judge")}
    for mode, entry in ev["modes"].items():
        for side in ("policy", "reference"):
            for key, value in entry[side].items():
                out[f"{mode}_{side}_{key}"] = value
        if "win_rate" in entry:
            w = entry["win_rate"]
            out[f"{mode}_win_rate"], out[f"{mode}_win_ci"] = w["rate"], [w["low"], w["high"]]
    rates = [out[k] for k in ("greedy_win_rate", "sampled_win_rate") if k in out]
    out["win_rate"] = sum(rates) / len(rates) if rates else None
    out["greedy_loop_share"] = out.get("greedy_policy_loop_share")
    if keep_samples:  # the write-up's tests (rows 0, 1, 3, 6, 7) and the first prompts, greedy, side by side
        out["samples"] = [{"row": r["row"], "prompt": r["prompt"],
                           **{side: {k: r[side]["greedy"][0].get(k) for k in ("text", "loops", "stop", "judge_score")}
                              for side in ("reference", "policy")}}
                          for r in ev.get("prompts", [])[:8]]
    return out


def fmt(x, spec="{:.3f}") -> str:
    return "-" if x is None else spec.format(x)


def win(g: dict, mode: str) -> str:
    ci = g.get(f"{mode}_win_ci")
    return "-" if ci is None else f"{g[f'{mode}_win_rate']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def candidate_lines(candidates: dict) -> list[str]:
    """The validation table: one row per candidate, and the starting model's own answers below them."""
    lines = ["Validation rows (1812:2012): DPO's held-out reward accuracy, and 100 prompts answered greedily and "
             "with samples; win rate = the judge's, policy over the starting model.", "",
             "| candidate | reward acc | win greedy | win sampled | greedy loops | finished | mean tokens | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in candidates.items():
        v = c.get("validation", {})
        g = v.get("generations", {})
        lines.append(f"| {name} | {fmt(v.get('dpo', {}).get('eval/rewards/accuracies'))} | {win(g, 'greedy')} | "
                     f"{win(g, 'sampled')} | {fmt(g.get('greedy_policy_loop_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_policy_finished_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_policy_mean_tokens'), '{:.1f}')} | {fmt(v.get('train_s'), '{:.1f}')} |")
    if any("generations" in c.get("validation", {}) for c in candidates.values()):
        g = next(c["validation"]["generations"] for c in candidates.values() if "generations" in c.get("validation", {}))
        lines.append(f"| *starting model* | | | | {fmt(g.get('greedy_reference_loop_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_reference_finished_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_reference_mean_tokens'), '{:.1f}')} | |")
    return lines


def markdown(doc: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct x HH harmless-base: the recipe sweep", "",
             f"Device: {doc.get('device', '-')}. Rows of harmless-base: {doc['rows']}. Targets: {doc['targets']}.", ""]
    for name, j in doc.get("judges", {}).items():
        lines.append(f"- judge {name}: rows {j['rows']} of {j['dataset']}, validation accuracy "
                     f"{fmt(j.get('validation_accuracy'))}{' (chosen)' if doc.get('judge') == name else ''}")
    lines += ["", *candidate_lines(doc.get("candidates", {}))]
    if doc.get("chosen"):
        lines += ["", f"Chosen: **{doc['chosen']}** (rule: `choose` in benchmarks/recipes/recipe_sweep.py)."]
    final = doc.get("final", {})
    if final:
        lines += ["", f"Eval rows 0:300, touched once. Judge accuracy on them: {fmt(final.get('judge_eval_accuracy'))}.", "",
                  "| model | reward acc (300 pairs) | greedy loops | sampled loops | finished (greedy) | mean tokens | "
                  "distinct-2 | win greedy | win sampled |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [("recipe", "recipe", (final.get("recipe_heldout") or {}).get("reward_accuracy"))]
        e2e = {r["runner"]: r for r in (final.get("e2e") or {}).get("runs", [])}
        rows.append(("minialign, TRL's settings", "minialign-trl-settings",
                     (e2e.get("minialign", {}).get("heldout") or {}).get("reward_accuracy")))
        rerun = doc.get("trl_rerun")
        if rerun:
            trl_e2e = {r["runner"]: r for r in rerun["e2e"].get("runs", [])}.get("trl", {})
            rows.append(("TRL (rerun, chat template)", None, (trl_e2e.get("heldout") or {}).get("reward_accuracy")))
        for label, key, acc in rows:
            g = final.get(key, {}) if key else rerun["generations"]
            lines.append(f"| {label} | {fmt(acc)} | {fmt(g.get('greedy_policy_loop_share'), '{:.2f}')} | "
                         f"{fmt(g.get('sampled_policy_loop_share'), '{:.2f}')} | "
                         f"{fmt(g.get('greedy_policy_finished_share'), '{:.2f}')} | "
                         f"{fmt(g.get('greedy_policy_mean_tokens'), '{:.1f}')} | "
                         f"{fmt(g.get('greedy_policy_distinct_2'), '{:.3f}')} | {win(g, 'greedy')} | {win(g, 'sampled')} |")
        g = final.get("recipe", {})
        lines.append(f"| starting model | - | {fmt(g.get('greedy_reference_loop_share'), '{:.2f}')} | "
                     f"{fmt(g.get('sampled_reference_loop_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_reference_finished_share'), '{:.2f}')} | "
                     f"{fmt(g.get('greedy_reference_mean_tokens'), '{:.1f}')} | "
                     f"{fmt(g.get('greedy_reference_distinct_2'), '{:.3f}')} | | |")
    lines += ["", "Commands:", "", *[f"    {c}" for c in doc.get("invocations", [])],
              *[f"    {c}" for c in doc.get("device_commands", [])]]
    if doc.get("trl_rerun"):
        lines.append(f"    {doc['trl_rerun']['command']}")
    return "\n".join(lines) + "\n"


def plot_sweep(doc: dict, path: Path) -> None:
    """One bar group per candidate: validation reward accuracy, greedy win rate, greedy loop share, finished share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in doc["candidates"].items() if "generations" in c.get("validation", {})]
    series = {"reward accuracy": [doc["candidates"][n]["validation"]["dpo"].get("eval/rewards/accuracies") for n in names],
              "win rate, greedy (judge)": [doc["candidates"][n]["validation"]["generations"].get("greedy_win_rate")
                                           for n in names],
              "greedy answers that loop": [doc["candidates"][n]["validation"]["generations"]["greedy_policy_loop_share"]
                                           for n in names],
              "greedy answers ending on EOS": [doc["candidates"][n]["validation"]["generations"]
                                               ["greedy_policy_finished_share"] for n in names]}
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], [v or 0 for v in values], width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_ylim(0, 1)
    ax.set_title("DPO variants of SmolLM2-135M-Instruct on HH harmless-base, validation rows 1812:2012")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # the example's figure from a committed sweep: JSON in, PNG out
    import argparse
    import json

    cli = argparse.ArgumentParser(description="Plot a recipe sweep's validation rows (examples/hh-smollm2/plots).")
    cli.add_argument("sweep_json", help="e.g. benchmarks/results/recipe-h200.json")
    cli.add_argument("png", help="e.g. examples/hh-smollm2/plots/sweep.png")
    args = cli.parse_args()
    plot_sweep(json.loads(Path(args.sweep_json).read_text()), Path(args.png))
