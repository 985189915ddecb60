"""`--help` documents every flag (help text, default, choices), from one description beside each config field;
--max-prompt-length follows --max-length unless given."""

import argparse
import dataclasses
import json
import re

import pytest
import torch

from minialign import cli
from minialign.base.errors import UserError
from minialign.config import evaluation, fields, online, presets
from minialign.config import schema as config
from minialign.config.presets import build
from minialign.config.schema import DPOConfig, SFTConfig


def sub_parsers(parser: argparse.ArgumentParser, prefix: str = "minialign"):
    """Every (name, parser) reachable from ``parser``, nested sub-commands included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from sub_parsers(sub, f"{prefix} {name}")


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word sequences


CONFIG_MODULES = (config, online, evaluation)  # every module of minialign/config that declares command configs


def config_classes():
    return [cls for module in CONFIG_MODULES for cls in vars(module).values()
            if dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls.__module__ == module.__name__]


def test_the_checked_config_classes_are_every_commands():
    names = {cls.__name__ for cls in config_classes()}
    assert {"SFTConfig", "DPOConfig", "RMConfig", "OnlineConfig", "RunConfig", "EvalConfig"} <= names


def test_every_option_of_every_command_has_help():
    commands = list(sub_parsers(cli.build_parser()))
    assert {"minialign sft", "minialign dpo", "minialign run", "minialign data"} <= {name for name, _ in commands}
    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in commands
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS or not action.help.strip())]
    assert not missing, f"options without help: {missing}"


def test_every_config_field_has_help_and_a_known_group():
    classes = config_classes()
    assert {SFTConfig, DPOConfig, evaluation.RunConfig} <= set(classes)
    for cls in classes:
        for f in dataclasses.fields(cls):
            where = f"{cls.__name__}.{f.name}"
            assert f.metadata.get("help", "").strip(), f"{where} has no help: declare it with config.fields.opt(...)"
            assert f.metadata.get("group") in fields.GROUPS, f"{where}: group {f.metadata.get('group')!r}"
            choices = f.metadata.get("choices")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if choices:  # the default is one of the choices (every element of a list default)
                values = default if isinstance(default, list) else fields.split_list(default) \
                    if f.metadata.get("multiple") else [default]
                assert set(values) <= set(choices), where


def test_dpo_help_shows_groups_choices_and_defaults(capsys):
    text = help_of(capsys, "dpo")
    assert "--loss-type {sigmoid,hinge,ipo,robust,simpo}" in text
    assert "peak learning rate (default: 5e-5)" in text  # DPOConfig's own default, not TrainConfig's 2e-4
    assert "--share-prompt, --no-share-prompt" in text and "(default: true)" in text
    assert "--report-to NAME[,NAME]" in text and "tensorboard, trackio, wandb, mlflow" in text
    for title in ("model options", "data options", "LoRA options", "training options", "speed options",
                  "memory options", "distributed (torchrun) options", "DPO options", "output options"):
        assert title in text
    assert text.index("model options") < text.index("LoRA options") < text.index("DPO options")
    assert "examples: minialign dpo --demo" in text
    assert "peak learning rate (default: 2e-4)" in help_of(capsys, "sft")


def test_hand_written_parsers_show_defaults(capsys):
    assert "tokens generated per prompt at most (default: 64)" in help_of(capsys, "generate")
    assert "(default: 16 64)" in help_of(capsys, "bench")
    assert "0: half of --max-length (default: 0)" in help_of(capsys, "data")


def test_choices_are_shared_with_the_code_that_uses_them():
    from minialign.ops import losses

    assert fields.LOSS_TYPES == losses.LOSS_TYPES


def test_bad_choice_from_yaml_names_the_flag_and_the_choices():
    with pytest.raises(UserError, match=r"loss_type \(--loss-type\) must be one of sigmoid, hinge, ipo, robust, simpo"):
        build(DPOConfig, {"loss_type": "kto"}).validate()
    with pytest.raises(UserError, match="report_to .* comma-separated list"):
        build(SFTConfig, {"report_to": "tensorboard,comet"}).validate()
    assert build(SFTConfig, {"report_to": ["tensorboard", "none"]}).report_to == "tensorboard,none"


def test_flags_override_only_what_was_typed():
    args = cli.build_parser().parse_args(["dpo", "--lr", "1e-5", "--no-share-prompt", "--beta", "0.2"])
    assert presets.flag_values(args, DPOConfig) == {"lr": 1e-5, "share_prompt": False, "beta": 0.2}
    run = cli.build_parser().parse_args(["run", "--stages", "sft", "dpo", "--ranks", "4", "8"])
    assert (run.stages, run.ranks) == (["sft", "dpo"], [4, 8])


def test_max_prompt_length_follows_max_length():
    args = cli.build_parser().parse_args(["sft", "--demo", "--max-length", "256"])
    cfg = cli._train_config(args, SFTConfig, "sft")
    cfg.validate()
    assert (cfg.max_length, cfg.max_prompt_length) == (256, 128)
    assert SFTConfig().max_prompt_length == 256  # the old default, now derived from max_length 512
    explicit = build(DPOConfig, {"max_length": 256, "max_prompt_length": 200})
    explicit.validate()
    assert explicit.max_prompt_length == 200


def test_bad_explicit_prompt_length_names_both_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["sft", "--demo", "--max-length", "64", "--max-prompt-length", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--max-prompt-length 64" in err and "--max-length 64" in err and "drop --max-prompt-length" in err
    assert not out.exists()


def test_data_command_prompt_length_follows_max_length(capsys):
    assert cli.main(["data", "demo", "--tokenizer", "demo", "--max-length", "64", "--json"]) == 0
    limits = json.loads(capsys.readouterr().out)["truncated"]
    assert (limits["max_length"], limits["max_prompt_length"]) == (64, 32)
    assert cli.main(["data", "demo", "--max-length", "64", "--max-prompt-length", "80"]) == 2
    err = capsys.readouterr().err
    assert "--max-prompt-length 80" in err and "--max-length 64" in err


def test_every_shipped_preset_builds_its_command_config():
    """Each YAML in configs/ names only fields of its command's config and validates (a typo fails here, not on a GPU)."""
    from minialign.config.evaluation import RunConfig
    from minialign.config.online import OnlineConfig
    from minialign.config.presets import PRESETS, load_yaml
    from minialign.config.schema import DPOConfig, RMConfig, SFTConfig

    kinds = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig, "run": RunConfig, "smollm2-hh": DPOConfig,
             "smollm2-hh-online": OnlineConfig,
             "online": OnlineConfig}
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert "smollm2-hh" in names
    for name in names:
        cls = kinds.get(name) or kinds[name.split("-")[0]]
        cfg = build(cls, load_yaml(PRESETS / f"{name}.yaml", cls), {})
        if hasattr(cfg, "validate") and not name.endswith("-gpu"):
            cfg.validate()
    smol = build(DPOConfig, load_yaml(PRESETS / "smollm2-hh.yaml", DPOConfig), {})
    assert (smol.rpo_alpha, smol.lora_r, smol.chat_template) == (1.0, 16, True)


def test_run_config_choices_are_checked_outside_argparse(tmp_path):
    """A run.yaml preset is not parsed by argparse: an unknown stage or device still stops with the field's choices."""
    bad = tmp_path / "run.yaml"
    bad.write_text("stages: [sft, train]\n")
    assert cli.main(["run", "--demo", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "run.yaml").exists()


def test_running_out_of_gpu_memory_names_only_flags_the_command_has(monkeypatch, capsys):
    parsers = dict(sub_parsers(cli.build_parser()))
    for command, advice in cli.OUT_OF_MEMORY.items():
        for name in ("sft", "dpo", "rm") if command == "train" else (command,):
            flags = {o for action in parsers[f"minialign {name}"]._actions for o in action.option_strings}
            named = set(re.findall(r"--[a-z][a-z-]*", advice))
            assert named and named <= flags, (name, named - flags)

    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cli, "cmd_eval", oom)
    monkeypatch.setattr(cli, "cmd_train", oom)
    assert cli.main(["eval", "--policy", "tiny", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "at --batch-size 64" in err and "--judge-batch-size" in err and "--grad-accum" not in err
    assert cli.main(["sft", "--demo"]) == 2
    assert "--grad-accum" in capsys.readouterr().err
