"""Samples packed into one sequence per micro-batch, every shared prefix computed once.

A GRPO group's rollouts share their prompt, SPO-chain's completions share the prompt and often their first
words, and SPO-tree's edges share whole segments. ``pack`` merges the micro-batch's token sequences (prompt +
completion) into a token trie and lays its nodes out in one row, in order of first appearance (a parent always
precedes its children). Each token sits at the position it has in its own sequence and attends to itself and its
ancestors only, so its hidden state is exactly the one it gets in an unshared pass: a shared token runs forward and
backward once, and the gradient equals the unshared computation (``tests/test_packing.py``). Nothing is padded, and
only the positions that predict a completion token get logits.

Attention runs in blocks of consecutive packed tokens (``TreeAttention``): a block's queries attend to the union of
their root-to-token paths, under a mask that lets each query see its own path only. The blocks are chosen so that
the work is close to that of attending over each path, not over the whole packed row.

With ``share=False`` every sample keeps its own copy of every token (padding-free packing), which is what prefix
sharing is measured against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch

# Queries per attention block tried by ``tree_attention``: smaller blocks attend to fewer keys they do not need (a
# block's keys are the union of its queries' paths), larger ones run fewer, larger products.
BLOCK_SIZES = (32, 64, 128)
# What a block costs beyond its scores (its gathers and products), in scores: fitted to the forward and backward
# passes of the packed attention on the quickstarts' micro-batches on a 2-core CPU (benchmarks/packed_attention.py).
BLOCK_OVERHEAD_SCORES = 16_384


@dataclass
class TreeAttention:
    """Attention of a packed row, block by block: ``S`` blocks of at most ``Q`` consecutive packed tokens, each
    attending to at most ``K`` keys, the union of its tokens' paths from the root."""

    query_index: torch.Tensor  # [S, Q] packed index of each block's tokens (its last token again where padded)
    key_index: torch.Tensor  # [S, K] packed index of the keys its queries attend to, in packed order (0 where padded)
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


def pack(prompts: list[list[int]], completions: list[list[int]], share: bool = True, width: int = 1,
         attention_block: int | None = None) -> PackedBatch:
    """Pack (prompt, completion) token sequences; ``share``: identical prefixes become one run of tokens.
    Per-token outputs are [B, max(width, longest completion)]. ``attention_block``: see ``tree_attention``."""
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
                       [list(p) for p in prompts], [list(c) for c in completions], share,
                       tree_attention(parents, attention_block))


def tree_attention(parents: list[int], block: int | None = None) -> TreeAttention:
    """The query blocks of a packed trie (``parents[i]``: the packed index of token i's predecessor, -1 for a first
    token; parents precede their children) and the keys each one attends to.

    A block is a range of consecutive packed tokens. Its keys are the union of its queries' paths: the whole of every
    ancestor segment (run without a branch point) of a segment it touches, and those segments' own tokens up to the
    block's end. A key is visible to a query if it lies in an ancestor segment of the query's, or earlier in the same
    segment. Blocks of ``block`` tokens if given; otherwise the cheapest blocking (attention scores, blocks x queries x
    keys padded, plus ``BLOCK_OVERHEAD_SCORES`` per block) among ``BLOCK_SIZES``-token ranges and segments cut at
    their mean length (which suit deep trees, where a range across branches gathers several branches' paths)."""
    n = len(parents)
    children = Counter(parents)
    starts_segment = torch.tensor([p < 0 or p != i - 1 or children[p] > 1 for i, p in enumerate(parents)])
    segment_of = torch.cumsum(starts_segment.long(), 0) - 1
    starts = starts_segment.nonzero().flatten().tolist()
    # ancestor[s, t]: segment t lies on the path from the root to segment s (a parent segment precedes its children)
    ancestor = torch.zeros((len(starts), len(starts)), dtype=torch.bool)
    for s, first in enumerate(starts):
        if parents[first] >= 0:
            t = int(segment_of[parents[first]])
            ancestor[s] = ancestor[t]
            ancestor[s, t] = True
    segment_start = torch.tensor(starts)
    segment_end = torch.tensor(starts[1:] + [n])

    def key_spans(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a block's keys lie: [from, to) in packed order, one span per segment they come from."""
        touched = segment_of[start:end].unique()
        needed = ancestor[touched].any(0)
        needed[touched] = True
        chosen = needed.nonzero()[:, 0]
        return segment_start[chosen], torch.minimum(segment_end[chosen], torch.tensor(end))

    if block is not None:
        candidates = [_ranges(0, n, block)]
    else:
        mean = -(-n // len(starts))
        candidates = [_ranges(0, n, size) for size in BLOCK_SIZES if size < 2 * n]
        candidates.append([piece for start, end in zip(starts, segment_end.tolist())
                           for piece in _ranges(start, end, mean)])
    best = None
    for ranges in candidates:
        spans = [key_spans(start, end) for start, end in ranges]
        cost = len(ranges) * (max(end - start for start, end in ranges) * max(int((to - at).sum()) for at, to in spans)
                              + BLOCK_OVERHEAD_SCORES)
        if best is None or cost < best[0]:
            best = cost, ranges, spans
    _, ranges, spans = best
    keys = [torch.cat([torch.arange(a, b) for a, b in zip(at.tolist(), to.tolist())]) for at, to in spans]
    width_q = max(end - start for start, end in ranges)
    query_index = torch.zeros((len(ranges), width_q), dtype=torch.long)
    query_valid = torch.zeros(query_index.shape, dtype=torch.bool)
    key_index = torch.zeros((len(ranges), max(len(k) for k in keys)), dtype=torch.long)
    key_valid = torch.zeros(key_index.shape, dtype=torch.bool)
    output_index = torch.zeros(n, dtype=torch.long)
    for b, ((start, end), k) in enumerate(zip(ranges, keys)):
        query_index[b] = end - 1  # padded queries repeat the last one; their outputs are never read
        query_index[b, :end - start] = torch.arange(start, end)
        query_valid[b, :end - start] = True
        key_index[b, :len(k)] = k
        key_valid[b, :len(k)] = True
        output_index[start:end] = torch.arange(b * width_q, b * width_q + end - start)
    query_segment, key_segment = segment_of[query_index][:, :, None], segment_of[key_index][:, None, :]
    mask = ancestor[query_segment, key_segment] | ((query_segment == key_segment)
                                                   & (key_index[:, None, :] <= query_index[:, :, None]))
    mask &= key_valid[:, None, :] & query_valid[:, :, None]
    mask[:, :, 0] |= ~query_valid  # a padded query attends one key, so that its (unused) softmax is finite
    return TreeAttention(query_index, key_index, mask, output_index)


def _ranges(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(piece, min(piece + size, end)) for piece in range(start, end, size)]
