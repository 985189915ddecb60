"""How the static decoder compiles its pieces with ``torch.compile``: for fixed shapes (decode steps, replayed as
CUDA graphs) or for any number of tokens (prefill passes, whose lengths differ from batch to batch)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from minialign.modeling.decoder_model import BlockParts, out_mlp, qkv_heads, qkv_rope

RECOMPILES = 64  # one compilation per (batch bucket, cache length); torch's default of 8 would fall back to eager


@functools.cache
def compile_fixed(fn: Callable) -> Callable:
    """``fn`` compiled for fixed shapes, once per process (every decoder shares the compiled code, and the
    recompilation limit is not spent on copies of it), with room for ``RECOMPILES``: a decode step's pieces compile
    once per batch bucket and, those that see the cache, once per cache length too."""
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILES):
            return compiled(*args)

    return call


@functools.cache
def compile_tokens(fn: Callable, token_args: tuple[int, ...]) -> Callable:
    """``fn`` compiled once for any token count: dim 0 of the arguments at ``token_args`` (the ``[N, ...]`` tensors
    that hold one row per token) is symbolic, everything else (weights, head counts) specialised as in
    ``compile_fixed``. Eager, a prefill pass runs RMSNorm, RoPE and ``act(gate) * up`` as dozens of float32
    elementwise kernels a layer over every prompt token: most of the ~74 ms fixed cost of a 33,600-token batch on an
    H100, a fifth of its generate time (benchmarks/NOTES.md entry 36)."""

    def over_tokens(*args):
        return fn(*args)

    # A code object per fn: dynamo keeps compilations and their recompilation limit per code object, so these stay
    # apart from each other and from compile_fixed's of the same fn.
    over_tokens.__code__ = over_tokens.__code__.replace(co_name=f"over_tokens_{fn.__name__}")
    compiled = torch.compile(over_tokens, fullgraph=True)

    def call(*args):
        for i in token_args:
            torch._dynamo.maybe_mark_dynamic(args[i], 0)
        # Automatic dynamic shapes off: a second model's shapes recompile specialised instead of making its weight
        # dims and head counts symbolic too.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILES, automatic_dynamic_shapes=False):
            return compiled(*args)

    return call


@functools.cache
def decode_parts() -> BlockParts:
    """A decode step's block halves compiled: Inductor fuses RMSNorm, RoPE, the residual adds and ``act(gate) * up``
    into a few kernels around the matmuls. The cache stores stay outside the compiled code: compiled with RoPE they
    made Inductor copy each layer's whole cache every step on CUDA (3.4x slower decoding, benchmarks/NOTES.md
    entry 29)."""
    return BlockParts(compile_fixed(qkv_rope), compile_fixed(out_mlp), compile_fixed(qkv_heads))


@functools.cache
def prefill_parts() -> BlockParts:
    """The same halves for prefill passes, compiled once for any number of prompt tokens (the ``[N, ...]``
    arguments: ``x`` and the cos/sin rows of ``qkv_rope``, ``x`` and the attention output of ``out_mlp``)."""
    return BlockParts(compile_tokens(qkv_rope, (0, 4, 5)), compile_tokens(out_mlp, (0, 1)))
