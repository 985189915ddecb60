"""The model side of the static decoder (``minialign.modeling.decoder``): which models it runs, their weights, their forward.

The decoder does not call the transformers model: a decode step through ``model.forward`` is hundreds of small
kernels plus Python around each (cache objects, masks, hooks), launch-bound at any batch. It runs its own forward
from the model's weights instead, the few kernels a Llama block needs (gpt-fast / nanoGPT style):

    RMSNorm -> one fused QKV matmul -> RoPE -> K/V into the static cache -> attention -> o_proj -> residual
    RMSNorm -> one fused gate/up matmul -> act(gate) * up -> down_proj -> residual

with the same arithmetic as transformers' Llama code, op for op (RMSNorm in float32 then cast, RoPE as
``q * cos + rotate_half(q) * sin`` with transformers' own cos/sin table, so rope_theta and rope scaling are the
model's), so float32 greedy decoding gives transformers' tokens.

``DecoderWeights`` holds the fused copies (LoRA adapters merged in, float32 math, the model left untouched) and
refreshes them in place when the model's parameters change, so captured CUDA graphs stay valid across training
rounds. ``decoder_support`` says which models qualify: Llama-family blocks (Llama, SmolLM2, Mistral and Qwen2 without
sliding windows) with a rope table that does not depend on the sequence length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from minialign.modeling.blocks import sliding_window
from minialign.modeling.lora import LoRALinear, lora_layers
from minialign.ops.attention import flash_varlen_available, varlen_reference

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # their cos/sin change with the sequence length: no fixed table


def decoder_support(model: torch.nn.Module) -> str | None:
    """None when the static decoder computes ``model``'s function exactly, else the reason it does not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} (the static decoder runs {', '.join(SUPPORTED_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "not a causal LM with model.model.layers and lm_head"
    params = list(model.parameters())
    if any(type(p).__name__ == "DTensor" for p in params) or len({p.device for p in params}) > 1:
        return "parameters sharded or spread over several devices"
    if sliding_window(model) is not None:
        return "sliding-window attention"
    rope_type = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope_type is None or rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope type {rope_type!r} (its table depends on the sequence length)"
    if config.hidden_act not in ACT2FN:
        return f"activation {config.hidden_act!r}"
    return None


@dataclass(frozen=True)
class Dims:
    """The shapes and constants of one model's blocks."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    act: str

    @property
    def groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads


def model_dims(model: torch.nn.Module) -> Dims:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Dims(len(model.model.layers), config.hidden_size, config.num_attention_heads, kv_heads, head_dim,
                float(config.rms_norm_eps), config.hidden_act)


def effective_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """The weight ``linear`` applies: the base weight, plus scaling * B @ A for an enabled LoRA layer.

    Merged in float32 and cast back, as ``LoRALinear.merged`` does, but into a new tensor: the model is not modified.
    """
    if isinstance(linear, LoRALinear) and not linear.disabled:
        delta = linear.lora_B.weight.float() @ linear.lora_A.weight.float()
        return (linear.weight.float() + linear.scaling * delta).to(linear.weight.dtype)
    return linear.weight


def _cat_bias(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device) for b, lin in zip(biases, linears)])


def _block_tensors(block: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """One block's weights as the decoder uses them: QKV and gate/up fused, LoRA merged (fresh tensors)."""
    attn, mlp = block.self_attn, block.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    return {
        "norm1": block.input_layernorm.weight.detach().clone(),
        "wqkv": torch.cat([effective_weight(lin) for lin in qkv]),
        "bqkv": _cat_bias(qkv),
        "wo": effective_weight(attn.o_proj).clone(),
        "bo": None if attn.o_proj.bias is None else attn.o_proj.bias.detach().clone(),
        "norm2": block.post_attention_layernorm.weight.detach().clone(),
        "wgu": torch.cat([effective_weight(lin) for lin in gate_up]),
        "bgu": _cat_bias(gate_up),
        "wd": effective_weight(mlp.down_proj).clone(),
        "bd": None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach().clone(),
    }


def _fingerprint(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """(structure, versions): which parameter tensors the model has, and how often each was modified in place.

    Optimizer steps and ``load_state_dict`` modify parameters in place, which bumps their version counters; toggling
    ``lora.disabled`` changes the flags. A new structure (adapters added or merged) means new tensors altogether.
    """
    params = list(model.parameters())
    flags = tuple(layer.disabled for _, layer in lora_layers(model))
    return tuple(id(p) for p in params), (tuple(p._version for p in params), flags)


class DecoderWeights:
    """The fused weights of a supported model, owned by the decoder (addresses fixed for its CUDA graphs).

    ``blocks[i]`` maps names (``wqkv``, ``wgu``, ...) to tensors; ``embed``, ``head`` and ``final_norm`` are the model's
    own tensors unless a LoRA layer wraps the head (then a merged copy).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.dims = model_dims(model)
        self.act: Callable = ACT2FN[self.dims.act]
        self.structure, self.versions = _fingerprint(model)
        with torch.no_grad():
            self.blocks = [_block_tensors(block) for block in model.model.layers]
            self.embed = model.get_input_embeddings().weight.detach()
            self.head = effective_weight(model.lm_head).detach()
            self.final_norm = model.model.norm.weight.detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0]["wqkv"].dtype

    def stale(self) -> str | None:
        """None when the copies match the model; "values" when they can be refreshed in place; "structure" when not."""
        structure, versions = _fingerprint(self.model)
        if structure != self.structure:
            return "structure"
        return None if versions == self.versions else "values"

    def refresh(self) -> None:
        """Copy the model's current weights into the same tensors (graphs recorded over them stay valid)."""
        with torch.no_grad():
            for own, block in zip(self.blocks, self.model.model.layers, strict=True):
                for name, tensor in _block_tensors(block).items():
                    if tensor is not None:
                        own[name].copy_(tensor)
            head = effective_weight(self.model.lm_head)
            if head.data_ptr() != self.head.data_ptr():
                self.head.copy_(head)
        self.structure, self.versions = _fingerprint(self.model)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (cache lengths)."""
    return -(-n // multiple) * multiple


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op: ``[..., hidden]`` normalised in float32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[N, heads, D]`` rotated by ``cos``/``sin`` ``[N, 1, D]``: ``x * cos + rotate_half(x) * sin``, as in
    transformers."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def qkv_rope(x: torch.Tensor, norm: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, cos: torch.Tensor,
             sin: torch.Tensor, heads: int, kv_heads: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention half's inputs: ``x`` ``[N, hidden]`` -> q ``[N, H, D]``, k, v ``[N, Hk, D]`` (RoPE applied)."""
    q, k, v = qkv_heads(x, norm, wqkv, bqkv, cos, sin, heads, kv_heads, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous()


def qkv_heads(x: torch.Tensor, norm: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, heads: int, kv_heads: int,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv_rope`` before RoPE, for an attention kernel that rotates q and k itself: q ``[N, H, D]``, k, v
    ``[N, Hk, D]`` as views into one QKV output (no copies); ``cos`` gives only the head dim."""
    n, d = x.shape[0], cos.shape[-1]
    q, k, v = F.linear(rms_norm(x, norm, eps), wqkv, bqkv).split([heads * d, kv_heads * d, kv_heads * d], -1)
    return q.view(n, heads, d), k.view(n, kv_heads, d), v.view(n, kv_heads, d)


def out_mlp(x: torch.Tensor, attn: torch.Tensor, w: dict, act: Callable, eps: float) -> torch.Tensor:
    """The rest of a block: o_proj and residual, RMSNorm, fused gate/up, ``act(gate) * up``, down_proj and residual."""
    x = x + F.linear(attn.reshape(x.shape[0], -1), w["wo"], w["bo"])
    h = rms_norm(x, w["norm2"], eps)
    gate, up = F.linear(h, w["wgu"], w["bgu"]).chunk(2, dim=-1)
    return x + F.linear(act(gate) * up, w["wd"], w["bd"])


@dataclass(frozen=True)
class BlockParts:
    """The two halves of a decode step's block around its attention, plain or compiled (on CUDA, fusing their
    elementwise work): ``qkv`` (``qkv_rope``, or ``qkv_heads`` where the attention kernel applies RoPE) and
    ``out_mlp``. The cache stores stay outside the compiled code: compiled with RoPE, Inductor on CUDA copied each
    layer's whole cache back every step (benchmarks/NOTES.md 29)."""

    qkv: Callable = qkv_rope
    out_mlp: Callable = out_mlp
    heads: Callable = qkv_heads


PLAIN = BlockParts()


def block_forward(x: torch.Tensor, w: dict, dims: Dims, act: Callable, cos: torch.Tensor, sin: torch.Tensor,
                  attend: Attend, parts: BlockParts = PLAIN) -> torch.Tensor:
    """One Llama block over ``N`` tokens (a prompt's in prefill, one a row in a decode step): ``x`` ``[N, hidden]`` ->
    ``[N, hidden]``.

    ``attend(q [N, H, D], k [N, Hk, D], v [N, Hk, D]) -> [N, H, D]`` stores the new keys and values where it keeps
    them and attends (one kernel may do both); prefill and decode steps differ only there and in ``parts``.
    """
    q, k, v = parts.qkv(x, w["norm1"], w["wqkv"], w["bqkv"], cos, sin, dims.heads, dims.kv_heads, dims.eps)
    return parts.out_mlp(x, attend(q, k, v), w, act, dims.eps)


def flat_prompts(prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, ...]:
    """A prefill pass's inputs, built on the host in NumPy: ``flat`` ``[T]`` (every prompt's tokens one after
    another), ``positions`` ``[T]`` (each token's place in its prompt), ``slots`` ``[T]`` (its prompt's cache slot,
    from ``slots`` ``[P]``) and ``lengths`` ``[P]``, all int64 CPU tensors. Python lists of 33,000 token ids took
    7 ms here where this takes 0.6 ms, and the GPU waits for them."""
    lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=total)
    positions = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    token_slots = np.repeat(np.asarray(slots, dtype=np.int64), lengths)
    return tuple(torch.from_numpy(a) for a in (flat, positions, token_slots, lengths))


def last_logits(x: torch.Tensor, weights: DecoderWeights) -> torch.Tensor:
    """``[N, hidden]`` hidden states of the last tokens -> ``[N, V]`` next-token logits (model dtype)."""
    return F.linear(rms_norm(x, weights.final_norm, weights.dims.eps), weights.head)


def flash_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prefill and decode steps in ``dtype`` on ``device`` run FlashAttention (else the SDPA reference)."""
    return dtype in (torch.float16, torch.bfloat16) and flash_varlen_available(device)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                      scale: float) -> torch.Tensor:
    """Causal attention within each prompt of a flat batch: ``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hk, D]``, prompts
    bounded by ``cu_seqlens`` (int32 ``[n + 1]``) -> ``[T, H, D]``. FlashAttention-2 varlen on CUDA (the trainer's
    kernel), the SDPA reference elsewhere."""
    if flash_ok(q.dtype, q.device):
        return torch.ops.aten._flash_attention_forward(q, k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens,
                                                       max_len, max_len, 0.0, True, False, scale=scale)[0]
    return varlen_reference(q, k, v, cu_seqlens, cu_seqlens, None, scale)


@dataclass(frozen=True)
class DecodeLayout:
    """What every layer's attention and cache write in one decode step share, built once a step (not once a layer:
    each piece is a kernel, and a step of a small model is a chain of small kernels).

    ``cache_index``: ``[B * Hk]`` rows of a layer's cache viewed as ``[rows * Hk * L, D]`` that the step's new keys
    (and values) go to, so the write is one ``index_copy_``; then how many keys each row attends over (the new one
    included) as FlashAttention's varlen description (``cu_q``, ``cu_k``, ``seqused``) or as the SDPA path's ``mask``.
    """

    cache_index: torch.Tensor
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    seqused: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def _per_head(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B]`` -> ``[B * Hk]``, each row's value once per key head (no sync)."""
    return t[:, None].expand(t.shape[0], kv_heads).reshape(-1)


def cache_rows(positions: torch.Tensor, kv_heads: int, length: int) -> torch.Tensor:
    """``DecodeLayout.cache_index`` alone: where rows 0..B-1 write their new key, at ``positions`` ``[B]``."""
    seq = torch.arange(positions.shape[0] * kv_heads, device=positions.device)  # (row, key head) -> its sequence
    return seq * length + _per_head(positions, kv_heads)


def decode_layout(positions: torch.Tensor, kv_heads: int, groups: int, length: int, flash: bool) -> DecodeLayout:
    """The layout of a step whose rows 0..B-1 write their new key at ``positions`` ``[B]`` of a cache of ``length``
    positions (see ``DecodeLayout``); ``flash``: build FlashAttention's description, else SDPA's mask."""
    b, device = positions.shape[0], positions.device
    cache_index = cache_rows(positions, kv_heads, length)
    used = positions + 1
    if flash:
        starts = torch.arange(b * kv_heads + 1, device=device, dtype=torch.int32)
        seqused = _per_head(used.to(torch.int32), kv_heads)
        return DecodeLayout(cache_index, starts * groups, starts * length, seqused)
    mask = torch.arange(length, device=device)[None, :] < used[:, None]
    return DecodeLayout(cache_index, mask=mask[:, None, None, :])


def write_cache(cache: torch.Tensor, new: torch.Tensor, cache_index: torch.Tensor) -> None:
    """Store ``new`` ``[B, Hk, D]`` into one layer's cache ``[rows, Hk, L, D]`` (contiguous) at the step's positions
    (``DecodeLayout.cache_index``)."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, cache_index, new.reshape(-1, new.shape[-1]))


def varlen_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       layout: DecodeLayout) -> tuple[torch.Tensor, ...]:
    """A decode step's attention as one varlen call over the padded cache (what FlashAttention reads): the G = H / Hk
    query heads sharing a key head are G queries of one sequence per (row, key head), so each cached key is read
    once, not G times. Returns q ``[B * Hk * G, 1, D]``, k and v ``[B * Hk * L, 1, D]`` (views of the caches
    ``[B, Hk, L, D]``), each sequence's start in q and in k (``cu_q``, ``cu_k``) and its used keys (``seqused``)."""
    b, heads, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    seqs = b * kv_heads
    return (q.reshape(seqs * (heads // kv_heads), 1, d), k_cache.view(seqs * length, 1, d),
            v_cache.view(seqs * length, 1, d), layout.cu_q, layout.cu_k, layout.seqused)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: DecodeLayout,
                     scale: float) -> torch.Tensor:
    """One new query per row over that row's used cached keys (as ``layout`` says): ``q`` ``[B, H, D]``, caches
    ``[B, Hk, L, D]`` -> ``[B, H, D]``.

    On CUDA (``layout`` with ``seqused``) one FlashAttention-2 varlen call (``varlen_decode_args``); elsewhere SDPA
    with a length mask computes the same.
    """
    b, heads, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    if layout.seqused is not None:
        q2, k2, v2, cu_q, cu_k, used = varlen_decode_args(q, k_cache, v_cache, layout)
        out = torch.ops.aten._flash_attention_forward(q2, k2, v2, cu_q, cu_k, groups, length, 0.0, False, False,
                                                      scale=scale, seqused_k=used)[0]
        return out.view(b, heads, d)
    out = F.scaled_dot_product_attention(q.view(b, kv_heads, groups, d), k_cache, v_cache, attn_mask=layout.mask,
                                         scale=scale)
    return out.reshape(b, heads, d)


def rope_table(model: torch.nn.Module, length: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[length, D]`` for positions 0..length-1 from the model's own rotary embedding (its rope_theta and
    scaling; the values transformers computes for those positions, in the model's dtype)."""
    positions = torch.arange(length, device=device)[None]
    cos, sin = model.model.rotary_emb(torch.zeros((), dtype=dtype, device=device), positions)
    return cos[0].to(dtype), sin[0].to(dtype)
