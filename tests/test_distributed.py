"""Training on 2 CPU processes (gloo) through `accelerate launch`, as a user with several GPUs would run it: DDP
runs that cannot hang when processes get different amounts of work, identical weights on every process, kill and
resume, evaluation after training, and FSDP2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_lora_shards_ddp import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"


def launch(config: str, target: list[str], **popen):
    """``accelerate launch --config_file recipes/accelerate/<config>`` with this interpreter, on a free port."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
               "--main_process_port", str(free_port()), *target]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def finish(process, timeout=600) -> str:
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"the 2-process run hung (killed after {timeout} s):\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return output


def kill_every_process_of(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (the launcher, torchrun's agent and the
    workers, which torchrun may start in sessions of their own)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def assert_identical_and_trained(out: Path) -> None:
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    initial = load_file(str(out / "initial.safetensors"))
    assert any(not torch.equal(initial[n], ranks[0][n]) for n in initial)  # training changed them


def test_ddp_spo_chain_with_mos_keeps_identical_adapters(tmp_path, tiny_model_dir):
    finish(launch("cpu_2proc.yaml", [str(SCRIPT), str(tiny_model_dir), str(tmp_path), "spo_chain", "mos"]))
    assert_identical_and_trained(tmp_path)


def test_ddp_spo_tree_with_a_reward_skipping_on_one_rank_cannot_hang(tmp_path, tiny_model_dir):
    """Rank 1's reward declines most samples, so rank 1 trains on fewer tree edges: it runs zero-weight micro-batches
    to match rank 0's passes (before, the ranks disagreed on the number of backward passes and hung)."""
    finish(launch("cpu_2proc.yaml", [str(SCRIPT), str(tiny_model_dir), str(tmp_path), "spo_tree", "lora",
                                      "--skip-on-rank-1"]))
    assert_identical_and_trained(tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert any(row.get("train/padding_micro_batches", 0) > 0 for row in history), history


TINY_RECIPE = """
algorithm: spo_chain
model: {model}
dataset: {{source: "builtin:arithmetic", split: train, limit: 32}}
eval_dataset: {{source: "builtin:arithmetic", split: test, limit: 6}}
reward_funcs: [format]
peft: {{type: mos, r: 4, equivalent_rank: 3, target_modules: [q_proj, v_proj]}}
evaluate_before: true
evaluate_after: true
train:
  output_dir: {out}
  max_steps: 4
  prompts_per_step: 2
  num_generations: 2
  mc_samples: 2
  max_completion_length: 10
  eval_max_new_tokens: 6
  temperature: 1.0
  top_p: 1.0
  learning_rate: 1.0e-3
  per_device_train_batch_size: 2
  use_sample_buffer: true
  save_steps: 2
  report_to: [none]
"""


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]


@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "fsdp2_cpu_2proc.yaml"], ids=["ddp", "fsdp2"])
def test_cli_run_killed_and_resumed_matches_and_evaluates_after(tmp_path, tiny_model_dir, config):
    """`accelerate launch ... -m spo.cli train` on 2 processes (DDP, or FSDP2 sharding the MoS pools) runs to the
    end with both evaluations (rc 0) and saves an adapter PEFT loads; a run killed after its step-2 checkpoint
    resumes to exactly the same metrics (per-rank buffer state included)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        (tmp_path / f"{out.name}.yaml").write_text(TINY_RECIPE.format(model=tiny_model_dir, out=out))
    cli = ["-m", "spo.cli", "train"]
    output = finish(launch(config, [*cli, str(tmp_path / "straight.yaml")]))
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval_after" in summary and "eval_before" in summary, output[-3000:]
    assert "held-out accuracy after training" in output
    import lora_shards  # noqa: F401  (registers MoS with PEFT)
    from peft import PeftModel

    from spo.models import load_model

    adapted = PeftModel.from_pretrained(load_model(tiny_model_dir), straight / "adapter")
    trained = load_file(str(straight / "checkpoint-4" / "trainable.safetensors"))
    parameters = dict(adapted.named_parameters())
    assert trained and all(torch.equal(parameters[name], value) for name, value in trained.items())

    process = launch(config, [*cli, str(tmp_path / "killed.yaml")])
    deadline = time.time() + 600
    while not (killed / "checkpoint-2" / "COMPLETE").is_file():
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    kill_every_process_of(str(tmp_path / "killed.yaml"))
    process.communicate()
    assert not (killed / "adapter").exists()  # it really died before the end
    assert {p.name for p in (killed / "checkpoint-2").glob("rank_state_*.pt")} == {"rank_state_0.pt",
                                                                                    "rank_state_1.pt"}
    output = finish(launch(config, [*cli, str(tmp_path / "killed.yaml"), "--resume"]))
    assert "resumed from" in output
    assert _metrics(killed) == _metrics(straight)
    assert json.loads((killed / "summary.json").read_text())["eval_after"] == summary["eval_after"]


EQUIVALENCE = ROOT / "tests" / "scripts" / "learner_equivalence.py"


@pytest.mark.parametrize("config,peft", [("fsdp2_cpu_2proc.yaml", "none"), ("fsdp2_cpu_2proc.yaml", "lora"),
                                         ("fsdp2_cpu_2proc.yaml", "mos"), ("cpu_2proc.yaml", "mos")],
                         ids=["fsdp2-full", "fsdp2-lora", "fsdp2-mos", "ddp-mos"])
def test_two_processes_train_what_one_process_trains_and_resume_exactly(tmp_path, config, peft):
    """The same 12 samples, all on one process or split over two (DDP or FSDP2 sharding): the same weights after
    two updates (global token normaliser, gathered gradients). The learner's checkpoint state (whole weights and
    optimizer, gathered from the shards) loaded into a fresh learner trains on identically."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    one.mkdir()
    single = subprocess.run([sys.executable, str(EQUIVALENCE), str(one), peft], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    two = tmp_path / "two"
    two.mkdir()
    finish(launch(config, [str(EQUIVALENCE), str(two), peft]))
    reference, sharded = load_file(str(one / "world1.safetensors")), load_file(str(two / "world2.safetensors"))
    report = json.loads((two / "world2.json").read_text())
    assert report["distributed_type"].endswith("FSDP" if "fsdp" in config else "MULTI_CPU")
    assert sorted(reference) == report["names"] == sorted(sharded)
    single_report = json.loads((one / "world1.json").read_text())
    # each process packs different micro-batches, so float32 sums run in another order: after two AdamW steps of lr
    # 1e-2 the weights agree to ~6e-6 (a sample trained twice or left out would move them by ~1e-2)
    for name, value in reference.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=2e-5, msg=name)
    assert report["grad_norm"] == pytest.approx(single_report["grad_norm"], rel=1e-4)  # of the whole batch
    assert report["third_update_moved"] > 1e-4  # the update after the reload trains
    assert report["resume_error"] < 1e-6


@pytest.mark.parametrize("config", ["deepspeed_zero2_cpu_2proc.yaml", "deepspeed_zero3_cpu_2proc.yaml"],
                         ids=["zero2", "zero3"])
def test_deepspeed_cli_run_evaluates_after_and_resumes_exactly(tmp_path, tiny_model_dir, config):
    """DeepSpeed ZeRO-2/3 (its CPU accelerator, gloo) through the CLI: micro-batch size, accumulation and clipping
    filled from the recipe, rollouts from a gathered copy under ZeRO-3, both evaluations, the engine's checkpoint;
    resuming from the step-2 checkpoint gives the uninterrupted run's metrics."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE.format(model=tiny_model_dir, out=straight))
    cli = ["-m", "spo.cli", "train", str(recipe)]
    output = finish(launch(config, cli))
    assert json.loads((straight / "summary.json").read_text())["steps"] == 4, output[-3000:]
    assert (straight / "checkpoint-2" / "deepspeed").is_dir() and (straight / "adapter").is_dir()
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    first_rows = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in first_rows))
    output = finish(launch(config, [*cli, "--train.output_dir", str(resumed), "--resume"]))
    assert "resumed from" in output
    assert _metrics(resumed) == _metrics(straight)
