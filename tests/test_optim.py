"""minialign.training.optim: clipping folded into fused AdamW against torch's clip_grad_norm_ followed by AdamW."""

from __future__ import annotations

import pytest
import torch

from minialign.training import optim


def params_and_grads(scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (300, 17, 1000)]
    grads = [scale * torch.randn(p.shape, generator=gen) for p in params]
    return params, grads


def train(fold: bool, scale: float, max_norm: float, steps: int = 3):
    params, grads = params_and_grads(scale)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fold)  # fused AdamW runs on CPUs too
    norms = []
    for step in range(steps):
        for p, g in zip(params, grads):
            p.grad = g * (step + 1)
        if fold:
            assert optim.folds_clipping(opt, [p.grad for p in params])
            norms.append(optim.grad_norm_step(opt, params, max_norm))
        else:  # torch's own: clip the gradients in place, then step
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else
                         torch.nn.utils.get_total_norm([p.grad for p in params]))
        opt.step()
    return params, torch.stack(norms)


@pytest.mark.parametrize("scale, max_norm", [(5.0, 1.0), (1e-3, 1.0), (5.0, 0.0)])
def test_folded_clipping_equals_clip_grad_norm_then_adamw(scale, max_norm):
    """Clipped (norm ~100 > 1), unclipped (norm < 1) and no clipping at all: the same norms and weights."""
    folded, folded_norms = train(True, scale, max_norm)
    plain, plain_norms = train(False, scale, max_norm)
    torch.testing.assert_close(folded_norms, plain_norms, rtol=1e-6, atol=0)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and the clipping really happened: unclipped AdamW on large gradients ends elsewhere
    if max_norm and scale > 1:
        free, _ = train(False, scale, 0.0)
        assert max((a - b).abs().max() for a, b in zip(free, plain)) > 1e-4


def test_clipping_is_folded_only_into_fused_adamw():
    params, grads = params_and_grads(1.0)
    for p, g in zip(params, grads):
        p.grad = g
    assert not optim.folds_clipping(torch.optim.AdamW(params, fused=False), grads)
    assert not optim.folds_clipping(torch.optim.SGD(params, lr=0.1), grads)
    unfused = torch.optim.AdamW(params, fused=False)
    optim.grad_norm_step(unfused, params, 1e-3)  # clips in place instead
    assert not hasattr(unfused, "grad_scale")
    assert torch.nn.utils.get_total_norm([p.grad for p in params]) == pytest.approx(1e-3, rel=1e-4)
