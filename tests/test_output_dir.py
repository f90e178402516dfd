"""The output folder: an earlier run in it is never silently mixed with a new one, one run at a time holds it, and
resuming past max_steps says that there is nothing to train."""

import subprocess
import sys
import time

import pytest

from spo.data import make_arithmetic_task
from spo.errors import ConfigError
from spo.models import tiny_model
from spo.trainer import GRPOConfig, GRPOTrainer
from spo.trainer.output_dir import OutputDirInUse

from helpers import tiny_run, vowel_share


@pytest.fixture(scope="module")
def task():
    return make_arithmetic_task("train", 8)


def trainer(tmp_path, task, tokenizer, **overrides):
    args = GRPOConfig(**tiny_run(tmp_path, **{"max_steps": 1, "save_steps": 1, **overrides}))
    return GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                       processing_class=tokenizer)


def test_an_earlier_run_is_refused_continued_or_overwritten_on_request(tmp_path, task, embedded_tokenizer):
    first = trainer(tmp_path, task, embedded_tokenizer)
    first.train()
    first.close()
    out = tmp_path / "run"
    assert (out / "checkpoint-1").is_dir() and (out / "metrics.jsonl").is_file()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-1, metrics.jsonl.*--resume.*"
                                          r"overwrite_output_dir"):
        trainer(tmp_path, task, embedded_tokenizer)
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched

    resumed = trainer(tmp_path, task, embedded_tokenizer, resume_from_checkpoint="latest", max_steps=2)
    assert len(resumed.train()) == 2  # steps 1 and 2: the earlier run continued
    resumed.close()

    fresh = trainer(tmp_path, task, embedded_tokenizer, overwrite_output_dir=True)
    assert not (out / "checkpoint-2").exists() and not (out / "metrics.jsonl").exists()
    assert [row["step"] for row in fresh.train()] == [1]
    fresh.close()


def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_first(tmp_path, task, embedded_tokenizer):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from spo.trainer.output_dir import lock; h = lock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(OutputDirInUse, match=rf"in use by another run \(pid {holder.pid}\)"):
            trainer(tmp_path, task, embedded_tokenizer)
        assert time.monotonic() - started < 60  # it does not wait for the first run
    finally:
        holder.kill()
        holder.wait()
    trainer(tmp_path, task, embedded_tokenizer).close()  # the lock goes with the process that held it


def test_resuming_at_or_past_max_steps_says_nothing_is_trained(tmp_path, task, embedded_tokenizer, caplog):
    first = trainer(tmp_path, task, embedded_tokenizer, max_steps=2, save_steps=1)
    first.train()
    first.close()
    again = trainer(tmp_path, task, embedded_tokenizer, resume_from_checkpoint="latest", max_steps=1)
    with caplog.at_level("WARNING"):
        history = again.train()
    assert "nothing to train: the checkpoint is at step 2 and max_steps is 1" in caplog.text
    assert [row["step"] for row in history] == [1, 2]  # the log is left as it was
    again.close()


def test_resuming_with_other_adapter_settings_is_named(tmp_path, task, embedded_tokenizer):
    from peft import LoraConfig

    def lora(r, **overrides):
        args = GRPOConfig(**tiny_run(tmp_path, **{"max_steps": 1, "save_steps": 1, **overrides}))
        return GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                           processing_class=embedded_tokenizer,
                           peft_config=LoraConfig(r=r, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    first = lora(4)
    first.train()
    first.close()
    other = lora(2, resume_from_checkpoint="latest", max_steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint-1 holds .*lora_A.* of shape \[4, 64\], the model "
                                          r"has \[2, 64\]: resume with the adapter settings"):
        other.train()
    other.close()
