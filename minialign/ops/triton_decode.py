"""A decode step's attention as one Triton kernel that also stores the step's new keys and values.

FlashAttention's forward tiles queries 128 rows at a time, and a decode step's sequence (one row, one key head) holds
G = H / Hk queries: at G = 3 nearly all of each tile is padding, and the kernel is bound by that wasted compute, not by
reading the cache (benchmarks/NOTES.md entry 29). Here one program serves one (row, key head): its G queries padded to
16 rows (``tl.dot``'s least), keys read once in 64-key tiles, an online softmax in float32, and the new key and value
both written into the cache and attended from registers, which saves the two cache-store kernels a layer.

Triton is imported only where it is installed (it ships with CUDA builds of torch); ``available()`` says whether the
kernel can run. On a CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed (CPU-only torch) or broken: the kernel is never launched
    triton = tl = None

BLOCK_N = 64  # keys a tile
MIN_ROWS = 16  # tl.dot's smallest M: a program's G queries are padded to this


def available() -> bool:
    return triton is not None


def supports(groups: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """What the kernel handles: a power-of-two head dim of at least 16 (``tl.arange``, ``tl.dot``), at most
    ``MIN_ROWS`` queries a key head, and 16-bit weights (``tl.dot`` on float32 would round through TF32, where the
    float32 decoder promises transformers' exact tokens)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and 1 <= groups <= MIN_ROWS
            and dtype in (torch.bfloat16, torch.float16))


if triton is not None:

    @triton.jit
    def _append_attend(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, scale,
                       LENGTH: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, TILES: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)  # (row, key head); 64-bit offsets: a cache may pass 2^31 elements
        row, head = seq // HK, seq % HK
        pos = tl.load(pos_ptr + row)  # the new token's position: the keys cached before it
        g, d = tl.arange(0, ROWS), tl.arange(0, D)
        real = g < G
        q_rows = (row * HK * G + head * G + g) * D
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=real[:, None], other=0.0)
        k_new = tl.load(k_new_ptr + seq * D + d)
        v_new = tl.load(v_new_ptr + seq * D + d)
        base = seq * LENGTH * D
        tl.store(k_cache_ptr + base + pos * D + d, k_new)
        tl.store(v_cache_ptr + base + pos * D + d, v_new)
        # the new key first (from registers): the running max, the softmax sum and the weighted values start there
        m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
        total = tl.full([ROWS], 1.0, tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32) + v_new.to(tl.float32)[None, :]
        # a fixed trip count (the cache length is fixed per recorded step), tiles past the row's keys skipped
        for tile in range(TILES):
            if tile * BLOCK < pos:
                n = tile * BLOCK + tl.arange(0, BLOCK)
                cached = n < pos
                k = tl.load(k_cache_ptr + base + n[:, None] * D + d[None, :], mask=cached[:, None], other=0.0)
                v = tl.load(v_cache_ptr + base + n[:, None] * D + d[None, :], mask=cached[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
                s = tl.where(cached[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                keep = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                total = total * keep + tl.sum(p, axis=1)
                acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
                m = m_new
        out = acc / total[:, None]
        tl.store(out_ptr + q_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def append_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Store ``k_new``/``v_new`` ``[B, Hk, D]`` at ``positions`` ``[B]`` of one layer's caches ``[B, Hk, L, D]``
    (contiguous) and return each row's attention over its keys up to and including the new one: ``q`` ``[B, H, D]``
    -> ``[B, H, D]``. The same numbers as ``write_cache`` twice then ``decoder_model.decode_attention``."""
    b, heads, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    out = torch.empty_like(q)
    _append_attend[(b * kv_heads,)](q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_cache, v_cache,
                                    positions, out, scale, LENGTH=length, HK=kv_heads, G=groups, D=d, ROWS=MIN_ROWS,
                                    BLOCK=BLOCK_N, TILES=triton.cdiv(length, BLOCK_N))
    return out
