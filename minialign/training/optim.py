"""AdamW as minialign steps it: fused on CUDA, optionally inside backward, clipped without a host sync, and its
learning-rate schedule. Kept apart from the loop (``train.py``), which only calls ``update()`` and the scheduler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minialign.base import dist
from minialign.config.schema import TrainConfig

# Compiling StochasticAdamW's update costs ~6-10 s once (H200, empty caches: check_bf16_adamw-h200.json); run op by
# op inside a CUDA graph it costs ~40 ms more a step per 1e9 parameters. At 1.35e11 parameter-steps (llama-1b, one
# HH epoch at batch 16) both took the same training time (e2e-h200-llama1b-epoch.json); longer runs compile.
COMPILE_UPDATE_FROM = 1.5e11


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device,
                   steps: int | None = None) -> torch.optim.Optimizer:
    """AdamW: the fused kernel on CUDA, the for-loop one elsewhere; stepped inside backward with ``optim_in_backward``;
    ``StochasticAdamW`` when the trained weights are bf16 (full fine-tuning with ``base_dtype`` bfloat16), its
    update compiled on CUDA when the run (``steps``; None: open-ended) is long enough to repay the compilation."""
    if any(p.dtype != torch.float32 for p in params):
        work = float("inf") if steps is None else steps * sum(p.numel() for p in params)
        return StochasticAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                               compiled=device.type == "cuda" and work >= COMPILE_UPDATE_FROM)
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=device.type == "cuda")
    if cfg.optim_in_backward:
        cfg.check_optim_in_backward(dist.world_size())
        return InBackwardAdamW(params, max_norm=cfg.max_grad_norm, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class InBackwardAdamW(torch.optim.AdamW):
    """AdamW fused into the backward pass (torchtune's ``optimizer_in_bwd``).

    A ``post_accumulate_grad`` hook steps each parameter as soon as its gradient is complete and frees that
    gradient at once, so the whole-model gradient never exists. To the loop it is an ordinary AdamW:
    ``step()`` and ``zero_grad()`` are no-ops (the work was done in backward), the LR scheduler drives
    ``param_groups`` (read by each hook when it fires), and its checkpoints and the plain optimizer's are
    interchangeable (AdamW's ``state_dict`` plus ``last_grad_norm``, which plain AdamW ignores). Each parameter is
    stepped by a one-parameter AdamW that shares this optimizer's ``state``: the same kernels (fused on CUDA), the
    same numbers as one ``AdamW.step()`` over all of them.

    Each hook also writes its gradient's norm into a device vector: ``take_grad_norm()`` gives the norm of the
    whole gradient without a host sync. Call ``remove_hooks()`` when training is over.

    ``max_norm`` > 0 clips with the norm of the *previous* step's whole gradient: this step's norm is complete only
    after its last parameter has been updated. Over a few steps the norm changes little, so this keeps what
    clipping does to AdamW's second moments (early large gradients do not shrink every later update), which
    unclipped training loses (llama-1b SFT LoRA: 0.36 nats of held-out loss, NOTES entry 25). Where no previous norm
    is known (a run's first step, a resume from a checkpoint without one), ``measure_first`` runs that step's backward
    once with the hooks only measuring, so the step is clipped by its own norm. The last norm travels in
    ``state_dict()``; a resumed run clips with its own ``max_norm``.
    """

    # kernel flags: each device's own, never a checkpoint's (it may come from another device)
    FLAGS = ("fused", "foreach", "capturable", "differentiable")

    def __init__(self, params, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        owned = [(g, p) for g, group in enumerate(self.param_groups) for p in group["params"]]
        if not owned:
            raise ValueError("InBackwardAdamW got no parameters")
        device = owned[0][1].device
        self.max_norm = max_norm
        self.measuring = False  # hooks record norms and free gradients without stepping (``measure_first``)
        self.norm_known = False  # whether ``last_norm`` holds a real step's norm (host flag: no sync to read it)
        self._norms = torch.zeros(len(owned), dtype=torch.float32, device=device)
        self.last_norm = torch.zeros((), dtype=torch.float32, device=device)
        self._grad_scale = torch.ones((), dtype=torch.float32, device=device)  # the next step's gradients are divided by it
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i, g, torch.optim.AdamW([p], **kwargs)))
                         for i, (g, p) in enumerate(owned)]

    def _hook(self, i: int, g: int, single: torch.optim.AdamW):
        norm = self._norms[i]
        divide = False
        if self.max_norm > 0:
            if single.param_groups[0].get("fused"):
                single.grad_scale = self._grad_scale  # the fused kernel divides by it as it reads (updated in place)
            else:
                divide = True

        def step_now(param: torch.Tensor) -> None:
            torch.linalg.vector_norm(param.grad, dtype=torch.float32, out=norm)
            if self.measuring:
                param.grad = None
                return
            if divide:
                param.grad.div_(self._grad_scale.to(param.grad.dtype))
            # Looked up at every step: load_state_dict replaces both the state dict and the group dicts.
            single.state = self.state  # the moments live in this optimizer's state
            group = self.param_groups[g]
            single.param_groups[0].update((k, v) for k, v in group.items() if k != "params" and k not in self.FLAGS)
            single.step()
            param.grad = None

        return step_now

    @property
    def needs_norm(self) -> bool:
        """Whether the next step would be clipped without knowing any gradient norm (see ``measure_first``)."""
        return self.max_norm > 0 and not self.norm_known

    @torch.no_grad()
    def take_grad_norm(self) -> torch.Tensor:
        """Norm of the gradient of the last backward (a device scalar, before clipping); resets for the next one
        and, with ``max_norm``, sets the next step's clipping coefficient from it."""
        total = torch.linalg.vector_norm(self._norms)
        self.last_norm.copy_(total)
        self.norm_known = True
        self._scale_from_last_norm()
        self._norms.zero_()
        return total

    def _scale_from_last_norm(self) -> None:
        if self.max_norm > 0 and self.norm_known:
            self._grad_scale.copy_(clip_scale(self.last_norm, self.max_norm))
        else:
            self._grad_scale.fill_(1.0)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.norm_known:
            state["last_grad_norm"] = self.last_norm.detach().cpu().clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's state, and the last step's gradient norm when the checkpoint has one (else the next step is
        measured first, see ``measure_first``)."""
        state_dict = dict(state_dict)
        norm = state_dict.pop("last_grad_norm", None)
        # This device's kernel flags, not the saved ones: torch places each loaded step count by them (a CPU-written
        # checkpoint would leave CPU step counts for CUDA's fused kernel).
        state_dict["param_groups"] = [{**saved, **{k: mine[k] for k in self.FLAGS if k in mine}}
                                      for saved, mine in zip(state_dict["param_groups"], self.param_groups)]
        super().load_state_dict(state_dict)
        self.norm_known = norm is not None
        self.last_norm.fill_(0.0 if norm is None else float(norm))
        self._scale_from_last_norm()

    def step(self, closure=None):
        """Nothing to do: every parameter was stepped in backward. A closure is run (its backward steps them)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed right after its step."""

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def measure_first(optimizer: torch.optim.Optimizer, backward: Callable[[], object]) -> None:
    """Before a step that an in-backward optimizer would clip without knowing any gradient norm, run ``backward``
    (that step's forward and backward) once with its hooks only measuring: the step is then clipped by its own norm,
    as ``clip_grad_norm_`` would. The random state is restored, so dropout draws the same masks in the real pass.
    Costs one forward and backward, once a run (or after a resume from a checkpoint without a norm). Every tensor
    that ``backward`` gives a gradient must be the optimizer's (the loop's trainable parameters are): the
    measuring pass frees only those."""
    if not (isinstance(optimizer, InBackwardAdamW) and optimizer.needs_norm):
        return
    device = optimizer.last_norm.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        optimizer.measuring = True
        try:
            backward()
        finally:
            optimizer.measuring = False
    optimizer.take_grad_norm()


def stochastic_round(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x`` (float32) in bf16, rounded away from zero with probability (distance to the lower bf16 value) / spacing.

    The expectation is ``x`` itself, so updates far below a bf16 spacing still move a weight on average, where
    round-to-nearest would drop every one of them. bf16 is float32's upper 16 bits: adding uniform noise to the
    lower 16 bits and clearing them does the rounding (on the magnitude: the sign bit is untouched).
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    noise = (torch.rand_like(x) * 65536).to(torch.int32)  # uniform over 0..65535 (rand has 24 random bits)
    bits = x.view(torch.int32) + noise
    return bits.bitwise_and_(-65536).view(torch.float32).to(dtype)  # exact: the low 16 bits are zero


def adamw_update_(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr, step: torch.Tensor,
                  b1: float, b2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update in place: weight ``w`` (bf16 or float32), gradient ``g``, float32 moments ``m`` and ``v``,
    ``step`` the (already incremented) step count as a tensor. Same formula as ``torch.optim.AdamW``; the new
    weight, computed in float32, is stochastically rounded when ``w`` is bf16."""
    g = g.float()
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt() / (1 - b2 ** step).sqrt() + eps
    new = w.float() * (1 - lr * weight_decay) - m / denom * (lr / (1 - b1 ** step))
    w.copy_(new if w.dtype == torch.float32 else stochastic_round(new, w.dtype))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: float32 moments and arithmetic, each new weight stochastically rounded to bf16.

    Full fine-tuning then holds 12 bytes a parameter (bf16 weight and gradient, float32 moments) instead of 16
    (float32 weights, gradients, moments), and the forward needs no bf16 copies of the weights. Round-to-nearest
    (torch's AdamW on bf16 weights) would lose every update below half a bf16 spacing, 2^-9 of the weight: at
    fine-tuning learning rates that is most of them. Stochastic rounding keeps their expected value
    (``tests/test_bf16_weights.py`` shows both). float32 parameters are updated exactly as ``torch.optim.AdamW`` does.

    ``compiled``: the update is one fused kernel per parameter (``torch.compile``, one compilation for every size)
    that reads and writes each weight, gradient and moment once; run op by op it makes ~15 passes over float32
    data, ~40 ms more a step for 1B parameters on an H200 (``make_optimizer`` weighs that against the compilation).
    Op by op, large parameters go in slices of ``chunk``
    elements, so the float32 temporaries stay small. Capturable either way: the step count lives on the device
    and the lr may be a device tensor (``use_tensor_lr``), so a CUDA graph replays it, and the rounding noise comes
    from the graph-safe CUDA generator.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, compiled: bool = False, chunk: int = 1 << 24):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=True))
        self.chunk = chunk
        self.update = torch.compile(adamw_update_, dynamic=True, fullgraph=True) if compiled else adamw_update_
        self.compiled = compiled

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if self.compiled and not torch.is_tensor(lr):  # a Python float would be a constant of the compiled code
                lr = torch.tensor(lr, dtype=torch.float32, device=group["params"][0].device)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if self.compiled:
                    self.update(*(t.view(-1) for t in tensors), lr, state["step"], b1, b2, eps, decay)
                    continue
                for w, g, m, v in zip(*(_slices(t, self.chunk) for t in tensors)):
                    self.update(w, g, m, v, lr, state["step"], b1, b2, eps, decay)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, but the moments stay float32 (the base class casts them to the
        weights' bf16) and the step count stays on the weights' device."""
        saved = [state_dict["state"].get(i, {}) for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for p, values in zip(params, saved):
            for key, value in values.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


def _slices(t: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Views of ``t`` of at most ``chunk`` elements that together cover it (the whole tensor if not contiguous)."""
    return list(t.view(-1).split(chunk)) if t.is_contiguous() else [t]


def grad_norm_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The norm of the step's whole gradient (a device scalar), clipping it first to ``max_norm`` when > 0.

    With fused AdamW over plain tensors the clipping is folded into the optimizer: its kernel divides each
    gradient by ``grad_scale`` as it reads it (the hook AMP's GradScaler uses), so the gradients are not read and
    written once more by a separate multiply (~0.2 ms of a 7 ms DPO step for pythia-70m on an H200). The result is
    ``clip_grad_norm_``'s to rounding: a division by 1 / coefficient instead of a multiplication.
    """
    if isinstance(optimizer, InBackwardAdamW):
        return optimizer.take_grad_norm()
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and not folds_clipping(optimizer, grads):
        return dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))  # FSDP: a DTensor
    norm = dist.full_tensor(torch.nn.utils.get_total_norm(grads))
    if max_norm > 0:
        optimizer.grad_scale = clip_scale(norm, max_norm)
    return norm


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide gradients of total ``norm`` by to clip them to ``max_norm``: ``clip_grad_norm_``'s coefficient,
    inverted (>= 1), in the form fused AdamW's ``grad_scale`` takes."""
    return ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)


def folds_clipping(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> bool:
    """Whether ``optimizer`` can apply the clipping itself: a fused AdamW (or Adam) over plain tensors."""
    return (type(optimizer) in (torch.optim.AdamW, torch.optim.Adam)
            and all(group.get("fused") for group in optimizer.param_groups)
            and all(type(g) is torch.Tensor for g in grads))


def schedule_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` over the peak: warm-up, then ``cfg.schedule`` to the run's last step."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 1 - frac) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def make_scheduler(optimizer, total_steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, total_steps, cfg))
