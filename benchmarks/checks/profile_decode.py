"""Where a static-decoder step's time goes (issue 31's target: >= 100k new tokens/s at batch 256; measured 40.1k, ~4 ms
a step). Splits one timed ``generate`` call into what the GPU does and what the host adds:

* ``replay_ms``: one recorded decode step replayed back to back (CUDA events): the GPU's own time per step;
* ``generate_ms_per_step``: the whole ``generate`` call over its decode steps (bench_decode's number): tokenizing,
  prefill, the looks at the rows every ``sync_every`` steps, compactions, detokenizing included;
* the top CUDA kernels of that call (torch.profiler), so the next change aims at the right thing.

    python benchmarks/checks/profile_decode.py --model /tmp/model.gguf --data SHARED/data/hh-rlhf/harmless-base/... \
        --json-out $OUT/profile-decode.json
Prompts are harmless-base rows 300:556 (train rows: the eval rows 0:300 are kept for studies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from minialign.data import load_preference_pairs  # noqa: E402
from minialign.modeling.decoder import StaticDecoder  # noqa: E402
from minialign.modeling.generate import generate  # noqa: E402
from minialign.modeling.models import load_model, load_tokenizer  # noqa: E402


def replay_ms(decoder: StaticDecoder, repeats: int = 50) -> dict:
    """GPU time of one step for each recorded graph (its bucket), replayed back to back.

    Each replay advances the state's output column (``step``), so it is reset before each bucket and the replays stay
    below the answer length; every slot is marked done, so no row's cache length grows (a finished row runs the same
    kernels: the step masks, it does not branch), and every row attends over half the cache, a mid-answer length
    (compaction leaves emptied slots at length 0, which would make the big buckets look cheap)."""
    out, state = {}, decoder.state
    repeats = max(1, min(repeats, state.new_tokens - 2))
    state.done.fill_(True)
    state.lengths.fill_(state.length // 2)
    for (bucket, _key), graph in sorted(decoder.graphs.items(), key=lambda kv: -kv[0][0]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        state.step.fill_(0)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out[str(bucket)] = start.elapsed_time(end) / repeats
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", required=True)
    p.add_argument("--rows", default="300:556")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--attention", default="flash", choices=["flash", "triton", "flex"],
                   help="the decode steps' attention (StaticDecoder's attention)")
    p.add_argument("--json-out", default="")
    args = p.parse_args(argv)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.bfloat16).cuda().eval()
    prompts = [x.prompt for x in load_preference_pairs(args.data, rows=args.rows)]
    decoder = StaticDecoder(model, attention=args.attention)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, decoder=decoder, details=True)
    generate(model, tok, prompts, **kw)  # warm-up: compiles and records every bucket's graph
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = generate(model, tok, prompts, **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = decoder.last_steps
    new = sum(c.n_tokens for c in done)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, tok, prompts, **kw)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    result = {"device": torch.cuda.get_device_name(0), "attention": args.attention, "fallback": decoder.fallback,
              "batch_size": args.batch_size, "prompts": len(prompts),
              "steps": steps, "new_tokens": new, "wall_s": wall, "tokens_per_s": new / wall,
              "generate_ms_per_step": 1000 * wall / max(steps, 1), "compactions": decoder.compactions,
              "cuda_kernel_launches": sum(e.count for e in kernels),
              "cuda_time_ms": sum(e.device_time_total for e in kernels) / 1000, "top_kernels": table}
    print(table)
    if args.json_out:  # kept should the replays below fail
        Path(args.json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    result["replay_ms"] = replay_ms(decoder)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
