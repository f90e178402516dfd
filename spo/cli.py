"""Command line: ``spo eval``, ``spo train`` and ``spo prepare-model``.

Options are config keys: ``spo eval --model M --num-samples 8`` or ``spo train recipe.yaml --train.learning_rate 1e-5``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from .config import ConfigError, load_config

USAGE = """usage:
  spo eval [CONFIG.yaml] [--model M] [--adapter PATH] [--dataset D] [--split S] [--limit N]
           [--num-samples K] [--temperature T] [--max-new-tokens N] [--output FILE.jsonl] ...
  spo train RECIPE.yaml [--section.key value ...] [--resume] [--dry-run]
  spo prepare-model [NAME]      convert the embedded model once (default: smollm2-135m-instruct)
"""


def _split_config_path(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("--"):
        return args[0], args[1:]
    return None, args


def cmd_eval(args: list[str]) -> int:
    from .evaluation import EvalConfig, format_summary, run_eval

    path, overrides = _split_config_path(args)
    config = load_config(EvalConfig, path, overrides)
    result = run_eval(config)
    print(format_summary(result))
    print(json.dumps(result.summary()))
    return 0


def cmd_train(args: list[str]) -> int:
    try:
        from .trainer.run import train_from_recipe
    except ImportError:
        print("spo train: the trainer is not available in this version", file=sys.stderr)
        return 2
    path, overrides = _split_config_path(args)
    if path is None:
        raise ConfigError("spo train needs a recipe: spo train recipes/quickstart.yaml")
    return train_from_recipe(path, overrides)


def cmd_prepare_model(args: list[str]) -> int:
    from .models import EMBEDDED_MODEL, resolve_model_path

    print(resolve_model_path(args[0] if args else EMBEDDED_MODEL))
    return 0


COMMANDS = {"eval": cmd_eval, "train": cmd_train, "prepare-model": cmd_prepare_model}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"spo: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(USAGE)
        return 0
    logging.basicConfig(level=os.environ.get("SPO_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[command](rest)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"spo {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
