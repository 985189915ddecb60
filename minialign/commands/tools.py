"""The small commands: `minialign lora-params`, `data`, `generate` and `bench`, each one call and a printout.

Like ``minialign.cli``, this module imports torch and transformers only inside a command, so the CLI's ``--help``
(which reads ``BENCH_VARIANTS``) stays instant.
"""

from __future__ import annotations

import functools
import json

from minialign.base.errors import UserError
from minialign.config.fields import prompt_length


def cmd_lora_params(args) -> int:
    from minialign.modeling.lora import LoRAConfig, lora_param_table
    from minialign.modeling.models import load_model

    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    for r in args.ranks:  # before loading anything
        LoRAConfig(r=r, target_modules=targets).validate()
    rows = lora_param_table(load_model(args.model), args.ranks, targets)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'rank':>6} {'trainable':>12} {'total':>14} {'percent':>8}")
    for r in rows:
        print(f"{r['rank']:>6} {r['trainable']:>12,} {r['total']:>14,} {r['percent']:>7.2f}%")
    return 0


def cmd_data(args) -> int:
    from minialign.data import format_summary, summarize_source
    from minialign.modeling.models import load_tokenizer

    max_prompt_length = prompt_length(args.max_length, args.max_prompt_length)  # before loading anything
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    summary = summarize_source(args.source, split=args.split, data_dir=args.data_dir, rows=args.rows, tokenizer=tokenizer,
                               max_length=args.max_length, max_prompt_length=max_prompt_length)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_generate(args) -> int:
    from minialign.modeling.adapters import load_adapter
    from minialign.modeling.generate import generate
    from minialign.modeling.models import default_tokenizer, load_model, load_tokenizer, refuse_reward_model

    refuse_reward_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(args.model), cache=args.cache)
    prompts = [f"\n\nHuman: {p}\n\nAssistant:" if args.hh else p for p in args.prompt]
    if args.chat_template:  # before the model loads: a tokenizer without a template fails at once
        from minialign.data.chat import chat_prompt

        prompts = [chat_prompt(p, tokenizer) for p in prompts]
    model = load_model(args.model, cache=args.cache)
    if args.adapter:
        load_adapter(model, args.adapter)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    for prompt, out in zip(prompts, outputs):
        print(f"PROMPT: {prompt.strip()}\nMODEL: {out.strip()}\n")
    return 0


# minialign bench --variant: (compile, padding-free, whole-step CUDA graphs, row length rounded up to a multiple of)
BENCH_VARIANTS = {"eager": (False, False, False, 64), "compile": (True, False, False, 64),
                  "cudagraphs": ("reduce-overhead", False, False, 512), "graphs": ("default", True, True, 512)}


def cmd_bench(args) -> int:
    import dataclasses

    import torch

    from minialign.data import collate_pairs, collate_sft, load_preference_pairs, tokenize_pairs, tokenize_sft
    from minialign.modeling.models import load_model, load_tokenizer
    from minialign.training.bench import measure

    if not torch.cuda.is_available() and not args.small:
        raise UserError("No CUDA GPU is visible. `minialign bench --small` measures the tiny model on the demo data "
                        "on this CPU instead (its numbers only show that the path works).")
    if args.small:
        args.model, args.tokenizer, args.data, args.steps = "tiny", "demo", "demo", min(args.steps, 3)
        args.batch_sizes = [min(b, 8) for b in args.batch_sizes[:1]]
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    tok = load_tokenizer(args.tokenizer)
    pairs = load_preference_pairs(args.data, limit=8 * max(args.batch_sizes))
    compile_arg, flat, graphs, pad = BENCH_VARIANTS[args.variant]
    rows = []
    for task in args.tasks:
        tokenized = (tokenize_sft if task == "sft" else tokenize_pairs)(pairs, tok, max_length=512, max_prompt_length=256)
        # padding-free DPO shares each prompt between its two responses, as `minialign dpo --padding-free` does
        collate = collate_sft if task == "sft" else functools.partial(collate_pairs, share_prompt=flat)
        for mode in args.modes:
            for b in args.batch_sizes:
                batches = [collate(tokenized[i:i + b], pad_id=tok.pad_token_id, pad_to_multiple_of=pad, flat=flat)
                           for i in range(0, len(tokenized) - b + 1, b)][:8]
                try:
                    m = measure(load_model(args.model), batches, task=task, full=mode == "full", steps=args.steps,
                                warmup=3, device=device, compile=compile_arg, grad_checkpointing=args.grad_checkpointing,
                                cuda_graphs=graphs, compile_scope=args.compile_scope)
                    row = dataclasses.asdict(m)
                except torch.OutOfMemoryError:
                    row = {"task": task, "mode": mode, "batch_size": b, "error": "out of memory"}
                    torch.cuda.empty_cache()
                rows.append(row)
                if not args.json:
                    print(f"{task} {mode:>4} batch {b:>4}: " + (row.get("error") or
                          f"{row['tokens_per_s']:>10,.0f} tok/s, peak {row['peak_memory_mb']:,.0f} MB ({row['memory_kind']})"))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
