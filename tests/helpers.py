"""Shared pieces of the tests: a reward a random tiny model can move, small-run trainer settings, and a word
tokenizer with prompts for tiny-model generation."""


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


class WordTokenizer:
    """Just enough tokenizer for tiny models: ids printed as words."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == 2))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r, skip_special_tokens) for r in rows]


# prompts of different lengths for tiny models (left padding matters)
PROMPTS = [[5, 17, 300, 9, 41, 8], [7, 7, 1200], [99, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
