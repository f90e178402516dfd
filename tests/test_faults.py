"""Reliability under faults and bad input: runs killed with SIGKILL again and again, full disks, tokenizers without a
chat template or pad token, unusable prompts, and configurations that cannot fit the model."""

import copy
import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from spo.data import make_arithmetic_task, plain_text
from spo.models import tiny_model
from spo.trainer import GRPOConfig, GRPOTrainer
from spo.trainer import checkpoint as ckpt
from spo.trainer.output_dir import LOCK

from helpers import tiny_run, vowel_share  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fault_train.py"


def _args(tmp_path, **overrides):
    return GRPOConfig(**tiny_run(tmp_path, **{"max_steps": 1, "num_generations": 2, "max_completion_length": 8,
                                              **overrides}))


def _trainer(tmp_path, tokenizer, dataset=None, model=None, **overrides):
    return GRPOTrainer(model=model or tiny_model(seed=0), reward_funcs=[vowel_share], args=_args(tmp_path, **overrides),
                       train_dataset=dataset if dataset is not None else make_arithmetic_task("train", 8),
                       processing_class=tokenizer)


# --- runs killed again and again ------------------------------------------------------------------------------

RECIPE = """
algorithm: {algorithm}
model: {model}
dataset: {{source: "builtin:arithmetic", split: train, limit: 32}}
reward_funcs: ["fault_train:vowel_share"]
peft: {peft}
evaluate_after: false
train:
  output_dir: {out}
  max_steps: {steps}
  prompts_per_step: 2
  num_generations: 4
  max_completion_length: 16
  temperature: 1.0
  top_p: 1.0
  learning_rate: 1.0e-3
  save_steps: 1
  save_total_limit: 2
  report_to: [none]
{extra}"""

FAST = dict(algorithm="grpo", steps=5, peft="{type: lora, r: 4, target_modules: [q_proj, v_proj]}", extra="")
SLOW = dict(algorithm="spo_chain", steps=8,
            peft="{type: mos, r: 4, equivalent_rank: 3, shards_per_vector: 2, private_rank: 1, "
                 "target_modules: [q_proj, v_proj]}",
            extra="  mc_samples: 2\n  kv_policy: lazy\n  kv_budget: 0.5\n  use_sample_buffer: true\n"
                  "  max_mc_states_per_step: 6\n")


def _launch(recipe: Path, resume: bool, fault: str | None = None) -> subprocess.Popen:
    # one thread each: the reference run goes alongside the killed ones (oversubscribed cores are many times slower)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "SPO_TEST_FAULT": fault or ""}
    return subprocess.Popen([sys.executable, str(SCRIPT), "train", str(recipe), *(["--resume"] if resume else [])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl without timings, and without a line a kill cut short."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]


def _kill_after_progress(process: subprocess.Popen, out: Path, rng: random.Random) -> None:
    """SIGKILL once the run logged a step past what the last run left, after a seeded random delay (lands in
    generation, the update, a checkpoint write or logging)."""
    before = len(_rows(out))
    deadline = time.time() + 300
    while process.poll() is None and len(_rows(out)) <= before:
        assert time.time() < deadline, "the resumed run made no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)


def _assert_nothing_half_visible(out: Path) -> None:
    """Every visible checkpoint and the adapter are whole and loadable; anything partial is hidden."""
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        if re.fullmatch(r"checkpoint-\d+", path.name):
            assert (path / ckpt.MARKER).is_file(), f"{path} is visible without its {ckpt.MARKER} marker"
            load_file(str(path / "trainable.safetensors"))
            for state in ("trainer_state.pt", "rank_state_0.pt"):
                ckpt.load_state(path, state)
        elif path.name == "adapter":
            load_file(str(path / "adapter_model.safetensors"))
            json.loads((path / "adapter_config.json").read_text())
        else:
            assert path.name in {"metrics.jsonl", "completions.jsonl", "learning_curve.png", "summary.json"}, path


def _kill_and_resume(recipe: Path, out: Path, faults: list[str], seed: int) -> list[str]:
    """Run, kill at each fault in turn (``point:n`` inside this process, ``random`` from outside), resume with
    --resume each time, then let the last run finish. Returns the runs' outputs."""
    rng = random.Random(seed)
    outputs = []
    for attempt, fault in enumerate([*faults, None]):
        process = _launch(recipe, resume=attempt > 0, fault=None if fault in (None, "random") else fault)
        if fault == "random":
            _kill_after_progress(process, out, rng)
        output = process.communicate(timeout=600)[0]
        outputs.append(output)
        if fault is None:
            assert process.returncode == 0, output
        elif fault == "random":  # killed, or finished before the kill
            assert process.returncode in (0, -signal.SIGKILL), output
        else:  # the fault really fired
            assert process.returncode == -signal.SIGKILL, f"{fault} was never reached:\n{output}"
        _assert_nothing_half_visible(out)
    return outputs


def _assert_same_result(killed: Path, straight: Path) -> None:
    assert _rows(killed) == _rows(straight)
    assert [r["step"] for r in _rows(killed)] == list(range(1, len(_rows(straight)) + 1))
    final, reference = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (killed, straight))
    assert final.keys() == reference.keys() and final
    for name in final:
        assert torch.equal(final[name], reference[name]), name
    # the run's lock file stays (an flock, released with its process), nothing else hidden does
    assert not [p for p in killed.glob(".*") if p.name != LOCK], "hidden leftovers after the run finished"


def _recipes(tmp_path, model_dir, settings) -> tuple[Path, Path, Path, Path]:
    paths = []
    for name in ("straight", "killed"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(RECIPE.format(model=model_dir, out=tmp_path / name, **settings))
        paths.append(recipe)
    return paths[0], paths[1], tmp_path / "straight", tmp_path / "killed"


def test_repeated_kills_resume_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    straight_recipe, killed_recipe, straight, killed = _recipes(tmp_path, tiny_model_dir, FAST)
    reference = _launch(straight_recipe, resume=False)  # runs alongside the killed chain
    outputs = _kill_and_resume(killed_recipe, killed, ["weights:2", "random", "rotate:1"], seed=0)
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output
    assert all("resumed from" in o for o in outputs[1:2] + outputs[3:]), outputs
    _assert_same_result(killed, straight)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_many_kills_of_spo_chain_with_mos_and_buffer(tmp_path, tiny_model_dir, seed):
    straight_recipe, killed_recipe, straight, killed = _recipes(tmp_path, tiny_model_dir, SLOW)
    reference = _launch(straight_recipe, resume=False)
    # in an order where each point is reached: every launch but the last still has at least two steps to run
    faults = ["weights:1", "random", "metrics:2", "random", "publish:2", "rotate:1", "random", "adapter:1"]
    _kill_and_resume(killed_recipe, killed, faults, seed=seed)
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output
    _assert_same_result(killed, straight)


# --- a full disk ----------------------------------------------------------------------------------------------


def test_too_little_free_space_fails_before_training(tmp_path, embedded_tokenizer, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(OSError, match=r"output_dir .*run has 1,048,576 bytes free, but training needs about "
                                      r"[\d,]+ \(a checkpoint of about [\d,]+ bytes") as caught:
        _trainer(tmp_path, embedded_tokenizer)
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.parametrize("target,failing_call", [
    ("spo.trainer.checkpoint.save_file", 2),  # the trainable weights of the second checkpoint
    ("torch.save", 4),  # its trainer state (each checkpoint saves an RNG state, then the trainer state)
])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, embedded_tokenizer, monkeypatch, target,
                                                                failing_call):
    trainer = _trainer(tmp_path, embedded_tokenizer, max_steps=2, save_steps=1)
    module, _, name = target.rpartition(".")
    original = getattr(sys.modules[module], name)
    calls = []

    def fails_when_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(sys.modules[module], name, fails_when_full)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint-2 in .*run \([\d,]+ bytes free\): "
                                                    r"OSError: .*No space left on device.* the last complete "
                                                    r"checkpoint, .*checkpoint-1, is intact") as caught:
        trainer.train()
    assert caught.value.errno == errno.ENOSPC
    out = Path(trainer.args.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-2").exists()
    monkeypatch.undo()
    _assert_nothing_half_visible(out)
    resumed = _trainer(tmp_path, embedded_tokenizer, max_steps=2, save_steps=1, resume_from_checkpoint="latest")
    assert [row["step"] for row in resumed.train()] == [1, 2]


# --- tokenizers without a chat template or a pad token -------------------------------------------------------


def test_a_tokenizer_without_chat_template_or_pad_token_trains_and_evaluates(tmp_path, embedded_tokenizer, caplog,
                                                                               monkeypatch):
    import spo.data

    monkeypatch.setattr(spo.data, "_warned", set())  # warnings are once per process; earlier tests may have warned
    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    task = make_arithmetic_task("train", 8)
    with caplog.at_level(logging.INFO):
        trainer = _trainer(tmp_path, tokenizer, dataset=task, eval_steps=1, eval_limit=2, eval_max_new_tokens=4)
        trainer.eval_dataset = make_arithmetic_task("test", 2)
        history = trainer.train()
    assert tokenizer.pad_token == tokenizer.eos_token
    assert trainer.prompt_ids[0] == tokenizer(plain_text(task[0]["prompt"]), add_special_tokens=False)["input_ids"]
    assert task[0]["question"] in tokenizer.decode(trainer.prompt_ids[0])
    assert [row["step"] for row in history] == [1] and "eval/accuracy" in history[0]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("has no chat template" in m for m in messages) == 1, messages  # once, for training and evaluation
    assert sum("has no pad token: padding with its EOS token" in m for m in messages) == 1, messages


def test_a_tokenizer_with_neither_pad_nor_eos_is_named(tmp_path, embedded_tokenizer):
    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer .*smollm2.* has neither a pad token nor an EOS token"):
        _trainer(tmp_path, tokenizer)


# --- unusable prompts -----------------------------------------------------------------------------------------


def _chat_rows(contents: list[str]) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": c}], "answer": "1"} for c in contents])


HUGE = "many words " * 3000


@pytest.mark.parametrize("dataset,overrides,match", [
    (_chat_rows(["1+1?", "2+2?", " "]), {}, r"train_dataset row 2: field 'prompt' is empty \(no message has any text"),
    (Dataset.from_list([{"prompt": "1+1?"}, {"prompt": ""}]), {}, "train_dataset row 1: field 'prompt' is empty"),
    (_chat_rows(["1+1?", HUGE]), {"max_prompt_length": 64},
     "train_dataset row 1: field 'prompt' has 6\\d{3} tokens, more than max_prompt_length=64"),
    (_chat_rows([HUGE + HUGE]), {"max_prompt_length": None},
     r"row 0: field 'prompt' has 1\d{4} tokens, more than the 2040 tokens the model's context "
     r"\(max_position_embeddings=2048\) leaves after max_completion_length=8"),
])
def test_an_unusable_prompt_is_named_by_row_and_field(tmp_path, embedded_tokenizer, dataset, overrides, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, embedded_tokenizer, dataset=dataset, **overrides)


def test_unusable_prompts_can_be_skipped_and_counted(tmp_path, embedded_tokenizer, caplog):
    dataset = _chat_rows(["1+1?", "", "2+2?", HUGE, "3+3?"])
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, embedded_tokenizer, dataset=dataset, prompt_errors="skip", max_prompt_length=64)
    assert sorted(trainer.skipped_prompts) == [1, 3] and "more than max_prompt_length=64" in trainer.skipped_prompts[3]
    assert trainer.train_dataset["prompt"] == [dataset[i]["prompt"] for i in (0, 2, 4)]
    assert "train_dataset: skipped 2 of 5 rows with an unusable prompt (row 1: field 'prompt' is empty" in caplog.text
    assert [row["step"] for row in trainer.train()] == [1]
    with pytest.raises(ValueError, match="every row of train_dataset has an unusable prompt"):
        _trainer(tmp_path / "empty", embedded_tokenizer, dataset=_chat_rows(["", " "]), prompt_errors="skip")


# --- configurations that cannot work -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"max_prompt_length": 2000, "max_completion_length": 100},
     r"max_prompt_length \+ max_completion_length = 2000 \+ 100 tokens do not fit the model's context "
     r"\(max_position_embeddings=2048\)"),
    ({"max_prompt_length": None, "max_completion_length": 2048},
     r"max_completion_length = 2048 \(plus at least one prompt token\) tokens do not fit"),
    ({"kv_policy": "lazy", "kv_budget": 4096},
     r"kv_budget=4096 tokens is larger than the model's context \(max_position_embeddings=2048\)"),
])
def test_lengths_that_cannot_fit_the_model_are_refused(tmp_path, embedded_tokenizer, overrides, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, embedded_tokenizer, **overrides)


def test_generation_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="generation_batch_size=10 must be a multiple of num_generations=4"):
        GRPOConfig(num_generations=4, generation_batch_size=10)
    assert GRPOConfig(num_generations=6).generation_batch_size == 60  # the default adapts: 64 rounded down
    assert GRPOConfig(num_generations=100).generation_batch_size == 100
