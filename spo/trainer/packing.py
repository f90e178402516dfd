"""Samples packed into one sequence per micro-batch, every shared prefix computed once.

A GRPO group's rollouts share their prompt, SPO-chain's completions share the prompt and often their first
words, and SPO-tree's edges share whole segments. ``pack`` merges the micro-batch's token sequences (prompt +
completion) into a token trie and lays its nodes out in one row, in order of first appearance (a parent always
precedes its children). Each token sits at the position it has in its own sequence and attends to itself and its
ancestors only, so its hidden state is exactly the one it gets in an unshared pass: a shared token runs forward and
backward once, and the gradient equals the unshared computation (``tests/test_packing.py``). Nothing is padded, and
only the positions that predict a completion token get logits.

Attention runs per trie segment (a maximal run of tokens without a branch point: a prompt, a common opening, each
completion's own tail; long ones in pieces): the segment's tokens are the queries, the path from the root to its
end the keys (``TreeAttention``). The work is that of attending over each path, not over the whole packed row.

With ``share=False`` every sample keeps its own copy of every token (padding-free packing), which is what prefix
sharing is measured against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch


@dataclass
class TreeAttention:
    """Attention of a packed row, block by block: ``S`` blocks of at most ``Q`` consecutive tokens of one segment,
    each attending to the path of at most ``K`` tokens from the root to its last token."""

    query_index: torch.Tensor  # [S, Q] packed index of each block's tokens (0 where padded)
    key_index: torch.Tensor  # [S, K] packed index of the tokens of the path from the root to the block's end
    mask: torch.Tensor  # bool [S, Q, K]: query j of block s attends key k (padded queries attend key 0 only)
    output_index: torch.Tensor  # [N] where packed token n sits in the flattened [S * Q] queries

    def to(self, device) -> "TreeAttention":
        return TreeAttention(self.query_index.to(device), self.key_index.to(device), self.mask.to(device),
                             self.output_index.to(device))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, N] the trie's tokens
    position_ids: torch.Tensor  # [1, N] each token's position in its own sequence
    predictors: torch.Tensor  # [B, T] packed index whose output predicts completion token t of sample b
    completion_mask: torch.Tensor  # [B, T] real completion tokens (long)
    prompts: list[list[int]]
    completions: list[list[int]]
    share: bool
    attention: TreeAttention

    @property
    def targets(self) -> torch.Tensor:
        """[B, T] the completion tokens (0 where padded)."""
        out = torch.zeros(self.completion_mask.shape, dtype=torch.long)
        for b, completion in enumerate(self.completions):
            out[b, :len(completion)] = torch.tensor(completion, dtype=torch.long)
        return out

    @property
    def unshared_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompts, self.completions))

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def to(self, device) -> "PackedBatch":
        return replace(self, input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                       predictors=self.predictors.to(device), completion_mask=self.completion_mask.to(device),
                       attention=self.attention.to(device))

    def select(self, rows: list[int]) -> "PackedBatch":
        chosen = pack([self.prompts[i] for i in rows], [self.completions[i] for i in rows], share=self.share,
                      width=self.completion_mask.shape[1])
        return chosen.to(self.input_ids.device)


def pack(prompts: list[list[int]], completions: list[list[int]], share: bool = True, width: int = 1) -> PackedBatch:
    """Pack (prompt, completion) token sequences; ``share``: identical prefixes become one run of tokens.
    Per-token outputs are [B, max(width, longest completion)]."""
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"pack: {len(prompts)} prompts for {len(completions)} completions")
    tokens: list[int] = []
    parents: list[int] = []
    positions: list[int] = []
    children: list[dict[int, int]] = []
    roots: dict[int, int] = {}
    width = max(width, max(len(c) for c in completions))
    predictors = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not prompt:
            raise ValueError(f"pack: sample {b} has an empty prompt (its first completion token has no context)")
        node, path = -1, []
        for position, token in enumerate(list(prompt) + list(completion)):
            table = roots if node < 0 else children[node]
            child = table.get(token) if share else None
            if child is None:
                child = len(tokens)
                tokens.append(int(token))
                parents.append(node)
                positions.append(position)
                children.append({})
                table[token] = child
            node = child
            path.append(node)
        start = len(prompt) - 1
        predictors[b, :len(completion)] = torch.tensor(path[start:start + len(completion)], dtype=torch.long)
        completion_mask[b, :len(completion)] = 1
    return PackedBatch(torch.tensor([tokens], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
                       predictors, completion_mask,
                       [list(p) for p in prompts], [list(c) for c in completions], share, tree_attention(parents))


def tree_attention(parents: list[int]) -> TreeAttention:
    """The query blocks of a packed trie (``parents[i]``: the packed index of token i's predecessor, -1 for a first
    token; parents precede their children) and the keys each one attends to. A block is a segment (a run without
    branch point) or, for segments longer than the mean, a piece of one, so that one long prompt does not pad every
    block to its length."""
    children = Counter(parents)
    starts = [i for i, parent in enumerate(parents) if parent < 0 or parent != i - 1 or children[parent] > 1]
    segments = list(zip(starts, starts[1:] + [len(parents)]))
    width_q = -(-len(parents) // len(segments))  # the mean segment length, rounded up
    blocks, paths = [], []
    for start, end in segments:
        ancestors, node = [], parents[start]
        while node >= 0:
            ancestors.append(node)
            node = parents[node]
        ancestors.reverse()
        for piece in range(start, end, width_q):
            stop = min(piece + width_q, end)
            blocks.append((piece, stop))
            paths.append(ancestors + list(range(start, stop)))
    width_k = max(len(path) for path in paths)
    query_index = torch.zeros((len(blocks), width_q), dtype=torch.long)
    key_index = torch.zeros((len(blocks), width_k), dtype=torch.long)
    query_position = torch.zeros((len(blocks), width_q), dtype=torch.long)  # in the path; 0 where padded
    output_index = torch.zeros(len(parents), dtype=torch.long)
    for b, ((start, end), path) in enumerate(zip(blocks, paths)):
        own = end - start
        query_index[b, :own] = torch.arange(start, end)
        key_index[b, :len(path)] = torch.tensor(path)
        query_position[b, :own] = torch.arange(len(path) - own, len(path))
        output_index[start:end] = torch.arange(b * width_q, b * width_q + own)
    mask = torch.arange(width_k)[None, None, :] <= query_position[:, :, None]
    return TreeAttention(query_index, key_index, mask, output_index)
