"""How `--help` reads: config fields become grouped flags with their help, default and choices.

The text itself lives beside each field (``config.fields.opt``); this module only lays it out.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import typing

from minialign.config.fields import GROUPS, split_list

# Every number a flag can take, in Python's own syntax: argparse's matcher knows only "-5" and "-.5", so
# `--lr -1e-3` read "-1e-3" as an unknown option and reported "expected one argument".
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose sub-parsers (``add_subparsers`` makes them of this class) share ``HelpFormatter``
    and read negative numbers in any notation (``--lr -1e-3``, ``--beta -0.1``) as values, so they reach the
    config's own validation; no minialign option looks like a number, so none is shadowed."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


GROUP_TITLES = {"lora": "LoRA", "dpo": "DPO", "rm": "reward model", "eval": "evaluation",
                "distributed": "distributed (torchrun)"}


class HelpFormatter(argparse.HelpFormatter):
    """Shows a hand-written argument's default (not None/False/suppressed); descriptions and epilogs keep their
    line breaks, and lines indented by the author (example commands) are left as typed; no line breaks at a hyphen."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith(" ") else textwrap.fill(line, width, initial_indent=indent,
                                                                                   subsequent_indent=indent)
                         for line in text.splitlines())

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never "tiny-\nmistral" or "--max-\nlength": names and flags hold hyphens.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("%(default)" in help or "(default:" in help or not action.option_strings
                or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))):
            return help
        return help + f" (default: {show_value(action.default)})".replace("%", "%%")


def show_value(value) -> str:
    """A default as a user would type it: 2e-4, not 0.0002; lists space-separated; '' as empty."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.6g}"
        if 0 < abs(value) < 1e-2:
            mantissa, exponent = f"{value:.6e}".split("e")
            text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return text
    if isinstance(value, (list, tuple)):
        return " ".join(map(show_value, value))
    return str(value) if value != "" else "empty"


def _list_of(choices: tuple):
    """argparse ``type`` of a comma-separated list of choices: each part is checked."""

    def parse(text: str) -> str:
        bad = [part for part in split_list(text) if part not in choices]
        if bad or not split_list(text):
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (a comma-separated list of {', '.join(choices)})")
        return ",".join(split_list(text))

    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field, in argument groups (``GROUPS`` order), with the field's help, default
    and choices. Defaults are suppressed in the namespace so only typed flags override presets."""
    types = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if types[f.name] is not dict]
    groups = {}
    for name in GROUPS:
        if any(f.metadata.get("group") == name for f in fields):
            groups[name] = parser.add_argument_group(f"{GROUP_TITLES.get(name, name)} options")
    for f in fields:
        meta, kind = f.metadata, types[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        # A field declared without config.fields.opt still gets its flag, with no help: tests/test_cli_help.py fails on it.
        target = groups.get(meta.get("group"), parser)
        flag = "--" + f.name.replace("_", "-")
        choices, metavar = meta.get("choices"), meta.get("metavar")
        help = meta.get("help")
        if help and choices and meta.get("multiple"):
            help += f"; any of {', '.join(choices)}"
        if help:
            if "(default:" not in help:  # a help text that explains its own default keeps its words
                help += f" (default: {show_value(default)})"
            help = help.replace("%", "%%")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:
            target.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], choices=choices,
                                metavar=None if choices else metavar or "N", **common)
        elif meta.get("multiple") and choices:
            target.add_argument(flag, type=_list_of(choices), metavar=metavar or "NAME[,NAME]", **common)
        else:
            metavar = metavar or {int: "N", float: "X"}.get(kind, f.name.upper())
            target.add_argument(flag, type=kind, choices=choices, metavar=None if choices else metavar, **common)
