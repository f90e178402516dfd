"""The command line on bad input (issue #15): every user-caused failure is one line on stderr that names the file,
field or value, with exit status 2; ``--debug`` keeps the traceback. Also: ``limit``, checks before loading,
rewards next to the recipe, ``--peft.type none``, Ctrl-C, and ``--help`` generated from the config dataclasses.

Most cases call ``spo.cli.main`` in this process (tiny models, loaded in a second); two run ``python -m spo.cli``.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo.cli import main

ROOT = Path(__file__).resolve().parents[1]
REWARDS_MODULE = "spo_cli_test_rewards"

REWARDS_SOURCE = '''
import time

NOT_CALLABLE = 3


def zero(completions, **kwargs):
    return [0.0] * len(completions)


def raises(completions, **kwargs):
    raise ZeroDivisionError("division by zero in my reward")


def slow(completions, **kwargs):
    time.sleep(2)
    return [0.0] * len(completions)
'''

RECIPE = """
algorithm: grpo
model: {model}
dataset: {{source: "builtin:arithmetic", split: train, limit: 8}}
reward_funcs: [{reward}]
peft: {{type: lora, r: 2, target_modules: [q_proj, v_proj]}}
evaluate_after: false
train:
  output_dir: {out}
  max_steps: 1
  prompts_per_step: 2
  num_generations: 2
  max_completion_length: 4
  temperature: 1.0
  top_p: 1.0
  save_steps: null
  report_to: [none]
"""


def visible_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows: within a line, what follows the last carriage return (progress bars)."""
    return [shown for line in text.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]


@pytest.fixture(scope="module")
def quiet_progress():
    """Loading a model or a new data file draws progress bars on stderr before any error; the one-line checks are
    about the error, so switch them off."""
    import datasets
    from transformers.utils import logging as hf_logging

    model_bars, data_bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    if model_bars:
        hf_logging.enable_progress_bar()
    if data_bars:
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, quiet_progress):
    """Bad (and some good) inputs: data files, recipes, model folders, adapters and a reward module."""
    from peft import LoraConfig, get_peft_model

    from spo.models import tiny_model

    root = tmp_path_factory.mktemp("cli")
    f = {"root": root, "model": tiny_model_dir}
    (root / f"{REWARDS_MODULE}.py").write_text(REWARDS_SOURCE)
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    good = "".join(json.dumps(r) + "\n" for r in rows)
    for name, text in {"good.jsonl": good, "empty.jsonl": "", "blank.jsonl": "\n\n",
                       "notjson.jsonl": good.splitlines()[0] + "\nquestion: 2+2\n",
                       "truncated.jsonl": good + '{"question": "What is 9 + 1?", "ans',
                       "array.jsonl": "[1, 2]\n", "empty.yaml": "# nothing here\n",
                       "list.yaml": "- a\n- b\n", "badyaml.yaml": "train: {max_steps: 3\n"}.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("x")
    (root / "recipes_dir").mkdir()
    (root / "plain_dir").mkdir()
    # a model whose weights file is cut short, one without config.json, one with a small context
    corrupt = root / "corrupt_model"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(tiny_model_dir, root / "no_config_model")
    (root / "no_config_model" / "config.json").unlink()
    short = root / "short_context_model"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    # an adapter trained on another base model (hidden size 32, not 64)
    other = get_peft_model(tiny_model(seed=1, seed_hidden=32),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    other.save_pretrained(str(root / "other_adapter"))
    f["recipe"] = root / "recipe.yaml"
    f["recipe"].write_text(RECIPE.format(model=tiny_model_dir, reward="arithmetic_accuracy", out=root / "run"))
    return f


@pytest.fixture
def cli(files, capsys, monkeypatch):
    """Run ``spo ...`` in this process from the inputs' folder; returns (rc, stdout, visible stderr lines)."""
    monkeypatch.chdir(files["root"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI may add the recipe's folder and the working dir
    monkeypatch.delitem(sys.modules, REWARDS_MODULE, raising=False)

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, visible_lines(err)

    return run


def _eval(files, *extra):
    return ["eval", "--model", files["model"], "--limit", 2, "--max-new-tokens", 4, "--output",
            files["root"] / "out.jsonl", *extra]


def _train(files, *extra):
    return ["train", files["recipe"], *extra]


# (id, argv from the files, what the one line must name)
BAD_INPUTS = [
    # item 4: limit
    ("eval-limit-0", lambda f: _eval(f, "--limit", 0), ["limit", "0"]),
    ("eval-limit-negative", lambda f: _eval(f, "--limit", -1), ["limit", "-1"]),
    ("eval-limit-0-file", lambda f: _eval(f, "--dataset", "good.jsonl", "--limit", 0), ["limit", "0"]),
    ("train-dataset-limit-0", lambda f: _train(f, "--dataset.limit", 0), ["dataset", "limit"]),
    ("train-eval-limit-negative", lambda f: _train(f, "--train.eval_limit", -5), ["eval_limit", "-5"]),
    # item 7: user-caused failures
    ("eval-output-is-a-directory", lambda f: _eval(f, "--output", f["root"] / "plain_dir"), ["plain_dir", "directory"]),
    ("eval-output-unwritable", lambda f: _eval(f, "--output", f["root"] / "a_file" / "out.jsonl"),
     ["a_file/out.jsonl", "is a file"]),
    ("train-output-dir-unwritable", lambda f: _train(f, "--train.output_dir", f["root"] / "a_file" / "run"),
     ["output_dir", "a_file/run"]),
    ("eval-device-cuda-without-cuda", lambda f: _eval(f, "--device", "cuda"), ["device", "'cuda'", "CUDA"]),
    ("eval-device-unknown", lambda f: _eval(f, "--device", "gpu0"), ["device", "'gpu0'"]),
    ("eval-missing-relative-data-path", lambda f: _eval(f, "--dataset", "data/missing.jsonl"),
     ["data/missing.jsonl", "does not exist"]),
    ("train-missing-relative-data-path", lambda f: _train(f, "--dataset.source", "data/train.jsonl"),
     ["data/train.jsonl", "does not exist"]),
    ("eval-empty-jsonl", lambda f: _eval(f, "--dataset", "empty.jsonl"), ["empty.jsonl", "empty"]),
    ("eval-blank-jsonl", lambda f: _eval(f, "--dataset", "blank.jsonl"), ["blank.jsonl", "empty"]),
    ("eval-non-json-line", lambda f: _eval(f, "--dataset", "notjson.jsonl"), ["notjson.jsonl", "line 2"]),
    ("eval-truncated-jsonl", lambda f: _eval(f, "--dataset", "truncated.jsonl"), ["truncated.jsonl", "line 4"]),
    ("eval-jsonl-row-not-an-object", lambda f: _eval(f, "--dataset", "array.jsonl"), ["array.jsonl", "line 1"]),
    ("eval-missing-question-field", lambda f: _eval(f, "--dataset", "good.jsonl", "--question-field", "q"),
     ["good.jsonl", "'q'"]),
    ("eval-missing-model-folder", lambda f: _eval(f, "--model", "./no-such-model"), ["./no-such-model"]),
    ("eval-missing-nested-model-folder", lambda f: _eval(f, "--model", "models/run/final"), ["models/run/final"]),
    ("train-missing-model-folder", lambda f: _train(f, "--model", "outputs/run/model"), ["outputs/run/model"]),
    ("eval-model-folder-without-config", lambda f: _eval(f, "--model", f["root"] / "no_config_model"),
     ["no_config_model", "config.json"]),
    ("eval-corrupt-safetensors", lambda f: _eval(f, "--model", f["root"] / "corrupt_model"),
     ["corrupt_model/model.safetensors"]),
    ("eval-hub-model-offline", lambda f: _eval(f, "--model", "some-org/not-cached-model"),
     ["some-org/not-cached-model", "offline and not in the cache"]),
    ("eval-hub-dataset-offline", lambda f: _eval(f, "--dataset", "some-org/not-cached-data"),
     ["some-org/not-cached-data", "offline and not in the cache"]),
    ("eval-adapter-of-another-base", lambda f: _eval(f, "--adapter", f["root"] / "other_adapter"),
     ["other_adapter", "does not fit"]),
    ("eval-missing-adapter", lambda f: _eval(f, "--adapter", "outputs/run/adapter"), ["outputs/run/adapter"]),
    ("eval-adapter-folder-without-config", lambda f: _eval(f, "--adapter", f["root"] / "plain_dir"),
     ["plain_dir", "adapter_config.json"]),
    ("eval-reward-not-callable", lambda f: _eval(f, "--reward", f"{REWARDS_MODULE}:NOT_CALLABLE"),
     [f"{REWARDS_MODULE}:NOT_CALLABLE", "not callable"]),
    ("eval-unknown-reward", lambda f: _eval(f, "--reward", "acuracy"), ["reward", "'acuracy'"]),
    ("eval-reward-raises", lambda f: _eval(f, "--reward", f"{REWARDS_MODULE}:raises"),
     ["'raises'", "ZeroDivisionError"]),
    ("train-reward-not-callable", lambda f: _train(f, "--reward_funcs", f"[{REWARDS_MODULE}:NOT_CALLABLE]"),
     ["reward_funcs[0]", f"{REWARDS_MODULE}:NOT_CALLABLE", "not callable"]),
    ("train-reward-timeout", lambda f: _train(f, "--reward_funcs", f"[{REWARDS_MODULE}:slow]",
                                              "--train.reward_timeout", 0.2), ["slow' did not return", "0.2s"]),
    ("train-reward-weights-count", lambda f: _train(f, "--train.reward_weights", "[1, 2]"), ["reward_weights"]),
    ("train-logging-steps-0", lambda f: _train(f, "--train.logging_steps", 0), ["logging_steps", "0"]),
    ("train-recipe-is-a-directory", lambda f: ["train", f["root"] / "recipes_dir"], ["recipes_dir", "directory"]),
    ("train-binary-recipe", lambda f: ["train", f["root"] / "binary.yaml"], ["binary.yaml", "not a text"]),
    ("eval-binary-config", lambda f: ["eval", f["root"] / "binary.yaml"], ["binary.yaml", "not a text"]),
    ("train-recipe-not-yaml", lambda f: ["train", f["root"] / "badyaml.yaml"], ["badyaml.yaml", "line"]),
    ("train-recipe-not-a-mapping", lambda f: ["train", f["root"] / "list.yaml"], ["list.yaml", "mapping"]),
    ("train-missing-recipe", lambda f: ["train", "recipes/nope.yaml"], ["recipes/nope.yaml", "does not exist"]),
    ("train-no-recipe", lambda f: ["train"], ["recipe"]),
    ("eval-dtype", lambda f: _eval(f, "--dtype", "float8"), ["dtype", "'float8'"]),
    ("eval-typo-key", lambda f: _eval(f, "--num-sample", 2), ["num_sample", "num_samples"]),
    ("unknown-command", lambda f: ["evaluate", "--model", "x"], ["'evaluate'", "eval"]),
    # item 8: accepted silently before
    ("train-warmup-ratio-negative", lambda f: _train(f, "--train.warmup_ratio", -0.1), ["warmup_ratio", "-0.1"]),
    ("train-epsilon-high-negative", lambda f: _train(f, "--train.epsilon_high", -0.2), ["epsilon_high", "-0.2"]),
    ("train-grpo-one-generation", lambda f: _train(f, "--train.num_generations", 1), ["num_generations", "1"]),
    ("train-dr-grpo-one-generation", lambda f: _train(f, "--algorithm", "dr_grpo", "--train.num_generations", 1),
     ["num_generations", "1"]),
    ("train-empty-recipe", lambda f: ["train", f["root"] / "empty.yaml"], ["empty.yaml", "empty"]),
    ("eval-empty-config", lambda f: ["eval", f["root"] / "empty.yaml"], ["empty.yaml", "empty"]),
    ("prepare-model-unknown", lambda f: ["prepare-model", "smollm-135m"], ["'smollm-135m'"]),
    # item 9: peft options
    ("train-peft-type-unknown", lambda f: _train(f, "--peft.type", "qlora"), ["peft.type", "'qlora'"]),
]


@pytest.mark.parametrize("argv,names", [pytest.param(a, n, id=i) for i, a, n in BAD_INPUTS])
def test_bad_input_is_one_line_naming_it(cli, files, monkeypatch, argv, names):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    argv = argv(files)
    rc, _, err = cli(*argv)
    command = argv[0] if argv[0] in ("eval", "train", "prepare-model") else None
    if os.environ.get("SPO_SHOW_ERRORS"):  # the cases and their messages, for the record
        print(f"\nCASE spo {' '.join(str(a).replace(str(files['root']), '$T') for a in argv)}\n  -> "
              + "\n  -> ".join(e.replace(str(files["root"]), "$T") for e in err))
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"spo {command}: error: " if command else "spo: error: "), err
    for name in names:
        assert name in err[0], (name, err[0])


def test_there_are_at_least_thirty_kinds_of_bad_input():
    assert len(BAD_INPUTS) >= 30


def test_debug_keeps_the_traceback(cli, files):
    from spo.config import ConfigError

    with pytest.raises(ConfigError, match="limit"):
        cli(*_eval(files, "--limit", 0, "--debug"))


def test_programming_errors_are_not_reported_as_user_errors(cli, files, monkeypatch):
    import spo.evaluation

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(spo.evaluation, "load_problems", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli(*_eval(files))


def test_a_missing_module_is_not_hidden(cli, files, monkeypatch):
    """An ImportError inside the toolkit is a broken install or a bug, not "not available in this version"."""
    monkeypatch.setitem(sys.modules, "spo.trainer.run", None)  # importing it raises ImportError
    with pytest.raises(ImportError):
        cli(*_train(files))


# --- item 4: limit ---------------------------------------------------------------------------------------------


def test_limit_counts_problems_and_null_means_all(cli, files):
    rc, out, _ = cli(*_eval(files, "--dataset", "good.jsonl", "--limit", "null"))
    assert rc == 0 and json.loads(out.splitlines()[-1])["problems"] == 3
    rc, out, _ = cli(*_eval(files, "--dataset", "good.jsonl", "--limit", 2))
    assert rc == 0 and json.loads(out.splitlines()[-1])["problems"] == 2
    from spo.data import load_problems

    assert len(load_problems("builtin:arithmetic", "test", limit=None)) == 1000  # the built-in task's default
    assert len(load_problems("builtin:arithmetic", "test", limit=5)) == 5


# --- item 8: checks first, warnings ------------------------------------------------------------------------------


def test_eval_checks_data_adapter_and_output_before_loading_the_model(cli, files, monkeypatch):
    import spo.evaluation

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(spo.evaluation, "load_model", no_model)
    monkeypatch.setattr(spo.evaluation, "load_tokenizer", no_model)
    for extra, name in [(["--dataset", "data/missing.jsonl"], "data/missing.jsonl"),
                        (["--adapter", "outputs/run/adapter"], "outputs/run/adapter"),
                        (["--dataset", "notjson.jsonl"], "notjson.jsonl"),
                        (["--output", files["root"] / "plain_dir"], "plain_dir"),
                        (["--reward", "acuracy"], "acuracy")]:
        rc, _, err = cli(*_eval(files, *extra))
        assert rc == 2 and len(err) == 1 and name in err[0], err


def test_eval_warns_when_prompts_exceed_the_models_context(cli, files, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        rc, _, _ = cli(*_eval(files, "--model", files["root"] / "short_context_model", "--max-new-tokens", 2))
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 of 2 prompts" in warnings[0] and "max_position_embeddings=40" in warnings[0], warnings


def test_group_advantages_need_two_generations_but_the_tree_does_not():
    from spo.trainer.config import GRPOConfig, SPOChainConfig, SPOTreeConfig

    for estimator in ("grpo", "dr_grpo", "rloo"):
        with pytest.raises(ValueError, match="num_generations"):
            GRPOConfig(advantage_estimator=estimator, num_generations=1)
    SPOTreeConfig(num_generations=1, branching=[2, 2], segment_length=4)
    SPOChainConfig(num_generations=1)  # values segments by Monte Carlo, not by the group


def test_prepare_model_names_what_it_converts(cli, monkeypatch):
    import spo.models

    monkeypatch.setattr(spo.models, "embedded_model_path", lambda: Path("/cache/smollm2"))
    rc, out, _ = cli("prepare-model")
    assert rc == 0 and out.strip() == "/cache/smollm2"


# --- item 9: rewards next to the recipe, peft none from the command line ----------------------------------------


def test_reward_module_next_to_the_recipe_and_peft_none(cli, files, tmp_path, monkeypatch):
    folder = tmp_path / "my_recipes"
    folder.mkdir()
    module = "rewards_next_to_recipe"
    (folder / f"{module}.py").write_text(REWARDS_SOURCE)
    recipe = folder / "r.yaml"
    recipe.write_text(RECIPE.format(model=files["model"], reward=f"{module}:zero", out=tmp_path / "run"))
    monkeypatch.delitem(sys.modules, module, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out, err = cli("train", recipe, "--peft.type", "none", "--train.max_steps", 1)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["steps"] == 1
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / "adapter").exists()  # no adapter


def test_reward_module_in_the_working_directory(files, monkeypatch):
    from spo.trainer.run import load_recipe, resolve_reward_funcs

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.delitem(sys.modules, REWARDS_MODULE, raising=False)
    monkeypatch.chdir(files["root"])
    recipe = load_recipe(files["recipe"], ["--reward_funcs", f"[{REWARDS_MODULE}:zero]"])
    assert resolve_reward_funcs(recipe)[0].__name__ == "zero"


@pytest.mark.parametrize("override", [["--peft.type", "none"], ["--peft", "none"]])
def test_peft_none_from_the_command_line(files, override):
    from spo.trainer.run import load_recipe, peft_config

    recipe = load_recipe(files["recipe"], override)
    assert recipe.peft == {"type": "none"} and peft_config(recipe.peft) is None
    kept = load_recipe(files["recipe"], ["--peft.r", "8"])  # other peft keys still merge into the recipe's
    assert kept.peft == {"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}


# --- item 10: Ctrl-C -------------------------------------------------------------------------------------------


def test_interrupt_before_training_is_one_line(cli, files, monkeypatch):
    import spo.trainer.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spo.trainer.run, "load_model", interrupted)
    rc, _, err = cli(*_train(files))
    assert rc == 130 and err == ["spo train: interrupted before training started"], err


def test_interrupt_during_training_names_the_step(cli, files, monkeypatch):
    from spo.trainer.grpo import GRPOTrainer

    original = GRPOTrainer.make_samples

    def make_samples(self, rows, step):
        if step == 1:
            raise KeyboardInterrupt
        return original(self, rows, step)

    monkeypatch.setattr(GRPOTrainer, "make_samples", make_samples)
    rc, _, err = cli(*_train(files, "--train.max_steps", 3, "--train.save_steps", 1))
    assert rc == 130, err
    assert err == ["spo train: interrupted at step 2 of 3 (last checkpoint: checkpoint-1); resume with --resume"], err


def _spo(args, cwd, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "spo.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigint_prints_one_line_and_the_step(files, tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(RECIPE.format(model=files["model"], reward="arithmetic_accuracy", out=tmp_path / "run")
                      .replace("max_steps: 1", "max_steps: 1000").replace("save_steps: null", "save_steps: 1"))
    process = _spo(["train", recipe], tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint-1" / "COMPLETE").is_file():  # a step is done and saved
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    last = visible_lines(err)[-1]
    assert last.startswith("spo train: interrupted at step ") and last.endswith("resume with --resume"), err


def test_a_bad_input_in_a_real_process_is_one_line(files, tmp_path):
    """The missing relative data path that used to become a Hub ConnectionError, through ``python -m spo.cli``."""
    process = _spo(["eval", "--model", files["model"], "--dataset", "data/test.jsonl"], tmp_path)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert visible_lines(err) == [f"spo eval: error: data file data/test.jsonl does not exist (in {tmp_path})"], err


# --- item 11: --help --------------------------------------------------------------------------------------------


def _config_classes():
    from spo.evaluation import EvalConfig
    from spo.trainer.config import GRPOConfig, SPOChainConfig, SPOTreeConfig
    from spo.trainer.run import DataSection, Recipe

    return [EvalConfig, GRPOConfig, SPOChainConfig, SPOTreeConfig, Recipe, DataSection]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_one_line_of_help(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help")
        assert text and "\n" not in text and len(text) <= 110, (cls.__name__, f.name, text)


def test_help_lists_every_key_with_type_default_and_help(cli):
    from spo.evaluation import EvalConfig
    from spo.trainer.config import GRPOConfig, SPOChainConfig, SPOTreeConfig
    from spo.trainer.run import DataSection, Recipe

    rc, out, _ = cli("eval", "--help")
    assert rc == 0
    lines = out.splitlines()
    for f in dataclasses.fields(EvalConfig):
        line = next((x for x in lines if x.split()[:1] == [f"--{f.name}"]), None)
        assert line and f.metadata["help"] in line, (f.name, line)
    assert any(x.split()[:3] == ["--num_samples", "int", "1"] for x in lines), lines
    assert any(x.split()[:3] == ["--limit", "int|null", "64"] for x in lines), lines

    rc, out, _ = cli("train", "--help")
    assert rc == 0
    lines = out.splitlines()
    keys = [f"--{f.name}" for f in dataclasses.fields(Recipe) if f.name not in ("dataset", "peft", "train")]
    keys += [f"--dataset.{f.name}" for f in dataclasses.fields(DataSection)]
    keys += [f"--train.{f.name}" for cls in (GRPOConfig, SPOChainConfig, SPOTreeConfig) for f in dataclasses.fields(cls)]
    keys += ["--peft.type", "--peft.r", "--peft.equivalent_rank"]
    for key in keys:
        assert any(x.split()[:1] == [key] for x in lines), key
    assert any(x.split()[:3] == ["--train.learning_rate", "float", "1e-05"] for x in lines), lines
    assert any(x.split()[:3] == ["--train.mc_samples", "int", "9"] for x in lines), lines
    rc, out, _ = cli("train", "recipes/quickstart.yaml", "--help")
    assert rc == 0 and "--train.mc_samples" in out
    assert cli("prepare-model", "--help")[0] == 0


def test_resuming_a_checkpoint_of_another_algorithm_is_one_line(cli, files, tmp_path):
    out = tmp_path / "run"
    assert cli(*_train(files, "--train.output_dir", out))[0] == 0
    rc, _, err = cli(*_train(files, "--train.output_dir", out, "--algorithm", "spo_chain", "--resume"))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("spo train: error: --resume: checkpoint ") and "'grpo', not 'spo_chain'" in err[0], err


# --- issue 15: the adapter is merged for evaluation -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "mos"])
def test_eval_merges_the_adapter_and_decodes_the_same_tokens(cli, files, monkeypatch, kind):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    import spo.evaluation
    from lora_shards import MoSConfig
    from spo.models import tiny_model

    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if kind == "lora" else
              MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, target_modules=["q_proj", "v_proj"]))
    adapted = get_peft_model(tiny_model(seed=5), config)  # the base of files["model"]
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    adapted.save_pretrained(str(files["root"] / f"{kind}_adapter"))
    decoded_by, evaluate = [], spo.evaluation.evaluate
    monkeypatch.setattr(spo.evaluation, "evaluate",
                        lambda model, *a, **k: decoded_by.append(model) or evaluate(model, *a, **k))

    completions = {}
    for merge in ("true", "false"):
        rc, _, err = cli(*_eval(files, "--adapter", files["root"] / f"{kind}_adapter", "--merge-adapter", merge,
                                "--max-new-tokens", 12))
        assert rc == 0, err
        completions[merge] = [json.loads(line)["completion"] for line in (files["root"] / "out.jsonl").open()]
    merged, unmerged = decoded_by
    assert not isinstance(merged, PeftModel) and not hasattr(merged, "peft_config")
    assert isinstance(unmerged, PeftModel)
    assert completions["true"] == completions["false"]
