"""Qwen2, Mistral, Gemma2 and Phi3 (tiny random built-ins) on every path: padded, padding-free with a dense document
mask, varlen segments; SFT and DPO; LoRA and full; ``--fast`` on and off.

References are independent of minialign: each sequence run alone through the transformers model with eager attention
(its own sliding-window masks, soft-capping and logits), and PEFT for adapters. Gemma2 soft-caps attention logits,
which no padding-free path can: it must fall back to padded batches, say so, and still compute the model's function.
"""

from __future__ import annotations

import copy
import json
import math
import random

import peft
import pytest
import torch
from cli_runs import _one_thread, read_metrics, train_losses  # noqa: F401 (_one_thread: autouse fixture)
from test_lora import randomise_lora

from minialign import cli
from minialign.base.errors import UserError
from minialign.data import TokenizedExample, TokenizedPair, block_causal_mask, collate_pairs, collate_sft, pad_row
from minialign.modeling.adapters import save_adapter
from minialign.modeling.blocks import fast_path_support, sliding_window
from minialign.modeling.lora import LoRAConfig, LoRALinear, apply_lora, resolve_target_modules
from minialign.modeling.models import default_tokenizer, load_model
from minialign.modeling.policy import TokenLogps
from minialign.ops.attention import kv_slots, varlen_index, varlen_reference, window_mask
from minialign.training.batches import prepare_batch
from minialign.training.tasks import sequence_sums

ARCHS = ["tiny-qwen2", "tiny-mistral", "tiny-gemma2", "tiny-phi3"]
FAST = ["tiny-qwen2", "tiny-mistral", "tiny-phi3"]  # Gemma2 soft-caps attention: padded batches only
WINDOW = 16  # the built-ins' sliding window; the sequences below reach well past it
LINEAR = {
    "tiny-qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "tiny-mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "tiny-gemma2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "tiny-phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(n)]


def pairs() -> list[TokenizedPair]:
    rng = random.Random(0)
    return [TokenizedPair(ids(rng, rng.randint(8, 30)), ids(rng, rng.randint(4, 24)), ids(rng, rng.randint(4, 24)))
            for _ in range(3)]


def examples() -> list[TokenizedExample]:
    rng = random.Random(1)
    return [TokenizedExample(ids(rng, rng.randint(0, 20)), ids(rng, rng.randint(8, 30))) for _ in range(4)]


def sequences(layout: str) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of every sequence of a batch, in its row order (DPO: chosen, then rejected)."""
    if layout == "sft":
        return [(e.prompt_ids + e.response_ids, len(e.prompt_ids)) for e in examples()]
    ps = pairs()
    return [(p.prompt_ids + getattr(p, side), len(p.prompt_ids)) for side in ("chosen_ids", "rejected_ids") for p in ps]


def collated(layout: str, flat: bool) -> dict:
    if layout == "sft":
        return collate_sft(examples(), pad_id=0, flat=flat)
    return collate_pairs(pairs(), pad_id=0, flat=flat, share_prompt=flat and layout == "dpo-shared")


def transformers_logps(model, layout: str) -> torch.Tensor:
    """Summed response log-probs, each sequence alone (no padding, no document mask) through the model's own eager
    attention and output logits (Gemma2's final soft-cap included)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for seq, n_prompt in sequences(layout):
            logits = ref(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
            logps = torch.log_softmax(logits.to(torch.float64), -1)
            out.append(sum(logps[i - 1, seq[i]] for i in range(max(n_prompt, 1), len(seq))))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
@pytest.mark.parametrize("layout", ["sft", "dpo", "dpo-shared"])
@pytest.mark.parametrize("arch", FAST)
def test_padding_free_rows_score_like_the_transformers_model(arch, layout, attention):
    """One flat row (padded to a planned length) with the dense document mask, or varlen segments (SDPA with the mask
    they imply, the CPU stand-in for FlashAttention): each sequence's log-probs as the model gives them alone, sliding
    windows included (sequences up to 54 tokens, window 16)."""
    model = load_model(arch).double()
    assert max(len(s) for s, _ in sequences(layout)) > 2 * WINDOW and fast_path_support(model) is None
    policy = TokenLogps(model, attention=attention)
    batch = collated(layout, flat=True)
    batch = prepare_batch(pad_row(batch, batch["input_ids"].shape[1] + 7), target_multiple=16,
                          varlen=attention == "varlen")
    assert ("cu_seqlens_q" in batch) == (attention == "varlen")
    with torch.no_grad():
        got = sequence_sums(policy, batch, False)
        padded = sequence_sums(policy, prepare_batch(collated(layout, flat=False)), False)
    want = transformers_logps(model, layout)
    # eager attention takes its softmax in float32, hence 1e-6 rather than float64's 1e-12
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-mistral"])
def test_the_window_matters_for_these_sequences(arch):
    """The references above would not notice a missing window unless it changes the result: it does, by far."""
    model = load_model(arch).double()
    assert sliding_window(model) == WINDOW
    windowed = transformers_logps(model, "dpo")
    model.config.sliding_window = 10_000  # wider than any sequence: plain causal attention
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            layer.self_attn.sliding_window = 10_000
    assert (transformers_logps(model, "dpo") - windowed).abs().max() > 1e-3


def test_windowed_segments_equal_the_windowed_document_mask():
    """Varlen segments with a window (what FlashAttention's window_size_left computes) against the dense document
    mask bounded by position distance, on a shared-prompt row whose branches read their prompt across the window."""
    batch = pad_row(collated("dpo-shared", flat=True), 160)
    length = batch["input_ids"].shape[1]
    meta = varlen_index(batch["doc_ids"], batch["prefix_ids"], kv_length=kv_slots(length))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(2))
    flat = [x.transpose(1, 2).reshape(length, x.shape[1], 8) for x in (q, k, v)]
    mask = block_causal_mask(batch["doc_ids"], batch["prefix_ids"]) & window_mask(batch["position_ids"], WINDOW)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dense = dense.transpose(1, 2).reshape(length, 4, 8)
    real = batch["doc_ids"].flatten() >= 0
    out = varlen_reference(*flat, meta["cu_seqlens_q"], meta["cu_seqlens_k"], meta["kv_index"], window=WINDOW)
    torch.testing.assert_close(out[real], dense[real], rtol=1e-10, atol=1e-10)
    unbounded = varlen_reference(*flat, meta["cu_seqlens_q"], meta["cu_seqlens_k"], meta["kv_index"])
    assert (unbounded[real] - out[real]).abs().max() > 1e-3


def test_gemma2_keeps_its_soft_caps_on_padded_batches():
    """Gemma2 (attention and final logit soft-capping, windows on alternating layers, query_pre_attn_scalar): padded
    batches give the model's log-probs (its final soft-cap applied to the target logits); padding-free paths refuse."""
    model = load_model("tiny-gemma2")  # float32: eager attention's float32 softmax overflows float64's mask value
    with torch.no_grad():  # random weights give logits near 0, where tanh is the identity: make the final cap bite
        model.model.norm.weight.fill_(300.0)
    config = model.config
    assert config.attn_logit_softcapping and config.final_logit_softcapping
    assert config.query_pre_attn_scalar != config.head_dim
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    reason = fast_path_support(model)
    assert reason is not None and "soft-capping" in reason
    policy = TokenLogps(model, attention="sdpa")
    with torch.no_grad():
        got = sequence_sums(policy, prepare_batch(collate_pairs(pairs(), pad_id=0)), False)
    torch.testing.assert_close(got.double(), transformers_logps(model, "dpo"), rtol=0, atol=2e-4)
    uncapped = copy.copy(policy)
    uncapped.final_softcap = None
    with torch.no_grad():
        plain = sequence_sums(uncapped, prepare_batch(collate_pairs(pairs(), pad_id=0)), False)
    assert (plain - got).abs().max() > 1e-3
    with pytest.raises(UserError, match="SDPA"):
        TokenLogps(model, attention="varlen")


# ----------------------------------------------------------------------------- whole runs through the CLI

SMALL = ["--demo", "--batch-size", "4", "--limit", "8", "--eval-limit", "4", "--max-steps", "2", "--max-length", "64",
         "--max-prompt-length", "32", "--lr", "1e-3"]


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_on_trains_like_fast_off(arch, kind, method, tmp_path, capsys):
    """Two steps each way: finite losses, and the first step's loss is the same on padded batches (--fast off) and
    padding-free ones of planned shapes (--fast on); Gemma2 says it falls back and trains exactly as --fast off."""
    assert default_tokenizer(arch) == "demo"
    first = {}
    for fast in ("off", "on"):
        out = tmp_path / fast
        flags = ["--full"] if method == "full" else []
        assert cli.main([kind, "--model", arch, *SMALL, "--fast", fast, "--out", str(out), *flags]) == 0
        losses = train_losses(read_metrics(out))
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses.values())
        first[fast] = losses
        plan = json.loads((out / "summary.json").read_text())["shape_plan"]
        assert (plan is not None) == (fast == "on" and arch in FAST)  # padding-free rows of planned shapes, or not
        said = capsys.readouterr().out
        falls_back = "--fast falls back to padded batches" in said
        assert falls_back == (fast == "on" and arch not in FAST)
        if falls_back:
            assert "soft-capping" in said
    if arch in FAST:
        assert first["on"][1] == pytest.approx(first["off"][1], rel=1e-5)
    else:  # the same padded batches: the same numbers
        assert first["on"] == first["off"]


@pytest.mark.parametrize("flag", ["--padding-free", "--packing"])
def test_explicit_padding_free_on_gemma2_is_refused(flag, tmp_path, capsys):
    assert cli.main(["sft", "--model", "tiny-gemma2", *SMALL, flag, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert flag in err and "soft-capping" in err


# ----------------------------------------------------------------------------- LoRA


def logits(model) -> torch.Tensor:
    x = torch.randint(1, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_adapter_loads_in_peft(arch, tmp_path):
    """all-linear targets every projection of the blocks (Phi3: its fused qkv_proj and gate_up_proj), as PEFT's
    all-linear does, and the saved adapter gives PEFT the same logits."""
    assert set(resolve_target_modules(load_model(arch), "all-linear")) == LINEAR[arch]
    model = apply_lora(load_model(arch), LoRAConfig(r=4, alpha=8)).eval()
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=arch)
    theirs = peft.PeftModel.from_pretrained(load_model(arch), tmp_path / "adapter").eval()
    ours = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ours == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert len(ours) == len(LINEAR[arch]) * model.config.num_hidden_layers
    peft_all = peft.get_peft_model(load_model(arch), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                     task_type="CAUSAL_LM"))
    assert {n.removeprefix("base_model.model.") for n, m in peft_all.named_modules() if hasattr(m, "lora_A")} == ours
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-5)
    assert (logits(theirs) - logits(load_model(arch).eval())).abs().max() > 1e-3  # the adapter really acts
