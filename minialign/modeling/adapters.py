"""LoRA adapters as files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, so PEFT,
TRL and transformers users load minialign's adapters as they are, and minialign loads theirs (plain LoRA)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minialign.base.errors import UserError
from minialign.base.files import publish_dir, staged_dir
from minialign.config.modelnames import adapter_base, adapter_readme
from minialign.modeling.lora import LoRAConfig, available_layers, linear_modules, lora_layers, short_targets, wrap_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "minialign_base.json"  # modelnames.adapter_base: the base as minialign named it, and its GGUF file
PEFT_PREFIX = "base_model.model."

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
    with staged_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_readme(base, task_type))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        publish_dir(tmp, directory)


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
    linear = linear_modules(model)
    for module in layer_weights:
        if module not in linear:
            raise UserError(f"The adapter in {directory} has weights for module {module!r}, which this model has "
                            f"no linear layer for (its linear layers: {available_layers(model)}). The adapter was "
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
        wrap_layers(model, names, config, short_targets(linear, names), dtype=None)
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
