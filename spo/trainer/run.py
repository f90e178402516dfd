"""Recipes: one YAML file names the algorithm, model, data, rewards, adapter and trainer settings.

    algorithm: spo_chain            # spo_chain | spo_tree | grpo | rloo | dr_grpo
    model: smollm2-135m-instruct
    dataset: {source: builtin:arithmetic, split: train}
    eval_dataset: {source: builtin:arithmetic, split: test, limit: 200}
    reward_funcs: [arithmetic_accuracy]
    peft: {type: mos, r: 8, equivalent_rank: 1, target_modules: all-linear}
    train: {max_steps: 40, learning_rate: 1e-4, ...}     # fields of the algorithm's config class

``spo train recipe.yaml --train.learning_rate 5e-5 --resume`` and ``accelerate launch -m spo.cli train ...`` both
run it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, _closest, from_dict, load_config
from ..data import load_problems
from ..models import EMBEDDED_MODEL, load_model, load_tokenizer
from .config import GRPOConfig, SPOChainConfig, SPOTreeConfig

logger = logging.getLogger(__name__)


@dataclass
class DataSection:
    source: str = "builtin:arithmetic"
    split: str = "train"
    limit: int | None = None
    seed: int = 0
    difficulty: int | None = None
    preset: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    instruction: str | None = None
    system_prompt: str | None = None
    config_name: str | None = None

    def load(self):
        return load_problems(self.source, self.split, preset=self.preset, question_field=self.question_field,
                             answer_field=self.answer_field, instruction=self.instruction,
                             system_prompt=self.system_prompt, config_name=self.config_name, limit=self.limit,
                             seed=self.seed, difficulty=self.difficulty)


@dataclass
class Recipe:
    algorithm: Literal["spo_chain", "spo_tree", "grpo", "rloo", "dr_grpo"] = "spo_chain"
    model: str = EMBEDDED_MODEL
    dtype: str = "auto"
    trust_remote_code: bool = False
    dataset: DataSection = field(default_factory=DataSection)
    eval_dataset: DataSection | None = None
    reward_funcs: list[str] = field(default_factory=lambda: ["arithmetic_accuracy"])
    peft: dict = field(default_factory=dict)  # {type: none | lora | mos, ...fields of LoraConfig / MoSConfig}
    train: dict = field(default_factory=dict)  # fields of the algorithm's config class
    evaluate_before: bool = False
    evaluate_after: bool = True
    resume: bool = False  # continue from the newest checkpoint in train.output_dir
    dry_run: bool = False  # build everything, run one tiny step


CONFIG_CLASSES = {"spo_chain": SPOChainConfig, "spo_tree": SPOTreeConfig, "grpo": GRPOConfig, "rloo": GRPOConfig,
                  "dr_grpo": GRPOConfig}


def trainer_config(recipe: Recipe):
    """The algorithm's config object from the recipe's ``train`` section (type-checked, unknown keys rejected)."""
    train = dict(recipe.train)
    if recipe.algorithm in ("rloo", "dr_grpo"):
        train.setdefault("advantage_estimator", recipe.algorithm)
    if recipe.algorithm == "dr_grpo":  # Dr. GRPO is both its advantage and its loss normaliser
        train.setdefault("loss_type", "dr_grpo")
    if recipe.dry_run:
        from .base import distributed_state

        train.update(max_steps=1, prompts_per_step=distributed_state().num_processes, num_generations=2,
                     max_completion_length=16, save_steps=None, eval_steps=None, report_to=["none"],
                     output_dir=str(train.get("output_dir", "outputs/run")) + "-dry-run")
        if recipe.algorithm == "spo_chain":
            train.update(mc_samples=2, max_mc_states_per_step=4)
        if recipe.algorithm == "spo_tree":
            train.update(branching=[2, 2], segment_length=4)
    if recipe.resume:
        train["resume_from_checkpoint"] = "latest"
    return from_dict(CONFIG_CLASSES[recipe.algorithm], train, "train")


def peft_config(section: dict):
    """A PEFT ``LoraConfig`` or a ``MoSConfig`` from the recipe's ``peft`` section, or None."""
    options = dict(section)
    kind = options.pop("type", "none")
    if kind == "none":
        if options:
            raise ConfigError("peft.type is 'none' but other peft options are set")
        return None
    if kind == "lora":
        from peft import LoraConfig as cls
    elif kind == "mos":
        from lora_shards import MoSConfig as cls
    else:
        raise ConfigError(f"peft.type must be none, lora or mos, got {kind!r}")
    options.setdefault("task_type", "CAUSAL_LM")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in options:
        if key not in names:
            raise ConfigError(f"unknown config key 'peft.{key}' for {kind}.{_closest(key, names)}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"peft: {error}") from error


def build_trainer(recipe: Recipe):
    from .grpo import GRPOTrainer
    from .spo_chain import SPOChainTrainer

    trainers = {"spo_chain": SPOChainTrainer, "grpo": GRPOTrainer, "rloo": GRPOTrainer, "dr_grpo": GRPOTrainer}
    if recipe.algorithm == "spo_tree":
        from .spo_tree import SPOTreeTrainer

        trainers["spo_tree"] = SPOTreeTrainer
    args = trainer_config(recipe)
    train_dataset = recipe.dataset.load()
    eval_dataset = recipe.eval_dataset.load() if recipe.eval_dataset is not None else None
    tokenizer = load_tokenizer(recipe.model, trust_remote_code=recipe.trust_remote_code)
    from .base import distributed_state

    model = load_model(recipe.model, dtype=recipe.dtype, device=distributed_state().device,
                       trust_remote_code=recipe.trust_remote_code)
    return trainers[recipe.algorithm](model=model, reward_funcs=list(recipe.reward_funcs), args=args,
                                      train_dataset=train_dataset, eval_dataset=eval_dataset,
                                      processing_class=tokenizer, peft_config=peft_config(recipe.peft))


def train_from_recipe(path: str, overrides: list[str] | None = None) -> int:
    recipe = load_config(Recipe, path, overrides)
    trainer = build_trainer(recipe)
    try:
        return _train_and_evaluate(recipe, trainer)
    finally:
        trainer.close()


def _train_and_evaluate(recipe: Recipe, trainer) -> int:
    main = trainer.accelerator.is_main_process
    before = None
    if recipe.evaluate_before and trainer.eval_dataset is not None and not recipe.dry_run:
        before = trainer.evaluate()
        if main:
            print(f"held-out accuracy before training: {before['accuracy']:.4f} ({int(before['problems'])} problems)")
    trainer.train()
    summary = {"algorithm": recipe.algorithm, "steps": trainer.step, "output_dir": str(trainer.output_dir)}
    if recipe.evaluate_after and trainer.eval_dataset is not None and not recipe.dry_run:
        after = trainer.evaluate()
        summary["eval_after"] = after["accuracy"]
        if before is not None:
            summary["eval_before"] = before["accuracy"]
        if main:
            print(f"held-out accuracy after training:  {after['accuracy']:.4f} ({int(after['problems'])} problems)")
    if main:
        (trainer.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    return 0
