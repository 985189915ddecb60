"""What a ``StaticDecoder`` keeps between steps: the device tensors its steps update in place, and the host's
looks at them.

A look copies the rows' done flags, their slots' prompts and (for stop strings) their tokens so far into pinned host
buffers on the decoding stream, without waiting; the decoder reads it one chunk of steps later, once the GPU is busy
with the next chunk. Reading a look right after its own chunk left the GPU idle while the host copied, converted and
decided (benchmarks/NOTES.md entry 37). On a CPU the copies are plain copies, read as late as on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeState:
    """Device tensors a decode step reads and updates in place (fixed addresses: graphs are recorded over them),
    and the host buffers looks copy them into.

    Slot s holds prompt ``row_id[s]`` (``rows`` = the trash row of ``out`` / ``uniforms`` for an empty slot);
    ``lengths[s]`` keys are cached, ``tokens[s]`` is the token to feed next, ``step`` the next column of ``out``.
    """

    rows: int
    length: int
    new_tokens: int
    k_cache: torch.Tensor  # [layers, rows, kv_heads, length, head_dim]
    v_cache: torch.Tensor
    tokens: torch.Tensor  # [rows] long
    lengths: torch.Tensor  # [rows] long
    done: torch.Tensor  # [rows] bool
    row_id: torch.Tensor  # [rows] long
    step: torch.Tensor  # [1] long
    out: torch.Tensor  # [rows + 1, new_tokens] long
    uniforms: torch.Tensor  # [new_tokens, rows + 1] float32
    cos: torch.Tensor  # [length, head_dim]
    sin: torch.Tensor
    host_done: torch.Tensor  # [rows] bool, pinned on CUDA: a look's copies
    host_rows: torch.Tensor  # [rows] long
    host_out: torch.Tensor  # [rows + 1, new_tokens] long


def allocate_state(rows: int, length: int, new_tokens: int, cache_shape: tuple[int, ...], dtype: torch.dtype,
                   cos: torch.Tensor, sin: torch.Tensor) -> DecodeState:
    """An empty state on ``cos``'s device: every slot empty and done."""
    dev = cos.device
    long = {"dtype": torch.long, "device": dev}
    pinned = {"pin_memory": dev.type == "cuda"}
    return DecodeState(
        rows, length, new_tokens, torch.zeros(cache_shape, dtype=dtype, device=dev),
        torch.zeros(cache_shape, dtype=dtype, device=dev), torch.zeros(rows, **long), torch.zeros(rows, **long),
        torch.ones(rows, dtype=torch.bool, device=dev), torch.full((rows,), rows, **long), torch.zeros(1, **long),
        torch.zeros((rows + 1, new_tokens), **long), torch.ones((new_tokens, rows + 1), dtype=torch.float32, device=dev),
        cos, sin, torch.empty(rows, dtype=torch.bool, **pinned), torch.empty(rows, dtype=torch.long, **pinned),
        torch.empty((rows + 1, new_tokens), dtype=torch.long, **pinned))


def is_eos(tokens: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """``[B]`` bool: which tokens end a reply (Python constants: nothing to copy to the device inside a graph)."""
    hit = tokens == eos_ids[0]
    for eos in eos_ids[1:]:
        hit = hit | (tokens == eos)
    return hit


class Look:
    """The first ``bucket`` slots' done flags and prompts, and with ``tokens`` the first ``n`` rows' tokens up to
    ``steps``, as the state holds them once the work queued so far has run: copied to the host buffers now, read by
    ``read`` later. Only one look may be pending: the next one reuses the buffers."""

    def __init__(self, s: DecodeState, bucket: int, n: int, steps: int, tokens: bool):
        self.s, self.bucket, self.n, self.steps, self.tokens = s, bucket, n, steps, tokens
        cuda = s.done.device.type == "cuda"
        s.host_done[:bucket].copy_(s.done[:bucket], non_blocking=cuda)
        s.host_rows[:bucket].copy_(s.row_id[:bucket], non_blocking=cuda)
        if tokens:  # whole rows: a copy between contiguous tensors is the only kind that leaves the host free
            s.host_out[:n].copy_(s.out[:n], non_blocking=cuda)
        self.copied = None
        if cuda:  # on the stream of the state's own GPU, which need not be the current device
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(s.done.device))

    def read(self) -> tuple[list[bool], list[int], list[list[int]] | None]:
        """Done flag and prompt of each slot, and each row's tokens (None without ``tokens``): waits for the copies."""
        if self.copied is not None:
            self.copied.synchronize()
        s = self.s
        out = s.host_out[: self.n, : self.steps].tolist() if self.tokens else None
        return s.host_done[: self.bucket].tolist(), s.host_rows[: self.bucket].tolist(), out
