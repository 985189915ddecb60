"""Our own LoRA: wrap linear layers, train two small matrices, save adapters PEFT can read.

A LoRA layer computes ``W x + b + scaling * B (A x)`` with the base ``W``/``b`` frozen and only
``A`` ([r, in]) and ``B`` ([out, r]) trained. ``B`` starts at zero, so a fresh adapter leaves the
model's outputs exactly unchanged.

Design choices, each for a reason:
- ``LoRALinear`` subclasses ``nn.Linear`` and *reuses* the wrapped layer's ``weight``/``bias``
  Parameters, so base state-dict keys do not move and no base weight is copied.
- ``lora_A``/``lora_B`` are bias-free ``nn.Linear`` children, so their keys end in
  ``lora_A.weight``/``lora_B.weight`` -- PEFT's names once its ``base_model.model.`` prefix is added.
- Applying LoRA twice raises ``UserError``: stacking adapters silently is never what a user meant.
- ``disabled(model)`` turns every adapter off, which gives DPO its reference model for free.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minialign.base.errors import UserError

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "embed_out")


@dataclass
class LoRAConfig:
    """Rank, strength and placement of the adapters (field names follow the paper, not PEFT)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    use_rslora: bool = False

    def validate(self) -> None:
        """Reject values that would train nothing or divide by zero, before any layer is touched."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"LoRA field 'r' must be a positive integer (the adapter rank), got {self.r!r}; "
                            "typical values are 4, 8 or 16.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(f"LoRA field 'alpha' must be a positive number (the update is scaled by alpha/r), "
                            f"got {self.alpha!r}; a common choice is alpha = 2 * r.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA field 'dropout' must be in [0, 1) (the probability of zeroing an input of the "
                            f"adapter), got {self.dropout!r}; use 0.0 to switch dropout off.")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(f"LoRA field 'target_modules' must be \"{ALL_LINEAR}\" or a non-empty list of module "
                            f"names such as [\"q_proj\", \"v_proj\"], got {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        """alpha/r; rsLoRA uses alpha/sqrt(r) so that larger ranks do not shrink the update."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Linear):
    """A linear layer plus a low-rank update; shares (never copies) the base weight and bias."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # skip nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.scaling = r, scaling
        self.disabled = False
        factory = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        # A gets the usual nn.Linear init (as PEFT does); B = 0 makes the initial update exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        h = x
        if x.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            h = x.to(self.lora_A.weight.dtype)  # under autocast the matmul casts for us: no activation copy
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        update = self.lora_B(self.lora_A(h)).to(out.dtype)
        # In place: the base product's output is not needed for its backward, so this saves a tensor.
        return out.add_(update, alpha=self.scaling)

    def merged(self) -> nn.Linear:
        """Fold scaling * B @ A into the base weight (float32 math) and return a plain nn.Linear."""
        with torch.no_grad():
            delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
            self.weight.copy_((self.weight.float() + self.scaling * delta).to(self.weight.dtype))
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------------- choosing layers

def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer a user could target: plain or already-wrapped, never LoRA's own A/B."""
    found: dict[str, nn.Linear] = {}
    inner: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inner:
            continue
        if isinstance(module, LoRALinear):
            inner.update({id(module.lora_A), id(module.lora_B)})
        if isinstance(module, nn.Linear):
            found[name] = module
    return found


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def available_layers(model: nn.Module) -> str:
    return ", ".join(sorted({_suffix(n) for n in linear_modules(model)})) or "(none)"


def short_targets(linear: dict[str, nn.Linear], names: list[str]) -> list[str]:
    """Short suffixes when they pick exactly these layers again (what a reader expects to see),
    else the full paths, so that PEFT re-creates precisely the same adapter from the list."""
    suffixes = sorted({_suffix(n) for n in names})
    same = {n for n in linear if any(_matches(n, s) for s in suffixes)} == set(names)
    return suffixes if same else sorted(names)


def _select_layers(model: nn.Module, target_modules: str | list[str]) -> tuple[list[str], list[str]]:
    """(module names to wrap, the target list to record), or UserError when nothing matches."""
    linear = linear_modules(model)
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in linear.items() if m is not head and _suffix(n) not in HEAD_NAMES]
        if not names:
            raise UserError(f"target_modules=\"{ALL_LINEAR}\" found no linear layer besides the output head in "
                            f"this model (linear layers: {available_layers(model)}); list the modules to adapt explicitly.")
        return names, short_targets(linear, names)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [n for n in linear if any(_matches(n, t) for t in targets)]
    if not names:
        raise UserError(f"LoRA target_modules {targets!r} matched no linear layer of this model. Its linear "
                        f"layers are named: {available_layers(model)}. Use some of those names or \"{ALL_LINEAR}\".")
    used = [t for t in targets if any(_matches(n, t) for n in names)]
    unused = [t for t in targets if t not in used]
    if unused:
        print(f"warning: LoRA target_modules {unused!r} matched no linear layer and are ignored", file=sys.stderr)
    return names, used


def resolve_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The module-name suffixes LoRA will target, e.g. ['dense', 'dense_4h_to_h', ...] for GPT-NeoX."""
    LoRAConfig(target_modules=target_modules).validate()
    return _select_layers(model, target_modules)[1]


# ----------------------------------------------------------------------------- apply / merge / toggle

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_layers(model: nn.Module, names: list[str], config: LoRAConfig, targets: list[str],
          dtype: torch.dtype | None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config.r, config.scaling, config.dropout, dtype))
    model.lora_config = config
    model.lora_targets = targets


def apply_lora(model: nn.Module, config: LoRAConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the targeted linear layers in place and freeze everything else.

    ``dtype`` overrides the adapters' dtype (default: the base weight's). A model that already
    has LoRA layers raises UserError: merge it first (``merge_lora``) or start from a fresh model.
    """
    config.validate()
    if any(True for _ in lora_layers(model)):
        raise UserError("apply_lora was called on a model that already has LoRA layers. Call merge_lora(model) "
                        "first to fold them in, or apply LoRA to a freshly loaded model.")
    names, targets = _select_layers(model, config.target_modules)
    wrap_layers(model, names, config, targets, dtype)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the result has plain nn.Linear layers only."""
    for name, layer in list(lora_layers(model)):
        _replace(model, name, layer.merged())
    for attr in ("lora_config", "lora_targets"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (all adapters off); each layer's previous state returns on exit, even on error."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable LoRA matrices (what the optimizer should see)."""
    for _, layer in lora_layers(model):
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            if p.requires_grad:
                yield p


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) Parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_param_table(model: nn.Module, ranks: list[int],
                     target_modules: str | list[str] = ALL_LINEAR) -> list[dict]:
    """Trainable/total counts per rank from layer shapes alone: the model is neither copied nor changed."""
    for r in ranks:
        LoRAConfig(r=r, target_modules=target_modules).validate()
    names, _ = _select_layers(model, target_modules)
    linear = linear_modules(model)
    per_rank = sum(linear[n].in_features + linear[n].out_features for n in names)
    existing = {id(p) for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in existing)
    rows = []
    for r in ranks:
        trainable = r * per_rank
        total = base + trainable
        rows.append({"rank": r, "trainable": trainable, "total": total, "percent": round(100 * trainable / total, 2)})
    return rows
