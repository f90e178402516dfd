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
import os
import re
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import (ConfigError, _closest, add_import_paths, format_help_rows, from_dict, help_rows, load_yaml,
                      merge, parse_overrides)
from ..data import check_limit, load_problems
from ..errors import Interrupted
from ..models import EMBEDDED_MODEL, check_model_source, load_model, load_tokenizer
from .config import GRPOConfig, SPOChainConfig, SPOTreeConfig

logger = logging.getLogger(__name__)


def _f(default=None, help: str = "", factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataSection:
    source: str = _f("builtin:arithmetic", "a .jsonl/.json/.parquet file, a folder of {split}.jsonl, a hub name, "
                                           "builtin:arithmetic or builtin:ledger")
    split: str = _f("train", "split to read (train or test on the built-in task)")
    limit: int | None = _f(None, "the first N problems; null: all of them (the built-in task: 1000)")
    seed: int = _f(0, "seed of the built-in task's problems")
    difficulty: int | None = _f(None, "built-in task only: difficulty 1..6; null: the task's default")
    preset: str | None = _f(None, "field names and instruction: gsm8k, math, arithmetic or ledger; null: from source")
    question_field: str | None = _f(None, "field holding the question; null: the preset's")
    answer_field: str | None = _f(None, "field holding the reference answer; null: the preset's")
    instruction: str | None = _f(None, "answer-format instruction after each question; null: the preset's")
    system_prompt: str | None = _f(None, "system message before each question; null: none")
    config_name: str | None = _f(None, "hub data set configuration (gsm8k: main)")

    def __post_init__(self):
        check_limit(self.limit)

    def load(self):
        return load_problems(self.source, self.split, preset=self.preset, question_field=self.question_field,
                             answer_field=self.answer_field, instruction=self.instruction,
                             system_prompt=self.system_prompt, config_name=self.config_name, limit=self.limit,
                             seed=self.seed, difficulty=self.difficulty)


@dataclass
class Recipe:
    algorithm: Literal["spo_chain", "spo_tree", "grpo", "rloo", "dr_grpo"] = _f(
        "spo_chain", "the RL algorithm; train: takes the keys of its config")
    model: str = _f(EMBEDDED_MODEL, "model: a hub name, a local folder, or the embedded smollm2-135m-instruct")
    dtype: str = _f("auto", "model dtype: auto, float32, bfloat16 or float16")
    trust_remote_code: bool = _f(False, "let transformers run code from the model's repository")
    dataset: DataSection = _f(help="training problems (keys below)", factory=DataSection)
    eval_dataset: DataSection | None = _f(None, "held-out problems, the same keys as dataset; null: none")
    reward_funcs: list[str] = _f(help="reward functions: registered names or module:function",
                                 factory=lambda: ["arithmetic_accuracy"])
    peft: dict = _f(help="the adapter: {type: none | lora | mos, ...} (keys below)", factory=dict)
    train: dict = _f(help="the algorithm's trainer settings (keys below)", factory=dict)
    evaluate_before: bool = _f(False, "held-out accuracy before training")
    evaluate_after: bool = _f(True, "held-out accuracy after training")
    resume: bool = _f(False, "continue from the newest checkpoint in train.output_dir")
    dry_run: bool = _f(False, "build everything, run one tiny step")


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
        from .distributed import distributed_state

        train.update(max_steps=1, prompts_per_step=distributed_state().num_processes, num_generations=2,
                     max_completion_length=16, save_steps=None, eval_steps=None, report_to=["none"],
                     output_dir=str(train.get("output_dir", "outputs/run")) + "-dry-run", overwrite_output_dir=True)
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
    if kind in ("none", None):
        if options:
            raise ConfigError("peft.type is 'none' but other peft options are set")
        return None
    if kind == "lora":
        from peft import LoraConfig as cls
    elif kind == "mos":
        from lora_shards import MoSConfig as cls
    else:
        raise ConfigError(f"peft.type must be none, lora or mos, got {kind!r}."
                          f"{_closest(str(kind), ['none', 'lora', 'mos'])}")
    options.setdefault("task_type", "CAUSAL_LM")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in options:
        if key not in names:
            raise ConfigError(f"unknown config key 'peft.{key}' for {kind}.{_closest(key, names)}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"peft: {error}") from error


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict | None = None) -> Recipe:
    """The recipe in YAML file ``path`` with command-line ``overrides`` on top. A ``peft.type`` given on the command
    line replaces the recipe's whole ``peft`` section (``--peft.type none`` trains without an adapter; ``--peft none``
    says the same). The recipe's folder and the working directory join the import path, so ``module:function``
    rewards in files next to the recipe are found."""
    data = load_yaml(path)
    if overrides:
        update = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        peft = update.get("peft")
        if peft in ("none", None) and "peft" in update:
            update = {**update, "peft": {"type": "none"}}
        recipe_peft = data.get("peft") if isinstance(data.get("peft"), dict) else {}
        if isinstance(update.get("peft"), dict) and update["peft"].get("type", recipe_peft.get("type")) != \
                recipe_peft.get("type"):
            data = {key: value for key, value in data.items() if key != "peft"}  # another adapter type
        data = merge(data, update)
    if data.get("peft", {}) in ("none", None):
        data["peft"] = {"type": "none"}
    add_import_paths(Path(path).parent, Path.cwd())
    return from_dict(Recipe, data)


def resolve_reward_funcs(recipe: Recipe) -> list:
    """The recipe's reward functions, each error naming its entry (``reward_funcs[1]: ...``)."""
    from ..evaluation import resolve_reward

    if not recipe.reward_funcs:
        raise ConfigError("reward_funcs must name at least one reward function")
    weights = recipe.train.get("reward_weights")
    if isinstance(weights, list) and len(weights) != len(recipe.reward_funcs):
        raise ConfigError(f"train.reward_weights has {len(weights)} values for {len(recipe.reward_funcs)} reward "
                          f"functions ({', '.join(map(str, recipe.reward_funcs))})")
    return [resolve_reward(name, f"reward_funcs[{i}]") for i, name in enumerate(recipe.reward_funcs)]


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Fail before loading anything when ``train.output_dir`` cannot be made or written to."""
    folder = Path(output_dir)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"train.output_dir {folder} cannot be made: {blocking} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        detail = error.strerror or str(error)
        raise ConfigError(f"train.output_dir {folder} is not writable: {detail}") from error


def check_target_modules(model, section: dict) -> None:
    """Fail naming them when ``peft.target_modules`` lists modules the model does not have."""
    wanted = section.get("target_modules")
    if section.get("type") not in ("lora", "mos") or not isinstance(wanted, list):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"peft.target_modules: {', '.join(map(repr, missing))} not in the model; its linear layers "
                          f"are {', '.join(linear)}")


def build_trainer(recipe: Recipe):
    """The trainer a recipe describes. What can be checked without the model is checked first: the trainer settings,
    the adapter, the rewards, the output folder, the model's name, and the data."""
    from .distributed import distributed_state
    from .grpo import GRPOTrainer
    from .spo_chain import SPOChainTrainer

    trainers = {"spo_chain": SPOChainTrainer, "grpo": GRPOTrainer, "rloo": GRPOTrainer, "dr_grpo": GRPOTrainer}
    if recipe.algorithm == "spo_tree":
        from .spo_tree import SPOTreeTrainer

        trainers["spo_tree"] = SPOTreeTrainer
    args = trainer_config(recipe)
    adapter = peft_config(recipe.peft)
    resolve_reward_funcs(recipe)  # the trainer takes the names: metrics are named after them
    world = distributed_state().num_processes
    if args.prompts_per_step % world:
        raise ConfigError(f"train.prompts_per_step={args.prompts_per_step} must be divisible by the number of "
                          f"processes ({world})")
    check_output_dir(args.output_dir)
    check_model_source(recipe.model)
    train_dataset = recipe.dataset.load()
    eval_dataset = recipe.eval_dataset.load() if recipe.eval_dataset is not None else None
    tokenizer = load_tokenizer(recipe.model, trust_remote_code=recipe.trust_remote_code)
    model = load_model(recipe.model, dtype=recipe.dtype, device=distributed_state().device,
                       trust_remote_code=recipe.trust_remote_code)
    check_target_modules(model, recipe.peft)
    return trainers[recipe.algorithm](model=model, reward_funcs=list(recipe.reward_funcs), args=args,
                                      train_dataset=train_dataset, eval_dataset=eval_dataset,
                                      processing_class=tokenizer, peft_config=adapter)


def interrupted_message(trainer) -> str:
    """One line saying where Ctrl-C stopped a run and how to go on."""
    if trainer is None:
        return "interrupted before training started"
    from .checkpoint import list_checkpoints

    total = trainer.args.max_steps
    checkpoints = list_checkpoints(Path(trainer.output_dir))
    if trainer.step >= total:
        return f"interrupted after the last step ({total} of {total}), while saving or evaluating"
    if checkpoints:
        return (f"interrupted at step {trainer.step + 1} of {total} (last checkpoint: {checkpoints[-1].name}); "
                "resume with --resume")
    return (f"interrupted at step {trainer.step + 1} of {total}, before the first checkpoint (train.save_steps): "
            "--resume would start over")


def train_from_recipe(path: str, overrides: list[str] | None = None) -> int:
    """``spo train``: build the recipe's trainer, evaluate, train, evaluate. Ctrl-C raises :class:`Interrupted`
    (a KeyboardInterrupt) whose message says at which step it stopped."""
    trainer = None

    def on_sigint(signum, frame):
        # Python raises KeyboardInterrupt wherever the main thread is, and one raised inside a __del__ or a weakref
        # callback is printed and dropped: the flag makes the training loop stop at the next step regardless
        if trainer is not None:
            trainer.interrupt_requested = True
        raise KeyboardInterrupt

    def on_unraisable(unraisable):
        # that dropped KeyboardInterrupt is handled by the flag: its "Exception ignored ... Traceback" is noise
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous_hook(unraisable)

    installed = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook
    if installed:
        signal.signal(signal.SIGINT, on_sigint)
        sys.unraisablehook = on_unraisable
    try:
        recipe = load_recipe(path, overrides)
        trainer = build_trainer(recipe)
        try:
            return _train_and_evaluate(recipe, trainer)
        finally:
            trainer.close()
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Interrupted):
            raise
        raise Interrupted(interrupted_message(trainer)) from None
    finally:
        if installed and previous is not None:
            signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


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


def _first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of a longer help text, cut at a colon (or "...") to fit ``limit`` characters."""
    sentence = re.split(r"\.\s+(?=[A-Z])", text.strip())[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    cut = sentence.rfind(": ", 0, limit)
    return sentence[:cut] if cut > 0 else sentence[:limit - 3].rstrip() + "..."


def recipe_help() -> str:
    """``spo train --help``: every recipe key with its type, default and one line of help, from the dataclasses."""
    from lora_shards import MoSConfig
    from peft.config import PeftConfig

    top = [row for row in help_rows(Recipe) if row[0] not in ("dataset", "peft", "train")]
    peft_base = {f.name for f in dataclasses.fields(PeftConfig)}
    mos = [(key, kind, default, _first_sentence(text))
           for key, kind, default, text in help_rows(MoSConfig, "peft.",
                                                     only={f.name for f in dataclasses.fields(MoSConfig)} - peft_base)]
    base_fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}

    def own(cls) -> set[str]:  # fields a subclass adds, or whose default it changes
        return {f.name for f in dataclasses.fields(cls)
                if f.name not in base_fields or f.default != base_fields[f.name].default}

    sections = [
        ("recipe", top),
        ("dataset (eval_dataset takes the same keys)", help_rows(DataSection, "dataset.")),
        ("peft: type, then for mos the keys below; lora takes the fields of peft.LoraConfig (r, lora_alpha, "
         "target_modules, ...)",
         [("peft.type", "none|lora|mos", "none", "the adapter; none trains every weight")] + mos),
        ("train: grpo, rloo, dr_grpo (GRPOConfig); spo_chain and spo_tree take these too", help_rows(GRPOConfig, "train.")),
        ("train, spo_chain (SPOChainConfig): further keys and other defaults",
         help_rows(SPOChainConfig, "train.", only=own(SPOChainConfig))),
        ("train, spo_tree (SPOTreeConfig): further keys and other defaults",
         help_rows(SPOTreeConfig, "train.", only=own(SPOTreeConfig))),
    ]
    lines = ["usage: spo train RECIPE.yaml [--section.key value ...] [--resume] [--dry-run] [--debug]", "",
             "Each key is set in the recipe (YAML) or on the command line, where values are read as YAML and dashes in",
             "keys are underscores (--train.reward_weights '[1, 0.5]'). --debug shows the full traceback of an error.",
             "Columns: key, type, default, help."]
    for title, rows in sections:
        lines += ["", f"{title}:", format_help_rows(rows)]
    return "\n".join(lines)
