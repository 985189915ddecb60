"""Packed SFT rows on a GPU: FlexAttention document mask vs the dense block mask vs each document alone.

    python benchmarks/checks/check_flex.py [--model pythia-70m] [--rows 8] [--length 2048] [--steps 10] [--compile]

Prints the max abs difference of per-token log-probs (float32) and of LoRA gradients, flex and dense against the
documents run alone; that building the BlockMask makes no host sync; and ms per forward+backward step (bf16
autocast, as training on CUDA runs it) for flex, dense and unpacked (one padded row per document). Nothing is written.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # minialign need not be installed

import torch

from minialign.base.devices import to_device
from minialign.data import TokenizedExample, collate_packed, collate_sft, pack_sft
from minialign.modeling import lora
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps, document_block_mask, run_logps
from minialign.training.batches import add_target_index


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="pythia-70m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="compile model.base_model, as --compile does")
    args = p.parse_args()
    dev = torch.device("cuda")
    model = load_model(args.model).to(dev)
    vocab, rng = model.config.vocab_size, random.Random(0)
    docs = [TokenizedExample([rng.randrange(1, vocab) for _ in range(rng.randint(8, 64))],
                             [rng.randrange(1, vocab) for _ in range(rng.randint(16, args.length // 4))])
            for _ in range(args.rows * args.length // 100)]
    rows = pack_sft(docs, args.length)[: args.rows]
    packed = to_device(add_target_index(collate_packed(docs, rows, row_length=args.length, pad_id=0)), dev)
    order = [i for row in rows for i in row]
    alone = [to_device(add_target_index(collate_sft([docs[i]], pad_id=0)), dev) for i in order]
    unpacked = to_device(add_target_index(collate_sft([docs[i] for i in order], pad_id=0)), dev)
    print(f"{args.model}: {len(order)} documents in {len(rows)} rows of {args.length}; "
          f"{packed['n_targets']} targets")

    lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16))
    with torch.no_grad():  # B = 0 at start: give the adapters values so that every one has a gradient
        for q in model.parameters():
            if q.requires_grad and not q.any():
                q.normal_(0, 0.02)
    if args.compile:
        model.base_model.compile()
    flex, dense = TokenLogps(model, attention="flex"), TokenLogps(model, attention="sdpa")

    def logps_and_grads(policy, batches):
        model.zero_grad(set_to_none=True)
        out = []
        for b in batches:
            lp = run_logps(policy, b)
            lp.sum().backward()
            out.append(lp.detach())
        return torch.cat(out), [q.grad.clone() for q in model.parameters() if q.requires_grad]

    ref_lp, ref_g = logps_and_grads(dense, alone)
    for name, policy in (("flex", flex), ("dense", dense)):
        lp, g = logps_and_grads(policy, [packed])
        gdiff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(g, ref_g))
        print(f"float32 {name:5s} vs alone: max |d logp| {(lp - ref_lp).abs().max().item():.2e}, "
              f"max relative |d grad| {gdiff:.2e}")

    document_block_mask(packed["doc_ids"])  # compile and warm up, then check that it never syncs with the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        document_block_mask(packed["doc_ids"])
        print("BlockMask build: no host sync")
    except RuntimeError as exc:
        print(f"BlockMask build SYNCS with the host: {exc}")
    torch.cuda.set_sync_debug_mode(0)

    def step_ms(policy, batch) -> float:
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                run_logps(policy, batch).sum().backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3 / args.steps

    for name, policy, batch in (("flex", flex, packed), ("dense", dense, packed), ("unpacked", dense, unpacked)):
        torch.cuda.reset_peak_memory_stats()
        ms = step_ms(policy, batch)
        shape = "x".join(map(str, batch["input_ids"].shape))
        print(f"bf16 {name:8s} [{shape}]: {ms:7.2f} ms/step, peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
