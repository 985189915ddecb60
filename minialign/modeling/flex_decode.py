"""Decode attention as one split-KV kernel, from FlexAttention's decoding template (issue 31; an experiment).

``decoder_model.decode_attention`` calls FlashAttention-2's varlen forward, which gives each (row, key head) a
128-row query tile for the G = H / Hk queries that share the key head (3 for SmolLM2-135M) and exponentiates every
row of it: at batch 256 that is 33 us a layer on an H200, where reading the used keys and values once takes ~16 us
(``benchmarks/NOTES.md`` entry 24). Compiled for one query per row, FlexAttention picks its decoding kernel instead,
which packs the G queries into a small tile and splits each row's keys over several thread blocks. Off by default
(``StaticDecoder(attention="flex")``, ``bench_decode.py --decoders static-flex``) until a GPU run shows it faster
with the same answers; on a CPU it runs FlexAttention's eager reference, which the tests compare with SDPA.
"""

from __future__ import annotations

import warnings

import torch

from minialign.base.errors import UserError
from minialign.modeling.compiled import compile_fixed

KV_BLOCK = 128  # keys per block of the mask; the decoding kernel's own key tile divides it


def decode_blocks(used: torch.Tensor, length: int, block: int = KV_BLOCK) -> tuple[torch.Tensor, ...]:
    """What every layer's mask in one decode step shares, built once a step: ``used`` ``[B]`` (keys each row's query
    sees), how many key blocks each row visits ``[B, 1, 1]`` and their order ``[B, 1, 1, blocks]`` (int32). Device
    tensors, no host sync: recorded in the step's CUDA graph."""
    rows, blocks = used.shape[0], -(-length // block)
    visited = torch.div(used + (block - 1), block, rounding_mode="floor").to(torch.int32).view(rows, 1, 1)
    order = torch.arange(blocks, device=used.device, dtype=torch.int32).view(1, 1, 1, blocks).repeat(rows, 1, 1, 1)
    return used, visited, order


def decode_block_mask(used: torch.Tensor, visited: torch.Tensor, order: torch.Tensor, length: int,
                      block: int = KV_BLOCK):
    """The mask of one decode step (``decode_blocks``'s tensors): row b's single query sees its first ``used[b]`` of
    ``length`` cached keys, visiting only the blocks that hold them and masking the tail of the last one. Made in
    each layer's compiled call, where it only wraps the tensors: made outside, its ``mask_mod`` would be a new
    closure each step, which a compiled call would not reuse."""
    from torch.nn.attention.flex_attention import BlockMask

    def sees(b, h, q_idx, kv_idx):
        return kv_idx < used[b]

    return BlockMask.from_kv_blocks(visited, order, BLOCK_SIZE=(128, block), mask_mod=sees, seq_lengths=(1, length),
                                    compute_q_blocks=False)


def flex_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor,
                          visited: torch.Tensor, order: torch.Tensor, scale: float) -> torch.Tensor:
    """One new query per row over its first ``used`` cached keys: ``q`` ``[B, H, D]``, caches ``[B, Hk, L, D]``,
    ``used, visited, order`` from ``decode_blocks`` -> ``[B, H, D]``; the same numbers as ``decode_attention``
    (query head h reads key head h // (H / Hk))."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = decode_block_mask(used, visited, order, k_cache.shape[2])
    out = flex_attention(q[:, :, None], k_cache, v_cache, block_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def flex_decode(device: torch.device):
    """The decode attention to call on ``device``: compiled on CUDA, the eager reference elsewhere (quietly: its
    warning says it is slow, which a CPU test run knows)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        BlockMask = None
    if BlockMask is None or not hasattr(BlockMask, "from_kv_blocks"):
        raise UserError(f"attention='flex' needs FlexAttention's BlockMask.from_kv_blocks, which torch "
                        f"{torch.__version__} lacks; upgrade torch or use attention='flash'.")
    if device.type == "cuda":
        return compile_fixed(flex_decode_attention)  # uncompiled, FlexAttention is a slow reference

    def eager(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_decode_attention(*args)

    return eager
