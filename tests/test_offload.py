"""--offload-activations (minialign.modeling.offload): checkpointing whose kept block inputs wait on the host.

The reference is transformers' own checkpointing and no checkpointing at all: the same loss and the same LoRA
gradients (float32, CPU), dropout masks included; through the CLI, the same run. The CUDA copies themselves (pinned
memory, a side stream) cannot run here; benchmarks/unsloth_gpu.sh's `sft-offload` row measures them.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from minialign import cli
from minialign.base.errors import UserError
from minialign.config.schema import SFTConfig
from minialign.modeling import lora, models, offload
from minialign.modeling.models import builtin_config, load_model
from tests.conftest import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def lora_model(name: str, checkpointing: str, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(name)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=dropout))
    model.train()
    if checkpointing != "off":
        offload.checkpoint_blocks(model)
    if checkpointing == "offload":
        assert offload.install(model) == model.config.num_hidden_layers
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)  # B = 0 would leave A without a gradient
    return model


def batch(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def lora_grads(name: str, checkpointing: str, dropout: float = 0.0, steps: int = 1) -> tuple[float, list[torch.Tensor]]:
    """The last step's loss and the LoRA gradients summed over ``steps`` forward/backward passes (each pass draws
    new dropout masks from where the last one left the random state)."""
    model = lora_model(name, checkpointing, dropout)
    ids = batch(model)
    torch.manual_seed(2)  # the dropout masks of the forwards
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_gradients_are_those_of_plain_and_checkpointed_backward(name):
    loss, plain = lora_grads(name, "off")
    for kind in ("checkpoint", "offload"):
        other_loss, grads = lora_grads(name, kind)
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert len(grads) == len(plain) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, plain))


def test_recomputation_draws_the_forwards_dropout_masks_and_leaves_the_random_state_alone():
    # two passes: the second pass's masks come from where backward left the random state
    loss, reference = lora_grads("tiny-llama", "checkpoint", dropout=0.3, steps=2)
    other_loss, grads = lora_grads("tiny-llama", "offload", dropout=0.3, steps=2)
    assert other_loss == loss and all(torch.equal(a, b) for a, b in zip(grads, reference))
    _, plain = lora_grads("tiny-llama", "off", dropout=0.3)  # and dropout is on: no dropout would differ
    _, without = lora_grads("tiny-llama", "off", dropout=0.0)
    assert not all(torch.allclose(a, b) for a, b in zip(plain, without))


def test_each_blocks_input_is_let_go_once_the_block_has_run(monkeypatch):
    # What leaves the GPU there: here the "host copy" is a clone, so the inputs themselves must be unreferenced.
    model = lora_model("tiny-llama", "offload")
    monkeypatch.setattr(offload.Offloader, "to_host", lambda self, x: (x.detach().clone(), None))
    inputs = []
    call = offload.Offloader.__call__
    monkeypatch.setattr(offload.Offloader, "__call__",
                        lambda self, f, *args: inputs.append(weakref.ref(args[0])) or call(self, f, *args))
    ids = batch(model)
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = [r for r in inputs if r() is not None]
    assert len(inputs) == model.config.num_hidden_layers
    assert len(alive) <= 1  # the first block's input is the embedding's output, a leaf autograd keeps for backward
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_without_gradients_blocks_run_as_they_are(monkeypatch):
    model = lora_model("tiny-llama", "offload")
    plain = lora_model("tiny-llama", "off")
    monkeypatch.setattr(offload.Offloader, "to_host", lambda *_: pytest.fail("nothing should be kept"))
    ids = batch(model)
    with torch.no_grad():  # e.g. the adapters switched off as DPO's reference, the model still in training mode
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_a_model_without_checkpointed_blocks_is_refused():
    with pytest.raises(UserError, match="no checkpointed block"):
        offload.install(load_model("tiny"))


def test_checkpoint_blocks_checkpoints_every_block_without_a_deprecation_warning():
    import warnings

    from transformers.modeling_layers import GradientCheckpointingLayer

    def blocks(model):
        return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

    model = load_model("tiny-llama")
    layers = blocks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        offload.checkpoint_blocks(model)
    assert len(layers) == model.config.num_hidden_layers and all(m.gradient_checkpointing for m in layers)
    # a transformers release without the new name (before 5.2x): its old switch, non-reentrant as well
    class Older(torch.nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    older = Older()
    offload.checkpoint_blocks(older)
    assert older.kwargs == {"use_reentrant": False}


@pytest.mark.parametrize("fields,match", [
    ({}, "add --grad-checkpointing"),
    ({"grad_checkpointing": True, "compile": True}, "drop --compile"),
])
def test_bad_combinations_are_refused(fields, match):
    with pytest.raises(UserError, match=match):
        SFTConfig(offload_activations=True, **fields).validate()
    with pytest.raises(UserError, match="one process only"):
        SFTConfig(offload_activations=True, grad_checkpointing=True).validate(world=2)


def test_the_cli_run_is_the_checkpointed_run(tmp_path, monkeypatch):
    kept = []
    real = offload.Offloader.to_host
    monkeypatch.setattr(offload.Offloader, "to_host", lambda self, x: kept.append(x.shape) or real(self, x))

    def losses(*flags):
        out = tmp_path / "-".join(flags)
        assert cli.main(["sft", "--demo", "--batch-size", "4", "--limit", "16", "--eval-limit", "4", "--max-steps",
                         "3", "--grad-checkpointing", *flags, "--out", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and "step" in r]

    checkpointed = losses()
    assert len(checkpointed) == 3 and not kept
    assert losses("--offload-activations") == pytest.approx(checkpointed, rel=1e-6)
    assert len(kept) == 3 * 2  # each training step, each of the tiny model's two blocks


def test_backward_fetches_each_input_one_block_ahead(monkeypatch):
    # The GPU path's bookkeeping with clones for its copies (no CUDA here): every kept input comes back exactly
    # once; the last block's when backward reaches it, each other one while backward is still in the block after it.
    hosts, events = [], []
    monkeypatch.setattr(offload.Offloader, "offloads", staticmethod(lambda x: True))
    monkeypatch.setattr(offload.Offloader, "copy_to_host", lambda self, x: hosts.append(x.detach().clone()) or hosts[-1])
    monkeypatch.setattr(offload.Offloader, "use_on_compute_stream", staticmethod(lambda gpu, arrived: None))

    def index(tensor):
        return next(i for i, h in enumerate(hosts) if h is tensor)

    def copy_to_device(self, host, device):
        events.append(("fetch", index(host)))
        return host.clone(), None

    to_device = offload.Offloader.to_device
    monkeypatch.setattr(offload.Offloader, "copy_to_device", copy_to_device)
    monkeypatch.setattr(offload.Offloader, "to_device",
                        lambda self, saved: events.append(("use", index(saved[0]))) or to_device(self, saved))
    config = builtin_config("tiny-llama")
    config.num_hidden_layers = 4
    monkeypatch.setattr(models, "builtin_config", lambda *_: config)
    model = lora_model("tiny-llama", "offload")
    ids = batch(model)
    model(input_ids=ids, labels=ids).loss.backward()
    last = len(hosts) - 1
    assert last == 3
    expected = [("use", last), ("fetch", last)]
    for i in range(last - 1, -1, -1):
        expected += [("fetch", i), ("use", i)]
    assert events == expected
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
