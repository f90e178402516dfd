"""Shared pieces of the trainer tests: a reward a random tiny model can move, and small-run settings."""


def vowel_share(completions, **kwargs):
    """A dense reward a random model can move: the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def tiny_run(tmp_path, **overrides) -> dict:
    """Trainer settings of a short CPU run on a tiny model (override any field)."""
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2, num_generations=4,
                max_completion_length=12, temperature=1.0, top_p=1.0, learning_rate=1e-3,
                per_device_train_batch_size=4, report_to=["none"], save_steps=None, seed=0)
    base.update(overrides)
    return base
