"""minialign's side of bench_gpu.py: the variants (settings) it is timed with, its batches, one timed run."""

from __future__ import annotations

import time

import torch
from trl_peer import LR, batch_stats, reset_memory

LORA_R = 8
BETA = 0.1


# minialign variants. "compile": torch.compile of the transformer (TokenLogps.compile_body; dynamic shapes);
# "cudagraphs": mode="reduce-overhead" (CUDA graphs) over batches padded to max_length, the target count padded to
# the largest batch's, so every step has the same shapes (one graph); "gc": activation checkpointing; "flat":
# padding-free batches (the batch's sequences back to back in one row, FlexAttention document mask), eager, the
# row rounded up to FLAT_BUCKET tokens; "flat-static": compiled with CUDA graphs, every row rounded up to the
# longest of the run (one shape, one graph: FlexAttention under dynamic shapes does not compile in torch 2.11,
# see benchmarks/NOTES.md); "oib": AdamW stepped inside the backward (no gradient buffer; clipped by the previous
# step's norm since 2026-12-06, unclipped in earlier results), eager so that each gradient is freed as soon as it is
# complete; "graph": flat-static's shapes, compiled without CUDA graphs,
# and the whole step (forward, backward, clipping, AdamW) replayed as one CUDA graph (--cuda-graphs); "graph-buckets":
# the same with rows rounded up to GRAPH_BUCKET tokens (a few compiled shapes) and each batch's target count rounded
# to TARGET_MULTIPLE (one capture per (row length, target count), each captured before the timed steps; the target
# count is outside the compiled transformer, see TokenLogps.compile_body). Compiled variants compile one transformer
# block, which serves every block (compile scope "blocks"); "graph-buckets-model" compiles the whole transformer as
# one graph instead. Padding-free DPO batches compute each prompt once, both responses branching off it
# (collate_pairs(share_prompt=True), what `minialign dpo --padding-free` does); "graph-buckets-unshared" lays each
# pair out as two whole sequences instead. tokens/s counts the tokens of the two whole sequences either way (what TRL
# computes), MFU the positions actually computed. Packed SFT rows are already free of padding and of one fixed shape,
# so "flat" changes nothing
# for them.
VARIANTS = {
    "eager": dict(compile=False),
    "compile": dict(compile=True),
    "cudagraphs": dict(compile="reduce-overhead", static=True),
    "compile-gc": dict(compile=True, grad_checkpointing=True),
    "flat": dict(compile=False, flat=True),
    "flat-static": dict(compile="reduce-overhead", flat=True, static=True),
    "flat-static-gc": dict(compile="reduce-overhead", flat=True, static=True, grad_checkpointing=True),
    "flat-gc-oib": dict(compile=False, grad_checkpointing=True, flat=True, optim_in_backward=True),
    "graph": dict(compile="default", flat=True, static=True, cuda_graphs=True),
    "graph-buckets": dict(compile="default", flat=True, buckets=True, cuda_graphs=True),
    "graph-buckets-gc": dict(compile="default", flat=True, buckets=True, cuda_graphs=True, grad_checkpointing=True),
    "graph-buckets-model": dict(compile="default", flat=True, buckets=True, cuda_graphs=True, compile_scope="model"),
    "graph-buckets-unshared": dict(compile="default", flat=True, buckets=True, cuda_graphs=True, share_prompt=False),
}
GRAPH_BUCKET = 512
FLAT_BUCKET = 256
TARGET_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_batches(task: str, packing: bool, workload, batch_size: int, needed: int, max_length: int,
                  pad_to: int | None = None, flat: bool = False, share_prompt: bool = False) -> list[dict]:
    """minialign batches in the benchmark's order: batch k holds ordered examples k*B .. (k+1)*B-1 (no short
    last batch), exactly what TRL's sequential loader gives; packed SFT packs the ordered examples into rows
    of ``max_length`` and groups B rows per batch. At most ``needed`` batches (``measure`` cycles through them)."""
    from minialign.data import collate_packed, collate_pairs, collate_sft, pack_sft

    tok, items, order = workload
    pad = tok.pad_token_id
    ordered = [items[i] for i in order]
    if packing:
        rows = pack_sft(ordered, max_length)
        groups = [rows[s:s + batch_size] for s in range(0, len(rows) - batch_size + 1, batch_size)][:needed]
        return [collate_packed(ordered, g, row_length=max_length, pad_id=pad) for g in groups]
    starts = list(range(0, len(ordered) - batch_size + 1, batch_size))[:needed]
    if task == "sft":
        return [collate_sft(ordered[s:s + batch_size], pad_id=pad, pad_to_multiple_of=pad_to, flat=flat) for s in starts]
    return [collate_pairs(ordered[s:s + batch_size], pad_id=pad, index=list(range(s, s + batch_size)),
                          pad_to_multiple_of=pad_to, flat=flat, share_prompt=share_prompt) for s in starts]


def computed_stats(batch: dict) -> tuple[int, int]:
    """(positions computed, attention work as a sum of squared lengths) of one batch, for MFU.

    A shared-prompt DPO batch computes prompt s once and branches c, r after it: its queries read
    s^2/2 + (c s + c^2/2) + (r s + r^2/2) keys, i.e. ((s+c)^2 + (s+r)^2 - s^2)/2, so that is its sum of squares.
    """
    if "prefix_ids" not in batch:
        return batch_stats(batch)
    n = batch["n_pairs"]
    counts = torch.bincount(batch["doc_ids"][batch["doc_ids"] >= 0], minlength=3 * n).tolist()
    sq = sum((counts[2 * n + i] + counts[i]) ** 2 + (counts[2 * n + i] + counts[n + i]) ** 2 - counts[2 * n + i] ** 2
             for i in range(n))
    return int(batch["attention_mask"].sum()), sq


def run_minialign(task: str, mode: str, packing: bool, batch_size: int, workload, args, device,
                  variant: str = "eager", on_step=None) -> dict:
    from minialign.data import tokens_in
    from minialign.modeling.models import load_model
    from minialign.training.bench import measure

    v = VARIANTS[variant]
    flat, static = v.get("flat", False) and not packing, v.get("static", False)
    needed = args.warmup + args.steps
    t0 = time.perf_counter()
    buckets = v.get("buckets", False)
    share = task == "dpo" and flat and v.get("share_prompt", True)
    pad_to = GRAPH_BUCKET if buckets else FLAT_BUCKET if flat else args.max_length if static else 64 if v["compile"] else None
    batches = build_batches(task, packing, workload, batch_size, needed, args.max_length, pad_to=pad_to, flat=flat,
                            share_prompt=share)
    if not batches:
        raise ValueError(f"the data holds fewer than one batch of {batch_size}")
    target_multiple = TARGET_MULTIPLE
    if static:  # every target count and row rounded up to the run's largest
        if flat:
            longest = max(b["input_ids"].shape[1] for b in batches)
            batches = build_batches(task, packing, workload, batch_size, needed, args.max_length, pad_to=longest, flat=True,
                                    share_prompt=share)
        target_multiple = round_up(max(b["n_targets"] for b in batches), TARGET_MULTIPLE)
    collate_ms = (time.perf_counter() - t0) * 1e3 / max(len(batches), 1)
    # CUDA graphs are recorded once per distinct shape: warm up over every distinct batch, so that the timed steps
    # see the steady state a long run reaches (every shape recorded), not recordings.
    warmup = max(args.warmup, len(batches)) if v["compile"] == "reduce-overhead" and not static else args.warmup
    reset_memory(device)
    model = load_model(args.model, seed=0)
    try:
        m = measure(model, batches, task=task, full=mode == "full", lora_r=LORA_R, steps=args.steps,
                    warmup=warmup, lr=LR, beta=BETA, device=device, compile=v["compile"],
                    grad_checkpointing=v.get("grad_checkpointing", False),
                    optim_in_backward=v.get("optim_in_backward", False), target_multiple=target_multiple,
                    chunk_size=getattr(args, "loss_chunk_size", None) or None,
                    cuda_graphs=v.get("cuda_graphs", False), on_step=on_step,
                    compile_scope=v.get("compile_scope", "blocks"))
    finally:
        del model
        torch._dynamo.reset()
    timed = [computed_stats(batches[i % len(batches)]) for i in range(warmup, warmup + args.steps)]
    tokens, attn_sq = sum(t for t, _ in timed), sum(s for _, s in timed)
    data_tokens = sum(tokens_in(batches[i % len(batches)]) for i in range(warmup, warmup + args.steps))
    return {
        "trainer": "minialign", "task": task, "mode": mode, "batch_size": batch_size,
        "tokens_per_s": m.tokens_per_s, "pairs_per_s": m.pairs_per_s, "peak_memory_mb": m.peak_memory_mb,
        "final_loss": m.final_loss, "memory_kind": m.memory_kind, "device": str(device), "steps": args.steps,
        "warmup": warmup, "elapsed_s": data_tokens / m.tokens_per_s, "tokens": tokens, "attn_sq": attn_sq,
        "data_tokens": data_tokens, "share_prompt": share,
        "packing": packing, "padding_free": flat or packing, "gradient_checkpointing": v.get("grad_checkpointing", False),
        "optim_in_backward": v.get("optim_in_backward", False), "compile": v["compile"], "variant": variant,
        "compile_scope": v.get("compile_scope", "blocks") if v["compile"] else None,
        "run_wall_s": time.perf_counter() - t0,  # the whole run: batches, model, compilation, captures, every step
        "cuda_graphs": v.get("cuda_graphs", False), "loss_chunk_size": getattr(args, "loss_chunk_size", None) or None,
        "distinct_batches": len(batches), "collate_ms_per_batch": collate_ms, "target_multiple": target_multiple,
        "distinct_shapes": len({(b["input_ids"].shape[1], round_up(b["n_targets"], target_multiple)) for b in batches}),
    }
