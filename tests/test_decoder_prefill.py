"""The static decoder's prefill passes: their inputs built in NumPy, their block halves compiled once for any number
of prompt tokens (CUDA only in use; Inductor's CPU code here), and the fall-back to plain halves."""

from dataclasses import replace

import pytest
import torch

from minialign.modeling.compiled import prefill_parts
from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.decoder_model import PLAIN, flat_prompts, qkv_rope
from minialign.modeling.generate import generate
from minialign.modeling.models import load_tokenizer
from tests.test_decoder import NEW, PROMPTS, llama


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


def test_flat_prompts_lays_the_prompts_end_to_end_with_their_positions_and_slots():
    """The NumPy build of a prefill pass against the per-prompt Python build it replaced."""
    prompts, slots = [[5, 6, 7], [9], [], [1, 2, 3, 4]], [3, 0, 7, 2]
    flat, positions, token_slots, lengths = flat_prompts(prompts, slots)
    assert flat.tolist() == [t for p in prompts for t in p]
    assert positions.tolist() == [i for p in prompts for i in range(len(p))]
    assert token_slots.tolist() == [s for p, s in zip(prompts, slots) for _ in p]
    assert lengths.tolist() == [3, 1, 0, 4] and flat.dtype == positions.dtype == torch.long


def test_the_compiled_prefill_halves_compute_what_eager_ones_do_for_any_token_count():
    """Prefill passes differ in length from batch to batch: ``prefill_parts()`` (Inductor's CPU code here) gives the
    plain halves' numbers at 5, 9 and 17 tokens and compiles once for all of them, not once per length."""
    torch.manual_seed(0)
    heads, kv_heads, d, hidden, inter = 4, 2, 8, 16, 24
    w = {"wo": torch.randn(hidden, heads * d), "bo": None, "norm2": torch.randn(hidden),
         "wgu": torch.randn(2 * inter, hidden), "bgu": None, "wd": torch.randn(hidden, inter), "bd": None}
    norm, wqkv = torch.randn(hidden), torch.randn((heads + 2 * kv_heads) * d, hidden)
    torch._dynamo.reset()
    parts = prefill_parts()
    for i, tokens in enumerate((5, 9, 17)):
        x, attn, angles = torch.randn(tokens, hidden), torch.randn(tokens, heads, d), torch.randn(tokens, 1, d)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = parts.qkv(x, norm, wqkv, None, angles.cos(), angles.sin(), heads, kv_heads, 1e-6)
            out = parts.out_mlp(x, attn, w, torch.nn.functional.silu, 1e-6)
        for a, b in zip(got, qkv_rope(x, norm, wqkv, None, angles.cos(), angles.sin(), heads, kv_heads, 1e-6)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # fused float32 sums, summed in another order
        torch.testing.assert_close(out, PLAIN.out_mlp(x, attn, w, torch.nn.functional.silu, 1e-6), rtol=1e-5,
                                   atol=1e-4)


def test_a_failing_compiled_prefill_falls_back_to_plain_parts_and_says_so(tok, capsys):
    """A prefill part that fails (a compiler error on some GPU) costs its speed, not the batch: the pass reruns with
    plain parts, the answers are the plain decoder's, and ``fallback`` says what was dropped."""
    def broken(*args):
        raise RuntimeError("no inductor here")

    common = {"max_new_tokens": NEW, "stop_strings": (), "batch_size": 8}
    model = llama()
    plain = generate(model, tok, PROMPTS, decoder=StaticDecoder(model), **common)
    decoder = StaticDecoder(model)
    decoder.prefill_parts = replace(PLAIN, qkv=broken)
    assert generate(model, tok, PROMPTS, decoder=decoder, **common) == plain
    assert decoder.prefill_parts is PLAIN and "compiled prefill parts failed" in decoder.fallback
    assert "no inductor here" in capsys.readouterr().err

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    decoder = StaticDecoder(model)  # running out of memory is nobody's kernel's fault: raised, nothing dropped
    decoder.prefill_parts = parts = replace(PLAIN, qkv=out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, tok, PROMPTS, decoder=decoder, **common)
    assert decoder.prefill_parts is parts and decoder.fallback is None
