"""Variable-length ("varlen") attention over padding-free rows: any sequence lengths, no recompilation.

A padding-free batch is one row of sequences back to back. FlexAttention masks it with a block mask, but its kernel
and its mask are compiled for one row length: a real epoch, whose batches all differ in length, compiled again and
again (issue 19). The varlen form describes the row instead by segment boundaries, ``cu_seqlens`` (cumulative
lengths, as FlashAttention's varlen kernels take them), which are data, not shapes: one kernel serves every batch.

Segments, in row order, are every run of one document within a row (padding, doc -1, included). Query segment s
reads key segment s, causally, aligned on their *ends*: query i of a segment of length ``lq`` whose keys number
``lk >= lq`` sees keys ``0 .. i + lk - lq``. Equal lengths give plain causal attention; a response branch of a
shared-prompt DPO batch (see ``data.batching._collate_shared``) gets its pair's prompt gathered in front of its own
keys (``kv_index``), so it attends exactly as in ``prompt + response`` while the prompt is computed once.

``varlen_index`` builds this description on the host from ``doc_ids`` / ``prefix_ids``. ``varlen_attention`` runs it:
on CUDA through PyTorch's FlashAttention-2 varlen kernels (``aten._flash_attention_forward/backward``), elsewhere
through ``varlen_reference``, SDPA with the dense mask the same description implies (CPU tests, checks).

Sliding-window layers (Mistral, Qwen2, Gemma2: a query sees only keys fewer than ``window`` positions back) keep
their window on every path here: FlashAttention's own ``window_size_left``, the same bound in the dense reference,
and, for document masks handed to SDPA, a bound on ``position_ids`` distances (``POSITIONS_KWARG``). Attention
logit soft-capping has no such path; ``blocks.fast_path_support`` keeps those models on padded batches.

Below the kernels, the attention implementation (``FLEX_DOCUMENTS``) that routes a transformers model to them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from minialign.base.errors import UserError


def varlen_index(doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None, *, kv_length: int | None = None,
                 max_seqlen: int | None = None) -> dict:
    """Host-side segment description of packed / padding-free rows ``doc_ids`` ``[R, L]``.

    Returns ``cu_seqlens_q`` and ``cu_seqlens_k`` (int32 ``[S + 1]``), ``max_seqlen`` (int: the longest query or key
    segment, or the given bound) and, when some segment reads a prefix document, ``kv_index`` (long ``[Tk]``: the
    flat token each key slot gathers; padded with 0 to ``kv_length`` so shapes depend on the row alone; slots past
    ``cu_seqlens_k[-1]`` belong to no segment and are never read).
    """
    rows, length = doc_ids.shape
    flat = doc_ids.flatten()
    n = flat.numel()
    t = torch.arange(n)
    starts_mask = (t % length == 0) | (flat != torch.roll(flat, 1))
    starts = torch.nonzero(starts_mask).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([n])])
    q_lengths = (ends - starts).tolist()
    cu_q = torch.zeros(len(q_lengths) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(torch.tensor(q_lengths), 0)
    out = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_q}
    longest = max(q_lengths)
    prefix = None if prefix_ids is None else prefix_ids.flatten()[starts].tolist()
    docs = flat[starts].tolist()
    if prefix is not None and any(p >= 0 and p != d for p, d in zip(prefix, docs)):
        row_of = (starts // length).tolist()
        where = {(r, d): (s, e) for r, d, s, e in zip(row_of, docs, starts.tolist(), ends.tolist())}
        pieces, k_lengths = [], []
        for r, d, p, s, e in zip(row_of, docs, prefix, starts.tolist(), ends.tolist()):
            own = torch.arange(s, e)
            if p >= 0 and p != d:
                if (r, p) not in where:
                    raise ValueError(f"segment of document {d} reads document {p}, which is not in its row")
                ps, pe = where[r, p]
                own = torch.cat([torch.arange(ps, pe), own])
            pieces.append(own)
            k_lengths.append(len(own))
        kv_index = torch.cat(pieces)
        if kv_length is not None:
            if kv_length < len(kv_index):
                raise ValueError(f"kv_length {kv_length} < {len(kv_index)} key slots")
            kv_index = torch.cat([kv_index, torch.zeros(kv_length - len(kv_index), dtype=torch.long)])
        cu_k = torch.zeros_like(cu_q)
        cu_k[1:] = torch.cumsum(torch.tensor(k_lengths), 0)
        out.update(cu_seqlens_k=cu_k, kv_index=kv_index)
        longest = max(longest, max(k_lengths))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen {max_seqlen} < the longest segment ({longest})")
    out["max_seqlen"] = longest if max_seqlen is None else max_seqlen
    return out


def kv_slots(length: int) -> int:
    """Key slots a shared-prompt row of ``length`` tokens can need: prompt (p) + branches (b) read p + 2(p + b) <= 3L."""
    return 3 * length


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     kv_index: torch.Tensor | None, scale: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """``[Tq, H, D]`` attention of ``q`` over ``k``/``v`` ``[T, Hk, D]`` as the segments say, through SDPA and a dense
    ``[Tq, Tk]`` mask: the definition the FlashAttention path is checked against, and what runs without CUDA.
    ``window``: a query sees only keys fewer than ``window`` positions back (transformers' sliding window)."""
    if kv_index is not None:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    tq, tk = q.shape[0], k.shape[0]
    cu_q, cu_k = cu_q.long(), cu_k.long()
    seg_q = torch.searchsorted(cu_q[1:], torch.arange(tq, device=q.device), right=True)
    seg_k = torch.searchsorted(cu_k[1:], torch.arange(tk, device=q.device), right=True)
    segments = len(cu_q) - 1
    # Positions counted back from each segment's end: key j is visible to query i iff it is not further from the end.
    from_end_q = torch.arange(tq, device=q.device) - cu_q[1:][seg_q.clamp(max=segments - 1)]
    from_end_k = torch.arange(tk, device=q.device) - cu_k[1:][seg_k.clamp(max=segments - 1)]
    back = from_end_q[:, None] - from_end_k[None, :]  # how far key j lies behind query i in their sequence
    mask = (seg_q[:, None] == seg_k[None, :]) & (back >= 0)
    if window is not None:
        mask &= back < window
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention-2 varlen, causal, ends aligned. Keys are gathered through ``kv_index`` inside, so the gathered
    copy is not kept for backward (it is gathered again there) and its gradient is scattered back onto ``k``/``v``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, kv_index, max_seqlen: int, scale: float | None, window: int | None):
        kg, vg = _gather(k, v, kv_index)
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, kg, vg, cu_q, cu_k, max_seqlen, max_seqlen, 0.0, True, False, scale=scale, **_window_sizes(window))
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, kv_index, rng, unused)
        ctx.max_seqlen, ctx.scale, ctx.window = max_seqlen, scale, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k, kv_index, rng, unused = ctx.saved_tensors
        kg, vg = _gather(k, v, kv_index)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, kg, vg, out, lse, cu_q, cu_k, ctx.max_seqlen, ctx.max_seqlen, 0.0, True, rng,
            unused, scale=ctx.scale, **_window_sizes(ctx.window))
        if kv_index is not None:
            # Slots past the last segment are never written by the kernel: zero them before scattering back.
            unused_slot = torch.arange(len(kv_index), device=kv_index.device) >= cu_k[-1]
            dk = torch.zeros_like(k).index_add_(0, kv_index, dk.masked_fill(unused_slot[:, None, None], 0))
            dv = torch.zeros_like(v).index_add_(0, kv_index, dv.masked_fill(unused_slot[:, None, None], 0))
        return dq, dk, dv, None, None, None, None, None, None


def _window_sizes(window: int | None) -> dict:
    """FlashAttention's window counts keys back from the query, itself excluded (ends-aligned, as our segments are)."""
    return {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}


def _gather(k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_index is None:
        return k, v
    return k.index_select(0, kv_index), v.index_select(0, kv_index)


def flash_varlen_available(device: torch.device) -> bool:
    """FlashAttention-2 varlen needs CUDA (compute capability >= 8.0) and PyTorch's flash kernels."""
    return (device.type == "cuda" and torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, varlen: tuple,
                     scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of rows ``[R, H, L, D]`` (keys/values ``[R, Hk, L, D]``) described by ``varlen`` = (cu_seqlens_q,
    cu_seqlens_k, kv_index, max_seqlen) -> ``[R, L, H, D]``, the layout transformers' attention functions return;
    ``window``: a sliding-window layer's window (see ``varlen_reference``)."""
    cu_q, cu_k, kv_index, max_seqlen = varlen
    rows, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * length, x.shape[1], dim) for x in (query, key, value))
    if q.is_cuda and flash_varlen_available(q.device):
        if torch.is_autocast_enabled("cuda"):  # rotary embeddings may have promoted them to float32
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = _FlashVarlen.apply(q, k, v, cu_q, cu_k, kv_index, max_seqlen, scale, window)
    else:
        out = varlen_reference(q, k, v, cu_q, cu_k, kv_index, scale, window)
    return out.view(rows, length, heads, dim)


# ----------------------------------------------------------------------------- FlexAttention for packed rows

# A model switched to this attention implementation runs SDPA exactly as before for every mask transformers builds
# or is given as a tensor, FlexAttention when it is given a ``BlockMask`` (packed rows: see
# ``policy.document_block_mask``), and varlen attention when the forward is given segment boundaries as the keyword
# ``VARLEN_KWARG`` (``attention.varlen_attention``; transformers hands unknown keywords down to the attention
# function). One model thus serves packed training batches and unpacked eval batches.
FLEX_DOCUMENTS = "sdpa+flex_documents"
VARLEN_KWARG = "minialign_varlen"
# ``position_ids`` beside a dense document mask, so that sliding-window layers can bound it (``window_mask``).
POSITIONS_KWARG = "minialign_positions"


@functools.cache
def _compiled_flex_attention():
    """Compiled once per process: the fused, block-sparse kernel (eager FlexAttention is a reference path)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, scale):
    """FlexAttention [B, H, L, D] -> [B, H, L, D]: compiled (fused, block-sparse) on CUDA unless already inside a
    compiled region; eager elsewhere (an unfused math path that materialises the scores: for CPU checks only)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if query.device.type == "cuda" and not torch.compiler.is_compiling():
        fn = _compiled_flex_attention()
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


def _sdpa_or_flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    varlen = kwargs.pop(VARLEN_KWARG, None)
    positions = kwargs.pop(POSITIONS_KWARG, None)
    window = kwargs.pop("sliding_window", None)  # this layer's window; transformers' own masks already hold it
    if kwargs.get("softcap") is not None and (varlen is not None or positions is not None):
        raise UserError(f"{type(module).__name__} soft-caps its attention logits, which padding-free and packed "
                        "attention cannot; train it without --padding-free / --packing (see blocks.fast_path_support).")
    if varlen is not None:
        if dropout > 0:
            raise UserError("Padding-free attention has no attention dropout; set the model's attention dropout to 0.")
        return varlen_attention(query, key, value, varlen, scaling, window), None
    if not isinstance(attention_mask, BlockMask):
        if positions is not None and window is not None:  # a document mask from minialign: bound it here
            attention_mask = attention_mask & window_mask(positions, window)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if window is not None:
        raise UserError(f"FlexAttention (--attention flex) does not apply {type(module).__name__}'s sliding window of "
                        f"{window} tokens; use --attention varlen or sdpa.")
    if dropout > 0:
        raise UserError("FlexAttention (packed rows) has no attention dropout; set the model's attention dropout to 0 "
                        "or train without --packing.")
    out = _flex_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def window_mask(position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """``[R, 1, L, L]``: key j lies fewer than ``window`` positions behind query i. Within a document (and from a
    shared-prompt branch into its prompt, whose positions it continues) that is transformers' sliding window."""
    back = position_ids[:, :, None] - position_ids[:, None, :]
    return (back < window)[:, None]


def enable_flex_documents(model) -> bool:
    """Let ``model`` take a FlexAttention ``BlockMask`` as its ``attention_mask``; True if it now can.

    Only models running SDPA are switched (every built-in and hub model here is, by default); anything else,
    e.g. a model that was asked for eager attention, is left alone and keeps the dense mask. The switch is not
    saved with the model (transformers does not serialise ``_attn_implementation``).
    """
    try:  # older torch / transformers: no FlexAttention or no mask interface to register with
        from torch.nn.attention import flex_attention  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == FLEX_DOCUMENTS:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(FLEX_DOCUMENTS, _sdpa_or_flex)
    AttentionMaskInterface.register(FLEX_DOCUMENTS, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # same masks as SDPA
    model.set_attn_implementation(FLEX_DOCUMENTS)
    return model.config._attn_implementation == FLEX_DOCUMENTS
