"""Varlen attention on a GPU: FlashAttention-2 varlen (minialign.attention) against two references.

    python benchmarks/check_varlen.py [--out check_varlen.json]

For padding-free SFT rows and shared-prompt DPO rows of random lengths (padded to a planned length, keys padded to
their fixed slot count), with grouped-query heads (9 query / 3 key-value, head dim 64, bf16):

* output and q/k/v gradients of the flash path against ``varlen_reference`` in float32 on the same inputs;
* the output against the dense document mask (``block_causal_mask`` from doc_ids/prefix_ids, through SDPA): the
  segment description is checked against the batch layout it came from, not against itself;
* one forward+backward captured as a CUDA graph and replayed on a second batch of the same shape with other
  segment boundaries, against the same batch run eagerly.

Prints and writes the max abs differences (float32 references, so they measure bf16 rounding).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # minialign need not be installed

import torch
import torch.nn.functional as F

from minialign.attention import flash_varlen_available, kv_slots, varlen_attention, varlen_index, varlen_reference
from minialign.data import TokenizedExample, TokenizedPair, block_causal_mask, collate_pairs, collate_sft, pad_row

HEADS, KV_HEADS, DIM = 9, 3, 64


def layouts(rng: random.Random, length: int) -> dict[str, dict]:
    """Two batches of one row ``length`` for each layout (same shapes, other documents)."""
    def ids(n):
        return [rng.randrange(1, 1000) for _ in range(n)]

    out = {}
    for name in ("sft", "dpo-shared"):
        pair = []
        for _ in range(2):
            if name == "sft":
                batch = collate_sft([TokenizedExample(ids(rng.randint(20, 200)), ids(rng.randint(5, 200)))
                                     for _ in range(8)], pad_id=0, flat=True)
            else:
                batch = collate_pairs([TokenizedPair(ids(rng.randint(20, 200)), ids(rng.randint(5, 120)),
                                                     ids(rng.randint(5, 120))) for _ in range(8)],
                                      pad_id=0, flat=True, share_prompt=True)
            pair.append(pad_row(batch, length))
        out[name] = pair
    return out


def qkv(length: int, dev, seed: int):
    g = torch.Generator(device=dev).manual_seed(seed)
    make = lambda h: torch.randn(1, h, length, DIM, device=dev, generator=g, dtype=torch.bfloat16)  # noqa: E731
    return make(HEADS), make(KV_HEADS), make(KV_HEADS)


def described(batch: dict, dev, max_seqlen: int) -> tuple:
    kv = kv_slots(batch["input_ids"].shape[1]) if "prefix_ids" in batch else None
    meta = varlen_index(batch["doc_ids"], batch.get("prefix_ids"), kv_length=kv, max_seqlen=max_seqlen)
    kv_index = meta.get("kv_index")
    return (meta["cu_seqlens_q"].to(dev), meta["cu_seqlens_k"].to(dev), None if kv_index is None else kv_index.to(dev),
            meta["max_seqlen"])


def grads(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()


def check(name: str, batches: list[dict], dev) -> dict:
    length = batches[0]["input_ids"].shape[1]
    scale = DIM ** -0.5
    q, k, v = qkv(length, dev, 0)
    grad_out = torch.randn(1, length, HEADS, DIM, device=dev, dtype=torch.bfloat16)
    varlen = described(batches[0], dev, length)
    flash = grads(lambda a, b, c: varlen_attention(a, b, c, varlen, scale), q, k, v, grad_out)

    def reference(a, b, c):
        flat = [x.float().transpose(1, 2).reshape(length, x.shape[1], DIM) for x in (a, b, c)]
        return varlen_reference(*flat, *varlen[:3], scale).view(1, length, HEADS, DIM)

    ref = grads(reference, q, k, v, grad_out.float())
    prefix = batches[0].get("prefix_ids")
    mask = block_causal_mask(batches[0]["doc_ids"].to(dev), None if prefix is None else prefix.to(dev))
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                           enable_gqa=True).transpose(1, 2)
    real = (batches[0]["doc_ids"][0] >= 0).to(dev)
    result = {
        "out_vs_reference": (flash[0] - ref[0]).abs().max().item(),
        "dq_dk_dv_vs_reference": [(a - b).abs().max().item() for a, b in zip(flash[1:], ref[1:])],
        "grad_scale": [b.abs().max().item() for b in ref[1:]],
        "out_vs_dense_document_mask": (flash[0] - dense)[0][real].abs().max().item(),
    }
    if dev.type != "cuda":  # a CPU run checks the script and the reference only
        print(name, json.dumps(result))
        return result
    # One step captured, replayed on the second batch (same shapes, other boundaries).
    static = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    meta = [t.clone() if torch.is_tensor(t) else t for t in varlen]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        varlen_attention(*static, tuple(meta), scale).backward(grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in static:
        x.grad = None
    with torch.cuda.graph(graph):
        out = varlen_attention(*static, tuple(meta), scale)
        out.backward(grad_out)
    second = described(batches[1], dev, length)
    for dst, src in zip(meta, second):
        if torch.is_tensor(dst):
            dst.copy_(src)
    q2, k2, v2 = qkv(length, dev, 1)
    for dst, src in zip(static, (q2, k2, v2)):
        dst.detach().copy_(src)
    graph.replay()
    eager = grads(lambda a, b, c: varlen_attention(a, b, c, second, scale), q2, k2, v2, grad_out)
    result["graph_replay_vs_eager"] = max((out.float() - eager[0]).abs().max().item(),
                                          *[(s.grad.float() - e).abs().max().item() for s, e in zip(static, eager[1:])])
    print(name, json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", help="cpu: run the references only (checks this script)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not flash_varlen_available(dev):
        raise SystemExit("needs a CUDA GPU with FlashAttention-2 (compute capability >= 8.0)")
    results = {name: check(name, batches, dev) for name, batches in layouts(random.Random(0), args.length).items()}
    results["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    results["torch"] = torch.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
