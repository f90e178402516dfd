"""The rollout generator: batched prefill of distinct prefixes, forking, and a decode loop over RolloutCache."""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field, replace

import torch

from .attention import scored_attention
from .cache import RolloutCache
from .kv import KVPolicy, make_policy
from .packed import PackedLinears
from .sampling import SamplingParams, sample
from .stopping import StopStrings, eos_token_ids


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # for continue_from: the continuation only
    text: str  # decoded completion (special tokens skipped), cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    logprobs: torch.Tensor  # float32 [len(completion_ids)]: log softmax(logits / T) of the sampled tokens
    input_index: int  # which input of the call it answers: a prompt of generate(), a state of continue_from()
    # float32 [len(completion_ids)]: log-probs under the distribution actually sampled from (after top-k / top-p
    # truncation; the importance weights' denominator); None: nothing was truncated, the same as ``logprobs``
    truncated_logprobs: torch.Tensor | None = None

    @property
    def behaviour_logprobs(self) -> torch.Tensor:
        return self.logprobs if self.truncated_logprobs is None else self.truncated_logprobs

    @property
    def cut_off(self) -> bool:
        """Whether it ran to its length limit without finishing (no EOS, no stop string)."""
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    stats: dict = field(default_factory=dict)


@dataclass
class _Plan:
    """Distinct prefixes to encode, and which (state, sample) each forked row continues."""

    prompts: list[list[int]]
    partials: list[list[int]]
    limits: list[int]  # new-token limit per distinct prefix
    owners: list[list[int]]  # state indices sharing each distinct prefix


_SUMMED_STATS = {"prefixes", "prefill_tokens", "prefill_tokens_unshared", "tokens_generated", "rollouts", "seconds"}


def cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in recent transformers, ``past_key_values`` before
    (deprecated there, to be removed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes it through
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class Generator:
    """Samples completions from a Hugging Face causal LM with a compressed KV cache.

    ``kv_policy`` is a registry name (see ``spo.rollout.kv.available_policies()``) or a ``KVPolicy``;
    ``kv_budget`` is a number of tokens or a fraction in (0, 1]: of the longest prompt for prompt policies; for
    decoding policies, the prompt plus that fraction of max_new_tokens. ``kv_kwargs`` go to the policy's
    constructor.
    ``pack_weights`` runs the linear layers on prepacked oneDNN weights when the model is on a CPU (see
    ``spo.rollout.packed``: faster decoding for one extra copy of those weights).
    """

    def __init__(self, model, tokenizer, kv_policy: str | KVPolicy = "full", kv_budget: int | float | None = None,
                 kv_kwargs: dict | None = None, max_batch_rows: int | None = None, pack_weights: bool = True):
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_rows = max_batch_rows  # rows decoded at once; larger requests run in consecutive chunks
        self.policy = make_policy(kv_policy, kv_budget, **(kv_kwargs or {}))
        self.packed = PackedLinears() if pack_weights else None
        config = model.config.get_text_config()
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eos = eos_token_ids(model, tokenizer)
        self.cache_keyword = cache_keyword(model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos[0]

    # --- public API ------------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 num_return_sequences: int = 1) -> RolloutBatch:
        """``num_return_sequences`` completions per prompt; identical prompts are encoded once."""
        return self.continue_from([(p, []) for p in prompt_ids], params, k=num_return_sequences)

    def continue_from(self, states: list[tuple[list[int], list[int]]], params: SamplingParams, k: int = 1,
                      max_total_new_tokens: int | None = None, share_prefixes: bool = True) -> RolloutBatch:
        """Continue each state (prompt ids, partial completion ids) ``k`` times. Each distinct state is encoded
        once and its cache copied to its continuations (``share_prefixes=False`` encodes every continuation's
        prefix separately instead: the baseline for measuring the saving). With ``max_total_new_tokens`` a state
        may add at most that many tokens minus its partial's length (and at most ``params.max_new_tokens``).
        A partial ending in EOS continues with nothing (finish reason "stop"). With ``max_total_new_tokens``, a
        fractional ``kv_budget`` of a decoding policy is the prompt plus that fraction of ``max_total_new_tokens``,
        the whole completion's limit, as when that rollout was generated in one call."""
        if k < 1:
            raise ValueError(f"k (num_return_sequences) must be >= 1, got {k}")
        if any(not prompt for prompt, _ in states):
            raise ValueError("every prompt needs at least one token")
        per_chunk = len(states) if self.max_batch_rows is None else max(1, self.max_batch_rows // k)
        if len(states) <= per_chunk:
            return self._continue_chunk(states, params, k, max_total_new_tokens, share_prefixes)
        rollouts, stats = [], {}
        for number, begin in enumerate(range(0, len(states), per_chunk)):
            chunk_params = params if params.seed is None else replace(params, seed=params.seed + 1_000_003 * number)
            part = self._continue_chunk(states[begin:begin + per_chunk], chunk_params, k, max_total_new_tokens,
                                        share_prefixes)
            for rollout in part.rollouts:
                rollout.input_index += begin
            rollouts += part.rollouts
            for key, value in part.stats.items():
                if key in _SUMMED_STATS:
                    stats[key] = stats.get(key, 0) + value
                elif isinstance(value, (int, float)):  # memory and budgets hold one chunk at a time
                    stats[key] = max(stats.get(key, 0), value)
                else:
                    stats.setdefault(key, value)
        stats["tokens_per_second"] = stats["tokens_generated"] / max(stats["seconds"], 1e-9)
        return RolloutBatch(rollouts, stats)

    def _continue_chunk(self, states, params: SamplingParams, k: int, max_total_new_tokens: int | None,
                        share_prefixes: bool) -> RolloutBatch:
        started = time.perf_counter()
        plan, done = self._plan(states, params, max_total_new_tokens, 1 if share_prefixes else k)
        k = k if share_prefixes else 1
        rollouts = [Rollout(list(states[i][0]), [], "", reason, torch.zeros(0), i)
                    for i, reason in done for _ in range(k)]
        stats = {"prefixes": len(plan.prompts), "prefill_tokens": 0,
                 "prefill_tokens_unshared": 0, "tokens_generated": 0, "peak_kv_bytes": 0, "full_kv_bytes": 0,
                 "allocated_kv_bytes": 0, "kv_policy": self.policy.name}
        if plan.prompts:
            rollout = None if max_total_new_tokens is None else \
                (max(len(prompt) for prompt in plan.prompts), max_total_new_tokens)
            rollouts += self._run(plan, params, k, stats, rollout)
        rollouts.sort(key=lambda r: r.input_index)
        stats["rollouts"] = len(rollouts)
        stats["seconds"] = time.perf_counter() - started
        stats["tokens_per_second"] = stats["tokens_generated"] / max(stats["seconds"], 1e-9)
        return RolloutBatch(rollouts, stats)

    # --- internals -------------------------------------------------------------------------------------------------

    def _plan(self, states, params, max_total, copies: int) -> tuple[_Plan, list[tuple[int, str]]]:
        """Distinct prefixes (each listed ``copies`` times when prefixes are not shared) and finished states."""
        plan, done, index = _Plan([], [], [], []), [], {}
        for i, (prompt, partial) in ((i, s) for i, s in enumerate(states) for _ in range(copies)):
            limit = params.max_new_tokens
            if max_total is not None:
                limit = min(limit, max_total - len(partial))
            if partial and partial[-1] in self.eos:
                done.append((i, "stop"))
            elif limit <= 0:
                done.append((i, "length"))
            else:
                key = (tuple(prompt), tuple(partial), len(plan.prompts) if copies > 1 else 0)
                if key not in index:
                    index[key] = len(plan.prompts)
                    plan.prompts.append(list(prompt))
                    plan.partials.append(list(partial))
                    plan.limits.append(limit)
                    plan.owners.append([])
                plan.owners[index[key]].append(i)
        return plan, done

    def _check_window(self, length: int) -> None:
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True) and length > window:
            raise ValueError(f"sequences of {length} tokens exceed the model's sliding window ({window}), "
                             "which spo.rollout does not implement")

    def _additive_mask(self) -> bool:
        """Whether the model needs an additive float mask: sdpa (and our scored attention) honour a boolean 4-D
        mask, eager adds the mask to the attention logits; other kernels (flash, flex) take no custom 4-D mask."""
        if self.policy.needs_attention:
            return False
        implementation = self.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"spo.rollout needs attn_implementation 'sdpa' or 'eager', the model uses "
                             f"{implementation!r}")
        return implementation == "eager"

    def _forward(self, cache: RolloutCache, input_ids, positions, mask, additive: bool) -> torch.Tensor:
        """Logits [rows, vocab] of each row's last position."""
        if additive:
            mask = torch.zeros(mask.shape, dtype=cache.k[0].dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(cache.k[0].dtype).min)
        cache.observed = 0
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, rollout_cache=cache, **{self.cache_keyword: cache})
        if self.policy.needs_attention and cache.observed != self.num_layers:
            raise RuntimeError(f"{type(self.model).__name__} did not route attention through transformers' "
                               f"AttentionInterface ({cache.observed}/{self.num_layers} layers); kv_policy "
                               f"{self.policy.name!r} needs attention scores")
        return out.logits[:, -1]

    @torch.inference_mode()
    def _run(self, plan: _Plan, params: SamplingParams, k: int, stats: dict, rollout: tuple[int, int] | None
             ) -> list[Rollout]:
        device = self.model.get_input_embeddings().weight.device
        dtype = self.model.get_input_embeddings().weight.dtype
        additive = self._additive_mask()
        prefixes = [p + c for p, c in zip(plan.prompts, plan.partials)]
        lengths = torch.tensor([len(p) for p in prefixes], device=device)
        width, longest_new = int(lengths.max()), max(plan.limits)
        self._check_window(width + longest_new)
        budget = self.policy.budget_tokens(width, longest_new, rollout)
        decode_budget = self.policy.decode_budget(budget)
        capacity = width + longest_new if decode_budget is None else max(width, min(decode_budget, width + longest_new))
        forks = torch.tensor([k * len(o) for o in plan.owners], device=device)  # rows continuing each prefix
        n, rows = len(prefixes), int(forks.sum())
        cache = RolloutCache(self.policy, budget=budget, layers=self.num_layers, rows=rows, kv_heads=self.kv_heads,
                             head_dim=self.head_dim, capacity=capacity, dtype=dtype, device=device)

        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prefixes):
            input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        offsets = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]
        valid = offsets >= 0
        positions = offsets.clamp_min(0).masked_fill(~valid, 1)  # pads get position 1, like Hugging Face
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        prefill_mask = (causal & valid[:, None, None, :]) | torch.eye(width, dtype=torch.bool, device=device)

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stops = StopStrings(self.tokenizer, params.stop)
        eos = torch.tensor(self.eos, device=device)

        packing = self.packed.applied(self.model) if self.packed is not None else contextlib.nullcontext()
        with scored_attention(self.model, self.policy.needs_attention), packing:
            cache.rows = n
            cache.begin_prefill(valid, positions)
            logits = self._forward(cache, input_ids, positions, prefill_mask, additive)
            cache.end_prefill()
            cache.repeat_rows(forks)
            logits = logits.repeat_interleave(forks, dim=0)

            # per row: which output sequence it fills (sequences are ordered prefix by prefix)
            seq_of_row = torch.arange(rows, device=device)
            limit = torch.tensor(plan.limits, device=device).repeat_interleave(forks)
            tokens_out = torch.full((rows, longest_new), self.pad_id, dtype=torch.long, device=device)
            logprobs_out = torch.zeros(rows, longest_new, dtype=torch.float32, device=device)
            truncates = not params.greedy and (params.top_p < 1 or params.top_k > 0)
            behaviour_out = torch.zeros_like(logprobs_out) if truncates else None
            length_out = torch.zeros(rows, dtype=torch.long, device=device)
            stopped_out = torch.zeros(rows, dtype=torch.bool, device=device)
            by_string = torch.zeros(rows, dtype=torch.bool, device=device)
            for step in range(longest_new):
                tokens, logprobs, behaviour = sample(logits, params, generator)
                tokens_out[seq_of_row, step] = tokens
                logprobs_out[seq_of_row, step] = logprobs
                if behaviour_out is not None:
                    behaviour_out[seq_of_row, step] = behaviour
                hit_eos = torch.isin(tokens, eos)
                hit_string = (stops.hits(tokens_out[seq_of_row], step + 1).to(device) if stops
                              else torch.zeros_like(hit_eos))
                finished = hit_eos | hit_string | (step + 1 >= limit[seq_of_row])
                if bool(finished.any()):
                    ended = seq_of_row[finished]
                    length_out[ended] = step + 1
                    stopped_out[ended] = (hit_eos | hit_string)[finished]
                    by_string[ended] = (hit_string & ~hit_eos)[finished]
                    order = cache.drop_rows(~finished)
                    seq_of_row, tokens = seq_of_row[order], tokens[order]
                if cache.rows == 0:
                    break
                cache.newest[: cache.rows] += 1
                cache.prepare_step()
                logits = self._forward(cache, tokens[:, None], cache.newest[: cache.rows, None], cache.mask(),
                                       additive)

        stats["prefill_tokens"] += int(lengths.sum())
        stats["prefill_tokens_unshared"] += int((lengths * forks).sum())
        stats["tokens_generated"] += int(length_out.sum())
        stats["peak_kv_bytes"] = cache.peak_tokens * cache.bytes_per_token
        # a dense full cache of the padded batch (Hugging Face's DynamicCache at the end of ``generate``)
        stats["full_kv_bytes"] = rows * (width + int(length_out.max())) * self.num_layers * cache.bytes_per_token
        stats["allocated_kv_bytes"] = cache.allocated_bytes
        stats["kv_budget_tokens"] = budget
        return self._collect(plan, k, stops, tokens_out, logprobs_out, behaviour_out, length_out, stopped_out,
                             by_string)

    def _collect(self, plan, k, stops, tokens_out, logprobs_out, behaviour_out, length_out, stopped_out,
                 by_string) -> list[Rollout]:
        owners = [(prefix, state) for prefix, states in enumerate(plan.owners) for state in states for _ in range(k)]
        tokens_list, lengths = tokens_out.tolist(), length_out.tolist()
        rollouts = []
        for row, (prefix, state) in enumerate(owners):
            ids = tokens_list[row][: lengths[row]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if by_string[row]:
                text = stops.truncate(text)
            reason = "stop" if stopped_out[row] else "length"
            logprobs = logprobs_out[row, : lengths[row]].cpu()
            truncated = behaviour_out[row, : lengths[row]].cpu() if behaviour_out is not None else None
            rollouts.append(Rollout(list(plan.prompts[prefix]), ids, text, reason, logprobs, state, truncated))
        return rollouts
