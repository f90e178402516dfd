"""The benchmark scripts behind the figures of README.md and benchmarks/RESULTS.md: every quoted command runs a
committed script with options it has, the profiles come from those scripts, and the settings they claim to control
are the ones they pass."""

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from spo.models import EMBEDDED_MODEL, load_tokenizer, tiny_model
from spo.config import load_config
from spo.trainer.run import Recipe, trainer_config
from spo.trainer.samples import train_batch

from test_learner import learner_for, make_samples

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python (benchmarks/\w+\.py)([^\n`|#]*)")


def load(name: str):
    """A benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_quoted_benchmark_command_names_a_committed_script_and_its_options():
    documents = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md"),
                 *(ROOT / "benchmarks").glob("*.py")]
    commands = [(doc.relative_to(ROOT), match) for doc in documents for match in COMMAND.finditer(doc.read_text())]
    assert len(commands) >= 15
    for document, match in commands:
        script = ROOT / match.group(1)
        assert script.is_file(), f"{document}: `{match.group(0).strip()}`: no such script"
        source = script.read_text()
        for option in re.findall(r"(?<![\w-])--[a-z][\w.-]*", match.group(2)):
            if "." in option:  # a recipe key (--train.kv_budget), for scripts that pass them on to spo train
                assert "parse_known_args" in source, f"{document}: {script.name} passes no recipe key such as {option}"
            else:
                assert f'"{option}"' in source, f"{document}: `{match.group(0).strip()}`: {script.name} has no {option}"


def test_vs_trl_passes_trls_gradient_checkpointing_setting(monkeypatch):
    """TRL's GRPOConfig turns gradient checkpointing on by default; the comparison must set it, off unless asked."""
    configs = []

    class Trainer:
        def __init__(self, **kwargs):
            self.state = types.SimpleNamespace(log_history=[{"completions/mean_length": 10.0}])

        def train(self):
            pass

    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(
        GRPOConfig=lambda **kwargs: configs.append(kwargs), GRPOTrainer=Trainer))
    vs_trl = load("vs_trl")
    vs_trl.run_trl(1)
    vs_trl.run_trl(1, gradient_checkpointing=True)
    assert [config["gradient_checkpointing"] for config in configs] == [False, True]


def test_learning_benchmark_variants_are_valid_recipes_ended_by_their_budget(tmp_path):
    """A budget ends these runs (max_steps is out of reach), and the recipe's linear schedule decays over it.
    Every variant on every task is a recipe the trainer accepts, evaluated on the same held-out problems."""
    learning = load("learning")
    for task in learning.TASKS:
        for name in learning.VARIANTS:
            recipe = learning.variant_recipe(name, seed=1, out=tmp_path, eval_limit=10, task=task, token_budget=5000)
            config = trainer_config(recipe)
            # max_steps is out of reach: every step samples at least one token for each of its 64 rollouts
            assert config.lr_scheduler_type == "linear" and config.max_steps * 64 > 5000, name
            assert config.max_generated_tokens == 5000 and config.max_train_seconds is None and config.seed == 1
            assert recipe.eval_dataset.source.endswith(task) and recipe.eval_dataset.seed == 0, (task, name)
    for name, shipped in (("spo_tree", "quickstart_spo_tree.yaml"), ("rloo", "quickstart_grpo.yaml")):
        recipe = learning.variant_recipe(name, seed=1, out=tmp_path, eval_limit=10, token_budget=5000)
        settings = load_config(Recipe, ROOT / "recipes" / shipped).train  # each algorithm keeps its own
        budget_keys = {"max_steps", "save_steps", "output_dir", "report_to", "seed"}
        assert {k: v for k, v in settings.items() if k not in budget_keys} == \
            {k: recipe.train[k] for k in settings if k not in budget_keys}, name
    timed = learning.variant_recipe("lora_r1", seed=0, out=tmp_path, eval_limit=10, seconds_budget=60.0,
                                    learning_rate=5e-4)
    config = trainer_config(timed)
    assert config.max_train_seconds == 60.0 and config.max_generated_tokens is None and config.learning_rate == 5e-4
    assert config.output_dir.endswith("lora_r1@lr0.0005-seed0")
    with pytest.raises(ValueError, match="exactly one"):
        learning.variant_recipe("grpo", seed=0, out=tmp_path, eval_limit=10)
    warmed = learning.variant_recipe("grpo", seed=0, out=tmp_path, eval_limit=10, task="ledger", token_budget=5000,
                                     model="outputs/ledger_warmup/step16")
    assert warmed.model == "outputs/ledger_warmup/step16" and recipe.model == "smollm2-135m-instruct"


def test_learning_benchmark_refuses_results_of_another_setting_and_averages_curves_over_seeds(tmp_path):
    learning = load("learning")
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"setting": {"task": "arithmetic", "token_budget": 100}, "runs": [{"seed": 0}]}))
    assert learning.load_results(saved, {"task": "arithmetic", "token_budget": 100}) == [{"seed": 0}]
    with pytest.raises(SystemExit, match="token_budget"):
        learning.load_results(saved, {"task": "ledger", "token_budget": 100})
    x, mean, error = learning.spread([[(0, 0.0), (10, 1.0)], [(0, 0.0), (5, 0.0), (8, 0.0)]], points=3)
    assert x == [0.0, 4.0, 8.0]  # up to the shorter curve's end
    assert mean == pytest.approx([0.0, 0.2, 0.4]) and error == pytest.approx([0.0, 0.2, 0.4])
    runs = [{"variant": "a", "accuracy": acc, "tokens": 10, "steps": 2, "train_seconds": 5.0} for acc in (0.2, 0.4)]
    assert "| a | 0.300 ± 0.100 | 2 |" in learning.table(runs) and "before" not in learning.table(runs)
    runs[1]["before"] = 0.125  # the starting model, measured by one run
    assert learning.accuracy_before(runs) == 0.125
    assert learning.table(runs).startswith("Held-out accuracy before training: 0.125")


def test_update_benchmark_profiles_an_update(tmp_path):
    learner, args = learner_for(tmp_path)
    table = load("update").profile_update(learner, train_batch(make_samples(count=6), args), rows=8)
    assert "Self CPU" in table and "aten::mm" in table


@pytest.fixture(scope="module")
def small_generation():
    return tiny_model(seed=0), load_tokenizer(EMBEDDED_MODEL)


def test_rollout_benchmark_profiles_ours_and_hf_generate(small_generation, capsys):
    model, tokenizer = small_generation
    load("rollout").profile(model, tokenizer, types.SimpleNamespace(batches=[2], new_tokens=4, skip_hf=False,
                                                                     profile_rows=5))
    out = capsys.readouterr().out
    assert "## Profile: ours, batch 2" in out and "## Profile: HF generate, batch 2" in out
    assert out.count("Self CPU %") == 2


def test_rollout_benchmark_states_peaks_against_our_full_cache(small_generation, capsys):
    """Each policy's peak KV against a padded dense cache and against our own full-cache policy."""
    model, tokenizer = small_generation
    load("rollout").policies(model, tokenizer, types.SimpleNamespace(problems=3, new_tokens=6, policies=["lazy"],
                                                                      budgets=[0.5]))
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| policy"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith(("| full", "| lazy"))}
    dense, ours = columns.index("peak / full"), columns.index("peak / our full")
    full, lazy = rows[("full", "-")], rows[("lazy", "50%")]
    assert float(full[ours]) == 1.0
    # the same peak over our full policy's peak, not over the padded dense cache's size
    assert float(lazy[ours]) == pytest.approx(float(lazy[dense]) / float(full[dense]), abs=0.02)
    assert float(lazy[dense]) < float(full[dense])


def _record(saved, setting, runs, start):
    learning = load("learning")
    start.wait()  # all processes write at once
    for name, seed in runs:
        learning.record_run(saved, setting, {"variant": name, "seed": seed})


def test_learning_benchmark_runs_each_pending_run_in_its_own_process_and_loses_no_result(tmp_path, monkeypatch):
    """A resumed sweep runs only what is not recorded; every run gets a fresh process, at most ``jobs`` at once;
    processes recording at the same time keep every result; a failed run stops new ones and is reported."""
    import multiprocessing

    learning = load("learning")
    saved, setting = tmp_path / "results.json", {"task": "arithmetic", "token_budget": 100}
    plan = [("grpo", None, seed) for seed in range(3)] + [("rloo", 1e-3, seed) for seed in range(2)]
    learning.record_run(saved, setting, {"variant": "grpo", "seed": 1})
    learning.record_run(saved, setting, {"variant": "rloo@lr0.001", "seed": 0})
    pending = learning.pending_runs(saved, setting, plan)
    assert pending == [("grpo", None, 0), ("grpo", None, 2), ("rloo", 1e-3, 1)]

    log = tmp_path / "log"
    script = ("import json, os, sys, time; time.sleep(0.3); "
              f"open({str(log)!r}, 'a').write(json.dumps([sys.argv[1], os.getpid(), time.time()]) + chr(10))")
    learning.run_in_processes(pending, 2, lambda run: [sys.executable, "-c", script, json.dumps(list(run))])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(json.loads(run) for run, _, _ in lines) == sorted(list(run) for run in pending)  # each once
    assert len({pid for _, pid, _ in lines}) == 3  # a process per run
    ends = sorted(end for _, _, end in lines)
    assert ends[2] - ends[0] > 0.25  # two at once: the third started when a slot was free

    log.unlink()
    failing = lambda run: [sys.executable, "-c", f"import sys; sys.exit({run[2]} == 0)"]  # noqa: E731
    with pytest.raises(SystemExit, match="grpo seed 0 failed"):
        learning.run_in_processes([("grpo", None, 0), ("grpo", None, 2)], 1, failing)

    saved = tmp_path / "concurrent" / "results.json"
    saved.parent.mkdir()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    shares = [[(variant, seed) for seed in range(40)] for variant in ("grpo", "spo_chain", "rloo")]
    processes = [context.Process(target=_record, args=(saved, setting, share, start)) for share in shares]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    runs = learning.load_results(saved, setting)
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(run for share in shares for run in share)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert learning.worker_environment(1, 2, cpu_count=2, gpu_count=0) == {"OMP_NUM_THREADS": "1"}
    assert learning.worker_environment(3, 4, cpu_count=16, gpu_count=2) == {"OMP_NUM_THREADS": "4",
                                                                            "CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
    assert learning.worker_environment(0, 2, cpu_count=2, gpu_count=0) == {}


def test_ledger_warmup_trains_on_solutions_only_and_saves_models_that_load_and_measure(tmp_path, tiny_model_dir,
                                                                                      embedded_tokenizer):
    warmup = load("ledger_warmup")
    examples = warmup.warmup_examples(embedded_tokenizer, 3, difficulty=3, seed=7)
    from spo.data import make_ledger_task

    for example, row in zip(examples, make_ledger_task("train", 3, 3, 7), strict=True):
        answer = [t for t in example["labels"] if t != -100]
        prompt_length = len(example["labels"]) - len(answer)
        assert example["labels"][:prompt_length] == [-100] * prompt_length  # no loss on the prompt
        assert example["input_ids"][-len(answer):] == answer and len(example["input_ids"]) == len(example["labels"])
        assert embedded_tokenizer.decode(answer) == row["solution"] + embedded_tokenizer.eos_token
    for _ in range(2):  # a rerun (a saved model was missing) replaces the models already there
        warmup.fine_tune(tmp_path, [1, 2], problems=4, difficulty=1, seed=0, learning_rate=1e-3, batch_size=2,
                         base=str(tiny_model_dir))
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step1", "step2"]  # no staging folder is left
    from spo.models import load_model

    first, second = (load_model(tmp_path / f"step{n}") for n in (1, 2))
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))  # step 2 trained on
    result = warmup.measure(str(tmp_path / "step2"), eval_limit=2, pass_limit=1, difficulty=1)
    assert result["greedy_problems"] == 2 and result["sampled_problems"] == 1
    assert 0 <= result["greedy"] <= 1 and 0 <= result["pass"] <= 1 and result["greedy_tokens_per_completion"] > 0
