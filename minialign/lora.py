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
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minialign.errors import UserError
from minialign.modelnames import adapter_base, adapter_readme

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "embed_out")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "minialign_base.json"  # modelnames.adapter_base: the base as minialign named it, and its GGUF file
PEFT_PREFIX = "base_model.model."


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

def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
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


def _available(model: nn.Module) -> str:
    return ", ".join(sorted({_suffix(n) for n in _linear_modules(model)})) or "(none)"


def _short_targets(linear: dict[str, nn.Linear], names: list[str]) -> list[str]:
    """Short suffixes when they pick exactly these layers again (what a reader expects to see),
    else the full paths, so that PEFT re-creates precisely the same adapter from the list."""
    suffixes = sorted({_suffix(n) for n in names})
    same = {n for n in linear if any(_matches(n, s) for s in suffixes)} == set(names)
    return suffixes if same else sorted(names)


def _select(model: nn.Module, target_modules: str | list[str]) -> tuple[list[str], list[str]]:
    """(module names to wrap, the target list to record), or UserError when nothing matches."""
    linear = _linear_modules(model)
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in linear.items() if m is not head and _suffix(n) not in HEAD_NAMES]
        if not names:
            raise UserError(f"target_modules=\"{ALL_LINEAR}\" found no linear layer besides the output head in "
                            f"this model (linear layers: {_available(model)}); list the modules to adapt explicitly.")
        return names, _short_targets(linear, names)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [n for n in linear if any(_matches(n, t) for t in targets)]
    if not names:
        raise UserError(f"LoRA target_modules {targets!r} matched no linear layer of this model. Its linear "
                        f"layers are named: {_available(model)}. Use some of those names or \"{ALL_LINEAR}\".")
    used = [t for t in targets if any(_matches(n, t) for n in names)]
    unused = [t for t in targets if t not in used]
    if unused:
        print(f"warning: LoRA target_modules {unused!r} matched no linear layer and are ignored", file=sys.stderr)
    return names, used


def resolve_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The module-name suffixes LoRA will target, e.g. ['dense', 'dense_4h_to_h', ...] for GPT-NeoX."""
    LoRAConfig(target_modules=target_modules).validate()
    return _select(model, target_modules)[1]


# ----------------------------------------------------------------------------- apply / merge / toggle

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _wrap(model: nn.Module, names: list[str], config: LoRAConfig, targets: list[str],
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
    names, targets = _select(model, config.target_modules)
    _wrap(model, names, config, targets, dtype)
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
    names, _ = _select(model, target_modules)
    linear = _linear_modules(model)
    per_rank = sum(linear[n].in_features + linear[n].out_features for n in names)
    existing = {id(p) for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in existing)
    rows = []
    for r in ranks:
        trainable = r * per_rank
        total = base + trainable
        rows.append({"rank": r, "trainable": trainable, "total": total, "percent": round(100 * trainable / total, 2)})
    return rows


# ----------------------------------------------------------------------------- PEFT-format files

def _model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None, *,
                 task_type: str = "CAUSAL_LM", modules_to_save: tuple[str, ...] = ()) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads.

    The config's ``base_model_name_or_path`` is a name PEFT can load (``modelnames.adapter_base``: SmolLM2 read from
    its GGUF becomes its hub id); ``minialign_base.json`` keeps minialign's own name and the GGUF file, and
    ``README.md`` shows how to load the adapter with PEFT.

    ``modules_to_save`` names modules trained in full beside the adapters (a reward model's ``score`` head): their
    whole weights are saved under PEFT's keys, ``base_model.model.<module>.<param>``. Atomic: everything goes to a
    temporary sibling folder which then takes the directory's place, so a crash never leaves a half-written adapter
    and an existing one is replaced only once complete.
    """
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    layers = list(lora_layers(model))
    if config is None or not layers:
        raise UserError("save_adapter needs a model with LoRA layers; call apply_lora(model, LoRAConfig(...)) "
                        "or load_adapter(model, directory) first.")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"Cannot save the adapter to {directory}: it exists and is not a directory. "
                        "Choose another path or remove that file.")
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": list(model.lora_targets), "use_rslora": config.use_rslora,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": list(modules_to_save) or None, "init_lora_weights": True, "use_dora": False,
        "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "revision": None,
    }
    base_name = base_model_name_or_path or _model_name(model)
    base = adapter_base(base_name) if base_name else {"base_model_name_or_path": None, "minialign_model": None}
    peft_config["base_model_name_or_path"] = base["base_model_name_or_path"]
    tensors = {}
    for name, layer in layers:
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().to("cpu").contiguous()
    for name in modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_readme(base, task_type))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if directory.exists():  # a directory cannot be renamed over a non-empty one: move the old aside first
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "adapter")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def _read_adapter(directory: Path, allowed: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's JSON config and its tensors, or a UserError saying which file is missing or wrong.

    ``allowed``: modules the caller loads in full (``modules_to_save`` may name them)."""
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory} is not a complete LoRA adapter: missing {', '.join(missing)}. Point to the "
                        f"folder written by save_adapter or PEFT's save_pretrained (it holds {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}).")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{directory / CONFIG_FILE} is not valid JSON ({exc}); re-save the adapter.") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UserError(f"{directory / CONFIG_FILE} has peft_type {kind!r}, but only \"LORA\" adapters can be "
                        "loaded; convert or retrain the adapter as LoRA.")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key)
        if key == "modules_to_save" and allowed and value:
            value = [name for name in value if name not in allowed] or None
        if value is not None and value != default and value not in ([], {}):
            raise UserError(f"{directory / CONFIG_FILE} sets {key}={config[key]!r}, which minialign's LoRA does "
                            f"not support (expected {default!r}); load this adapter with PEFT instead.")
    return config, load_file(str(directory / WEIGHTS_FILE))


def _layer_weights(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<module>.lora_{A,B}.weight`` tensors by module path."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stripped = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, _, part = stripped.removesuffix(".weight").rpartition(".")
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight") or part not in ("lora_A", "lora_B"):
            raise UserError(f"{path} holds the tensor {key!r}, which is not a LoRA linear weight "
                            f"('{PEFT_PREFIX}<module>.lora_A.weight'); this adapter cannot be loaded here.")
        layers.setdefault(module, {})[part] = value
    for module, parts in layers.items():
        if len(parts) != 2:
            raise UserError(f"{path} has only {list(parts)} for module {module!r}; both lora_A and lora_B are "
                            "needed. The adapter file is incomplete: re-save it.")
    if not layers:
        raise UserError(f"{path} holds no LoRA weights; re-save the adapter.")
    return layers


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """Load a LoRA adapter saved by PEFT or by ``save_adapter``; apply LoRA first if the model has none.

    ``modules_to_save``: modules whose whole weights the adapter must also hold (PEFT's ``modules_to_save``, e.g. a
    reward model's ``score``); they are loaded as they are.

    Which layers get adapters comes from the weight file's keys (exact module paths), so adapters
    whose config uses a regex, ``layers_to_transform`` or ``exclude_modules`` still load exactly.
    A model that already has LoRA (e.g. when resuming) must have the same layers, r and scaling.
    """
    directory = Path(directory)
    raw, tensors = _read_adapter(directory, modules_to_save)
    weights = directory / WEIGHTS_FILE
    saved = _split_saved_modules(tensors, modules_to_save, model, weights)
    layer_weights = _layer_weights(tensors, weights)
    linear = _linear_modules(model)
    for module in layer_weights:
        if module not in linear:
            raise UserError(f"The adapter in {directory} has weights for module {module!r}, which this model has "
                            f"no linear layer for (its linear layers: {_available(model)}). The adapter was "
                            "probably trained for another architecture; load it into the matching base model.")
    targets = raw.get("target_modules")
    config = LoRAConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                        target_modules=targets if isinstance(targets, list) and targets else sorted(layer_weights),
                        use_rslora=bool(raw.get("use_rslora", False)))
    try:
        config.validate()
    except UserError as exc:
        raise UserError(f"{directory / CONFIG_FILE} does not describe a usable adapter: {exc}") from exc
    # Check every shape before touching the model, so a bad adapter leaves it exactly as it was.
    for module, parts in layer_weights.items():
        expected = {"lora_A": [config.r, linear[module].in_features], "lora_B": [linear[module].out_features, config.r]}
        for part, value in parts.items():
            if list(value.shape) != expected[part]:
                raise UserError(f"Adapter tensor '{PEFT_PREFIX}{module}.{part}.weight' in {weights} has shape "
                                f"{list(value.shape)} but the model expects {expected[part]} (r={config.r}). The "
                                "adapter was trained for a different model size or rank; use the matching base model.")
    current: LoRAConfig | None = getattr(model, "lora_config", None)
    wrapped = {name for name, _ in lora_layers(model)}
    if not wrapped:
        names = sorted(layer_weights)
        _wrap(model, names, config, _short_targets(linear, names), dtype=None)
    elif wrapped != set(layer_weights) or current is None or \
            (current.r, current.scaling) != (config.r, config.scaling):
        raise UserError(f"The model already has LoRA layers that differ from the adapter in {directory} "
                        f"(targets or r/alpha/use_rslora). Load the adapter into a model without LoRA, or call "
                        "merge_lora(model) first.")
    with torch.no_grad():
        for module, parts in layer_weights.items():
            layer = model.get_submodule(module)
            for part, value in parts.items():
                getattr(layer, part).weight.copy_(value)
        for name, state in saved.items():
            for key, value in state.items():
                model.get_submodule(name).get_parameter(key).copy_(value)
    saved_for, ours = raw.get("base_model_name_or_path"), _model_name(model)
    names = {str(n).rstrip("/") for n in (saved_for, _read_base(directory).get("minialign_model")) if n}
    if names and ours and str(ours).rstrip("/") not in names:
        print(f"warning: adapter {directory} was trained on {saved_for!r} but is loaded into {ours!r}; "
              "the shapes fit, so loading continues", file=sys.stderr)
    return model


def _read_base(directory: Path) -> dict:
    """``minialign_base.json`` of an adapter folder ({} when absent or unreadable: PEFT's own adapters have none)."""
    try:
        base = json.loads((directory / BASE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return base if isinstance(base, dict) else {}


def _split_saved_modules(tensors: dict[str, torch.Tensor], names: tuple[str, ...], model: nn.Module,
                         path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Take the whole-module weights of ``names`` out of ``tensors``, checked against the model's parameters."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        prefix = f"{PEFT_PREFIX}{name}."
        state = {k.removeprefix(prefix).replace("modules_to_save.default.", ""): tensors.pop(k)
                 for k in [k for k in tensors if k.startswith(prefix)]}
        params = dict(model.get_submodule(name).named_parameters())
        if set(state) != set(params) or any(state[k].shape != params[k].shape for k in params):
            raise UserError(f"{path} should hold the whole weights of module {name!r} ({sorted(params)}, shapes "
                            f"{[list(p.shape) for p in params.values()]}) but holds {sorted(state) or 'none'}; it was "
                            "saved for another model or without that module. Re-save the adapter.")
        out[name] = state
    return out
