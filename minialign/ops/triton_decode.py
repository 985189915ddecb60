"""A decode step's attention as one Triton kernel that also stores the step's new keys and values.

FlashAttention's forward tiles queries 128 rows at a time, and a decode step's sequence (one row, one key head) holds
G = H / Hk queries: at G = 3 nearly all of each tile is padding, and the kernel is bound by that wasted compute, not by
reading the cache (benchmarks/NOTES.md entry 29). Here one program serves one (row, key head): its G queries padded to
16 rows (``tl.dot``'s least), keys read once in 64-key tiles, an online softmax in float32, and the new key and value
both written into the cache and attended from registers, which saves the two cache-store kernels a layer. A long row's
keys are shared out among several programs and merged by a second kernel (``Tiling``), so the longest prompt of a
batch does not leave the GPU to one program.

Triton is imported only where it is installed (it ships with CUDA builds of torch); ``available()`` says whether the
kernel can run. On a CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed (CPU-only torch) or broken: the kernel is never launched
    triton = tl = None

MIN_ROWS = 16  # tl.dot's smallest M: a program's G queries are padded to this


@dataclass(frozen=True)
class Tiling:
    """How the kernel shares out a step: ``chunk`` cached keys a program (0: each row's keys in one program),
    ``block`` keys a tile, the launch's warps, and the tile loop's software-pipeline stages (0: a fixed trip count
    with tiles past a row's keys skipped, unpipelined; Triton's interpreter, the CPU tests', takes only that loop).

    Split rows (flash-decoding): a batch's prompts differ in length (13 to 835 tokens among 256 HH prompts), and one
    program walking the longest row's keys alone bounds the kernel while the others idle. With ``chunk`` set, each
    program takes at most ``chunk`` keys of one row and a second, small kernel merges a row's parts."""

    chunk: int = 256
    block: int = 64
    warps: int = 4
    stages: int = 2


TILING = Tiling()


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
    def _tile(q, k_cache_ptr, v_cache_ptr, base, tile, end, m, total, acc, scale, D: tl.constexpr,
              BLOCK: tl.constexpr):
        """The online softmax over one tile of cached keys (``tile`` .. ``tile + BLOCK``, those before ``end``)."""
        n, d = tile + tl.arange(0, BLOCK), tl.arange(0, D)
        cached = n < end
        k = tl.load(k_cache_ptr + base + n[:, None] * D + d[None, :], mask=cached[:, None], other=0.0)
        v = tl.load(v_cache_ptr + base + n[:, None] * D + d[None, :], mask=cached[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(cached[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        keep = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        return m_new, total * keep + tl.sum(p, axis=1), acc * keep[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)

    @triton.jit
    def _rotated(ptr, offsets, d, cos_ptr, sin_ptr, pos, mask, D: tl.constexpr):
        """Rows of head vectors at ``ptr + offsets`` (``[R]`` starts, ``d`` ``[D]``), rotated by RoPE at ``pos``:
        ``x * cos + rotate_half(x) * sin`` in float32, rounded once to the input's dtype."""
        x = tl.load(ptr + offsets[:, None] + d[None, :], mask=mask[:, None], other=0.0)
        half = (d + D // 2) % D  # each coordinate's partner in rotate_half, negated in the first half
        partner = tl.load(ptr + offsets[:, None] + half[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        return (x.to(tl.float32) * cos[None, :] + (sign * sin)[None, :] * partner).to(x.dtype)

    @triton.jit
    def _append_attend(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,
                       part_ptr, lse_ptr, scale, q_row, q_head, k_row, k_head, v_row, v_head, LENGTH: tl.constexpr,
                       HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr, SPLITS: tl.constexpr, STAGES: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)  # (row, key head); 64-bit offsets: a cache may pass 2^31 elements
        split = tl.program_id(1)
        row, head = seq // HK, seq % HK
        pos = tl.load(pos_ptr + row).to(tl.int64)  # the row's new token's position: the keys cached before it
        start = split * CHUNK
        if start <= pos:  # else the row's keys end before this program's share
            g, d = tl.arange(0, ROWS), tl.arange(0, D)
            real = g < G
            q_rows = (seq * G + g) * D  # in the output
            q = _rotated(q_ptr, row * q_row + (head * G + g) * q_head, d, cos_ptr, sin_ptr, pos, real, D)
            base = seq * LENGTH * D
            m = tl.full([ROWS], float("-inf"), tl.float32)
            total = tl.zeros([ROWS], tl.float32)
            acc = tl.zeros([ROWS, D], tl.float32)
            if pos < start + CHUNK:  # the share that ends with the new key stores it and starts from its registers
                one = tl.arange(0, 1)
                k_new = tl.sum(_rotated(k_new_ptr, row * k_row + head * k_head + one, d, cos_ptr, sin_ptr, pos,
                                        one < 1, D), axis=0)
                v_new = tl.load(v_new_ptr + row * v_row + head * v_head + d)
                tl.store(k_cache_ptr + base + pos * D + d, k_new)
                tl.store(v_cache_ptr + base + pos * D + d, v_new)
                m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
                total = tl.full([ROWS], 1.0, tl.float32)
                acc = tl.zeros([ROWS, D], tl.float32) + v_new.to(tl.float32)[None, :]
            end = tl.minimum(start + CHUNK, pos)
            if STAGES > 0:  # a loop over the share's own tiles, pipelined (its bounds are read on the GPU)
                for tile in tl.range(start, end, BLOCK, num_stages=STAGES):
                    m, total, acc = _tile(q, k_cache_ptr, v_cache_ptr, base, tile, end, m, total, acc, scale, D,
                                          BLOCK)
            else:  # a fixed trip count, tiles past the row's keys skipped (what Triton's interpreter runs)
                for i in range(CHUNK // BLOCK):
                    if start + i * BLOCK < end:
                        m, total, acc = _tile(q, k_cache_ptr, v_cache_ptr, base, start + i * BLOCK, end, m, total,
                                              acc, scale, D, BLOCK)
            if SPLITS == 1:
                tl.store(out_ptr + q_rows[:, None] + d[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty),
                         mask=real[:, None])
            else:  # this share's attention and its log-sum-exp, for _merge
                part = (seq * SPLITS + split) * G + g
                tl.store(part_ptr + part[:, None] * D + d[None, :], acc / total[:, None], mask=real[:, None])
                tl.store(lse_ptr + part, m + tl.log(total), mask=real)

    @triton.jit
    def _merge(part_ptr, lse_ptr, pos_ptr, out_ptr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + seq // HK).to(tl.int64)
        g, d = tl.arange(0, ROWS), tl.arange(0, D)
        real = g < G
        m = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        for split in range(SPLITS):
            if split * CHUNK <= pos:  # a share that held keys
                part = (seq * SPLITS + split) * G + g
                lse = tl.load(lse_ptr + part, mask=real, other=0.0)
                o = tl.load(part_ptr + part[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
                m_new = tl.maximum(m, lse)
                keep, weight = tl.exp(m - m_new), tl.exp(lse - m_new)
                total = total * keep + weight
                acc = acc * keep[:, None] + weight[:, None] * o
                m = m_new
        out = acc / total[:, None]
        tl.store(out_ptr + (seq * G + g)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=real[:, None])


def append_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, positions: torch.Tensor, scale: float, rope: tuple[torch.Tensor, torch.Tensor],
                  tiling: Tiling = TILING) -> torch.Tensor:
    """Store ``k_new``/``v_new`` ``[B, Hk, D]`` at ``positions`` ``[B]`` of one layer's caches ``[B, Hk, L, D]``
    (contiguous) and return each row's attention over its keys up to and including the new one: ``q`` ``[B, H, D]``
    -> ``[B, H, D]``. The same numbers as ``decoder_model.apply_rope`` on q and k, ``write_cache`` twice, then
    ``decoder_model.decode_attention``.

    ``rope``: the cos and sin tables ``[positions, D]``: ``q`` and ``k_new`` arrive unrotated and the kernel rotates
    them at each row's position, which saves a step the RoPE kernels and the copies that lay q, k and v out. q, k and v
    may be views into one QKV output (any row and head strides)."""
    b, heads, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    groups, seqs = heads // kv_heads, b * kv_heads
    chunk = triton.cdiv(min(tiling.chunk or length, length), tiling.block) * tiling.block
    splits = triton.cdiv(length, chunk)
    q, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new))
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    part = torch.empty(seqs * splits * groups, d, dtype=torch.float32, device=q.device) if splits > 1 else out
    lse = torch.empty(seqs * splits * groups, dtype=torch.float32, device=q.device) if splits > 1 else out
    cos, sin = rope
    _append_attend[(seqs, splits)](q, k_new, v_new, k_cache, v_cache, positions, cos, sin, out, part, lse, scale,
                                   *q.stride()[:2], *k_new.stride()[:2], *v_new.stride()[:2], LENGTH=length,
                                   HK=kv_heads, G=groups, D=d, ROWS=MIN_ROWS, BLOCK=tiling.block, CHUNK=chunk,
                                   SPLITS=splits, STAGES=tiling.stages, num_warps=tiling.warps)
    if splits > 1:
        _merge[(seqs,)](part, lse, positions, out, HK=kv_heads, G=groups, D=d, ROWS=triton.next_power_of_2(groups),
                        CHUNK=chunk, SPLITS=splits)
    return out

