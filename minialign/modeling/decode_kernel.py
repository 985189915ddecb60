"""Which attention kernel a static decoder's steps take on CUDA, and the Triton kernel checked on the decoder's GPU.

``StaticDecoder(attention="auto")`` takes ``ops.triton_decode`` wherever it can run (``choose_kernel``: Triton
installed, shapes and dtype it handles, an Ampere or later GPU), and a kernel that compiles but
computes wrong numbers would not raise: every answer after it would quietly be another model's. So before a decoder
first decodes with the kernel it runs one layer's step both ways on random inputs of its own shapes, dtype and rope
tables (rows at positions across the whole cache, so split and unsplit rows both occur) and keeps the kernel only if
the outputs and the cache stores agree. One host sync, once per decoder.
"""

from __future__ import annotations

import torch

from minialign.modeling.decoder_model import Dims, apply_rope, decode_attention, decode_layout, flash_ok, write_cache
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


TOLERANCE = 0.02  # bf16 outputs of the two paths differ by ~0.004 on an H100 (benchmarks/NOTES.md entry 31)
ROWS = 8


def triton_disagrees(dims: Dims, cos: torch.Tensor, sin: torch.Tensor, tiling: triton_decode.Tiling,
                     rows: int = ROWS) -> str | None:
    """None when ``triton_decode.append_attend`` (RoPE inside) gives the reference path's numbers (RoPE, the two
    cache stores, ``decode_attention``) for ``rows`` rows over a cache as long as the rope tables ``cos``/``sin``
    ``[L, D]``; else what went wrong."""
    device, dtype, length, d = cos.device, cos.dtype, cos.shape[0], dims.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    qkv = randn(rows, (dims.heads + 2 * dims.kv_heads) * d)
    q, k, v = (t.view(rows, -1, d) for t in qkv.split([dims.heads * d, dims.kv_heads * d, dims.kv_heads * d], -1))
    caches = [randn(rows, dims.kv_heads, length, d) for _ in range(2)]
    positions = torch.linspace(0, length - 1, rows, device=device).long()
    c, s = cos[positions][:, None], sin[positions][:, None]
    want_k, want_v = caches[0].clone(), caches[1].clone()
    layout = decode_layout(positions, dims.kv_heads, dims.groups, length, flash_ok(dtype, device))
    write_cache(want_k, apply_rope(k, c, s), layout.cache_index)
    write_cache(want_v, v.contiguous(), layout.cache_index)
    want = decode_attention(apply_rope(q, c, s), want_k, want_v, layout, d ** -0.5)
    try:
        got = triton_decode.append_attend(q, k, v, caches[0], caches[1], positions, d ** -0.5, tiling, (cos, sin))
    except Exception as exc:  # noqa: BLE001 - whatever the kernel raises, the decoder keeps FlashAttention
        return f"failed ({type(exc).__name__}: {exc})"
    errors = [(a.float() - b.float()).abs().max() for a, b in ((got, want), (caches[0], want_k), (caches[1], want_v))]
    worst = torch.stack(errors).max().item()
    if not worst <= TOLERANCE:  # NaN included
        return f"differs from the reference path by {worst:.3g} (more than {TOLERANCE})"
    return None
