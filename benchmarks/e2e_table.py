"""The tables of a bench_e2e.py result: per-label ratios against each peer (in the JSON) and the markdown next to it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


def _ok(r: dict) -> bool:
    return r.get("returncode") == 0 and bool(r.get("wall_s"))


def _div(a, b) -> float | None:
    return a / b if a is not None and b else None


def _diff(a, b) -> float | None:
    return a - b if a is not None and b is not None else None


def _delta(mine: dict, peer: dict, key: str) -> float | None:
    return _diff((mine.get("heldout") or {}).get(key), (peer.get("heldout") or {}).get(key))


def _loss_ci(mine: dict, peer: dict) -> list[float] | None:
    """The paired 95% interval of the held-out loss difference (``evaluate.loss_difference``), where both results
    kept their per-example sums over the same tokens; None otherwise (results from before they were kept). It is the
    spread over held-out examples of two fixed trained results, not over training runs: seed to seed, one trainer's
    loss moves more (benchmarks/NOTES.md entry 32)."""
    a, b = (peer.get("heldout") or {}).get("per_example"), (mine.get("heldout") or {}).get("per_example")
    if not a or not b or len(a) != len(b) or [x[1] for x in a] != [x[1] for x in b]:
        return None
    import torch

    if ROOT not in sys.path:  # minialign need not be installed
        sys.path.append(ROOT)
    from minialign.evaluation.evaluate import loss_difference

    d = loss_difference(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    return [d["low"], d["high"]]


def _is_peer(runner: str) -> bool:
    return not runner.startswith("minialign")


def ratios(runs: list[dict]) -> list[dict]:
    """Each minialign row against each peer (TRL, Unsloth, ...) of its label: the peer row of its call, else the
    label's latest. Keys end in ``_vs_<peer>`` (``wall_speedup_vs_trl``, ``wall_speedup_vs_unsloth``) and ``peer``
    names it, so one result file can hold races against several peers."""
    out = []
    for r in runs:
        if _is_peer(r["runner"]) or not _ok(r):
            continue
        for peer in dict.fromkeys(t["runner"] for t in runs if _is_peer(t["runner"])):
            same = [t for t in runs if t["runner"] == peer and t.get("label") == r.get("label") and _ok(t)]
            if not same:
                continue
            t = next((t for t in same if t.get("call") == r.get("call")), same[-1])
            v = peer.replace("-", "_")
            out.append({
                "label": r.get("label"), "runner": r["runner"], "peer": peer, "call": r.get("call"),
                "peer_call": t.get("call"), **({"trl_call": t.get("call")} if peer == "trl" else {}),
                f"wall_speedup_vs_{v}": _div(t["wall_s"], r["wall_s"]),
                # like for like: both clocks stopped after the final evaluation (minialign's last metrics write)
                f"wall_to_eval_speedup_vs_{v}": _div(t["wall_s"], r.get("wall_to_eval_s")),
                f"steady_speedup_vs_{v}": _div(r.get("steady_tokens_per_s"), t.get("steady_tokens_per_s")),
                f"throughput_speedup_vs_{v}": _div(r.get("tokens_per_s"), t.get("tokens_per_s")),
                f"memory_ratio_vs_{v}": _div(r.get("peak_memory_mb"), t.get("peak_memory_mb")),
                **({"reward_accuracy_delta": _delta(r, t, "reward_accuracy"), "policy_accuracy_delta":
                    _delta(r, t, "policy_accuracy"), "reward_margin_delta": _delta(r, t, "reward_margin")}
                   if r.get("task") == "dpo" else {"heldout_loss_delta": _delta(r, t, "loss"),
                                                    "heldout_loss_delta_ci": _loss_ci(r, t)}),
                "final_train_loss_delta": _diff(r.get("final_train_loss"), t.get("final_train_loss")),
            })
    return out


def fmt(x, spec: str = "{:,.0f}") -> str:
    """A number for the markdown table ("-" when missing)."""
    return "-" if x is None else spec.format(x)


def _heldout(h: dict | None, own: dict | None = None) -> str:
    """The shared evaluator's numbers; without them (``--no-heldout``), the trainer's own final evaluation."""
    if not h and own:
        loss = own.get("eval/loss", own.get("eval_loss"))
        acc = own.get("eval/rewards/accuracies", own.get("eval_rewards/accuracies"))
        return f"own eval: loss {fmt(loss, '{:.4f}')}" + (f", reward acc {acc:.3f}" if acc is not None else "")
    if not h or "error" in h:
        return "error" if h else "-"
    if "reward_accuracy" in h:
        return (f"reward acc {h['reward_accuracy']:.3f}, margin {h['reward_margin']:.3f}, "
                f"policy acc {h['policy_accuracy']:.3f}")
    return f"loss {h['loss']:.4f} (base {h.get('base_loss', float('nan')):.4f})"


def _rc(r: dict) -> str:
    return f"{r.get('returncode')}{' (timeout)' if r.get('timed_out') else ''}"


def markdown(doc: dict) -> str:
    """Every run, then every ratio; a run that failed shows its return code (its log's end is in the JSON)."""
    v = doc.get("versions", {})
    peers = sorted({r["runner"] for r in doc["runs"] if _is_peer(r["runner"])})
    title = " and ".join(f"TRL {v.get('trl')} + PEFT {v.get('peft')}" if p == "trl" else p for p in peers) or "peers"
    lines = [f"## End to end: minialign vs {title} on {doc['device']}", "",
             f"torch {v.get('torch')}, transformers {v.get('transformers')}. Wall clock: from spawn to TRL's `t_done` "
             "(right after its final evaluation) or to minialign's exit (in brackets: to its final evaluation's "
             "metrics write, before its checkpoint and final save). Held-out: the same minialign evaluator on every "
             "trained result.", "",
             "| label | runner | rc | wall s | train s | steps | tokens | tok/s | steady tok/s | peak MiB | held-out |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["runs"]:
        to_eval = f" ({fmt(r['wall_to_eval_s'], '{:.1f}')})" if r.get("wall_to_eval_s") else ""
        lines.append(f"| {r.get('label')} | {r['runner']} | {_rc(r)} | {fmt(r.get('wall_s'), '{:.1f}')}{to_eval} "
                     f"| {fmt(r.get('train_s'), '{:.1f}')} | {fmt(r.get('steps'))} | {fmt(r.get('tokens'))} "
                     f"| {fmt(r.get('tokens_per_s'))} | {fmt(r.get('steady_tokens_per_s'))} "
                     f"| {fmt(r.get('peak_memory_mb'))} | {_heldout(r.get('heldout'), r.get('own_eval'))} |")
    lines += ["", "| label | runner | vs | wall speed-up (to eval) | train tok/s x | steady speed-up | memory x "
              "| held-out delta | final loss delta |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for q in doc.get("ratios", []):
        v = q.get("peer", "trl").replace("-", "_")
        delta = (f"reward acc {fmt(q.get('reward_accuracy_delta'), '{:+.3f}')}, policy acc "
                 f"{fmt(q.get('policy_accuracy_delta'), '{:+.3f}')}" if "reward_accuracy_delta" in q
                 else f"loss {fmt(q.get('heldout_loss_delta'), '{:+.4f}')}" + (
                     " [{:+.4f}, {:+.4f}]".format(*q["heldout_loss_delta_ci"]) if q.get("heldout_loss_delta_ci") else ""))
        lines.append(f"| {q['label']} | {q['runner']} | {q.get('peer', 'trl')} "
                     f"| {fmt(q[f'wall_speedup_vs_{v}'], '{:.2f}x')} "
                     f"({fmt(q.get(f'wall_to_eval_speedup_vs_{v}'), '{:.2f}x')}) "
                     f"| {fmt(q.get(f'throughput_speedup_vs_{v}'), '{:.2f}x')} "
                     f"| {fmt(q[f'steady_speedup_vs_{v}'], '{:.2f}x')} | {fmt(q[f'memory_ratio_vs_{v}'], '{:.2f}x')} "
                     f"| {delta} | {fmt(q.get('final_train_loss_delta'), '{:+.3f}')} |")
    if doc.get("mfu"):
        m = doc["mfu"]
        lines += ["", f"MFU: {m['formula']} ({doc.get('peak_tflops', 0):.0f} TFLOP/s; also against the 989 TFLOP/s "
                  "datasheet figure).", "", "| label | runner | call | batch | steady tok/s | MFU (measured peak) "
                  "| MFU (989) |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {x['label']} | {x['runner']} | {x['call']} | {x['batch']} | {fmt(x['steady_tokens_per_s'])} "
                  f"| {x['mfu_6n_measured_peak']:.1%} | {x['mfu_6n_989_spec']:.1%} |" for x in m["rows"]]
    notes = [f"- call {r['call']} {r['label']} {r['runner']}: {r['note']}" for r in doc["runs"] if r.get("note")]
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "Commands:", "", *[f"    {c}" for c in doc.get("commands", [])], ""]
    return "\n".join(lines)
