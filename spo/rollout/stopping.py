"""When a row is done: an EOS token, a stop string in the decoded completion, or its token limit."""

from __future__ import annotations

import torch


def eos_token_ids(model, tokenizer) -> list[int]:
    """The EOS set: the tokenizer's EOS plus every EOS id of the model's generation config."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in ([configured] if isinstance(configured, int) else configured))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return sorted(ids)


class StopStrings:
    """Checks only the text of each row's last few tokens (enough to hold the longest stop string), in one
    batched decode per step."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tail = max((len(s) for s in self.stop), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.stop)

    def hits(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """tokens [R, >= length] of the rows' completions so far -> bool [R]: a stop string appears in the
        last ``tail`` tokens' text."""
        texts = self.tokenizer.batch_decode(tokens[:, max(0, length - self.tail): length].tolist(),
                                            skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], dtype=torch.bool)

    def truncate(self, text: str) -> str:
        """``text`` cut before the earliest stop string."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]
