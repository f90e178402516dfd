"""The rollout generator: equivalence with Hugging Face generate and with teacher forcing, forking, row dropping,
stop handling, sampling, and argument errors. Tiny random models, plus the embedded model where it matters."""


import pytest
import torch

from spo.models import tiny_model
from spo.rollout import Generator, SamplingParams, available_policies
from spo.rollout.sampling import filter_logits
from spo.rollout.stopping import StopStrings

from helpers import PROMPTS, WordTokenizer  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=12, greedy=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine it can make them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def hf_greedy(model, prompts, new_tokens, pad_id=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_equals_hf_generate_tiny(family):
    model = tiny_model(family, seed=1, vocab_size=2048)
    model.generation_config.eos_token_id = None
    batch = Generator(model, WordTokenizer()).generate(PROMPTS, GREEDY)
    assert [r.completion_ids for r in batch.rollouts] == hf_greedy(model, PROMPTS, 12)
    assert all(r.finish_reason == "length" for r in batch.rollouts)


def test_decoding_passes_the_cache_under_the_keyword_the_installed_transformers_takes():
    """transformers renamed forward's ``past_key_values`` to ``cache`` (the old name is deprecated, then removed):
    the generator uses whichever the model's forward declares, also through a PEFT wrapper, and warns nothing."""
    import inspect
    import warnings

    from peft import LoraConfig, get_peft_model

    from spo.rollout.generator import cache_keyword

    model = _tiny()
    declared = inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) == ("cache" if "cache" in declared else "past_key_values")
    assert cache_keyword(get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))) == cache_keyword(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Generator(model, WordTokenizer()).generate(PROMPTS[:2], GREEDY)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_eager_attention_honours_the_4d_mask():
    model = tiny_model("llama", seed=2, vocab_size=2048)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = None
    batch = Generator(model, WordTokenizer()).generate(PROMPTS, GREEDY)
    assert [r.completion_ids for r in batch.rollouts] == hf_greedy(model, PROMPTS, 12)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "windowkv", "lazy"])
def test_compressed_policies_with_room_equal_full(policy):
    model = tiny_model("qwen2", seed=3, vocab_size=2048, layers=3)
    model.generation_config.eos_token_id = None
    params = SamplingParams(max_new_tokens=10, greedy=True)
    full = Generator(model, WordTokenizer()).generate(PROMPTS, params)
    ours = Generator(model, WordTokenizer(), kv_policy=policy, kv_budget=1000).generate(PROMPTS, params)
    assert [r.completion_ids for r in ours.rollouts] == [r.completion_ids for r in full.rollouts]
    for a, b in zip(ours.rollouts, full.rollouts):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def _tiny(seed=4, **kwargs):
    model = tiny_model("llama", seed=seed, vocab_size=2048, **kwargs)
    model.generation_config.eos_token_id = None
    return model


def test_forked_continuations_equal_generating_from_the_concatenation():
    model = _tiny()
    generator = Generator(model, WordTokenizer())
    states = [(PROMPTS[0], [11, 12, 13]), (PROMPTS[1], []), (PROMPTS[0], [11, 12, 13]), (PROMPTS[2], [5])]
    batch = generator.continue_from(states, GREEDY, k=3)
    assert batch.stats["prefixes"] == 3 and batch.stats["rollouts"] == 12
    assert batch.stats["prefill_tokens"] < batch.stats["prefill_tokens_unshared"]
    direct = generator.generate([p + c for p, c in states], GREEDY)
    for r in batch.rollouts:
        assert r.completion_ids == direct.rollouts[r.input_index].completion_ids
        assert r.prompt_ids == states[r.input_index][0]
    unshared = generator.continue_from(states, GREEDY, k=3, share_prefixes=False)
    assert [r.completion_ids for r in unshared.rollouts] == [r.completion_ids for r in batch.rollouts]


@pytest.mark.parametrize("policy", ["lazy", "h2o", "streaming"])
def test_a_continuation_keeps_the_kv_budget_of_the_whole_rollout(policy):
    """A fraction of a decoding policy's budget is the prompt plus a fraction of the whole completion's limit:
    continuing a partial completion (SPO-tree's levels, SPO-chain's Monte Carlo states) samples with the cache its
    rollout had, not one squeezed into the continuation's own length (which left a tree's first level no room for
    its own tokens)."""
    generator = Generator(_tiny(), WordTokenizer(), kv_policy=policy, kv_budget=0.5)
    prompt = PROMPTS[0]
    whole = generator.generate([prompt], SamplingParams(max_new_tokens=16, greedy=True))
    assert whole.stats["kv_budget_tokens"] == len(prompt) + 8
    partial = whole.rollouts[0].completion_ids[:8]
    for state, limit in (((prompt, []), 4), ((prompt, partial), 4), ((prompt, partial), 16)):
        continued = generator.continue_from([state], SamplingParams(max_new_tokens=limit, greedy=True),
                                            max_total_new_tokens=16)
        assert continued.stats["kv_budget_tokens"] == whole.stats["kv_budget_tokens"]


@pytest.mark.parametrize("policy", ["lazy", "h2o", "streaming"])
def test_a_fractional_decode_budget_keeps_the_whole_prompt_until_that_share_of_the_completion_is_written(policy):
    """At kv_budget 0.5 nothing is evicted before half the completion's limit is decoded, however long the prompt:
    the sampler reads the whole question (a budget taken of prompt + completion once fell below the prompt)."""
    model, tokenizer = _tiny(), WordTokenizer()
    prompt = PROMPTS[0] * 4
    params = SamplingParams(max_new_tokens=16, greedy=True)
    full = Generator(model, tokenizer).generate([prompt], params).rollouts[0].completion_ids
    compressed = Generator(model, tokenizer, kv_policy=policy, kv_budget=0.5).generate([prompt], params)
    assert compressed.stats["kv_budget_tokens"] == len(prompt) + 8 < len(prompt) + 16
    assert compressed.rollouts[0].completion_ids[:9] == full[:9]


def test_rows_finishing_at_different_steps_leave_the_batch_without_changing_the_others():
    model = _tiny(seed=5)
    generator = Generator(model, WordTokenizer())
    states = [(p, [3] * i) for i, p in enumerate(PROMPTS * 2)]
    batch = generator.continue_from(states, SamplingParams(max_new_tokens=20, greedy=True), max_total_new_tokens=14)
    lengths = [len(r.completion_ids) for r in batch.rollouts]
    assert lengths == [min(20, 14 - i) for i in range(len(states))]
    for r in batch.rollouts:
        alone = generator.generate([r.prompt_ids + states[r.input_index][1]],
                                   SamplingParams(max_new_tokens=lengths[r.input_index], greedy=True))
        assert alone.rollouts[0].completion_ids == r.completion_ids
        torch.testing.assert_close(alone.rollouts[0].logprobs, r.logprobs, atol=1e-5, rtol=0)


def test_decoding_attends_over_the_written_slots_only(monkeypatch):
    """The buffers hold prompt + max_new_tokens slots; each step reads only those written so far."""
    from spo.rollout.cache import RolloutCache

    seen = []
    update = RolloutCache.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(self, key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            seen.append((keys.shape[2], self.capacity))
        return keys, values

    monkeypatch.setattr(RolloutCache, "update", spy)
    model = _tiny(seed=6)
    Generator(model, WordTokenizer()).generate(PROMPTS, GREEDY)
    width = max(map(len, PROMPTS))
    assert [length for length, _ in seen] == [width + step for step in range(GREEDY.max_new_tokens)]
    assert {capacity for _, capacity in seen} == {width + GREEDY.max_new_tokens}


def test_eos_stops_a_row_and_finished_states_continue_with_nothing():
    model = _tiny(seed=6)
    generator = Generator(model, WordTokenizer())
    free = generator.generate(PROMPTS, GREEDY).rollouts
    model.generation_config.eos_token_id = [free[0].completion_ids[3]]  # the EOS set includes generation_config's
    generator = Generator(model, WordTokenizer())
    first = generator.generate(PROMPTS, GREEDY).rollouts[0]
    cut = free[0].completion_ids.index(free[0].completion_ids[3]) + 1
    assert first.completion_ids == free[0].completion_ids[:cut] and first.finish_reason == "stop"
    done = generator.continue_from([(PROMPTS[0], [5, 2])], GREEDY, k=2).rollouts
    assert [(r.completion_ids, r.finish_reason) for r in done] == [([], "stop")] * 2
    assert generator.continue_from([(PROMPTS[0], [5, 6])], GREEDY, max_total_new_tokens=2).rollouts[0].finish_reason \
        == "length"


def test_stop_strings_truncate_text_and_keep_the_completing_token():
    model = _tiny(seed=7)
    generator = Generator(model, WordTokenizer())
    free = generator.generate(PROMPTS[:1], GREEDY).rollouts[0]
    stop = f"<{free.completion_ids[4]}>"
    first = free.completion_ids.index(free.completion_ids[4])
    stopped = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, greedy=True, stop=[stop])).rollouts[0]
    assert stopped.completion_ids == free.completion_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]
    assert len(stopped.logprobs) == len(stopped.completion_ids)


def test_stop_string_checker_sees_strings_split_across_tokens(embedded_tokenizer):
    ids = embedded_tokenizer("The answer is 42.\n\nDone", add_special_tokens=False)["input_ids"]
    checker = StopStrings(embedded_tokenizer, ["\n\n"])
    hits = [bool(checker.hits(torch.tensor([ids]), n)[0]) for n in range(1, len(ids) + 1)]
    first = hits.index(True)
    assert "\n\n" in embedded_tokenizer.decode(ids[: first + 1])
    assert "\n\n" not in embedded_tokenizer.decode(ids[:first])
    assert checker.truncate("The answer is 42.\n\nDone") == "The answer is 42."


def test_sampling_is_reproducible_and_respects_top_k():
    model = _tiny(seed=8)
    generator = Generator(model, WordTokenizer())
    params = SamplingParams(max_new_tokens=8, temperature=1.3, top_k=3, seed=11)
    a = generator.generate(PROMPTS, params, num_return_sequences=2)
    b = generator.generate(PROMPTS, params, num_return_sequences=2)
    assert [r.completion_ids for r in a.rollouts] == [r.completion_ids for r in b.rollouts]
    assert [r.input_index for r in a.rollouts] == [0, 0, 1, 1, 2, 2]
    c = generator.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.3, top_k=3, seed=12), 2)
    assert [r.completion_ids for r in a.rollouts] != [r.completion_ids for r in c.rollouts]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_bad_arguments_name_the_field():
    model = _tiny()
    with pytest.raises(ValueError, match="valid: " + ", ".join(available_policies())):
        Generator(model, WordTokenizer(), kv_policy="nope")
    with pytest.raises(ValueError, match="kv_budget"):
        Generator(model, WordTokenizer(), kv_policy="lazy", kv_budget=1.5)
    with pytest.raises(ValueError, match="kv_budget"):
        Generator(model, WordTokenizer(), kv_policy="h2o")
    with pytest.raises(ValueError, match="kv_kwargs"):
        Generator(model, WordTokenizer(), kv_policy="lazy", kv_budget=0.5, kv_kwargs={"beta": 1})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_lazy_eviction_keeps_peak_kv_under_budget():
    model = _tiny(seed=9, layers=2)
    budget, rows = 16, len(PROMPTS) * 2
    generator = Generator(model, WordTokenizer(), kv_policy="lazy", kv_budget=budget, kv_kwargs={"window": 4})
    batch = generator.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=1.0, seed=0), 2)
    per_token = 2 * 2 * 16 * 2 * 4  # layers * kv heads * head dim * (k, v) * fp32 bytes
    assert max(len(r.completion_ids) for r in batch.rollouts) == 30
    assert batch.stats["peak_kv_bytes"] <= rows * budget * per_token
    assert batch.stats["peak_kv_bytes"] < 0.55 * batch.stats["full_kv_bytes"]


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "windowkv", "lazy"])
def test_compressed_policies_generate_under_a_tight_budget(policy):
    model = _tiny(seed=10, layers=3)
    budget = 6 if policy in ("snapkv", "windowkv") else 12
    kwargs = {"window": 2} if policy in ("snapkv", "lazy") else {"window": 2, "segment": 2} \
        if policy == "windowkv" else {}
    batch = Generator(model, WordTokenizer(), kv_policy=policy, kv_budget=budget, kv_kwargs=kwargs).generate(
        PROMPTS, SamplingParams(max_new_tokens=16, greedy=True))
    assert all(len(r.completion_ids) == 16 and torch.isfinite(r.logprobs).all() for r in batch.rollouts)
    assert batch.stats["peak_kv_bytes"] < batch.stats["full_kv_bytes"]


def test_large_requests_run_in_chunks_with_the_same_greedy_output():
    from spo.models import tiny_model
    from spo.models import load_tokenizer
    from spo.rollout import Generator, SamplingParams

    model, tokenizer = tiny_model(seed=7), load_tokenizer("smollm2-135m-instruct")
    states = [([1, 5, 9 + i], [3] * (i % 3)) for i in range(7)]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    whole = Generator(model, tokenizer).continue_from(states, params, k=2)
    chunked = Generator(model, tokenizer, max_batch_rows=4).continue_from(states, params, k=2)
    assert [(r.input_index, r.completion_ids) for r in whole.rollouts] == \
        [(r.input_index, r.completion_ids) for r in chunked.rollouts]
    assert chunked.stats["rollouts"] == 14 and chunked.stats["peak_kv_bytes"] <= whole.stats["peak_kv_bytes"]


def test_behaviour_logprobs_are_those_of_the_truncated_distribution():
    """With top-k / top-p the sampler draws from a renormalised nucleus: its log-probs (the importance weights'
    denominator) are taken there, while the model's own log-probs stay available for cutpoints and the mask."""
    from spo.rollout.sampling import SamplingParams, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    tokens, model, behaviour = sample(logits, SamplingParams(top_p=0.8), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) <= {0, 1}  # the nucleus of 0.8 holds the first two tokens
    expected = torch.log(torch.tensor([0.5, 0.3]) / 0.8)[tokens]
    torch.testing.assert_close(behaviour, expected)
    torch.testing.assert_close(model, torch.log(torch.tensor([0.5, 0.3]))[tokens])
    tokens, model, behaviour = sample(logits, SamplingParams(top_k=1), None)
    assert torch.equal(tokens, torch.zeros(200, dtype=torch.long)) and torch.allclose(behaviour, torch.zeros(200))
    _, model, behaviour = sample(logits, SamplingParams(), None)
    assert behaviour is model  # nothing truncated: one tensor
