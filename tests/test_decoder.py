"""minialign.modeling.decoder (static KV cache, its own Llama forward, retired rows) against transformers' ``generate``.

Tiny float32 Llama-family models with a wide init (clear-cut next-token choices) and the demo tokenizer: greedy
decoding must give transformers' tokens exactly; sampling must filter like transformers' warpers (checked in float64)
and draw from the filtered distribution; LoRA models decode as their merged equivalents without being modified.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minialign.base.errors import UserError
from minialign.modeling.compiled import decode_parts
from minialign.modeling.decoder import GREEDY, StaticDecoder
from minialign.modeling.decoder_model import (
    PLAIN,
    decode_attention,
    decode_layout,
    decoder_support,
    qkv_rope,
    varlen_decode_args,
    write_cache,
)
from minialign.modeling.flex_decode import KV_BLOCK, decode_blocks, flex_decode
from minialign.modeling.generate import generate
from minialign.modeling.lora import LoRAConfig, apply_lora, disabled, lora_layers, merge_lora
from minialign.modeling.models import BUILTIN_CONFIGS, builtin_config, load_tokenizer
from minialign.modeling.sampling import Sampling, inverse_cdf, warp_logits

PROMPTS = [
    "\n\nHuman: Hello there, how are you today?\n\nAssistant:",
    "I",
    "The quick brown fox jumps over the lazy dog and",
    "\n\nHuman: What?\n\nAssistant: Well",
    "Once upon a time",
    "\n\nHuman: Tell me a long story about a cat, a dog and a bird who live in Paris.\n\nAssistant: Sure,",
]
NEW = 12


def llama(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """tiny-llama's shapes (4 query heads, 2 key/value heads), random weights wide enough for clear choices."""
    kwargs = dict(BUILTIN_CONFIGS["tiny-llama"])
    kwargs.pop("model_type")
    kwargs.update(initializer_range=0.2, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


VARIANTS = {
    "llama-gqa": {},
    # llama3 rope scaling (frequency bands), q/k/v/o biases, a non-default rope_theta.
    "llama-rope-llama3-bias": {"attention_bias": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    # Qwen2 (q/k/v biases) with linear rope scaling and no sliding window.
    "qwen2-rope-linear": {"model_type": "qwen2", "use_sliding_window": False,
                          "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


def eos_for(model, tok, prompts, sampling: Sampling = GREEDY) -> int:
    """A token the model writes mid-answer in some rows: as EOS it ends those rows early and others not."""
    encoded = tok(prompts, add_special_tokens=False)["input_ids"]
    rows = StaticDecoder(model).decode(encoded, max_new_tokens=NEW, eos_ids=[-1], pad_id=0, sampling=sampling,
                                       generator=torch.Generator().manual_seed(3))
    counts: dict[int, int] = {}
    for ids in rows:
        for t in set(ids[3:NEW - 2]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t] < len(rows), counts[t]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_answers_are_transformers_answers(tok, variant):
    overrides = dict(VARIANTS[variant])
    model = llama(overrides.pop("model_type", "llama"), **overrides)
    assert decoder_support(model) is None
    eos = eos_for(model, tok, PROMPTS)
    common = {"max_new_tokens": NEW, "eos_token_id": eos, "details": True, "batch_size": 4, "stop_strings": ()}
    reference = generate(model, tok, PROMPTS, decoder="hf", **common)
    ours = generate(model, tok, PROMPTS, decoder="static", **common)
    assert ours == reference
    assert {c.stop for c in reference} == {"eos", "length"}  # some rows ended early, others ran to the end


def test_stop_strings_end_answers_as_in_transformers(tok):
    model = llama()
    plain = generate(model, tok, PROMPTS, max_new_tokens=NEW, stop_strings=(), decoder="hf")
    stop = plain[0][6:9]  # a piece of text the model writes: rows holding it stop there
    common = {"max_new_tokens": NEW, "details": True, "stop_strings": (stop,), "batch_size": 8}
    reference = generate(model, tok, PROMPTS, decoder="hf", **common)
    ours = generate(model, tok, PROMPTS, decoder=StaticDecoder(model, sync_every=2), **common)
    assert ours == reference
    assert any(c.stop == "stop" for c in reference)


def many_prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(n)]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(True, 0.8, 20, 0.9)])
def test_retiring_finished_rows_changes_no_answer(tok, sampling):
    model = llama()
    prompts = many_prompts(10)
    eos = eos_for(model, tok, prompts, sampling)
    encoded = tok(prompts, add_special_tokens=False)["input_ids"]

    def run(decoder):
        return decoder.decode(encoded, max_new_tokens=NEW, eos_ids=[eos], pad_id=eos, sampling=sampling,
                              generator=torch.Generator().manual_seed(3))

    retiring = StaticDecoder(model, sync_every=2, min_bucket=1, prefill_tokens=64)  # several prefill passes too
    kept = StaticDecoder(model, retire=False, sync_every=NEW)
    assert run(retiring) == run(kept)
    assert retiring.compactions >= 1 and kept.compactions == 0


def test_prefill_passes_stay_small_wherever_attention_is_dense(monkeypatch):
    # A float32 model on CUDA prefills through the dense SDPA path: 65,536 tokens a pass there ran out of 80 GB.
    from minialign.modeling import decoder as module

    monkeypatch.setattr(module, "flash_ok", lambda dtype, device: dtype != torch.float32 and device.type == "cuda")
    cuda = torch.device("cuda")
    assert module.default_prefill_tokens(torch.float32, cuda) == module.DENSE_PREFILL_TOKENS
    assert module.default_prefill_tokens(torch.bfloat16, torch.device("cpu")) == module.DENSE_PREFILL_TOKENS
    assert module.default_prefill_tokens(torch.bfloat16, cuda) == module.FLASH_PREFILL_TOKENS
    assert module.DENSE_PREFILL_TOKENS ** 2 * 9 * 4 < 2**30  # SmolLM2's 9 heads of float32 scores: < 1 GiB a pass
    # and the decoder takes it from the dtype its weights run in (here "flash" = bf16, whatever the device)
    monkeypatch.setattr(module, "flash_ok", lambda dtype, device: dtype == torch.bfloat16)
    for dtype, tokens in ((torch.float32, module.DENSE_PREFILL_TOKENS), (torch.bfloat16, module.FLASH_PREFILL_TOKENS)):
        assert StaticDecoder(llama().to(dtype), graphs=False, compile=False).prefill_tokens == tokens


def test_sampling_is_seeded_and_repeatable(tok):
    model = llama()
    common = {"max_new_tokens": NEW, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 50,
              "stop_strings": (), "decoder": "static"}
    first = generate(model, tok, PROMPTS, seed=1, **common)
    assert generate(model, tok, PROMPTS, seed=1, **common) == first
    assert generate(model, tok, PROMPTS, seed=2, **common) != first


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                             (1.3, 0, 0.8), (0.8, 7, 0.6), (1.0, 3, 0.05)])
def test_filtering_is_transformers_filtering(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 40, dtype=torch.float64) * 3
    logits[0, :4] = 2.5  # ties at the top-k / top-p boundaries
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = warp_logits(logits, Sampling(True, temperature, top_k, top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-12)


def test_inverse_cdf_draws_each_token_with_its_probability():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4, 0.0])
    n = 40000
    draws = inverse_cdf(probs.expand(n, -1), 1 - torch.rand(n, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(draws, minlength=6).double()
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    assert counts[1] == 0 and counts[5] == 0
    assert ((counts - n * probs.double()).abs() <= 4 * sigma + 1).all()
    edges = inverse_cdf(probs.expand(2, -1), torch.tensor([1e-9, 1.0]))
    assert edges.tolist() == [0, 4]  # the first and the last token of nonzero probability


def test_decode_attention_reads_each_rows_used_keys():
    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 3, 6, 2, 9, 8
    q = torch.randn(b, heads, d, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, length, d, dtype=torch.float64) for _ in range(2))
    used = torch.tensor([1, 9, 4])
    out = decode_attention(q, k, v, decode_layout(used - 1, kv_heads, heads // kv_heads, length, False), d**-0.5)
    for row in range(b):
        for h in range(heads):
            keys, values = k[row, h // 3, : used[row]], v[row, h // 3, : used[row]]
            weights = (keys @ q[row, h] * d**-0.5).softmax(0)
            torch.testing.assert_close(out[row, h], weights @ values)


def test_the_varlen_call_describes_each_rows_used_keys():
    """What FlashAttention's varlen kernel (its seqused_k) is given, read by its contract: sequence s holds queries
    cu_q[s]:cu_q[s+1] and the first used[s] keys from cu_k[s], no mask. Read so, it is each row's attention over its
    used keys (the kernel itself runs only on a GPU)."""
    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 3, 6, 2, 9, 8
    q = torch.randn(b, heads, d, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, length, d, dtype=torch.float64) for _ in range(2))
    used = torch.tensor([1, 9, 4])
    layout = decode_layout(used - 1, kv_heads, heads // kv_heads, length, True)
    q2, k2, v2, cu_q, cu_k, seqused = varlen_decode_args(q, k, v, layout)
    assert seqused.dtype == cu_q.dtype == cu_k.dtype == torch.int32 and k2.data_ptr() == k.data_ptr()  # views
    out = torch.empty_like(q2)
    for seq in range(len(seqused)):
        queries, start = q2[cu_q[seq] : cu_q[seq + 1], 0], int(cu_k[seq])
        keys, values = k2[start : start + seqused[seq], 0], v2[start : start + seqused[seq], 0]
        out[cu_q[seq] : cu_q[seq + 1], 0] = (queries @ keys.T * d**-0.5).softmax(-1) @ values
    out = out.view(b, heads, d)
    for row in range(b):
        for h in range(heads):
            keys, values = k[row, h // 3, : used[row]], v[row, h // 3, : used[row]]
            torch.testing.assert_close(out[row, h], (keys @ q[row, h] * d**-0.5).softmax(0) @ values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flex_decode_attention_reads_each_rows_used_keys(dtype):
    """FlexAttention's decode path (an experiment) against the formula, over several key blocks: a row that uses
    one key, exactly one block, one block and a key, the whole cache."""
    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 5, 6, 2, 300, 8
    q = torch.randn(b, heads, d, dtype=dtype)
    k, v = (torch.randn(b, kv_heads, length, d, dtype=dtype) for _ in range(2))
    used = torch.tensor([1, KV_BLOCK, KV_BLOCK + 1, length, 77])
    out = flex_decode(torch.device("cpu"))(q, k, v, *decode_blocks(used, length), d**-0.5)
    for row in range(b):
        for h in range(heads):
            keys, values = k[row, h // 3, : used[row]], v[row, h // 3, : used[row]]
            weights = (keys @ q[row, h] * d**-0.5).softmax(0)
            torch.testing.assert_close(out[row, h], weights @ values)


def test_static_decoder_with_flex_attention_answers_as_transformers(tok):
    model = llama()
    eos = eos_for(model, tok, PROMPTS)
    common = {"max_new_tokens": NEW, "eos_token_id": eos, "details": True, "batch_size": 4, "stop_strings": ()}
    reference = generate(model, tok, PROMPTS, decoder="hf", **common)
    decoder, calls = StaticDecoder(model, attention="flex"), []
    flex = decoder.flex
    decoder.flex = lambda *args: calls.append(1) or flex(*args)
    assert generate(model, tok, PROMPTS, decoder=decoder, **common) == reference
    assert len(calls) >= NEW * model.config.num_hidden_layers  # every decode step of every layer went through flex
    with pytest.raises(UserError, match="attention must be 'auto', 'flash', 'triton' or 'flex'"):
        StaticDecoder(model, attention="flexible")


def test_write_cache_puts_each_rows_key_at_its_position_and_touches_nothing_else():
    """One index_copy_ a layer (the step's layout built once) = cache[row, head, positions[row]] = new[row, head]."""
    rows, kv_heads, length, d = 4, 3, 7, 5
    cache = torch.randn(rows, kv_heads, length, d)
    before = cache.clone()
    bucket, positions = 3, torch.tensor([0, 6, 2])  # a bucket of the first 3 slots; slot 3 is outside it
    new = torch.randn(bucket, kv_heads, d)
    write_cache(cache[:bucket], new, decode_layout(positions, kv_heads, 2, length, False).cache_index)
    expected = before.clone()
    for row in range(bucket):
        expected[row, :, positions[row]] = new[row]
    assert torch.equal(cache, expected)


def test_the_compiled_block_halves_compute_what_eager_ones_do_without_recompiling_per_layer():
    """A decode step's block halves as the decoder compiles them (``decode_parts()``: Inductor's code, here its CPU
    code) against the plain ones, on two layers' weights: the same q, k, v and block output, and the second layer
    reuses the first's compilation. The caches never enter the compiled code (NOTES entry 29)."""
    torch.manual_seed(0)
    bucket, heads, kv_heads, d, hidden, inter = 4, 4, 2, 8, 16, 24
    angles = torch.randn(bucket, 1, d)
    cos, sin = angles.cos(), angles.sin()
    torch._dynamo.reset()
    parts = decode_parts()
    for layer in range(2):
        x, norm = torch.randn(bucket, hidden), torch.randn(hidden)
        wqkv, bqkv = torch.randn((heads + 2 * kv_heads) * d, hidden), torch.randn((heads + 2 * kv_heads) * d)
        w = {"wo": torch.randn(hidden, heads * d), "bo": None, "norm2": torch.randn(hidden),
             "wgu": torch.randn(2 * inter, hidden), "bgu": None, "wd": torch.randn(hidden, inter), "bd": None}
        attn = torch.randn(bucket, heads, d)
        with torch._dynamo.config.patch(error_on_recompile=layer > 0):
            got = parts.qkv(x, norm, wqkv, bqkv, cos, sin, heads, kv_heads, 1e-6)
            out = parts.out_mlp(x, attn, w, torch.nn.functional.silu, 1e-6)
        for a, b in zip(got, qkv_rope(x, norm, wqkv, bqkv, cos, sin, heads, kv_heads, 1e-6)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(out, PLAIN.out_mlp(x, attn, w, torch.nn.functional.silu, 1e-6))


def test_a_failing_step_drops_one_thing_at_a_time_and_says_what():
    triton = StaticDecoder(llama())
    triton.kernel = "triton"  # as on a GPU with Triton (a CPU decodes through SDPA whatever is asked)
    assert triton.fallback is None and triton._fall_back(RuntimeError("no kernel image"))
    assert triton.kernel == "flash" and "triton attention kernel failed" in triton.fallback
    assert "no kernel image" in triton.fallback
    assert not triton._fall_back(RuntimeError("again"))  # plain parts and FlashAttention: nothing left to drop
    kept = StaticDecoder(llama())
    kept.kernel = "triton"
    assert not kept._fall_back(torch.OutOfMemoryError("CUDA out of memory")) and kept.kernel == "triton"
    flex = StaticDecoder(llama(), attention="flex")
    assert flex._fall_back(RuntimeError("x")) and flex.flex is None and "FlexAttention" in flex.fallback


def test_lora_models_decode_as_merged_without_being_modified(tok):
    model = apply_lora(llama(), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = {"max_new_tokens": NEW, "stop_strings": (), "batch_size": 8}
    decoder = StaticDecoder(model)
    ours = generate(model, tok, PROMPTS, decoder=decoder, **common)
    assert ours == generate(merge_lora(copy.deepcopy(model)), tok, PROMPTS, decoder="hf", **common)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with disabled(model):  # the reference model: adapters off
        base = generate(model, tok, PROMPTS, decoder=decoder, **common)
        assert base == generate(model, tok, PROMPTS, decoder="hf", **common)
    assert base != ours
    with torch.no_grad():  # a training step: the same decoder picks up the new weights
        for _, layer in lora_layers(model):
            layer.lora_B.weight.mul_(-1)
    assert generate(model, tok, PROMPTS, decoder=decoder, **common) == generate(
        model, tok, PROMPTS, decoder="hf", **common)


def test_unsupported_models_fall_back_to_transformers(tok):
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(builtin_config("tiny")).eval()
    assert decoder_support(neox) is not None
    common = {"max_new_tokens": 8, "stop_strings": ()}
    assert generate(neox, tok, PROMPTS, decoder="auto", **common) == generate(neox, tok, PROMPTS, decoder="hf",
                                                                              **common)
    with pytest.raises(UserError, match="static decoder cannot run"):
        generate(neox, tok, PROMPTS, decoder="static", **common)
    with pytest.raises(UserError, match="decoder is 'fast'"):
        generate(neox, tok, PROMPTS, decoder="fast", **common)
    with pytest.raises(UserError, match="another model"):
        generate(neox, tok, PROMPTS, decoder=StaticDecoder(llama()), **common)
    windowed = llama("mistral", sliding_window=4)
    assert "sliding" in decoder_support(windowed)
