"""How a config field is declared (``opt``: default, help, group, choices) and the checks every config shares;
the choices other layers also name, kept here so that `--help` needs no torch import."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from minialign.base.errors import UserError

# Flag groups, in the order `--help` lists them.
GROUPS = ("model", "data", "lora", "training", "speed", "memory", "distributed", "dpo", "online", "rm", "eval", "run",
          "output")



# Choices shared with other modules, kept here so that `--help` needs no torch import (tests check they agree).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")  # minialign.ops.losses.LOSS_TYPES
TRUNCATIONS = ("prompt", "keep-start")  # how a long SFT example is cut (minialign.data.tokenize_sft)



TRACKERS = ("none", "tensorboard", "trackio", "wandb", "mlflow")  # minialign.training.trackers



def opt(default, help: str, *, group: str, choices: tuple | None = None, metavar: str | None = None,
        multiple: bool = False):
    """A config field with its one-line ``--help`` text, flag group and allowed values.


    The description lives here, beside the field, and nowhere else: ``cli_help.add_config_flags`` builds the CLI
    from it, so the help cannot drift from the config. Lists get a ``default_factory``. ``multiple``: a string field that
    holds a comma-separated list of ``choices`` (as transformers' ``report_to`` does).
    """
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "multiple": multiple}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)



def check_choices(cfg) -> None:
    """Every field declared with ``choices`` holds one of them (YAML presets and resumed runs skip argparse)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("multiple"):
            values = split_list(value)
        else:
            values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in choices]
        if bad:
            raise UserError(f"Invalid configuration: {f.name} (--{f.name.replace('_', '-')}) must be "
                            f"{'a comma-separated list of' if f.metadata.get('multiple') else 'one of'} "
                            f"{', '.join(map(str, choices))}; got {', '.join(map(repr, bad))}.")



def split_list(value: str) -> list[str]:
    """``"tensorboard, wandb"`` -> ``["tensorboard", "wandb"]`` (empty parts dropped)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]



def prompt_length(max_length: int, max_prompt_length: int) -> int:
    """``max_prompt_length``, where 0 follows ``max_length`` (half of it); an explicit value must leave the
    response at least one token."""
    if max_prompt_length == 0:
        return max(1, max_length // 2)
    if not 0 < max_prompt_length < max_length:
        raise UserError(
            f"Invalid configuration: --max-prompt-length {max_prompt_length} must be at least 1 and smaller than "
            f"--max-length {max_length}, so that every response keeps at least one token. Lower --max-prompt-length, "
            f"raise --max-length, or drop --max-prompt-length (0) to keep half of --max-length ({max_length // 2})."
        )
    return max_prompt_length


def parse_rows(spec: str | None, flag: str = "rows") -> slice:
    """Parse "START:STOP" (Python slice semantics; either side may be empty) into a slice; ``flag`` names the
    setting in errors. A span that can hold no row whatever the source's length (``5:2``, ``3:3``) is refused here,
    not reported later as a source with no usable rows."""
    if spec is None:
        return slice(None)
    parts = str(spec).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UserError(
            f"{flag} {spec!r} is not of the form START:STOP (e.g. '300:' or '0:300'; Python slice "
            "semantics over the raw rows, counted from 0)."
        ) from None
    if start is not None and stop is not None and (start < 0) == (stop < 0) and start >= stop:
        why = (f"START and STOP are both {start} and STOP is excluded ('{start}:{start + 1}' is row {start} alone)"
               if start == stop else f"it stops (at {stop}) before it starts (at {start}); '{stop}:{start}' is the "
               "range the other way round")
        raise UserError(f"{flag} {spec!r} selects no rows: {why}. Rows are counted from 0, STOP excluded: '0:300' "
                        "is rows 0 to 299, '300:' every row from 300 on.")
    return slice(start, stop)
