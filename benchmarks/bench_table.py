"""The markdown tables of a bench_gpu.py result (``doc``): equal batch, best batch, every run."""

from __future__ import annotations

import traceback
from pathlib import Path


def _f(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _cfg(r: dict) -> tuple:
    return (r["task"], r["mode"], bool(r.get("packing")))


def _cfg_name(task, mode, packing) -> str:
    return f"{task} {mode}" + (" packed" if packing else "")


def _call(r: dict) -> str:
    return f"[{r['call']}]" if "call" in r else ""


def _trl_references(ok: list[dict]) -> list[dict]:
    """TRL's fastest run of each config and batch, among warm-process runs when there is one.

    The first training runs of a process ran several times slower, for TRL and minialign alike (benchmarks/NOTES.md,
    entry 12): a ratio against such a run would flatter minialign.
    """
    best: dict[tuple, dict] = {}
    for r in ok:
        if r["trainer"] != "trl" or r.get("gradient_checkpointing"):
            continue
        key = (*_cfg(r), r["batch_size"])
        rank = (not r.get("cold_process"), r["tokens_per_s"] or 0)
        if key not in best or rank > (not best[key].get("cold_process"), best[key]["tokens_per_s"] or 0):
            best[key] = r
    return list(best.values())


def markdown(doc: dict) -> str:
    rows = doc["results"]
    ok = [r for r in rows if not r.get("error")]
    out = [f"## minialign vs TRL {doc.get('trl')} + PEFT {doc.get('peft')} on {doc['device']}", "",
           (f"torch {doc['torch']}, transformers {doc['transformers']}; model {doc['workload']['model']}, "
            f"max_length {doc['workload']['max_length']}, {doc['steps']} timed steps after {doc['warmup']} warm-up; "
            f"matmul peak {doc['peak_tflops']:.3g} TFLOP/s ({doc['peak_measured_with']})."), "",
           ("### Equal batch (speed ratio = minialign / TRL tokens/s; memory ratio = minialign / TRL peak; "
            "[c] = the call that made the row)"), "",
           ("| config | batch | TRL tok/s | minialign tok/s (fastest variant) | speed x | TRL peak MiB "
            "| minialign peak MiB (leanest variant) | memory x | TRL MFU | minialign MFU |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in _trl_references(ok):
        mine = [r for r in ok if r["trainer"] == "minialign" and _cfg(r) == _cfg(t) and r["batch_size"] == t["batch_size"]]
        m = max(mine, key=lambda r: r["tokens_per_s"]) if mine else {}
        lean = min(mine, key=lambda r: r["peak_memory_mb"]) if mine else {}
        speed = m.get("tokens_per_s") / t["tokens_per_s"] if m.get("tokens_per_s") and t["tokens_per_s"] else None
        mem = lean.get("peak_memory_mb") / t["peak_memory_mb"] if lean.get("peak_memory_mb") and t["peak_memory_mb"] else None
        out.append(f"| {_cfg_name(*_cfg(t))} | {t['batch_size']} | {_f(t['tokens_per_s'])} {_call(t)}"
                   f"{' (cold process)' if t.get('cold_process') else ''} "
                   f"| {_f(m.get('tokens_per_s'))} ({m.get('variant', '-')}) {_call(m)} "
                   f"| {_f(speed, '{:.2f}')} | {_f(t['peak_memory_mb'])} | {_f(lean.get('peak_memory_mb'))} "
                   f"({lean.get('variant', '-')}) {_call(lean)} | {_f(mem, '{:.2f}')} | {_f(t.get('mfu'), '{:.1%}')} "
                   f"| {_f(m.get('mfu'), '{:.1%}')} |")
    out += ["", "### minialign at its best batch (vs TRL's best measured batch)", "",
            "| config | batch | tok/s | pairs/s | peak MiB | MFU | MFU (6N) | x TRL best |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg in dict.fromkeys(_cfg(r) for r in rows):
        mine = [r for r in ok if r["trainer"] == "minialign" and _cfg(r) == cfg]
        theirs = [r for r in ok if r["trainer"] == "trl" and _cfg(r) == cfg and not r.get("cold_process")]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["tokens_per_s"])
        tb = max(theirs, key=lambda r: r["tokens_per_s"]) if theirs else None
        ratio = best["tokens_per_s"] / tb["tokens_per_s"] if tb else None
        out.append(f"| {_cfg_name(*cfg)} | {best['batch_size']} | {_f(best['tokens_per_s'])} "
                   f"| {_f(best.get('pairs_per_s'), '{:,.1f}')} | {_f(best['peak_memory_mb'])} "
                   f"| {_f(best.get('mfu'), '{:.1%}')} | {_f(best.get('mfu_6n'), '{:.1%}')} | {_f(ratio, '{:.2f}')} |")
    out += ["", "### All runs", "",
            "| call | trainer | config | batch | tok/s | pairs/s | peak MiB | final loss | MFU | MFU (6N) | note |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = r.get("error") or " ".join(filter(None, [r.get("variant", ""),
                                                           "gradient checkpointing" if r.get("gradient_checkpointing") else "",
                                                           "cold process" if r.get("cold_process") else ""]))
        out.append(f"| {r.get('call', '-')} | {r['trainer']} | {_cfg_name(*_cfg(r))} | {r['batch_size']} "
                   f"| {_f(r.get('tokens_per_s'))} "
                   f"| {_f(r.get('pairs_per_s'), '{:,.1f}')} | {_f(r.get('peak_memory_mb'))} "
                   f"| {_f(r.get('final_loss'), '{:.4f}')} | {_f(r.get('mfu'), '{:.1%}')} "
                   f"| {_f(r.get('mfu_6n'), '{:.1%}')} | {note[:80]} |")
    if doc.get("small"):
        out += ["", "(--small: CPU smoke-test workload; the numbers mean nothing.)"]
    return "\n".join(out) + "\n"


def write_markdown(path: Path, doc: dict) -> str:
    """The tables, beside the JSON (``.md``); a bug here must not cost the results, so it only warns."""
    try:
        table = markdown(doc)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return "(could not format the table; the JSON holds every result)\n"
    path.with_suffix(".md").write_text(table, encoding="utf-8")
    return table
