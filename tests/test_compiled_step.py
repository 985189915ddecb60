"""The fast paths give the plain eager numbers: target counts rounded up, and the transformer compiled.

Rounded target counts (``add_target_index(multiple=...)``) add slots that must carry no loss and no gradient;
``--compile`` compiles the transformer (``TokenLogps.compile_body``) and fuses the chunked log-prob's softmax math.
Both are compared with the eager, unrounded batch: loss, per-sequence sums and every gradient.
Compilation here uses the ``aot_eager`` backend, which traces exactly what Inductor would compile (the graph,
autograd of the custom function included) without generating C++, so it fits the CPU suite's time; the fused loss
math, which Inductor does compile, is checked in test_logprobs.py and in the static-shape test below.
"""

import copy
import random

import pytest
import torch
from test_flat_batches import _ids, assert_same, loss_and_grads, pairs
from test_flat_batches import lora_policy as make_policy

from minialign.base.errors import UserError
from minialign.data import TokenizedExample, collate_pairs, collate_sft
from minialign.modeling import blocks, offload
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps
from minialign.ops.losses import PreferenceLoss
from minialign.training.batches import add_target_index
from minialign.training.tasks import DPOTask, SFTTask, adapter_reference, sequence_sums


def sft_examples() -> list[TokenizedExample]:
    rng = random.Random(0)
    return [TokenizedExample(_ids(rng, p), _ids(rng, r - 1) + [0]) for p, r in [(5, 9), (3, 14), (7, 6), (1, 11)]]


def test_rounded_target_slots_are_inert():
    batch = collate_sft(sft_examples(), pad_id=0)
    plain = add_target_index(dict(batch))
    rounded = add_target_index(dict(batch), multiple=16)
    n = len(plain["tgt_index"])
    assert n == batch["n_targets"] == 40 and len(rounded["tgt_index"]) == 48
    for key in ("tgt_index", "tgt_ids", "tgt_rows"):
        assert torch.equal(rounded[key][:n], plain[key])
    assert (rounded["tgt_ids"][n:] == -100).all() and (rounded["tgt_index"][n:] == 0).all()
    assert len(add_target_index(dict(batch), multiple=10)["tgt_index"]) == 40  # already a multiple: nothing added


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_rounded_targets_give_the_same_sft_loss_and_grads(chunk_size):
    policy = make_policy(chunk_size)
    batch = collate_sft(sft_examples(), pad_id=0)
    plain = loss_and_grads(policy, SFTTask(), add_target_index(dict(batch)))
    rounded = loss_and_grads(policy, SFTTask(), add_target_index(dict(batch), multiple=32))
    assert_same(rounded, plain)


@pytest.mark.parametrize("flat", [False, True])
def test_rounded_targets_keep_length_normalised_sums(flat):
    policy = make_policy()
    batch = collate_pairs(pairs(), pad_id=0, flat=flat)
    with torch.no_grad():
        for normalise in (False, True):
            plain = sequence_sums(policy, add_target_index(dict(batch)), normalise)
            rounded = sequence_sums(policy, add_target_index(dict(batch), multiple=64), normalise)
            torch.testing.assert_close(rounded, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.parametrize("flat", [False, True], ids=["padded", "flat"])
def test_compiled_forward_equals_eager_sft(flat, scope):
    batch = collate_sft(sft_examples(), pad_id=0, flat=flat, pad_to_multiple_of=8)
    eager = loss_and_grads(make_policy(5), SFTTask(), add_target_index(dict(batch)))
    compiled_policy = make_policy(5)
    compiled_policy.compile_body(fuse_loss=False, scope=scope, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    compiled = loss_and_grads(compiled_policy, SFTTask(), add_target_index(dict(batch), multiple=16))
    assert_same(compiled, eager)


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_forward_equals_eager_dpo_with_adapter_reference(scope):
    """The reference is the same compiled module with adapters off: a second graph, no stale adapter state."""
    batch = collate_pairs(pairs(), pad_id=0, pad_to_multiple_of=8)
    results = []
    for compiled in (False, True):
        policy = make_policy()
        if compiled:
            torch._dynamo.reset()
            policy.compile_body(fuse_loss=False, scope=scope, backend="aot_eager", dynamic=True)
        task = DPOTask(adapter_reference(policy, False), PreferenceLoss(beta=0.1))
        b = add_target_index(dict(batch), multiple=16 if compiled else 0)
        with torch.no_grad():
            ref = task.reference(b)
        results.append((ref, loss_and_grads(policy, task, b)))
    (ref_e, eager), (ref_c, compiled) = results
    torch.testing.assert_close(ref_c, ref_e, rtol=1e-5, atol=1e-5)
    assert_same(compiled, eager)
    with torch.no_grad():  # and adapters off really differs from on: the reference is not the policy
        assert not torch.allclose(ref_e, sequence_sums(make_policy(), add_target_index(dict(batch)), False))


class CountingBackend:
    """A torch.compile backend that runs each graph as traced and counts the graphs it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def full_policy(chunk_size=None, layers: int = 2) -> TokenLogps:
    """The tiny model, every weight trained (so every block's input requires grad), ``layers`` blocks."""
    model = load_model("tiny", seed=0)
    if layers != model.config.num_hidden_layers:
        config = model.config
        config.num_hidden_layers = layers
        model = type(model)(config)
    return TokenLogps(model, chunk_size, attention="sdpa")


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_static_compile_is_per_row_length_not_per_target_count(scope):
    """With static shapes (padding-free, FlexAttention) only the row length picks the compiled graph: batches that
    differ in target count alone reuse it, so target counts can be rounded finely. Compiling blocks, one graph
    serves all four blocks."""
    torch._dynamo.reset()
    backend = CountingBackend()
    torch.manual_seed(0)
    policy = full_policy(5, layers=4)
    reference = copy.deepcopy(policy)
    policy.compile_body(scope=scope, backend=backend, dynamic=False)
    batch = collate_sft(sft_examples(), pad_id=0, flat=True, pad_to_multiple_of=64)
    eager = loss_and_grads(reference, SFTTask(), add_target_index(dict(batch)))
    for multiple in (0, 16, 64):  # 40, 48 and 64 target slots
        assert_same(loss_and_grads(policy, SFTTask(), add_target_index(dict(batch), multiple=multiple)), eager)
    assert len(backend.graphs) == 1
    longer = collate_sft(sft_examples(), pad_id=0, flat=True, pad_to_multiple_of=128)
    loss_and_grads(policy, SFTTask(), add_target_index(dict(longer)))
    assert len(backend.graphs) == 2
    torch._dynamo.reset()


def test_compiled_blocks_run_only_inside_the_body_and_copies_run_their_own():
    """Generation and evaluation call the model directly: its blocks must be the eager ones there. A deep copy of a
    compiled policy (a frozen reference, a merge) must compute with its own weights, not the original's."""
    torch._dynamo.reset()
    backend = CountingBackend()
    policy = full_policy(5)
    policy.compile_body(scope="blocks", backend=backend, dynamic=True)
    batch = add_target_index(collate_sft(sft_examples(), pad_id=0, pad_to_multiple_of=8))
    with torch.no_grad():
        policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert backend.graphs == []
    assert all("forward" not in vars(block) for block in blocks.transformer_blocks(policy))
    copied, plain = copy.deepcopy(policy), full_policy(5)
    with torch.no_grad():
        for p in [*copied.parameters(), *plain.parameters()]:
            p.mul_(0.5)
    assert_same(loss_and_grads(copied, SFTTask(), batch), loss_and_grads(plain, SFTTask(), batch))
    assert all(p.grad is None for p in policy.parameters())
    assert len(backend.graphs) >= 1  # the copy did run compiled blocks


def test_compiling_blocks_of_a_model_without_named_blocks_says_what_to_do():
    policy = full_policy()
    for module in policy.modules():
        module._no_split_modules = None
    with pytest.raises(UserError, match="compile-scope model"):
        policy.compile_body(scope="blocks")
    with pytest.raises(UserError, match="compile scope must be one of blocks, model"):
        policy.compile_body(scope="layers")


def test_checkpointed_blocks_recompute_inside_their_compiled_graph(monkeypatch):
    """With gradient checkpointing, backward recomputes each block: inside the compiled graph, never through the
    block's eager forward (which ``body`` has put back by then, and whose outputs a GPU compiles differently)."""
    batch = add_target_index(collate_sft(sft_examples(), pad_id=0, flat=True, pad_to_multiple_of=64))
    eager = loss_and_grads(full_policy(5), SFTTask(), batch)
    torch._dynamo.reset()
    policy = full_policy(5)
    offload.checkpoint_blocks(policy.model)
    policy.train()  # checkpointing is for training only
    policy.compile_body(fuse_loss=False, backend="aot_eager", dynamic=False)
    block_class = type(blocks.transformer_blocks(policy)[0])
    eager_forward, calls = block_class.forward, []

    def spy(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return eager_forward(self, *args, **kwargs)

    monkeypatch.setattr(block_class, "forward", spy)
    loss, _ = SFTTask().loss(policy, batch)
    loss.backward()
    assert calls == []
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert_same((loss.detach(), grads, {}), eager)
    assert all(block.gradient_checkpointing for block in blocks.transformer_blocks(policy))  # switched back on
    torch._dynamo.reset()
