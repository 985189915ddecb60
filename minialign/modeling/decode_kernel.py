"""Which attention kernel a static decoder's steps take on CUDA, and the Triton kernel checked on the decoder's GPU.

``StaticDecoder(attention="auto")`` takes ``ops.triton_decode`` wherever it can run (``choose_kernel``: Triton
installed, shapes and dtype it handles, an Ampere or later GPU), and a kernel that compiles but
computes wrong numbers would not raise: every answer after it would quietly be another model's. So before a decoder
first decodes with the kernel it runs one layer's step both ways on random inputs of its own shapes, dtype and rope
tables (rows at positions across the whole cache, so split and unsplit rows both occur) and keeps the kernel only if
the outputs and the cache stores agree. A few host syncs, each time the decoder allocates its cache.
"""

from __future__ import annotations

import torch

from minialign.modeling.decoder_model import (
    Dims,
    apply_rope,
    decode_attention,
    decode_layout,
    rope_table,
    round_up,
    write_cache,
)
from minialign.ops import triton_decode

ATTENTIONS = ("auto", "flash", "triton", "flex")


def choose_kernel(attention: str, dims: Dims, dtype: torch.dtype, device: torch.device) -> tuple[str, str | None]:
    """The kernel of ``StaticDecoder(attention=...)``'s steps, "flash" or "triton", and why an explicit "triton"
    cannot run (None otherwise: "auto" takes FlashAttention where the kernel cannot run as a matter of course). A
    CPU runs SDPA whatever is asked; "flex" is FlexAttention beside the flash layout."""
    if attention not in ("auto", "triton") or device.type != "cuda":
        return "flash", None
    capability = torch.cuda.get_device_capability(device)
    if triton_decode.available() and triton_decode.supports(dims.groups, dims.head_dim, dtype) and capability[0] >= 8:
        return "triton", None
    if attention == "auto":
        return "flash", None
    return "flash", (f"the triton kernel cannot run here (Triton installed: {triton_decode.available()}, "
                     f"{dims.groups} queries a key head, head dim {dims.head_dim}, {dtype}, compute capability "
                     f"{capability})")


ROWS = 8
SHARPEN = 4.0  # queries scaled up: attention rests on a few keys, so one key missed or misplaced moves the output


def kernel_disagrees(model: torch.nn.Module, dims: Dims, cos: torch.Tensor, sin: torch.Tensor,
                     tiling: triton_decode.Tiling) -> str | None:
    """``triton_disagrees`` at a decoder's cache length (its rope tables ``cos``/``sin`` ``[L, D]``) and at one long
    enough to share rows out among programs (a short cache never runs the merge); the first disagreement, or None."""
    length = cos.shape[0]
    split = round_up(2 * (tiling.chunk or length) + 1, 64)
    for n in sorted({length, split}):
        tables = (cos, sin) if n == length else rope_table(model, n, cos.dtype, cos.device)
        why = triton_disagrees(dims, *tables, tiling)
        if why is not None:
            return f"{why} (cache length {n})"
    return None


def triton_disagrees(dims: Dims, cos: torch.Tensor, sin: torch.Tensor, tiling: triton_decode.Tiling,
                     rows: int = ROWS) -> str | None:
    """None when ``triton_decode.append_attend`` (RoPE inside) gives the reference path's numbers for ``rows`` rows
    over a cache as long as the rope tables ``cos``/``sin`` ``[L, D]`` (positions across the whole cache); else what
    went wrong, including a check that could not run.

    The reference rotates q and the new key in float32 and rounds once, as the kernel does, so the cache stores must
    agree to one rounding step of the dtype; it attends in float32 over those same values, so the output must agree
    to the kernel's own rounding (its probabilities and output in the dtype), a few steps of the dtype's precision."""
    try:
        return _disagreement(dims, cos, sin, tiling, rows)
    except Exception as exc:  # noqa: BLE001 - whatever fails here, the decoder keeps FlashAttention
        return f"failed ({type(exc).__name__}: {exc})"


def _disagreement(dims: Dims, cos: torch.Tensor, sin: torch.Tensor, tiling: triton_decode.Tiling,
                  rows: int) -> str | None:
    device, dtype, length, d = cos.device, cos.dtype, cos.shape[0], dims.head_dim
    eps = torch.finfo(dtype).eps
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale: float = 1.0):
        return (scale * torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)).to(dtype)

    q = randn(rows, dims.heads, d, scale=SHARPEN)
    kv = randn(rows, 2 * dims.kv_heads * d)  # k and v as views of one buffer, as the decoder passes them
    k, v = (t.view(rows, dims.kv_heads, d) for t in kv.split(dims.kv_heads * d, -1))
    caches = [randn(rows, dims.kv_heads, length, d) for _ in range(2)]
    positions = torch.linspace(0, length - 1, rows, device=device).long()
    c, s = cos[positions][:, None].float(), sin[positions][:, None].float()
    q_rot, k_rot = apply_rope(q.float(), c, s).to(dtype), apply_rope(k.float(), c, s).to(dtype)
    want_k, want_v = caches[0].clone(), caches[1].clone()
    layout = decode_layout(positions, dims.kv_heads, dims.groups, length, False)
    write_cache(want_k, k_rot, layout.cache_index)
    write_cache(want_v, v.contiguous(), layout.cache_index)
    want = decode_attention(q_rot.float(), want_k.float(), want_v.float(), layout, d ** -0.5)
    got = triton_decode.append_attend(q, k, v, caches[0], caches[1], positions, d ** -0.5, (cos, sin), tiling)
    stores = max(((a.float() - b.float()).abs() - eps * b.float().abs()).max().item()
                 for a, b in ((caches[0], want_k), (caches[1], want_v)))
    output = (got.float() - want).abs().max().item()
    bound = 4 * eps * want_v.float().abs().max().item()
    if not stores <= 1e-6:  # NaN included
        return "stores keys or values that differ from the reference path's by more than one rounding step"
    if not output <= bound:
        return f"attends {output:.3g} away from the reference path (more than {bound:.3g})"
    return None
