"""Varlen attention on a GPU: FlashAttention-2 varlen (minialign.ops.attention) against two references.

    python benchmarks/checks/check_varlen.py [--out check_varlen.json]
    python benchmarks/checks/check_varlen.py --cpu-smoke     # no GPU: every piece on the CPU reference, short rows, float32

For padding-free SFT rows and shared-prompt DPO rows of random lengths (padded to a planned length, keys padded to
their fixed slot count), with grouped-query heads (9 query / 3 key-value, head dim 64, bf16):

* output and q/k/v gradients of the flash path against ``varlen_reference`` in float32 on the same inputs;
* the output against the dense document mask (``block_causal_mask`` from doc_ids/prefix_ids, through SDPA): the
  segment description is checked against the batch layout it came from, not against itself;
* one forward+backward captured as a CUDA graph and replayed on a second batch of the same shape with other
  segment boundaries, against the same batch run eagerly.

Then whole models of each architecture (``ARCHS``: Llama, Qwen2, Mistral, Gemma2, Phi3; random configs with
realistic head dims, sliding windows shorter than the sequences) in bf16: the per-token target log-probs of
padding-free SFT and shared-prompt DPO rows through TokenLogps' varlen path, against each sequence run alone through a
float32 copy of the model with eager attention (and, for scale, the bf16 padded batch against the same reference),
plus the relative gradient difference against the float32 padded batch. A model that cannot run varlen
(``blocks.fast_path_support``: Gemma2's attention soft-capping) is run the way training falls back, padded batches,
and its reason is recorded.

Prints and writes the max abs differences (float32 references, so they measure bf16 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # minialign need not be installed

import torch
import torch.nn.functional as F

from minialign.base.devices import to_device
from minialign.data import TokenizedExample, TokenizedPair, block_causal_mask, collate_pairs, collate_sft, pad_row
from minialign.modeling.blocks import fast_path_support
from minialign.modeling.models import BUILTIN_CONFIGS, load_model
from minialign.modeling.policy import TokenLogps, run_logps
from minialign.ops.attention import flash_varlen_available, kv_slots, varlen_attention, varlen_index, varlen_reference
from minialign.training.batches import prepare_batch

HEADS, KV_HEADS, DIM = 9, 3, 64


def layouts(rng: random.Random, length: int) -> dict[str, dict]:
    """Two batches of one row ``length`` for each layout (same shapes, other documents)."""
    def ids(n):
        return [rng.randrange(1, 1000) for _ in range(n)]

    out = {}
    top = min(200, length // 20)  # sequence lengths: 200 for the default 4096-token rows, shorter for --cpu-smoke
    for name in ("sft", "dpo-shared"):
        pair = []
        for _ in range(2):
            if name == "sft":
                batch = collate_sft([TokenizedExample(ids(rng.randint(20, top)), ids(rng.randint(5, top)))
                                     for _ in range(8)], pad_id=0, flat=True)
            else:
                batch = collate_pairs([TokenizedPair(ids(rng.randint(20, top)), ids(rng.randint(5, top * 3 // 5)),
                                                     ids(rng.randint(5, top * 3 // 5))) for _ in range(8)],
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
    # A sliding window (FlashAttention's window_size_left) against the reference's windowed mask, gradients included.
    window = 128 if length >= 4096 else 16
    flash_w = grads(lambda a, b, c: varlen_attention(a, b, c, varlen, scale, window), q, k, v, grad_out)

    def reference_w(a, b, c):
        flat = [x.float().transpose(1, 2).reshape(length, x.shape[1], DIM) for x in (a, b, c)]
        return varlen_reference(*flat, *varlen[:3], scale, window).view(1, length, HEADS, DIM)

    ref_w = grads(reference_w, q, k, v, grad_out.float())
    result[f"window{window}_out_vs_reference"] = (flash_w[0] - ref_w[0]).abs().max().item()
    result[f"window{window}_dq_dk_dv_vs_reference"] = [(a - b).abs().max().item()
                                                        for a, b in zip(flash_w[1:], ref_w[1:])]
    result[f"window{window}_changes_out_by"] = (flash_w[0] - flash[0]).abs().max().item()  # the window really bites
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


# Architectures, as their tiny built-ins scaled to realistic head dims (64; Gemma2 128), windows of 128 tokens.
# Weights drawn wider than an initialisation's (0.02) so that attention, windows and soft-caps move the log-probs.
ARCH_SIZES = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
                  initializer_range=0.1)
ARCHS = {
    "llama": ("tiny-llama", dict(ARCH_SIZES)),
    "qwen2": ("tiny-qwen2", dict(ARCH_SIZES, sliding_window=128)),
    "mistral": ("tiny-mistral", dict(ARCH_SIZES, head_dim=64, sliding_window=128)),
    "gemma2": ("tiny-gemma2", dict(ARCH_SIZES, head_dim=128, query_pre_attn_scalar=128, sliding_window=128)),
    "phi3": ("tiny-phi3", dict(ARCH_SIZES)),
}


def arch_model(name: str) -> torch.nn.Module:
    """The built-in ``ARCHS[name]`` config with realistic head dims, random weights, float32 on the CPU."""
    builtin, sizes = ARCHS[name]
    saved = BUILTIN_CONFIGS[builtin]
    BUILTIN_CONFIGS[builtin] = dict(saved, **sizes)
    try:
        return load_model(builtin, seed=0)
    finally:
        BUILTIN_CONFIGS[builtin] = saved


def arch_batches(rng: random.Random, scale: int) -> dict[str, tuple[dict, dict, list]]:
    """(flat batch, padded batch, [(ids, prompt length)] in batch row order) of an SFT and a shared-prompt DPO batch
    whose sequences reach past the windows (``scale`` bounds their lengths)."""
    def ids(n):
        return [rng.randrange(1, 1000) for _ in range(n)]

    examples = [TokenizedExample(ids(rng.randint(scale // 8, scale)), ids(rng.randint(scale // 8, scale)))
                for _ in range(4)]
    pairs = [TokenizedPair(ids(rng.randint(scale // 8, scale)), ids(rng.randint(4, scale)), ids(rng.randint(4, scale)))
             for _ in range(3)]
    sft_seqs = [(e.prompt_ids + e.response_ids, len(e.prompt_ids)) for e in examples]
    dpo_seqs = [(p.prompt_ids + getattr(p, side), len(p.prompt_ids)) for side in ("chosen_ids", "rejected_ids")
                for p in pairs]
    sft = collate_sft(examples, pad_id=0, flat=True)
    dpo = collate_pairs(pairs, pad_id=0, flat=True, share_prompt=True)
    return {
        "sft": (pad_row(sft, sft["input_ids"].shape[1] + 8), collate_sft(examples, pad_id=0), sft_seqs),
        "dpo-shared": (pad_row(dpo, dpo["input_ids"].shape[1] + 8), collate_pairs(pairs, pad_id=0), dpo_seqs),
    }


def per_sequence(logps: torch.Tensor, batch: dict, n: int) -> list[torch.Tensor]:
    """Target log-probs grouped by sequence, in order within each (targets are indexed in flat position order)."""
    real = batch["tgt_ids"] >= 0
    rows, values = batch["tgt_rows"][real].cpu(), logps[real].float().cpu()
    return [values[rows == i] for i in range(n)]


def reference_logps(model32: torch.nn.Module, seqs: list, dev) -> list[torch.Tensor]:
    """Each sequence alone through the float32 model with eager attention: its response tokens' log-probs."""
    ref = copy.deepcopy(model32).to(dev)
    ref.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for seq, n_prompt in seqs:
            logits = ref(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits[0].float()
            logps = torch.log_softmax(logits, -1)[torch.arange(max(n_prompt, 1) - 1, len(seq) - 1, device=dev)]
            out.append(logps.gather(1, torch.tensor(seq[max(n_prompt, 1):], device=dev)[:, None])[:, 0].cpu())
    return out


def logps_and_grads(model, batch: dict, dev, attention: str, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    policy = TokenLogps(model, attention=attention)
    model.zero_grad()
    batch = to_device(prepare_batch(batch, target_multiple=64, varlen=attention == "varlen"), dev)
    logps = run_logps(policy, batch)
    logps.float().sum().backward()
    return per_sequence(logps.detach(), batch, n), [p.grad.float().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b], "target counts differ"
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def check_architecture(name: str, dev, dtype: torch.dtype, scale: int) -> dict:
    """One architecture: the path training takes on ``dev`` for padding-free rows (varlen; padded batches if
    ``fast_path_support`` gives a reason) against the float32 eager reference, per token and in gradients."""
    model32 = arch_model(name)
    reason = fast_path_support(model32)
    config = model32.config
    result = {"dtype": str(dtype).removeprefix("torch."), "fallback": reason,
              "path": "padded (fallback)" if reason else "varlen", "window": getattr(config, "sliding_window", None),
              "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}
    model = copy.deepcopy(model32).to(dev, dtype)
    model32 = model32.to(dev)
    for layout, (flat, padded, seqs) in arch_batches(random.Random(1), scale).items():
        want = reference_logps(model32, seqs, dev)
        longest = max(len(s) for s, _ in seqs)
        ref_logps, ref_grads = logps_and_grads(model32, padded, dev, "sdpa", len(seqs))
        if reason:
            got, grads = logps_and_grads(model, padded, dev, "sdpa", len(seqs))
        else:
            got, grads = logps_and_grads(model, flat, dev, "varlen", len(seqs))
        pad_bf16, _ = logps_and_grads(model, padded, dev, "sdpa", len(seqs))
        rel = max(((g - r).norm() / r.norm().clamp(min=1e-12)).item() for g, r in zip(grads, ref_grads))
        result[layout] = {
            "longest_sequence": longest,
            "logps_max_abs_diff": max_diff(got, want),
            "padded_logps_max_abs_diff": max_diff(pad_bf16, want),  # the model's dtype on padded rows, for scale
            "logps_spread": max((w - w.mean()).abs().max().item() for w in want),  # how far from uniform they are
            "float32_padded_vs_eager": max_diff(ref_logps, want),
            "grad_max_rel_diff_vs_float32_padded": rel,
        }
    print(name, json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", help="cpu: run the references only (checks this script)")
    p.add_argument("--cpu-smoke", action="store_true", help="everything on the CPU (float32, short rows): checks this "
                   "script and the reference paths without a GPU")
    p.add_argument("--archs", default=",".join(ARCHS), help="architectures to check (comma-separated; '' for none)")
    args = p.parse_args()
    if args.cpu_smoke:
        args.device, args.length = "cpu", 512
    dev = torch.device(args.device)
    if dev.type == "cuda" and not flash_varlen_available(dev):
        raise SystemExit("needs a CUDA GPU with FlashAttention-2 (compute capability >= 8.0)")
    results = {name: check(name, batches, dev) for name, batches in layouts(random.Random(0), args.length).items()}
    dtype, scale = (torch.bfloat16, 400) if dev.type == "cuda" else (torch.float32, 160)
    results["architectures"] = {name: check_architecture(name, dev, dtype, scale)
                                for name in filter(None, args.archs.split(","))}
    results["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    results["torch"] = torch.__version__
    import transformers

    results["transformers"] = transformers.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
