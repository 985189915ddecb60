"""The transformer body with its heads: per-token log-probs of targets (``TokenLogps``), the piece every task
runs. Attention over packed / padding-free rows is chosen here (SDPA with a document mask, FlexAttention, or varlen
segments), and ``--compile`` compiles the body (one block for all, or the whole transformer)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from minialign.base.errors import UserError
from minialign.data.batching import block_causal_mask
from minialign.modeling import blocks
from minialign.ops import logprobs
from minialign.ops.attention import POSITIONS_KWARG, VARLEN_KWARG, enable_flex_documents

ATTENTION = ("auto", "sdpa", "flex", "varlen")  # how packed rows mask attention: see TokenLogps



COMPILE_SCOPES = ("blocks", "model")  # what --compile compiles: see TokenLogps.compile_body



class TokenLogps(nn.Module):
    """Wraps a causal LM so that its forward returns target-token log-probs instead of logits.


    Only positions that have a target reach the output head, and through ``logprobs.token_logps`` in chunks,
    so the [tokens x vocab] float32 logits of a batch never exist. Wrapping (rather than calling
    sub-modules from outside) keeps DDP, FSDP and ``torch.compile`` working on one module.


    Packed rows (``doc_ids`` given) attend within each document only. A batch that carries segment boundaries
    (``prepare_batch(varlen=True)``: ``cu_seqlens_q`` ...) runs varlen attention (``minialign.ops.attention``): any
    row length, nothing to compile. Otherwise ``attention`` says how: ``auto`` uses a FlexAttention ``BlockMask`` on
    CUDA (block-sparse, no [L, L] mask; compiled per row length) and the dense ``block_causal_mask`` through SDPA
    elsewhere; ``sdpa`` always the dense mask; ``flex`` always the BlockMask (on a CPU: forward only, slow).
    Unpacked batches run SDPA with the padding mask, as they always did, whatever ``attention`` says.


    Sliding-window layers keep their window on every path (``attention.window_mask`` bounds the dense document mask
    by position distance; varlen segments use the kernel's window); with one, ``auto`` uses the dense mask rather
    than a BlockMask, which holds no window. A model that soft-caps its final logits (Gemma2) gets its log-probs
    from the capped logits of its target positions, through plain autograd: the chunked op has no cap.
    """


    def __init__(self, model: nn.Module, chunk_size: int | None = None, *, attention: str = "auto"):
        super().__init__()
        if attention not in ATTENTION:
            raise UserError(f"attention must be one of {', '.join(ATTENTION)} (got '{attention}').")
        self.model = model
        self.chunk_size = chunk_size
        self.attention = attention
        self.window = blocks.sliding_window(model)
        # Sliding windows reach a document mask only through minialign's attention function, even for "sdpa".
        switched = (attention != "sdpa" or self.window is not None) and enable_flex_documents(model)
        self.flex = attention != "sdpa" and switched
        self.windowed_documents = self.window is None or switched
        self.compiled_body, self.compiled_blocks, self.fused = None, [], False  # see compile_body
        self.final_softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if attention == "flex" and self.window is not None:
            raise UserError(f"attention 'flex' cannot apply {type(model).__name__}'s sliding window ({self.window} "
                            "tokens): its BlockMask holds none. Use --attention auto, varlen or sdpa.")
        if attention in ("flex", "varlen") and not self.flex:
            raise UserError(f"attention '{attention}' needs a model running SDPA attention and a torch with "
                            "FlexAttention (>= 2.5); use --attention auto or sdpa.")


    def forward(self, input_ids, attention_mask, position_ids, tgt_index, tgt_ids, doc_ids=None, prefix_ids=None,
                varlen: tuple | None = None):
        body = functools.partial(self.compiled_body, self) if self.compiled_body else self.body
        hidden = body(input_ids, attention_mask, position_ids, doc_ids, prefix_ids, varlen)
        hidden = hidden.flatten(0, 1).index_select(0, tgt_index)
        head = self.model.get_output_embeddings()
        if self.final_softcap is not None:
            logps = capped_token_logps(head(hidden), tgt_ids.clamp(min=0), self.final_softcap)
        else:
            logps = logprobs.token_logps(hidden, head.weight, tgt_ids.clamp(min=0), self.chunk_size, fused=self.fused)
        return logps.masked_fill(tgt_ids < 0, 0.0)  # slots that only round the count up (see add_target_index)


    def body(self, input_ids, attention_mask, position_ids, doc_ids=None, prefix_ids=None, varlen=None) -> torch.Tensor:
        """``[R, L, H]`` final hidden states: everything whose shapes depend on the rows alone."""
        extra = {}
        if varlen is not None:
            # A ready-made 4-D mask makes transformers skip building one; the segments replace it.
            mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
            extra[VARLEN_KWARG] = varlen
        else:
            mask = attention_mask if doc_ids is None else self.document_mask(doc_ids, prefix_ids)
            if doc_ids is not None and not self.windowed_documents:
                raise UserError(f"{type(self.model).__name__} (attention '{self.model.config._attn_implementation}') "
                                "cannot bound packed rows' attention by its sliding window; see "
                                "blocks.fast_path_support.")
            if doc_ids is not None and self.window is not None:
                extra[POSITIONS_KWARG] = position_ids  # the attention function bounds the mask by the window
        with blocks.running_compiled(self.compiled_blocks):
            out = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                        use_cache=False, **extra)
        return out.last_hidden_state


    def compile_body(self, fuse_loss: bool = True, scope: str = "blocks", **options) -> None:
        """``torch.compile`` the transformer (``body``) and, with ``fuse_loss``, the loss's softmax math.


        ``scope`` "blocks" compiles one transformer block's forward and runs every block through it (regional
        compilation: the blocks are identical, so one graph serves them all and compiling costs about one block's
        time); "model" compiles the whole transformer as one graph (kernels may fuse across blocks; compiling is
        slower by about the number of blocks). Either way the target count stays outside the compiled code, so
        static shapes (``dynamic=False``, what FlexAttention needs) cost one compilation per row length and grad
        mode, not per target count: target counts can then be rounded finely. Parameter names do not change, and
        the compiled blocks run only inside ``body`` (generation with the same model stays eager).
        """
        if scope not in COMPILE_SCOPES:
            raise UserError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)} (got '{scope}').")
        if scope == "blocks":
            self.compiled_blocks = blocks.compile_blocks(self.model, **options)
        else:
            self.compiled_body = torch.compile(TokenLogps.body, **options)  # unbound: a deep copy runs its own
        self.fused = fuse_loss


    def document_mask(self, doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None):
        """The attention mask of packed rows ``doc_ids`` [R, L], built on their device (see ``attention``)."""
        if self.flex and self.window is None and (self.attention == "flex" or doc_ids.device.type == "cuda"):
            return document_block_mask(doc_ids, prefix_ids)
        return block_causal_mask(doc_ids, prefix_ids)



def capped_token_logps(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Log-probs of ``targets`` under ``cap * tanh(logits / cap)`` (Gemma2's final soft-capping), in float32 or
    wider."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    capped = torch.tanh(logits / cap) * cap
    return torch.log_softmax(capped, dim=-1).gather(1, targets[:, None]).squeeze(1)



def document_block_mask(doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None, block_size: int = 128):
    """FlexAttention ``BlockMask`` of packed rows: query i sees key j iff j <= i and doc_ids agree in the row
    (or ``prefix_ids[i]`` names key j's document: a shared prompt, see ``data.batching._collate_shared``).


    The same mask as ``block_causal_mask`` (padding, doc -1, is a document of its own, so no row is empty), kept
    as [R, 1, L/block, L/block] block indices: blocks outside every document are skipped, blocks inside one
    document skip the mask function. On CUDA a compiled kernel builds it from ``doc_ids`` without ever holding an
    [R, L, L] tensor (eager ``create_block_mask`` would, for a moment). No host sync and shapes fixed by [R, L],
    so the step around it can be compiled or CUDA-graphed.
    """
    from torch.nn.attention.flex_attention import create_block_mask


    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)


    def document_or_prefix_causal(b, h, q, kv):
        readable = (doc_ids[b, q] == doc_ids[b, kv]) | (prefix_ids[b, q] == doc_ids[b, kv])
        return readable & (q >= kv)


    rows, length = doc_ids.shape
    build = create_block_mask
    if doc_ids.device.type == "cuda" and not torch.compiler.is_compiling():
        build = _compiled_create_block_mask()
    mask_mod = same_document_causal if prefix_ids is None else document_or_prefix_causal
    return build(mask_mod, rows, None, length, length, device=doc_ids.device, BLOCK_SIZE=block_size)



@functools.cache
def _compiled_create_block_mask():
    """One compiled ``create_block_mask`` per process: a new mask function (closure) per batch does not recompile."""
    from torch.nn.attention.flex_attention import create_block_mask


    return torch.compile(create_block_mask)



def varlen_args(batch: dict) -> tuple | None:
    """The ``varlen`` argument of ``TokenLogps.body``: a prepared batch's segment bounds, or None without them."""
    if "cu_seqlens_q" not in batch:
        return None
    return batch["cu_seqlens_q"], batch["cu_seqlens_k"], batch.get("kv_index"), batch["max_seqlen"]



def run_logps(policy: nn.Module, batch: dict) -> torch.Tensor:
    return policy(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["tgt_index"], batch["tgt_ids"],
        batch.get("doc_ids"), batch.get("prefix_ids"), varlen_args(batch),
    )
