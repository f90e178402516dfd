"""Every shipped recipe is valid: it parses into its algorithm's config with the values it states, its adapter,
rewards, data and precision settings resolve, and the files it and the README point at exist and parse."""

import re
from pathlib import Path

import pytest
import yaml

from spo.config import load_config
from spo.data import BUILTIN_PREFIX, PRESETS
from spo.models import _parse_dtype
from spo.trainer.run import CONFIG_CLASSES, Recipe, peft_config, trainer_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
RECIPE_PATH = re.compile(r"recipes/[\w/.-]+\.yaml")


def test_recipes_are_found():
    assert len(RECIPES) >= 7 and (ROOT / "recipes" / "quickstart.yaml") in RECIPES
    assert len(ACCELERATE) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    recipe = load_config(Recipe, path)
    assert recipe.algorithm == raw["algorithm"] and recipe.algorithm in CONFIG_CLASSES

    # the train section parses into the algorithm's own config class, every value as written
    config = trainer_config(recipe)
    assert type(config) is CONFIG_CLASSES[recipe.algorithm]
    for key, value in raw["train"].items():
        assert getattr(config, key) == value, f"train.{key}"
    if recipe.algorithm in ("rloo", "dr_grpo"):
        assert config.advantage_estimator == recipe.algorithm
    assert config.output_dir == f"outputs/{path.stem}"  # no two recipes write into the same folder

    # the adapter section builds the adapter it names, with the values it states
    peft = peft_config(recipe.peft)
    kind = raw.get("peft", {}).get("type", "none")
    if kind == "none":
        assert peft is None
    else:
        assert type(peft).__name__ == {"lora": "LoraConfig", "mos": "MoSConfig"}[kind]
        for key, value in raw["peft"].items():
            if key != "type":
                expected = set(value) if key == "target_modules" and isinstance(value, list) else value
                assert getattr(peft, key) == expected, f"peft.{key}"

    # rewards, data and precision resolve
    from rewards import get_reward

    assert recipe.reward_funcs and all(callable(get_reward(name)) for name in recipe.reward_funcs)
    for section in (recipe.dataset, recipe.eval_dataset):
        if section is not None:
            assert section.source and (section.preset is None or section.preset in PRESETS)
            if section.source.startswith(BUILTIN_PREFIX):
                assert len(section.load()) == (section.limit or 1000)
    _parse_dtype(recipe.dtype, "cpu")
    assert recipe.model and not recipe.dry_run and not recipe.resume


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_commands_name_files_that_exist(path):
    """The launch command in a recipe's header names an accelerate config that exists and the recipe itself."""
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    named = RECIPE_PATH.findall(header)
    assert all((ROOT / name).is_file() for name in named), named
    if "accelerate launch" in header:
        assert f"recipes/{path.name}" in named and any(n.startswith("recipes/accelerate/") for n in named)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1 and config.num_machines == 1
    assert str(config.mixed_precision) in ("no", "bf16", "fp16")


def test_readme_names_only_files_that_exist():
    named = set(RECIPE_PATH.findall((ROOT / "README.md").read_text()))
    assert named and all((ROOT / name).is_file() for name in named), sorted(named)
