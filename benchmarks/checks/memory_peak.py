"""What fills GPU memory at the peak of a minialign run (issue 32: Unsloth peaks at 0.14-0.77x minialign's memory).

    python benchmarks/checks/memory_peak.py --json-out peak.json -- sft --model llama-1b --tokenizer T \\
        --dataset D --train-rows 300:1612 --batch-size 16 --lora-r 16 --max-steps 6 --out /tmp/peak-run

Runs the minialign command after ``--`` in this process with the CUDA caching allocator's history recorded (Python
stacks), replays the recorded allocations and frees to find the moment the most memory was allocated, and sums the
blocks live at that moment by where they were allocated: the innermost frame in minialign's own code (else in
transformers / peft / torch), e.g. ``minialign/modeling/lora.py:forward``. Writes the peak, that breakdown and
``torch.cuda.max_memory_allocated`` (the two should agree) to ``--json-out``. GPU only; the replay and grouping are
plain functions, tested on a CPU with made-up events (tests/test_memory_peak.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OWN = ("/minialign/", "/benchmarks/")  # our code: the site a block is charged to when its stack passes through it
LIBRARIES = ("/transformers/", "/peft/", "/torch/")


def peak_live(events: Iterable[dict]) -> tuple[int, dict[int, dict]]:
    """Replay allocator events (``alloc`` adds a block at ``addr``, ``free_completed`` removes it; others are
    ignored) -> (the most bytes live at once, the blocks live at that moment by address). A free whose alloc fell
    out of the recording's ring buffer is ignored, so the peak counts only blocks allocated while recording."""
    live: dict[int, dict] = {}
    total = best = 0
    at_best: dict[int, dict] = {}
    for event in events:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, at_best = total, dict(live)
        elif action == "free_completed" and event.get("addr") in live:
            total -= live.pop(event["addr"])["size"]
    return best, at_best


def site(frames: list[dict]) -> str:
    """Where a block was allocated: the innermost frame in our own code, else in a library, else the innermost."""
    for marks in (OWN, LIBRARIES):
        for frame in frames:
            name = frame.get("filename", "")
            for mark in marks:
                if mark in name:
                    return f"{mark.strip('/')}/{name.split(mark, 1)[1]}:{frame.get('name', '?')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('name', '?')}" if frames else "unknown"


def by_site(blocks: dict[int, dict], top: int = 20) -> list[dict]:
    """Bytes and block counts per allocation site, largest first (the rest summed as ``other``)."""
    sums: dict[str, list[int]] = {}
    for block in blocks.values():
        entry = sums.setdefault(site(block.get("frames", [])), [0, 0])
        entry[0] += block["size"]
        entry[1] += 1
    rows = sorted(({"site": k, "mib": v[0] / 2**20, "blocks": v[1]} for k, v in sums.items()),
                  key=lambda r: -r["mib"])
    if len(rows) > top:
        rest = rows[top:]
        rows = rows[:top] + [{"site": "other", "mib": sum(r["mib"] for r in rest),
                              "blocks": sum(r["blocks"] for r in rest)}]
    return [{**r, "mib": round(r["mib"], 1)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-out", required=True)
    p.add_argument("--max-entries", type=int, default=2_000_000, help="allocator events kept (a ring buffer)")
    args, command = p.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        p.error("give the minialign command after --, e.g. -- sft --demo --max-steps 4")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("memory_peak.py needs a CUDA GPU (the caching allocator's history)")
    from minialign import cli

    torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    status = cli.main(command)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    peak, blocks = peak_live(events)
    result = {"command": "python benchmarks/checks/memory_peak.py " + " ".join(argv), "status": status,
              "device": torch.cuda.get_device_name(0), "events": len(events),
              "peak_mib_replayed": round(peak / 2**20, 1),
              "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
              "by_site": by_site(blocks)}
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
