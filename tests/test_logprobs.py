"""minialign.ops.logprobs against independent references: materialised logits and float64 recomputations."""

from __future__ import annotations

import pytest
import torch

from minialign.ops import logprobs

# ----------------------------------------------------------------------------- token_logps


def random_head(n: int = 13, hidden: int = 8, vocab: int = 37, dtype=torch.float64, seed: int = 0):
    """Hidden states [n, hidden], an LM-head weight [vocab, hidden] and targets [n], all random."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, t


def materialised_logps(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The obvious way: full [n, vocab] logits, log_softmax, gather."""
    return torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)


def value_and_grads(fn, h, w, t, upstream: torch.Tensor):
    out = fn(h, w, t)
    gh, gw = torch.autograd.grad((out * upstream).sum(), (h, w))
    return out.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_token_logps_matches_materialised_logits(chunk):
    h, w, t = random_head()
    upstream = torch.randn(h.shape[0], dtype=h.dtype, generator=torch.Generator().manual_seed(1))
    got = value_and_grads(lambda *a: logprobs.token_logps(*a, chunk_size=chunk), h, w, t, upstream)
    want = value_and_grads(materialised_logps, h, w, t, upstream)
    assert got[0].dtype == torch.float64
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_token_logps_matches_materialised_logits(chunk):
    """The compiled per-chunk softmax math (what --compile uses) gives the same values and gradients."""
    h, w, t = random_head()
    upstream = torch.randn(h.shape[0], dtype=h.dtype, generator=torch.Generator().manual_seed(1))
    got = value_and_grads(lambda *a: logprobs.token_logps(*a, chunk_size=chunk, fused=True), h, w, t, upstream)
    want = value_and_grads(materialised_logps, h, w, t, upstream)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_fused_chunk_gradient_equals_the_in_place_one_in_bfloat16():
    gen = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(9, 50, generator=gen)).to(torch.bfloat16)
    targets, grad_out = torch.randint(0, 50, (9,), generator=gen), torch.randn(9, generator=gen)
    fused = logprobs._chunk_grad_pointwise(logits, targets, grad_out)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, logprobs._chunk_grad(logits, targets, grad_out), rtol=0, atol=0)


def test_fused_logps_and_gradient_equal_the_in_place_ones_in_bfloat16():
    gen = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(9, 50, generator=gen)).to(torch.bfloat16)
    targets = torch.randint(0, 50, (9,), generator=gen)
    fused = logprobs._chunk_logps_and_grad_pointwise(logits, targets)
    eager = logprobs._chunk_logps_and_grad(logits.clone(), targets)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], eager[1], rtol=0, atol=0)


def path_of(out: torch.Tensor) -> str:
    """Which op made ``out``: gradients from the forward pass, or recomputed in backward."""
    return "forward" if "token_logps_with_grads" in type(out.grad_fn).__name__ else "recompute"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [4, 13, 64])
@pytest.mark.parametrize("trained", ["both", "hidden", "weight"])
def test_gradients_from_the_forward_pass_match_materialised_logits(trained, chunk, fused):
    """The forward-pass gradient factors (any chunking, any input trained) against full logits, in float64."""
    h, w, t = random_head()
    h.requires_grad_(trained != "weight")
    w.requires_grad_(trained != "hidden")
    upstream = torch.randn(h.shape[0], dtype=h.dtype, generator=torch.Generator().manual_seed(1))
    inputs = [x for x in (h, w) if x.requires_grad]

    def run(fn):
        out = fn(h, w, t)
        return [out.detach(), *torch.autograd.grad((out * upstream).sum(), inputs)]

    got = run(lambda h, w, t: logprobs._token_logps_with_grads(h, w, t, chunk, fused, h.requires_grad,
                                                            w.requires_grad)[0])
    for g, r in zip(got, run(materialised_logps)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_forward_pass_gradients_agree_with_recomputed_ones_in_bfloat16():
    """Both paths in the training precision: the same log-probs, gradients within bf16 rounding."""
    h64, w64, t = random_head(n=40, hidden=32, vocab=200, seed=5)
    h = (0.3 * h64.detach()).to(torch.bfloat16).requires_grad_()
    w = w64.detach().to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(40, generator=torch.Generator().manual_seed(6))
    kept = value_and_grads(lambda *a: logprobs._token_logps_with_grads(*a, 16, False, True, True)[0], h, w, t, upstream)
    recomputed = value_and_grads(lambda *a: logprobs._chunked_token_logps(*a, 16, False), h, w, t, upstream)
    torch.testing.assert_close(kept[0], recomputed[0], rtol=0, atol=0)
    for g, r in zip(kept[1:], recomputed[1:]):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - r.float()).norm() / r.float().norm()) < 1e-2


def test_forward_pass_gradient_op_passes_opcheck():
    h, w, t = random_head()
    for need_h, need_w in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(logprobs._token_logps_with_grads, (h, w, t, 5, False, need_h, need_w))


def test_token_logps_keeps_logit_gradients_only_where_that_holds_no_more_memory():
    # Pythia's head: 128 MiB chunks are 667 rows of float32 copies (eager) or 1,334 rows of bf16 logits (fused).
    vocab, hidden = 50_304, 512
    assert logprobs.default_chunk_size(vocab) == 667 and logprobs.default_chunk_size(vocab, 2) == 1334
    # One chunk: always kept. Several: kept while [n, V] in bf16 is no larger than the float32 [V, H] sum it replaces.
    assert logprobs.keeps_logit_grads(1334, hidden, 1334, 2)
    assert logprobs.keeps_logit_grads(1024, hidden, 128, 2)
    assert not logprobs.keeps_logit_grads(1025, hidden, 128, 2)
    h, w, t = random_head()  # 13 rows, hidden 8, float64: several chunks keep up to 4 rows
    assert path_of(logprobs.token_logps(h, w, t, chunk_size=13)) == "forward"
    assert path_of(logprobs.token_logps(h, w, t, chunk_size=5)) == "recompute"
    assert path_of(logprobs.token_logps(h[:4], w, t[:4], chunk_size=1)) == "forward"
    assert path_of(logprobs.token_logps(h, w.detach(), t, chunk_size=1)) == "forward"  # frozen head: nothing kept
    with torch.no_grad():
        assert logprobs.token_logps(h, w, t).grad_fn is None


def test_token_logps_gradcheck_float64_uneven_chunks():
    h, w, t = random_head(n=7, hidden=4, vocab=11)
    # chunk 3 does not divide 7: the last chunk is short
    assert torch.autograd.gradcheck(lambda h, w: logprobs.token_logps(h, w, t, chunk_size=3), (h, w))


def test_token_logps_gradient_wrt_one_input_only():
    h, w, t = random_head()
    w_frozen = w.detach()
    (gh,) = torch.autograd.grad(logprobs.token_logps(h, w_frozen, t, chunk_size=4).sum(), (h,))
    (want,) = torch.autograd.grad(materialised_logps(h, w_frozen, t).sum(), (h,))
    torch.testing.assert_close(gh, want, rtol=1e-12, atol=1e-12)


def test_token_logps_float32_against_float64_recomputation():
    h64, w64, t = random_head(n=50, hidden=16, vocab=300, seed=3)
    h32 = h64.detach().float().requires_grad_()
    w32 = w64.detach().float().requires_grad_()
    upstream = torch.randn(50, generator=torch.Generator().manual_seed(4))
    got = value_and_grads(lambda *a: logprobs.token_logps(*a, chunk_size=7), h32, w32, t, upstream)
    # reference: the float32 inputs promoted to float64, materialised logits
    h_ref = h32.detach().double().requires_grad_()
    w_ref = w32.detach().double().requires_grad_()
    want = value_and_grads(materialised_logps, h_ref, w_ref, t, upstream.double())
    assert got[0].dtype == torch.float32
    for g, r in zip(got, want):
        rel = (g.double() - r).norm() / r.norm()
        assert rel < 5e-6, rel


def test_token_logps_under_bfloat16_autocast_stays_close_to_float32():
    h64, w64, t = random_head(n=40, hidden=32, vocab=200, seed=5)
    h = (0.3 * h64.detach().float()).requires_grad_()  # logits of a realistic size (std ~ 1.7)
    w = w64.detach().float().requires_grad_()
    upstream = torch.ones(40)
    full = value_and_grads(lambda *a: logprobs.token_logps(*a, chunk_size=16), h, w, t, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = value_and_grads(lambda *a: logprobs.token_logps(*a, chunk_size=16), h, w, t, upstream)
    assert low[0].dtype == torch.float32  # softmax maths stays in float32
    assert low[1].dtype == h.dtype and low[2].dtype == w.dtype
    torch.testing.assert_close(low[0], full[0], rtol=0, atol=0.15)
    for g, r in zip(low[1:], full[1:]):
        assert (g - r).norm() / r.norm() < 0.05
    # and not identical: the matmuls really ran in bfloat16
    assert not torch.equal(low[0], full[0])


# ----------------------------------------------------------------------------- sequence_logps


def loop_sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            tok = int(targets[b, t])
            if tok == -100:
                continue
            row = logits[b, t].double()
            out[b] += row[tok] - torch.logsumexp(row, dim=0)
    return out


def test_sequence_logps_against_float64_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=gen) * 3
    targets = torch.randint(0, 10, (3, 6), generator=gen)
    targets[0, :2] = -100  # prompt
    targets[1, 4:] = -100  # padding
    targets[2, :] = -100  # no response at all
    got = logprobs.sequence_logps(logits, targets)
    torch.testing.assert_close(got.double(), loop_sequence_logps(logits, targets), rtol=1e-6, atol=1e-5)
    assert got[2] == 0


def test_sequence_logps_ignores_impossible_tokens_at_masked_positions():
    # a masked position may have a -inf logit at token 0 (e.g. a banned token); it must not poison the sum
    logits = torch.randn(1, 4, 5)
    logits[0, 0, 0] = float("-inf")
    targets = torch.tensor([[-100, 1, 2, 3]])
    got = logprobs.sequence_logps(logits, targets)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), loop_sequence_logps(logits, targets), rtol=1e-6, atol=1e-5)
