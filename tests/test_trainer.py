"""End-to-end trainer runs on a tiny random model (fast) and on the embedded model (dry run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spo.config import load_config
from spo.data import make_arithmetic_task
from spo.models import tiny_model
from spo.trainer import GRPOConfig, GRPOTrainer
from spo.trainer.config import SPOChainConfig, SPOTreeConfig
from spo.trainer.run import Recipe, peft_config, trainer_config
from spo.trainer.spo_chain import SPOChainTrainer
from spo.trainer.spo_tree import SPOTreeTrainer

from helpers import tiny_run, vowel_share  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _common(tmp_path, **overrides):
    return tiny_run(tmp_path, **overrides)


@pytest.fixture(scope="module")
def task():
    return make_arithmetic_task("train", 16)


def test_grpo_trains_and_writes_everything(tmp_path, task, embedded_tokenizer):
    from peft import LoraConfig

    args = GRPOConfig(**_common(tmp_path, beta=0.1, num_iterations=2))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                "completions/clipped_ratio", "timing/rollout", "timing/update", "perf/tokens_per_second",
                "rewards/vowel_share/mean", "clip_ratio/low_mean", "is/logprob_gap"):
        assert key in history[-1], key
    assert history[-1]["kl"] > 0  # the adapters moved away from the reference (adapters disabled)
    changed = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    out = Path(args.output_dir)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "learning_curve.png").is_file()
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert len((out / "completions.jsonl").read_text().splitlines()) == 2 * 2 * 4


def _record_updates(monkeypatch, trainer) -> list:
    """The TrainBatch of every update, as the learner receives it."""
    batches, update = [], trainer.learner.update

    def recording(batch, step):
        batches.append(batch)
        return update(batch, step)

    monkeypatch.setattr(trainer.learner, "update", recording)
    return batches


def _trainable(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("estimator", ["rloo", "dr_grpo"])
def test_baselines_train_on_their_advantages(tmp_path, task, embedded_tokenizer, estimator, monkeypatch):
    args = GRPOConfig(**_common(tmp_path, max_steps=1, advantage_estimator=estimator, loss_type="dr_grpo",
                                        warmup_ratio=0.0))
    trainer = GRPOTrainer(model=tiny_model(seed=1), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer)
    groups, generate = [], trainer.generate_groups
    monkeypatch.setattr(trainer, "generate_groups", lambda rows, step: groups.append(generate(rows, step)) or groups[-1])
    batches = _record_updates(monkeypatch, trainer)
    before = _trainable(trainer)
    history = trainer.train()

    (rollouts, rewards), = groups
    g = args.num_generations
    expected = []
    for start in range(0, len(rollouts), g):
        group = rewards[start:start + g].tolist()
        mean = sum(group) / g
        for rollout, r in zip(rollouts[start:start + g], group):
            if rollout.completion_ids:  # an empty completion trains nothing
                expected.append(g / (g - 1) * (r - mean) if estimator == "rloo" else r - mean)
    assert any(abs(a) > 1e-3 for a in expected)
    (batch,) = batches
    assert len(batch.advantages) == len(expected)
    for row, advantage in zip(batch.advantages, expected):
        torch.testing.assert_close(row, torch.full_like(row, advantage))
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in _trainable(trainer).items())


def test_spo_chain_values_segments_by_monte_carlo(tmp_path, task, embedded_tokenizer):
    from lora_shards import MoSConfig

    args = SPOChainConfig(**_common(tmp_path, mc_samples=3, cutpoint_interval=2, max_steps=1,
                                    kv_policy="lazy", kv_budget=0.5, use_sample_buffer=True))
    trainer = SPOChainTrainer(model=tiny_model(seed=2), reward_funcs=[vowel_share], args=args, train_dataset=task,
                              processing_class=embedded_tokenizer,
                              peft_config=MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1,
                                                    target_modules=["q_proj", "v_proj"]))
    history = trainer.train()
    metrics = history[-1]
    # a random model at T=1 has many low-probability tokens: several segments, K continuations per state
    assert metrics["spo/num_segments"] >= 1
    assert metrics["spo/mc_rollouts"] == metrics["spo/mc_states"] * 3
    assert 0 < metrics["spo/masked_token_fraction"] <= 1
    assert "timing/monte_carlo" in metrics and "ssb/size" in metrics and "kv/peak_kv_bytes" in metrics


def test_spo_tree_trains_on_edges(tmp_path, task, embedded_tokenizer, monkeypatch):
    """The samples trained are the step's tree edges, each with advantage V(child) - V(parent)."""
    import spo.trainer.spo_tree as spo_tree

    args = SPOTreeConfig(**_common(tmp_path, branching=[2, 2], segment_length=4, max_steps=1, num_generations=1,
                                     warmup_ratio=0.0))
    trainer = SPOTreeTrainer(model=tiny_model(seed=3), reward_funcs=[vowel_share], args=args, train_dataset=task,
                             processing_class=embedded_tokenizer)
    trees = []

    def recording_grow_tree(generator, prompt_ids, *rest):
        roots, stats = grow(generator, prompt_ids, *rest)
        trees.append((prompt_ids, roots))
        return roots, stats

    grow = spo_tree.grow_tree
    monkeypatch.setattr(spo_tree, "grow_tree", recording_grow_tree)
    batches = _record_updates(monkeypatch, trainer)
    before = _trainable(trainer)
    metrics = trainer.train()[-1]
    assert metrics["tree/rollouts"] <= 2 * (2 + 4) and metrics["tree/leaves"] >= 2
    assert metrics["tree/edges_kept"] <= metrics["tree/edges"]

    (prompt_ids, roots), = trees
    expected = []  # (context, segment, V(child) - V(parent)) of every edge with a non-zero advantage
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.parent is not None and node.value is not None and abs(node.value - node.parent.value) > 1e-12:
            context = prompt_ids[node.prompt_index] + node.parent.path_tokens()
            expected.append((tuple(context), tuple(node.tokens), node.value - node.parent.value))
    (batch,) = batches
    trained = [(tuple(s.prompt_ids), tuple(s.completion_ids), s.advantages) for s in batch.samples]
    assert expected and len(trained) == len(expected) == metrics["tree/edges"]  # 6 edges a tree < edges_per_question
    expected.sort(key=lambda e: e[:2])
    trained.sort(key=lambda e: e[:2])
    for (context, segment, advantage), (got_context, got_segment, got) in zip(expected, trained):
        assert (got_context, got_segment) == (context, segment)
        torch.testing.assert_close(got, torch.full_like(got, advantage))
    assert any(not torch.equal(p, before[n]) for n, p in _trainable(trainer).items())


@pytest.mark.parametrize("trainer_class, config_class, extra", [
    (GRPOTrainer, GRPOConfig, {}),
    (SPOChainTrainer, SPOChainConfig, {"mc_samples": 2, "cutpoint_interval": 2}),
    (SPOTreeTrainer, SPOTreeConfig, {"branching": [2, 2], "segment_length": 3, "num_generations": 1}),
])
def test_rewards_are_told_which_completions_were_cut_at_the_length_limit(tmp_path, task, embedded_tokenizer,
                                                                          trainer_class, config_class, extra):
    """Every scored completion (group rollouts, Monte Carlo continuations, tree leaves) reaches the reward functions
    with ``truncated``: true exactly when it ran to max_completion_length without an EOS."""
    calls = []

    def recording(prompts=None, completions=None, completion_ids=None, truncated=None, **columns):
        calls.append((completion_ids, truncated))
        return [float(i % 2) for i in range(len(completions))]

    limit = 6
    args = config_class(**_common(tmp_path, max_steps=1, max_completion_length=limit, **extra))
    model = tiny_model(seed=2)
    eos = {embedded_tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    trainer_class(model=model, reward_funcs=[recording], args=args, train_dataset=task,
                  processing_class=embedded_tokenizer).train()
    assert calls
    for ids, truncated in calls:
        assert truncated == [len(row) >= limit and row[-1] not in eos for row in ids]
    assert any(any(t) for _, t in calls)


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0)
    with pytest.raises(ValueError, match="leaves no room for the last level"):
        SPOTreeConfig(branching=[2, 2, 2], segment_length=100, max_completion_length=150)


def test_spo_configs_reject_the_group_baseline_settings():
    for cls in (SPOChainConfig, SPOTreeConfig):
        with pytest.raises(ValueError, match=f"advantage_estimator='rloo' is a GRPO setting that {cls.__name__}"):
            cls(advantage_estimator="rloo", num_generations=2)
        with pytest.raises(ValueError, match=f"scale_rewards=False is a GRPO setting that {cls.__name__}"):
            cls(scale_rewards=False)
    assert not GRPOConfig(scale_rewards=False, advantage_estimator="rloo").scale_rewards


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: spo_chain\ntrain: {learnin_rate: 1.0}\n")
    from spo.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'train.learnin_rate'. Did you mean 'learning_rate'"):
        trainer_config(load_config(Recipe, path))
    with pytest.raises(ConfigError, match="peft.lora_alfa' for lora. Did you mean 'lora_alpha'"):
        peft_config({"type": "lora", "lora_alfa": 4})


def _run_cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "spo.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


TINY_RECIPE = """
algorithm: grpo
model: {model}
dataset: {{source: "builtin:arithmetic", split: train, limit: 32}}
reward_funcs: [format]
peft: {{type: lora, r: 4, target_modules: [q_proj, v_proj]}}
evaluate_after: false
train:
  output_dir: {out}
  max_steps: 4
  prompts_per_step: 2
  num_generations: 4
  max_completion_length: 10
  temperature: 1.0
  top_p: 1.0
  learning_rate: 1.0e-3
  save_steps: 2
  report_to: [{report}]
"""


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]


def test_killed_run_resumes_with_identical_metrics(tmp_path, tiny_model_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        (tmp_path / f"{out.name}.yaml").write_text(TINY_RECIPE.format(model=tiny_model_dir, out=out, report="none"))
    assert _run_cli([str(tmp_path / "straight.yaml")]).wait(timeout=600) == 0

    process = _run_cli([str(tmp_path / "killed.yaml")])
    deadline = time.time() + 600
    while not (killed / "checkpoint-2" / "COMPLETE").is_file():
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists()  # it really died before the end
    resumed = _run_cli([str(tmp_path / "killed.yaml"), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert _metrics(killed) == _metrics(straight)


def test_wandb_offline_run_directory(tmp_path, tiny_model_dir):
    (tmp_path / "w.yaml").write_text(TINY_RECIPE.format(model=tiny_model_dir, out=tmp_path / "w", report="wandb"))
    process = _run_cli([str(tmp_path / "w.yaml"), "--train.max_steps", "1"])
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert runs, output
    assert list(runs[0].glob("*.wandb"))


def test_unwritable_output_dir_fails_before_training(tmp_path, task, embedded_tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = GRPOConfig(**_common(tmp_path, output_dir=str(blocker / "run")))
    with pytest.raises(OSError, match="is not writable"):
        GRPOTrainer(model=tiny_model(), reward_funcs=[vowel_share], args=args, train_dataset=task,
                    processing_class=embedded_tokenizer)


def test_quickstart_recipe_dry_run_on_the_embedded_model(tmp_path):
    process = _run_cli(["recipes/quickstart.yaml", "--dry-run", "--train.output_dir", str(tmp_path / "q")])
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output
    assert (tmp_path / "q-dry-run" / "adapter" / "adapter_model.safetensors").is_file(), output


def test_bf16_autocasts_the_learner_and_trains(tmp_path, task, embedded_tokenizer):
    from peft import LoraConfig

    # a float32 trainer first: accelerate's process-wide state must not block the bf16 one in the same process
    GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=GRPOConfig(**_common(tmp_path / "fp32")),
                train_dataset=task, processing_class=embedded_tokenizer)

    args = GRPOConfig(**_common(tmp_path, max_steps=1, bf16=True, beta=0.1, warmup_ratio=0.0))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.accelerator.mixed_precision == "bf16"
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([[5, 6, 7]])).logits
    # the prepared model runs under autocast (accelerate hands the outputs back as float32)
    assert torch.equal(logits, logits.bfloat16().float())
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    history = trainer.train()
    assert all(p.dtype == torch.float32 for p in before.values())  # master weights stay float32
    assert any(not torch.equal(p, before[n]) for n, p in trainer.unwrapped.named_parameters() if p.requires_grad)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))


def test_gradient_checkpointing_recomputes_every_layer_and_trains(tmp_path, task, embedded_tokenizer):
    """gradient_checkpointing: true checkpoints each decoder layer (non-reentrant, so adapters get gradients),
    through the name the installed transformers does not deprecate."""
    import warnings

    from peft import LoraConfig

    args = GRPOConfig(**_common(tmp_path, max_steps=1, gradient_checkpointing=True, warmup_ratio=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                              processing_class=embedded_tokenizer,
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    layers = trainer.unwrapped.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.unwrapped.named_parameters() if p.requires_grad)


def test_group_prompt_value_bases_segments_on_the_group_mean(tmp_path, task, embedded_tokenizer, monkeypatch):
    """With group_prompt_value the bare prompt is every rollout's first boundary, valued by its group's mean reward
    (never by Monte Carlo), so a rollout's segment advantages telescope to R - mean(group)."""
    from spo.rollout import Rollout
    from spo.trainer.spo_chain import group_mean_rewards

    args = SPOChainConfig(**_common(tmp_path, max_steps=1, group_prompt_value=True, use_sample_buffer=False))
    trainer = SPOChainTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                              processing_class=embedded_tokenizer)

    def rollout(tokens, group):
        return Rollout([5, 6], tokens, "text", "stop", torch.full((len(tokens),), -0.1), group)

    rollouts = [rollout([7, 8, 9, 10], 0), rollout([7, 8, 11, 12], 0), rollout([13, 14, 15], 1),
                rollout([16, 17, 18], 1)]
    rewards = torch.tensor([1.0, 0.0, 0.0, float("nan")])
    cuts = {7: torch.tensor([1]), 13: torch.tensor([-1]), 16: torch.tensor([0])}  # by first token
    valued = []

    def fake_values(rows, rollouts, boundaries, step):
        valued.extend(boundaries)
        return [torch.full((b.numel(),), 0.25) for b in boundaries]

    monkeypatch.setattr(trainer, "generate_groups", lambda rows, step: (rollouts, rewards))
    monkeypatch.setattr(trainer, "partition", lambda r: cuts[r.completion_ids[0]])
    monkeypatch.setattr(trainer, "state_values", fake_values)
    trainer._metrics = {}
    samples = trainer.make_samples([0, 1], step=0)

    assert all(bool((b >= 0).all()) for b in valued)  # the prompt state is not valued by continuations
    assert group_mean_rewards(rewards, [0, 0, 1, 1]).tolist() == [0.5, 0.5, 0.0, 0.0]  # NaN rewards left out
    advantages = {tuple(s.completion_ids): s.advantages.tolist() for s in samples}
    assert advantages[(7, 8, 9, 10)] == [-0.25, -0.25, 0.75, 0.75]  # V(cut) - V(prompt), then R - V(cut)
    assert advantages[(7, 8, 11, 12)] == [-0.25, -0.25, -0.25, -0.25]  # the published base would give 0, 0, ...
    assert advantages[(13, 14, 15)] == [0.0, 0.0, 0.0]  # cut at the bare prompt only: R - mean = 0 - 0
    assert len(samples) == 3  # NaN reward: no sample


def test_a_zero_state_cap_values_nothing_and_leaves_each_rollout_its_group_advantage(tmp_path, task,
                                                                                      embedded_tokenizer, monkeypatch):
    """``max_mc_states_per_step: 0`` (the "no Monte Carlo" ablation): no continuation is sampled and every rollout's
    tokens carry R - mean(group). Without group_prompt_value there would be no base value, so it is refused."""
    from spo.rollout import Rollout

    with pytest.raises(ValueError, match="max_mc_states_per_step: 0 .* group_prompt_value"):
        SPOChainConfig(**_common(tmp_path, max_mc_states_per_step=0))
    args = SPOChainConfig(**_common(tmp_path, max_steps=1, group_prompt_value=True, max_mc_states_per_step=0,
                                    use_sample_buffer=False))
    trainer = SPOChainTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                              processing_class=embedded_tokenizer)
    rollouts = [Rollout([5, 6], tokens, "text", "stop", torch.full((len(tokens),), -1.0), group)
                for tokens, group in (([7, 8, 9, 10], 0), ([7, 8, 11], 0), ([13, 14, 15], 1), ([16, 17], 1))]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    monkeypatch.setattr(trainer, "generate_groups", lambda rows, step: (rollouts, rewards))
    monkeypatch.setattr(trainer.generator, "continue_from", lambda *a, **k: pytest.fail("sampled a continuation"))
    trainer._metrics = {}
    samples = trainer.make_samples([0, 1], step=0)

    assert [s.advantages.tolist() for s in samples] == [[0.5] * 4, [-0.5] * 3, [0.25] * 3, [-0.25] * 2]


def test_each_step_is_logged_once_with_the_completions_asked_for(tmp_path, task, embedded_tokenizer, caplog, capsys):
    import logging

    args = GRPOConfig(**_common(tmp_path, num_completions_to_print=2))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer)
    with caplog.at_level(logging.INFO, logger="spo"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "spo.trainer.tracking"]
    assert [line[:8] for line in lines] == ["step 1/2", "  reward", "  reward", "step 2/2", "  reward", "  reward"]
    assert "step 1/2" not in capsys.readouterr().err  # logging is configured: not printed a second time


def test_a_step_without_an_update_says_so_instead_of_a_nan_loss(tmp_path, task, embedded_tokenizer, caplog):
    """Every SPO-tree leaf rewarded alike: no edge has an advantage, nothing is trained, and the step line says
    that rather than printing a NaN loss."""
    import logging

    args = SPOTreeConfig(**_common(tmp_path, branching=[2, 2], segment_length=4, max_steps=1, num_generations=1,
                                     use_sample_buffer=False))
    trainer = SPOTreeTrainer(model=tiny_model(seed=3), reward_funcs=[lambda completions, **_: [1.0] * len(completions)],
                             args=args, train_dataset=task, processing_class=embedded_tokenizer)
    with caplog.at_level(logging.INFO, logger="spo"):
        trainer.train()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1"))
    assert "no update (nothing to train on)" in line and "nan" not in line


def test_python_api_without_logging_set_up_shows_steps_and_a_bar(tmp_path, task, embedded_tokenizer, capsys,
                                                                 monkeypatch):
    import logging
    import sys

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a plain script: logging never configured
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on terminals only
    args = GRPOConfig(**_common(tmp_path))
    GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                processing_class=embedded_tokenizer).train()
    err = capsys.readouterr().err
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # what a terminal shows of each line
    assert [line[:15] for line in shown if line.startswith("step ")] == ["step 1/2 reward", "step 2/2 reward"], err
    bar = [shown for shown in err.replace("\n", "\r").split("\r") if shown.startswith("training")][-1]  # last drawn
    assert "training" in bar and "2/2" in bar and "reward=" in bar and "tokens_per_s=" in bar, bar


def _recording_reward(texts: list):
    def first_completions(completions, **kwargs):
        texts.extend(completions)
        return [0.0] * len(completions)

    return first_completions


@pytest.mark.parametrize("rollout_dtype", [None, "bfloat16", "float32"])
def test_evaluation_decodes_a_merged_copy_with_the_policys_greedy_tokens(tmp_path, embedded_tokenizer,
                                                                       rollout_dtype):
    from peft import LoraConfig

    texts = []
    args = GRPOConfig(**_common(tmp_path, rollout_dtype=rollout_dtype, eval_limit=4, eval_max_new_tokens=10))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[_recording_reward(texts)], args=args,
                          train_dataset=make_arithmetic_task("train", 4),
                          eval_dataset=make_arithmetic_task("test", 4), processing_class=embedded_tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)

    def move_adapters():  # as a training step would
        with torch.no_grad():
            for p in trainer.unwrapped.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)

    def evaluate(merge: bool) -> list[str]:
        trainer.args.eval_merge_adapter, trainer._eval_generator = merge, None
        texts.clear()
        trainer.evaluate()
        return list(texts)

    for _ in range(2):  # the merged copy follows the adapters from one evaluation to the next
        move_adapters()
        merged = evaluate(True)
        assert merged == evaluate(False) and len(merged) == 4
    trainer.args.eval_merge_adapter = True
    copy = trainer._evaluation_model()
    assert copy is not trainer.unwrapped and not hasattr(copy, "peft_config")
    assert all(p.dtype == torch.float32 for p in copy.parameters())
    assert (copy is trainer.sampling_model) == (rollout_dtype == "float32")  # a float32 rollout copy is reused


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bfloat16_only_where_the_device_computes_it_natively(tmp_path, task, embedded_tokenizer,
                                                                               monkeypatch, native):
    monkeypatch.setattr("spo.trainer.base.has_native_bfloat16", lambda device: native)
    args = GRPOConfig(**_common(tmp_path, rollout_dtype="auto", bf16="auto"))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer)
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    expected = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in trainer.sampling_model.parameters()} == {expected}
    trainer.train()  # samples from that copy and updates the float32 weights
    assert all(p.dtype == torch.float32 for p in trainer.unwrapped.parameters() if p.requires_grad)


def test_a_requested_interrupt_stops_training_at_the_next_step(tmp_path, task, embedded_tokenizer):
    """``spo train``'s SIGINT handler sets ``interrupt_requested``: should the KeyboardInterrupt itself be swallowed
    (raised inside a ``__del__``), the loop still stops before the next step."""
    args = GRPOConfig(**_common(tmp_path))
    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                          processing_class=embedded_tokenizer)
    trainer.interrupt_requested = True
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))
    trainer.close()


@pytest.mark.parametrize("budget", [{"max_generated_tokens": 100}, {"max_train_seconds": 1e-3}])
def test_a_token_or_time_budget_ends_training_and_its_count_survives_a_resume(tmp_path, task, embedded_tokenizer,
                                                                             budget):
    """``max_generated_tokens`` and ``max_train_seconds`` end a run before ``max_steps`` (what equal-budget
    comparisons rely on); their running totals are checkpointed, so a resumed run stops where it would have."""
    def run(**extra):
        args = GRPOConfig(**_common(tmp_path, max_steps=6, save_steps=1, **budget, **extra))
        trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args, train_dataset=task,
                              processing_class=embedded_tokenizer)
        trainer.train()
        trainer.close()
        return trainer

    first = run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == first.step < 6
    assert logged[-1]["tokens/generated_total"] == first.tokens_generated
    assert logged[-1]["timing/train_total"] == pytest.approx(first.train_seconds) and first.train_seconds > 0
    if "max_train_seconds" in budget:
        assert first.step == 1
        return
    totals = [row["tokens/generated_total"] for row in logged]
    assert first.step >= 2 and max(totals[:-1]) < 100 <= totals[-1]  # a step holds at most 2 x 4 x 12 = 96 tokens
    # "linear" (after the default 3% warmup) decays over the token budget, to 0 where it is spent
    expected = [1e-3 * max(0.0, 1 - (min(1.0, total / 100) - 0.03) / 0.97) for total in totals]
    assert [row["learning_rate"] for row in logged] == pytest.approx(expected) and expected[-1] == 0
    finished = run(resume_from_checkpoint="latest")  # the last checkpoint has spent the budget: nothing to train
    assert finished.step == first.step and finished.tokens_generated == first.tokens_generated
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == first.step
    before_last = str(tmp_path / "run" / f"checkpoint-{first.step - 1}")
    resumed = run(resume_from_checkpoint=before_last, save_total_limit=None)  # stops where the first run did
    assert resumed.step == first.step and resumed.tokens_generated == first.tokens_generated
