"""parse_recipe_args: the scripts of trainers/ read their configuration as TRL's scripts do (trl.TrlParser)."""

import os
from dataclasses import dataclass, field

import pytest

from diffusers_raven.utils.recipe_args import parse_recipe_args
from recipe_utils import write_config


@dataclass
class Config:
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    patch_size: int | None = field(default=2, metadata={"help": "patch (None: the VAE's)"})
    modes: list[str] = field(default_factory=lambda: ["raven"], metadata={"help": "modes"})
    compile: bool = field(default=False, metadata={"help": "torch.compile"})
    output_dir: str = field(default="out", metadata={"help": "outputs"})


@dataclass
class ScriptArguments:
    resume: str | None = field(default=None, metadata={"help": "checkpoint to resume"})


def test_file_then_flags(tmp_path):
    path = write_config(tmp_path / "c.yaml", learning_rate=3e-4, patch_size=None, modes=["a", "b"], output_dir="x")
    config, script = parse_recipe_args((Config, ScriptArguments), ["--config", path])
    assert (config.learning_rate, config.patch_size, config.modes, config.output_dir) == (3e-4, None, ["a", "b"], "x")
    assert script.resume is None
    config, script = parse_recipe_args((Config, ScriptArguments), [
        "--config", path, "--learning_rate", "1e-5", "--patch_size", "4", "--modes", "c", "--compile",
        "--resume", "last"])
    assert (config.learning_rate, config.patch_size, config.modes, config.compile) == (1e-5, 4, ["c"], True)
    assert config.output_dir == "x" and script.resume == "last"
    config, _ = parse_recipe_args((Config, ScriptArguments), ["--patch_size", "null", "--compile", "false"])
    assert config.patch_size is None and config.compile is False  # no file: the defaults, then the flags


def test_unknown_keys_and_flags_name_the_closest_field(tmp_path):
    path = write_config(tmp_path / "c.yaml", learning_rat=3e-4)
    with pytest.raises(ValueError, match=r"--config file: 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_recipe_args((Config, ScriptArguments), ["--config", path])
    with pytest.raises(ValueError, match=r"unknown arguments: '--resum' \(did you mean '--resume'\?\)"):
        parse_recipe_args((Config, ScriptArguments), ["--resum", "last"])
    with pytest.raises(ValueError, match="'--learning'"):  # no prefix matching
        parse_recipe_args((Config, ScriptArguments), ["--learning", "1e-3"])
    with pytest.raises(SystemExit):  # a value of the wrong type: argparse's error
        parse_recipe_args((Config,), ["--patch_size", "four"])


def test_raven_script_reads_its_yaml_and_flags(tmp_path):
    """trainers/raven.py: trl.TrlParser over the script's arguments and RavenConfig; the tiny YAML with flags on top
    trains (one step here), prompts come from a list or a text file, and a misspelt flag is named."""
    import json

    import torch

    from recipe_utils import load_recipe

    recipe = load_recipe("raven")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n\na blue square moving left\n")
    assert recipe.load_prompts([str(prompts)]) == ["a red circle moving right", "a blue square moving left"]
    assert recipe.load_prompts(str(prompts)) == recipe.load_prompts([str(prompts)])  # as a YAML string
    assert recipe.load_prompts(["a", "b"]) == ["a", "b"]
    config = os.path.join(os.path.dirname(__file__), os.pardir, "trainers", "raven_tiny.yaml")
    with pytest.raises(ValueError, match=r"'--learning_rat' \(did you mean '--learning_rate'\?\)"):
        recipe.main(["--config", config, "--learning_rat", "1e-5"])
    out = tmp_path / "out"
    recipe.main(["--config", config, "--output_dir", str(out), "--max_steps", "1", "--save_steps", "1",
                 "--prompts", str(prompts), "--learning_rate", "3e-5"])
    results = json.loads((out / "train_results.json").read_text())
    assert results["log_history"][-1]["step"] == 1 and results["student"].startswith("randomly initialised")
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    args = torch.load(out / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert (args.learning_rate, args.max_steps, args.critic_learning_rate) == (3e-5, 1, 1e-4)  # flags, then the YAML
