"""A decoder close to the hardware: static KV cache, whole decode steps replayed as CUDA graphs, finished rows retired.

transformers' ``generate`` with its dynamic cache spends ~18 ms a decode step on an H100 for SmolLM2-135M at any
batch (issue 31): the step is hundreds of small kernels issued from Python, so the GPU waits on the host. Reading
the weights and the used KV cache once bounds a step near 0.4 ms at batch 256. ``StaticDecoder`` gets close to it:

* its own forward from the model's weights (``decoder_model``: fused QKV and gate/up, LoRA merged, RoPE and
  RMSNorm as transformers computes them), a fixed set of kernels per step;
* a static cache ``[layers, rows, kv_heads, length, head_dim]``; prompts are prefilled in one flat varlen pass (the
  trainer's FlashAttention-2 varlen kernel on CUDA) and each step attends over every row's used keys only;
* one decode step (forward, next-token choice, cache and length updates, all on device tensors) recorded as a CUDA
  graph per batch bucket (powers of two) and replayed; the host looks at the rows every ``sync_every`` steps only,
  stops when all are finished, and moves the live rows into a smaller bucket when they fit one, so finished rows stop
  costing;
* each look is copied to the host behind a chunk of steps and read once the next chunk is queued
  (``decode_state.Look``): the host's work (stop strings in the tokens, finished rows, compaction) overlaps the GPU's,
  at the price of deciding a chunk late (a batch may run up to two chunks past the end of its last row, not one).

On a CPU the same code runs eagerly (no graphs): the tests exercise every line but the graph capture and the
FlashAttention calls. A decoder is reusable: ``decode`` refreshes its weight copies in place when the model's
parameters changed (optimizer steps, ``lora.disabled``), so the captured graphs stay valid between training rounds.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from minialign.base.devices import host_to_device
from minialign.base.errors import UserError
from minialign.modeling.compiled import decode_parts, prefill_parts
from minialign.modeling.decode_kernel import ATTENTIONS, choose_kernel, kernel_disagrees
from minialign.modeling.decode_state import DecodeState, Look, allocate_state, is_eos
from minialign.modeling.decoder_model import (
    PLAIN,
    DecodeLayout,
    DecoderWeights,
    block_forward,
    cache_rows,
    decode_attention,
    decode_layout,
    decoder_support,
    flash_ok,
    flat_prompts,
    last_logits,
    prefill_attention,
    rope_table,
    round_up,
    write_cache,
)
from minialign.modeling.flex_decode import decode_blocks, flex_decode
from minialign.modeling.sampling import Sampling, draw_uniforms, next_tokens
from minialign.ops import triton_decode

MIN_BUCKET = 16  # smaller batches cost a step about as much: not worth another graph
FLASH_PREFILL_TOKENS = 65536  # FlashAttention's varlen prefill holds O(T) memory: a whole eval batch in one pass
DENSE_PREFILL_TOKENS = 2048  # the SDPA reference holds a [T, T] mask and [H, T, T] scores: 65,536 tokens is ~160 GB
GREEDY = Sampling()
Stopped = Callable[[list[list[int]]], list[bool]]  # each live row's tokens so far -> did it reach a stop string


def default_prefill_tokens(dtype: torch.dtype, device: torch.device) -> int:
    """Prompt tokens a prefill pass takes: many with FlashAttention, few on the dense SDPA path, which a float32
    model takes on CUDA too (a float32 eval of 100 long helpful-online prompts ran out of an H100's 80 GB)."""
    return FLASH_PREFILL_TOKENS if flash_ok(dtype, device) else DENSE_PREFILL_TOKENS


class StaticDecoder:
    """Batched decoding of one supported model (``decoder_model.decoder_support``); ``decode`` does one batch.

    ``graphs``: record steps as CUDA graphs (CUDA only); ``compile``: fuse each block's elementwise work with
    ``torch.compile`` in decode steps (CUDA only; a failing compilation falls back to plain kernels);
    ``compile_prefill``: in prefill passes too, compiled once for any token count (CUDA only; opt-in: the compilation
    costs seconds a process and an eager prefill of 33,600 prompt tokens about 74 ms, so it pays back only in a process
    that prefills hundreds of large batches, benchmarks/NOTES.md entry 36);
    ``sync_every``: steps between looks at the rows; ``late_looks``: read each look once the next steps are queued
    (the default; False reads it at once and the GPU waits, as before benchmarks/NOTES.md entry 37); ``retire``: move
    live rows into smaller buckets as rows finish (``min_bucket`` rows at least); ``prefill_tokens``: prompt tokens
    per prefill pass; ``attention``: the decode steps' attention, ``"auto"`` (``"triton"`` where its kernel can run,
    else ``"flash"``), ``"flash"`` (FlashAttention-2 varlen on CUDA, SDPA elsewhere), ``"triton"``
    (``ops.triton_decode``: the cache stores and the attention in one kernel, RoPE included, a long row's keys shared
    out among programs; 94.1k against 75.4k new tokens/s on an H100, benchmarks/NOTES.md entry 36) or ``"flex"``
    (``flex_decode``; slower on an H100, benchmarks/NOTES.md entry 29).
    """

    def __init__(self, model: torch.nn.Module, *, graphs: bool = True, compile: bool = True, sync_every: int = 8,
                 retire: bool = True, min_bucket: int = MIN_BUCKET, prefill_tokens: int | None = None,
                 attention: str = "auto", compile_prefill: bool = False, late_looks: bool = True):
        reason = decoder_support(model)
        if reason is not None:
            raise UserError(f"The static decoder cannot run this model: {reason}. Use decoder='auto' (falls back "
                            "to transformers' generate) or decoder='hf'.")
        if attention not in ATTENTIONS:
            raise UserError(f"StaticDecoder attention must be 'auto', 'flash', 'triton' or 'flex' (got {attention!r}).")
        self.model = model
        self.weights = DecoderWeights(model)
        self.device = self.weights.embed.device
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self.parts = decode_parts() if compile and self.device.type == "cuda" else PLAIN
        self.prefill_parts = prefill_parts() if compile and compile_prefill and self.device.type == "cuda" else PLAIN
        self.sync_every, self.retire, self.min_bucket = max(1, sync_every), retire, max(1, min_bucket)
        self.late_looks = late_looks
        self.prefill_tokens = prefill_tokens or default_prefill_tokens(self.weights.dtype, self.device)
        self.scale = self.weights.dims.head_dim ** -0.5
        self.flex = flex_decode(self.device) if attention == "flex" else None
        self.attention = attention
        self.kernel, self.fallback = choose_kernel(attention, self.weights.dims, self.weights.dtype, self.device)
        self.tiling = triton_decode.TILING  # how the Triton kernel shares out a step (set before the first decode)
        self.state: DecodeState | None = None
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs_enabled else None
        self.stream = torch.cuda.Stream(self.device) if self.graphs_enabled else None
        self.last_steps = 0  # decode steps the last batch ran (its longest answer), for benchmarks
        self.compactions = 0  # times live rows moved to a smaller bucket, over the decoder's life

    # ------------------------------------------------------------------------------------------------ the batch

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
               sampling: Sampling = GREEDY, generator: torch.Generator | None = None,
               stopped: Stopped | None = None) -> list[list[int]]:
        """New tokens of each prompt (token ids, no special tokens added): ``max_new_tokens`` or fewer per row, all
        rows as long as the longest, or up to ``2 * sync_every - 1`` longer (a batch learns its last row has ended a
        chunk late); a row's tokens after its EOS are ``pad_id``.
        Sampling draws from ``generator`` (a seeded CPU generator); ``stopped`` lets rows that wrote a stop string
        retire early."""
        n = len(prompts)
        s = self._prepare(n, max(len(p) for p in prompts) + max_new_tokens, max_new_tokens)
        key = (sampling, int(pad_id), tuple(int(e) for e in eos_ids))
        if sampling.do_sample:
            if generator is None:
                raise ValueError("sampling needs a seeded generator")
            s.uniforms[:max_new_tokens, :n].copy_(draw_uniforms(generator, max_new_tokens, n))
        self._prefill(prompts, key)
        bucket, steps, look, seen = self._bucket(n), 1, None, None
        longest_prompt = max(len(p) for p in prompts)
        while steps < max_new_tokens:
            for _ in range(min(self.sync_every, max_new_tokens - steps)):
                self._run_step(bucket, key)
                steps += 1
            if steps >= max_new_tokens:
                break
            used = min(s.length, longest_prompt + steps)
            if self.late_looks:
                if look is not None:  # taken before these steps, read while the GPU runs them
                    done, rows, tokens = look.read()
                    bucket = self._act(done, rows, self._stop_flags(stopped, done, rows, tokens), bucket, used)
                    if not bucket:
                        break
                look = Look(s, bucket, n, steps, tokens=stopped is not None)
            else:  # the look read at once, stop strings sought in the previous one's tokens meanwhile: the GPU waits
                flagged = self._stop_flags(stopped, *seen) if seen else set()
                seen = Look(s, bucket, n, steps, tokens=stopped is not None).read()
                bucket = self._act(*seen[:2], flagged, bucket, used)
                if not bucket:
                    break
        self.last_steps = steps
        return s.out[:n, :steps].tolist()

    def _bucket(self, n: int) -> int:
        """The batch size a step runs at for ``n`` live rows: a power of two (at least ``min_bucket``), at most the
        state's."""
        return min(max(self.min_bucket, 1 << (n - 1).bit_length()), self.state.rows)

    def _stop_flags(self, stopped: Stopped | None, done: list[bool], rows: list[int],
                    tokens: list[list[int]] | None) -> set[int]:
        """The rows (prompt indices) a look saw live whose tokens hold a stop string."""
        if stopped is None:
            return set()
        live_rows = [r for r, d in zip(rows, done) if not d]
        return {r for r, f in zip(live_rows, stopped([tokens[r] for r in live_rows])) if f}

    def _act(self, done: list[bool], rows: list[int], flagged: set[int], bucket: int, used: int) -> int:
        """What the host decides from a look (``done`` and ``rows`` of each slot): the ``flagged`` rows end, and the
        live rows move into a smaller bucket when they fit one. Returns the bucket the next steps run at, 0 when no
        row is live. Read late, a look counts rows that finished after it as live: they move and stay finished."""
        s = self.state
        if flagged:
            slots = [i for i, r in enumerate(rows) if r in flagged]
            s.done[host_to_device(torch.tensor(slots), self.device)] = True
            done = [d or r in flagged for d, r in zip(done, rows)]
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            return 0
        smaller = self._bucket(len(live))
        if self.retire and smaller < bucket:
            self._compact(live, smaller, used)
            return smaller
        return bucket

    def _prepare(self, rows: int, length: int, new_tokens: int) -> DecodeState:
        """A state big enough for the batch (kept when it is: its graphs stay valid), weights matching the model."""
        stale = self.weights.stale()
        if stale == "structure":
            self.weights, self.state = DecoderWeights(self.model), None
        elif stale == "values":
            self.weights.refresh()
        s = self.state
        if s is None or rows > s.rows or length > s.length or new_tokens > s.new_tokens:
            old = (s.rows, s.length, s.new_tokens) if s is not None else (0, 0, 0)
            self.state = None
            self.graphs.clear()
            self.state = self._allocate(max(rows, old[0]), round_up(max(length, old[1]), 64),
                                        max(new_tokens, old[2]))
            if self.kernel == "triton":
                self._check_kernel()
        return self.state

    def _check_kernel(self) -> None:
        """The Triton kernel against the reference path (``decode_kernel.kernel_disagrees``); FlashAttention from now
        on if it disagrees."""
        why = kernel_disagrees(self.model, self.weights.dims, self.state.cos, self.state.sin, self.tiling)
        if why is not None:
            self.kernel, self.fallback = "flash", f"the triton kernel {why}"
            if self.attention == "triton":  # asked for by name: say so ("auto" takes FlashAttention quietly)
                print(f"minialign: decoding with FlashAttention: {self.fallback}.", file=sys.stderr)

    def _allocate(self, rows: int, length: int, new_tokens: int) -> DecodeState:
        dims = self.weights.dims
        cos, sin = rope_table(self.model, length, self.weights.dtype, self.device)
        return allocate_state(rows, length, new_tokens, (dims.layers, rows, dims.kv_heads, length, dims.head_dim),
                              self.weights.dtype, cos, sin)

    # ------------------------------------------------------------------------------------------------ prefill

    def _prefill(self, prompts: list[list[int]], key: tuple) -> None:
        """Fill the cache with every prompt (slot i = prompt i) and choose each row's first new token."""
        s, n = self.state, len(prompts)
        s.done.fill_(True)
        s.lengths.zero_()
        s.tokens.fill_(key[1])
        s.row_id.fill_(s.rows)
        s.row_id[:n] = torch.arange(n, device=self.device)
        s.out.fill_(key[1])
        s.step.fill_(1)
        for chunk in self._prefill_chunks([len(p) for p in prompts]):
            try:
                self._prefill_chunk([prompts[r] for r in chunk], chunk, key)
            except Exception as exc:
                if self.prefill_parts is PLAIN or isinstance(exc, torch.OutOfMemoryError):
                    raise
                self.prefill_parts = PLAIN
                self._say_dropped(f"compiled prefill parts failed ({type(exc).__name__}: {exc})")
                self._prefill_chunk([prompts[r] for r in chunk], chunk, key)  # rewrites what the failed pass wrote

    def _prefill_chunk(self, prompts: list[list[int]], chunk: list[int], key: tuple) -> None:
        """One flat varlen pass over ``prompts`` (slots ``chunk``): cache their keys, choose their first tokens."""
        sampling, _, eos_ids = key
        s, w = self.state, self.weights
        flat, positions, slots, lengths = flat_prompts(prompts, chunk)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        max_len = int(lengths.max())
        # on the GPU without a host wait: the host builds the next pass while this one runs
        flat, positions, slots, rows, lengths, cu = (host_to_device(t, self.device)
                                                     for t in (flat, positions, slots, torch.tensor(chunk), lengths, cu))

        def attend(q, k, v, layer):
            s.k_cache[layer][slots, :, positions] = k
            s.v_cache[layer][slots, :, positions] = v
            return prefill_attention(q, k, v, cu, max_len, self.scale)

        x = F.embedding(flat, w.embed)
        cos, sin = s.cos[positions][:, None], s.sin[positions][:, None]
        for layer, block in enumerate(w.blocks):
            x = block_forward(x, block, w.dims, w.act, cos, sin, functools.partial(attend, layer=layer),
                              self.prefill_parts)
        first = next_tokens(last_logits(x[cu[1:].long() - 1], w), sampling, s.uniforms[0, rows])
        s.tokens[rows] = first
        s.lengths[rows] = lengths
        s.done[rows] = is_eos(first, eos_ids)
        s.out[rows, 0] = first

    def _prefill_chunks(self, lengths: list[int]) -> list[list[int]]:
        """Consecutive rows grouped so that a pass holds at most ``prefill_tokens`` tokens (and at least one row)."""
        chunks, current, total = [], [], 0
        for row, length in enumerate(lengths):
            if current and total + length > self.prefill_tokens:
                chunks.append(current)
                current, total = [], 0
            current.append(row)
            total += length
        return chunks + [current]

    # ------------------------------------------------------------------------------------------------ steps

    def _step(self, bucket: int, key: tuple) -> None:
        """One decode step of slots ``0..bucket-1``, in place on the state: no host sync, graph-capturable."""
        sampling, pad_id, eos_ids = key
        s, w = self.state, self.weights
        tokens, positions, done = s.tokens[:bucket], s.lengths[:bucket], s.done[:bucket]
        dims = w.dims
        if self.kernel == "triton":  # the kernel reads the positions itself
            layout = None
        elif self.flex is None:
            layout = decode_layout(positions, dims.kv_heads, dims.groups, s.length, flash_ok(w.dtype, self.device))
        else:  # flex describes the used keys itself (decode_blocks): only the cache rows
            layout = DecodeLayout(cache_rows(positions, dims.kv_heads, s.length))
            blocks = decode_blocks(positions + 1, s.length)

        def attend(q, k, v, layer):
            k_cache, v_cache = s.k_cache[layer, :bucket], s.v_cache[layer, :bucket]
            if self.kernel == "triton":
                return triton_decode.append_attend(q, k, v, k_cache, v_cache, positions, self.scale, (s.cos, s.sin),
                                                   self.tiling)
            write_cache(k_cache, k, layout.cache_index)
            write_cache(v_cache, v, layout.cache_index)
            if self.flex is not None:
                return self.flex(q, k_cache, v_cache, *blocks, self.scale)
            return decode_attention(q, k_cache, v_cache, layout, self.scale)

        x = F.embedding(tokens, w.embed)
        if self.kernel == "triton":  # the kernel rotates q and k itself, reading the tables at each row's position
            cos, sin, parts = s.cos, s.sin, replace(self.parts, qkv=self.parts.heads)
        else:
            cos, sin, parts = s.cos[positions][:, None], s.sin[positions][:, None], self.parts
        for layer, block in enumerate(w.blocks):
            x = block_forward(x, block, dims, w.act, cos, sin, functools.partial(attend, layer=layer), parts)
        rows = s.row_id[:bucket]
        chosen = next_tokens(last_logits(x, w), sampling, s.uniforms[s.step, rows])
        chosen = torch.where(done, pad_id, chosen)
        s.out[rows, s.step] = chosen
        s.lengths[:bucket] += (~done).long()
        s.tokens[:bucket] = chosen
        s.done[:bucket] = done | is_eos(chosen, eos_ids)
        s.step += 1

    def _run_step(self, bucket: int, key: tuple) -> None:
        """A step: eager on a CPU; on CUDA the first step of a bucket runs eagerly (it also warms up the kernels) and
        is recorded, later ones replay the recording."""
        if not self.graphs_enabled:
            self._step(bucket, key)
            return
        graph = self.graphs.get((bucket, key))
        if graph is not None:
            graph.replay()
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            while True:  # a failing step leaves the state as it was: rerunning rewrites the same cache positions
                try:
                    self._step(bucket, key)
                    break
                except Exception as exc:
                    if not self._fall_back(exc):
                        raise
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            self._step(bucket, key)  # recorded, not run
        current.wait_stream(self.stream)
        self.graphs[(bucket, key)] = graph

    def _fall_back(self, exc: Exception) -> bool:
        """After a failed step, one thing fewer to fail: the Triton kernel gives way to FlashAttention,
        else compiled parts and FlexAttention to plain kernels; False when nothing is left to drop. ``fallback``
        keeps what happened, for benchmarks (a row must not pass off the fallback's speed as the variant's)."""
        if isinstance(exc, torch.OutOfMemoryError):  # no kernel's fault: dropping one would only mislabel the run
            return False
        if self.kernel != "flash":
            self.kernel, dropped = "flash", f"the {self.kernel} attention kernel"
        elif self.parts is not PLAIN or self.flex is not None:
            self.parts, self.flex, dropped = PLAIN, None, "compiled parts / FlexAttention"
        else:
            return False
        self._say_dropped(f"{dropped} failed ({type(exc).__name__}: {exc})")
        self.graphs.clear()
        return True

    def _say_dropped(self, what: str) -> None:
        self.fallback = what if self.fallback is None else f"{self.fallback}; then {what}"  # every drop, in order
        print(f"minialign: decoding without {what}.", file=sys.stderr)

    def _compact(self, live: list[int], bucket: int, used: int) -> None:
        """Move the live slots to the front (their first ``used`` cache positions) and empty the rest of ``bucket``."""
        s, m = self.state, len(live)
        self.compactions += 1
        index = host_to_device(torch.tensor(live), self.device)
        s.k_cache[:, :m, :, :used] = s.k_cache[:, index, :, :used]  # every layer at once
        s.v_cache[:, :m, :, :used] = s.v_cache[:, index, :, :used]
        for t in (s.tokens, s.lengths, s.row_id, s.done):
            t[:m] = t[index]
        s.done[m:bucket] = True
        s.lengths[m:bucket] = 0
        s.row_id[m:bucket] = s.rows
