"""The generator on the embedded SmolLM2-135M-Instruct: token-for-token equal to Hugging Face greedy generate,
behaviour log-probs equal to a teacher-forced pass, compressed policies with room equal to the full cache."""

import pytest
import torch

from spo.rollout import Generator, SamplingParams

QUESTIONS = ["What is 7 + 5?", "Name a color.", "Write one sentence about the moon and the tides.", "Hi",
             "Explain in two sentences why the sky looks blue during the day.", "Count from one to five.",
             "What is the capital of France? Answer briefly.", "Give me a short tip for learning to cook rice well."]


def chat(tokenizer, questions):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in questions]


def test_greedy_equals_hf_generate(embedded):
    model, tokenizer = embedded
    prompts = chat(tokenizer, QUESTIONS)
    assert len(set(map(len, prompts))) > 4  # left padding matters
    batch = Generator(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=64, greedy=True))
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    for rollout, row in zip(batch.rollouts, out[:, width:].tolist()):
        assert rollout.completion_ids == row[: len(rollout.completion_ids)]
        if rollout.finish_reason == "length":
            assert len(rollout.completion_ids) == 64
        else:
            assert rollout.completion_ids[-1] in (tokenizer.eos_token_id, *[model.generation_config.eos_token_id])
    assert batch.stats["tokens_generated"] == sum(len(r.completion_ids) for r in batch.rollouts)


def test_behaviour_logprobs_match_teacher_forcing(embedded):
    model, tokenizer = embedded
    prompts = chat(tokenizer, QUESTIONS[:3])
    params = SamplingParams(max_new_tokens=24, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    batch = Generator(model, tokenizer).generate(prompts, params, num_return_sequences=2)
    for rollout in batch.rollouts:
        ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(rollout.prompt_ids) - 1: -1].float() / 0.7
        expected = logits.log_softmax(-1).gather(1, torch.tensor(rollout.completion_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(rollout.logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "windowkv", "lazy"])
def test_policies_with_room_equal_full_on_the_embedded_model(embedded, policy):
    model, tokenizer = embedded
    prompts = chat(tokenizer, QUESTIONS[:4])
    params = SamplingParams(max_new_tokens=32, greedy=True)
    full = Generator(model, tokenizer).generate(prompts, params)
    ours = Generator(model, tokenizer, kv_policy=policy, kv_budget=1.0).generate(prompts, params)
    assert [r.completion_ids for r in ours.rollouts] == [r.completion_ids for r in full.rollouts]
