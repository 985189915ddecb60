"""minialign.ops.triton_decode, the decode step's store-and-attend kernel: under Triton's interpreter on a CPU (where
Triton is installed; CUDA builds of torch ship it) against the decoder's own store and attention, and the decoder's
choice of it (which falls back to FlashAttention, or SDPA on a CPU, wherever the kernel cannot run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.generate import generate
from minialign.modeling.models import load_tokenizer
from minialign.ops import triton_decode
from tests.test_decoder import NEW, PROMPTS, eos_for, llama

ROOT = Path(__file__).resolve().parents[1]

INTERPRETED = """
import torch
from minialign.modeling.decoder_model import apply_rope, decode_attention, decode_layout, write_cache
from minialign.ops.triton_decode import Tiling, append_attend
torch.manual_seed(0)
# G = 3, 3, 1; each row's keys in one program, and shared out in 64-key parts (three parts at 150) merged after
cases = [(4, 6, 2, 150, 16), (4, 9, 3, 130, 64), (2, 4, 4, 70, 32)]
tilings = (Tiling(chunk=0, stages=0), Tiling(64, 32, stages=0))  # the interpreter runs only the unpipelined loop
for (b, heads, kv_heads, length, d), tiling in [(c, t) for c in cases for t in tilings]:
    q = torch.randn(b, heads, d)
    k_new, v_new = torch.randn(b, kv_heads, d), torch.randn(b, kv_heads, d)
    k_cache, v_cache = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    # no cached key, one tile, a tile and a key, the whole cache
    positions = torch.tensor([0, 63, 64, length - 1][:b])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    layout = decode_layout(positions, kv_heads, heads // kv_heads, length, False)
    write_cache(want_k, k_new, layout.cache_index)
    write_cache(want_v, v_new, layout.cache_index)
    want = decode_attention(q, want_k, want_v, layout, d ** -0.5)
    identity = (torch.ones(length, d), torch.zeros(length, d))  # RoPE that rotates nothing: q and k as given
    got = append_attend(q, k_new, v_new, k_cache, v_cache, positions, d ** -0.5, identity, tiling)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), ("the stores", tiling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(tiling))
# RoPE in the kernel: q, k, v as views into one QKV output (the decode step's layout), rotated at each row's position
for b, heads, kv_heads, length, d in cases:
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d)
    q, k_new, v_new = (t.view(b, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
    angles = torch.arange(length)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    positions = torch.tensor([0, 63, 64, length - 1][:b])
    k_cache, v_cache = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    c, s_ = cos[positions][:, None], sin[positions][:, None]
    layout = decode_layout(positions, kv_heads, heads // kv_heads, length, False)
    write_cache(want_k, apply_rope(k_new, c, s_), layout.cache_index)
    write_cache(want_v, v_new.contiguous(), layout.cache_index)
    want = decode_attention(apply_rope(q, c, s_), want_k, want_v, layout, d ** -0.5)
    got = append_attend(q, k_new, v_new, k_cache, v_cache, positions, d ** -0.5, (cos, sin), Tiling(64, 32, stages=0))
    torch.testing.assert_close(k_cache, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, want_v), "v stored as given"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_the_kernel_stores_and_attends_as_the_decoder_does():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-3000:]

# The whole decoder with the kernel in its steps (RoPE applied in the kernel, q/k/v as views into the QKV output,
# rows retiring at EOS), run eagerly under the interpreter in float32: transformers' greedy tokens.
INTERPRETED_DECODER = """
import minialign.ops.triton_decode as td
from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.generate import generate
from minialign.modeling.models import load_tokenizer
from tests.test_decoder import NEW, PROMPTS, eos_for, llama
model, tok = llama(), load_tokenizer("demo")
common = {"max_new_tokens": NEW, "eos_token_id": eos_for(model, tok, PROMPTS), "stop_strings": (), "batch_size": 4}
decoder = StaticDecoder(model)
decoder.kernel = "triton"  # what a CUDA decoder takes; here the interpreter runs it
decoder.tiling = td.Tiling(chunk=16, block=16, stages=0)  # prompts of up to 30 tokens: rows shared out, merged
calls = []
real = td.append_attend
td.append_attend = lambda *a, **k: calls.append(1) or real(*a, **k)
got = generate(model, tok, PROMPTS, decoder=decoder, **common)
assert calls, "the kernel ran"
assert got == generate(model, tok, PROMPTS, decoder="hf", **common), got
print("ok")
"""


def test_the_decoder_with_the_kernel_decodes_as_transformers():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_DECODER], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_shapes_the_kernel_takes():
    import torch

    assert triton_decode.supports(3, 64) and triton_decode.supports(1, 128) and triton_decode.supports(16, 16)
    assert not triton_decode.supports(3, 80) and not triton_decode.supports(17, 64) and not triton_decode.supports(3, 8)
    assert triton_decode.supports(3, 64, torch.float16) and not triton_decode.supports(3, 64, torch.float32)  # TF32


def test_a_decoder_asked_for_the_kernel_where_it_cannot_run_decodes_as_transformers():
    model, tok = llama(), load_tokenizer("demo")
    common = {"max_new_tokens": NEW, "eos_token_id": eos_for(model, tok, PROMPTS), "stop_strings": (), "batch_size": 4}
    decoder = StaticDecoder(model, attention="triton")
    assert decoder.kernel == "flash"  # a CPU: SDPA, as for every other choice
    assert generate(model, tok, PROMPTS, decoder=decoder, **common) == generate(model, tok, PROMPTS, decoder="hf",
                                                                                **common)


@pytest.mark.parametrize("attention,installed,dtype,major,kernel,fallback", [
    ("auto", True, "bfloat16", 9, "triton", False),  # the default takes the kernel wherever it can run
    ("auto", False, "bfloat16", 9, "flash", False),  # and FlashAttention elsewhere, as a matter of course
    ("auto", True, "float32", 9, "flash", False),
    ("auto", True, "bfloat16", 7, "flash", False),  # no bf16 tensor cores before Ampere
    ("triton", False, "bfloat16", 9, "flash", True),  # asked for by name: the fallback is recorded
    ("triton", True, "bfloat16", 7, "flash", True),
    ("flash", True, "bfloat16", 9, "flash", False),
])
def test_which_kernel_a_cuda_decoder_takes(monkeypatch, attention, installed, dtype, major, kernel, fallback):
    import torch

    from minialign.modeling.decode_kernel import choose_kernel
    from minialign.modeling.decoder_model import model_dims

    monkeypatch.setattr(triton_decode, "available", lambda: installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (major, 0))
    got, why = choose_kernel(attention, model_dims(llama()), getattr(torch, dtype), torch.device("cuda"))
    assert got == kernel and (why is not None) == fallback
    assert choose_kernel(attention, model_dims(llama()), getattr(torch, dtype), torch.device("cpu")) == ("flash", None)


def _reference_kernel(q, k, v, k_cache, v_cache, positions, scale, rope, tiling):
    """The decoder's reference path in append_attend's place (what a correct kernel computes)."""

    from minialign.modeling.decoder_model import apply_rope, decode_attention, decode_layout, write_cache

    b, heads, d = q.shape
    c, s = rope[0][positions][:, None], rope[1][positions][:, None]
    layout = decode_layout(positions, k.shape[1], heads // k.shape[1], k_cache.shape[2], False)
    write_cache(k_cache, apply_rope(k, c, s), layout.cache_index)
    write_cache(v_cache, v.contiguous(), layout.cache_index)
    return decode_attention(apply_rope(q, c, s), k_cache, v_cache, layout, scale)


@pytest.mark.parametrize("kernel,verdict", [
    (_reference_kernel, None),
    (lambda *a: _reference_kernel(*a) + 0.1, "attends 0.1 away from the reference path"),
    (lambda *a: _reference_kernel(*a) * float("nan"), "attends nan away from the reference path"),
    (lambda *a: 1 / 0, "failed (ZeroDivisionError"),
    (lambda q, k, v, kc, vc, *a: _reference_kernel(q, k, v, kc.zero_(), vc, *a), "stores keys or values"),
])
def test_the_kernel_is_checked_against_the_reference_path_once(monkeypatch, kernel, verdict):
    import torch

    from minialign.modeling import decode_kernel, decoder

    model, tok = llama(), load_tokenizer("demo")
    decoder_ = StaticDecoder(model)
    tables = decoder.rope_table(model, 64, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(triton_decode, "append_attend", kernel)
    why = decode_kernel.triton_disagrees(decoder_.weights.dims, *tables, triton_decode.TILING)
    assert why is None if verdict is None else why.startswith(verdict), why
    # in the decoder: checked before its first step; a kernel that disagrees gives way to the reference path
    checks = []
    monkeypatch.setattr(decode_kernel, "triton_disagrees",
                        lambda *a, real=decode_kernel.triton_disagrees: checks.append(1) or real(*a))
    decoder_.kernel = "triton"  # what a CUDA decoder takes (here every step would call the patched kernel)
    common = {"max_new_tokens": NEW, "eos_token_id": eos_for(model, tok, PROMPTS), "stop_strings": (), "batch_size": 4}
    answers = [generate(model, tok, PROMPTS, decoder=decoder_, **common)]
    first = len(checks)  # the cache's length and a length that shares rows out (one when the first disagrees)
    answers.append(generate(model, tok, PROMPTS, decoder=decoder_, **common))
    assert first == (2 if verdict is None else 1) and len(checks) == first  # the same cache: not checked again
    assert decoder_.kernel == ("triton" if verdict is None else "flash")
    assert (decoder_.fallback is None) == (verdict is None)
    assert answers[0] == answers[1] == generate(model, tok, PROMPTS, decoder="hf", **common)
