"""The Triton decode kernel's tiling (``minialign.ops.triton_decode.Tiling``) against FlashAttention, on a GPU.

A decode step's attention at batch 256 took ~33 us a layer with FlashAttention (NOTES entry 29), and the store-and-
attend kernel, one program a (row, key head) walking that row's keys unpipelined, saved only ~0.1 ms a step (entry
30). Two causes are tried here: the longest prompt's row left to one program (``chunk``: keys shared out among
programs, merged by a second kernel) and load latency (``stages``: a pipelined tile loop), with ``block`` and ``warps``.

1. Kernel alone: one layer's stores + attention for every layer of the model (each layer its own cache, so the keys
   come from memory, not L2), recorded as one CUDA graph and replayed; microseconds a layer, and the largest
   difference from the flash path's output (bf16), both as the decoder runs them: ``flash`` (the RoPE kernels, v's
   copy, ``write_cache`` x 2, ``decode_attention``) and each tiling of the kernel, which rotates q and the new key
   itself and reads q, k, v as views of one QKV output (the results before 2026-12-07 14:55 UTC timed the tilings
   without RoPE, against FlashAttention without its RoPE kernels). Positions: each prompt's length (harmless-base
   rows, the model's tokenizer) plus ``--answer-tokens``.
2. Whole decoding: ``bench_decode.measure`` (the same timed ``generate`` calls) for FlashAttention, the default tiling
   and the fastest tiling of step 1, same prompts.

    python benchmarks/checks/tune_triton_decode.py --model /tmp/smollm2-random --data SHARED/.../test.jsonl.gz \
        --rows 300:556 --json-out $OUT/tune-triton.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import measure  # noqa: E402

from minialign.data import load_preference_pairs  # noqa: E402
from minialign.modeling.decoder import StaticDecoder  # noqa: E402
from minialign.modeling.decoder_model import (  # noqa: E402
    apply_rope,
    decode_attention,
    decode_layout,
    model_dims,
    write_cache,
)
from minialign.modeling.models import load_model, load_tokenizer  # noqa: E402
from minialign.ops.triton_decode import TILING, Tiling, append_attend  # noqa: E402

# step 1's grid: every chunk x stages x warps at 64-key tiles, then the fastest with 32- and 128-key tiles
CHUNKS, STAGES, WARPS, BLOCKS = (0, 512, 256, 128), (0, 2, 3), (2, 4), (32, 128)
TOLERANCE = 0.02  # largest difference from the flash path a timed tiling may have (bf16; 0.0039 measured without
# RoPE; the flash path rounds RoPE after each bf16 op, the kernel once)


def layer_us(attend, layers: int, repeats: int) -> float:
    """Microseconds a layer of ``attend(layer)`` over ``layers`` layers, recorded as one graph and replayed."""
    for layer in range(layers):  # warm-up: compilation, allocator
        attend(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            attend(layer)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (repeats * layers)


def kernel_table(dims, positions: torch.Tensor, length: int, layers: int, repeats: int) -> dict:
    """Step 1: the flash path's and each tiling's microseconds a layer, as the decoder runs them (q, k, v views of one
    QKV output, RoPE applied), and each tiling's largest difference from the flash path."""
    b, device, dtype, d = positions.shape[0], positions.device, torch.bfloat16, dims.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    caches = [randn(layers, b, dims.kv_heads, length, d) for _ in range(2)]
    qkv = randn(b, (dims.heads + 2 * dims.kv_heads) * d)
    raw = [t.view(b, -1, d) for t in qkv.split([dims.heads * d, dims.kv_heads * d, dims.kv_heads * d], -1)]
    angles = torch.arange(length, device=device)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, device=device) / d)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    c, s_ = cos[positions][:, None], sin[positions][:, None]
    scale = d ** -0.5
    layout = decode_layout(positions, dims.kv_heads, dims.groups, length, True)

    def flash(layer):  # the flash path: its RoPE kernels and v's copy, the two stores, FlashAttention
        write_cache(caches[0][layer], apply_rope(raw[1], c, s_), layout.cache_index)
        write_cache(caches[1][layer], raw[2].contiguous(), layout.cache_index)
        return decode_attention(apply_rope(raw[0], c, s_), caches[0][layer], caches[1][layer], layout, scale)

    want = flash(0).float()
    rows = {"flash": {"us_per_layer": round(layer_us(flash, layers, repeats), 2)}}

    def triton(tiling: Tiling) -> dict:
        def call(layer):
            return append_attend(*raw, caches[0][layer], caches[1][layer], positions, scale, (cos, sin), tiling)
        try:
            error = (call(0).float() - want).abs().max().item()
            return {"us_per_layer": round(layer_us(call, layers, repeats), 2), "max_abs_diff": error}
        except Exception as exc:  # noqa: BLE001 - one tiling's failure must not lose the others' numbers
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}

    def name(t: Tiling) -> str:
        return f"chunk{t.chunk}-block{t.block}-warps{t.warps}-stages{t.stages}"

    tried = [Tiling(c, 64, w, st) for c, st, w in itertools.product(CHUNKS, STAGES, WARPS)]
    for tiling in tried:
        rows[name(tiling)] = {**dataclasses.asdict(tiling), **triton(tiling)}
    timed = [t for t in tried if "us_per_layer" in rows[name(t)] and rows[name(t)]["max_abs_diff"] < TOLERANCE]
    best = min(timed, key=lambda t: rows[name(t)]["us_per_layer"]) if timed else TILING
    for block in BLOCKS:
        tiling = dataclasses.replace(best, block=block)
        rows[name(tiling)] = {**dataclasses.asdict(tiling), **triton(tiling)}
        if rows[name(tiling)].get("max_abs_diff", 1.0) < TOLERANCE and \
                rows[name(tiling)]["us_per_layer"] < rows[name(best)]["us_per_layer"]:
            best = tiling
    return {"layers": rows, "best": name(best), "best_tiling": dataclasses.asdict(best)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Llama-family model (minialign names, a folder or a GGUF file)")
    p.add_argument("--data", required=True, help="preference file whose prompts set the rows' lengths")
    p.add_argument("--rows", default="300:556", help="rows of --data: one batch (START:STOP)")
    p.add_argument("--answer-tokens", type=int, default=64, help="step 1's rows this far into their answers")
    p.add_argument("--max-new-tokens", type=int, default=128, help="step 2's answers, and step 1's cache length")
    p.add_argument("--repeats", type=int, default=20, help="graph replays a timing (step 1); passes (step 2: 2)")
    p.add_argument("--json-out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this check times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    model = load_model(args.model, dtype=torch.bfloat16).to(device).eval()
    tokenizer = load_tokenizer(args.model)
    prompts = [pair.prompt for pair in load_preference_pairs(args.data, rows=args.rows)]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    dims = model_dims(model)
    length = -(-(max(lengths) + args.max_new_tokens) // 64) * 64  # as StaticDecoder sizes its cache
    if not 0 <= args.answer_tokens < args.max_new_tokens:
        p.error("--answer-tokens must be at least 0 and below --max-new-tokens (the rows' keys must fit the cache)")
    positions = torch.tensor([n + args.answer_tokens for n in lengths], device=device)
    result = {"command": " ".join(["python", "benchmarks/checks/tune_triton_decode.py", *(argv or sys.argv[1:])]),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
              "batch": len(prompts), "cache_length": length, "prompt_tokens": {"min": min(lengths), "max": max(lengths),
              "mean": round(sum(lengths) / len(lengths), 1)}, "answer_tokens": args.answer_tokens,
              "default_tiling": dataclasses.asdict(TILING)}
    result["kernel"] = kernel_table(dims, positions, length, dims.layers, args.repeats)
    Path(args.json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")  # kept should step 2 fail

    eos = model.generation_config.eos_token_id or model.config.eos_token_id
    runs = argparse.Namespace(max_new_tokens=args.max_new_tokens, sample=False, repeats=2)
    best = Tiling(**result["kernel"]["best_tiling"])
    decoders = {"flash": StaticDecoder(model, attention="flash"),
                "triton-default": StaticDecoder(model, attention="triton"),
                "triton-best": StaticDecoder(model, attention="triton")}
    decoders["triton-best"].tiling = best
    result["decode"] = {}
    for name, decoder in decoders.items():
        row, _ = measure(model, tokenizer, prompts, decoder, len(prompts), runs, eos)
        result["decode"][name] = row
        print(name, row, flush=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "kernel"}, indent=1))
    print(json.dumps(result["kernel"]["layers"], indent=0)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
