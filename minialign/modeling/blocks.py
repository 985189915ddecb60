"""What training needs to know of a loaded model, beyond loading it.

Whether padding-free / packed rows compute its attention exactly (``fast_path_support``: the one place that
decides when ``--fast`` falls back; the attention implementation that runs those rows is in ``ops/attention.py``),
its sliding window, and its repeated transformer blocks: FSDP's units, and what ``--compile`` compiles one of.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from minialign.base.errors import UserError
from minialign.ops.attention import FLEX_DOCUMENTS


def fast_path_support(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot run padding-free / packed rows (document masks, varlen segments) exactly; None if it can.


    The one place that decides it (``recipes`` falls back to padded batches, or refuses an explicit flag, on a
    reason). Those paths go through ``attention.FLEX_DOCUMENTS``, i.e. SDPA, FlashAttention varlen or
    FlexAttention without a score modifier: none soft-caps attention logits (Gemma2), and a model that cannot run
    SDPA would never see the document mask in the form it reads. Sliding windows are honoured on every path
    (``attention.window_mask``, FlashAttention's window), so they are no reason.
    """
    config = getattr(model, "config", None)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return (f"attention logit soft-capping (attn_logit_softcapping={softcap:g}), which neither FlashAttention "
                "varlen nor SDPA applies")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", FLEX_DOCUMENTS):
        return f"attention implementation '{impl}', which cannot read document masks or varlen segments (needs sdpa)"
    return None



def check_fast_path(cfg, model: PreTrainedModel, device: torch.device) -> None:
    """Padding-free / packed rows only for a model whose attention they compute exactly (``fast_path_support``):
    ``--fast`` falls back to padded batches and says so; an explicit --padding-free or --packing is refused.
    ``cfg`` is a ``config.TrainConfig``, resolved by ``apply_fast`` before the model was loaded."""
    reason = fast_path_support(model)
    if reason is None or not (cfg.padding_free or cfg.packing):
        return
    by_fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
    if cfg.packing or not by_fast:
        flag = "--packing" if cfg.packing else "--padding-free"
        raise UserError(f"{flag} cannot train '{cfg.model}': it has {reason}, so its rows would attend differently "
                        f"from the model's own attention. Drop {flag} (padded batches compute the same function).")
    from minialign.base import dist


    if dist.rank() == 0:
        graphs = " without CUDA graphs" if cfg.cuda_graphs else ""
        print(f"minialign: --fast falls back to padded batches{graphs} for '{cfg.model}': it has {reason}.")
    cfg.padding_free, cfg.cuda_graphs = False, False



def sliding_window(model: PreTrainedModel) -> int | None:
    """The model's sliding window if some layer uses one (Qwen2 only with ``use_sliding_window``), else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    types_ = getattr(config, "layer_types", None)
    if window is None or (types_ is not None and "sliding_attention" not in types_):
        return None
    return int(window)



def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model``, found by the model's own ``_no_split_modules`` (e.g. GPTNeoXLayer)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]



def compile_blocks(model: torch.nn.Module, **options) -> list[tuple[torch.nn.Module, Callable]]:
    """(block, compiled forward) for every transformer block; blocks of one class share one compiled function.


    The function is compiled unbound (the block is its first argument), so its graphs are keyed by shapes and
    grad mode, not by which block runs it, and a deep copy of the model holds nothing that calls the original.
    A block with gradient checkpointing on (enable it before compiling) gets a forward that checkpoints itself
    inside the compiled code, so its recomputation in backward replays the compiled graph: transformers' own
    checkpointing would recompute the block's eager forward, after ``running_compiled`` has put it back.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} names no transformer block class (_no_split_modules), so its blocks "
                        "cannot be compiled one by one; compile the whole model instead (--compile-scope model).")
    compiled: dict = {}
    for block in blocks:
        key = (type(block).forward, bool(getattr(block, "gradient_checkpointing", False)))
        if key not in compiled:
            forward, checkpointed = key
            compiled[key] = torch.compile(_checkpointing(forward) if checkpointed else forward, **options)
    return [(block, compiled[type(block).forward, bool(getattr(block, "gradient_checkpointing", False))])
            for block in blocks]



def _checkpointing(forward: Callable) -> Callable:
    def checkpointed(block, *args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(block, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


    return checkpointed



@contextlib.contextmanager
def running_compiled(blocks: list[tuple[torch.nn.Module, Callable]]):
    """Inside: every block runs its compiled forward (hooks, e.g. FSDP's, stay eager around it; checkpointing is
    inside it, see compile_blocks). Outside, the blocks are as they were, so generation, evaluation and saving
    never meet the compiled code."""
    saved = [getattr(block, "gradient_checkpointing", None) for block, _ in blocks]
    for block, forward in blocks:
        block.forward = types.MethodType(forward, block)
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = False
    try:
        yield
    finally:
        for (block, _), checkpointing in zip(blocks, saved):
            del block.forward
            if checkpointing is not None:
                block.gradient_checkpointing = checkpointing
