"""Prefix-shared packing in the learner: every shared prefix is computed once, and the log-probs and parameter
gradients equal those of one padded row per sample."""

import pytest
import torch

from spo.models import tiny_model
from spo.trainer.logprobs import completion_logprobs, packed_logprobs, packing_unsupported
from spo.trainer import tree_attention
from spo.trainer import packing
from spo.trainer.packing import pack
from spo.trainer.samples import collate

from test_learner import learner_for, make_samples, update_capturing_gradients


def tree_like_samples(seed=0):
    """A GRPO-like group (one prompt, completions that often start alike), SPO-tree-like edges (prompt + parent
    segment as the prompt) and an unrelated prompt."""
    gen = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, 500, (n,), generator=gen).tolist()  # noqa: E731
    prompt, segment = tokens(7), tokens(5)
    prompts, completions = [], []
    for i in range(4):
        prompts.append(prompt)
        completions.append(([11, 12] if i % 2 else []) + tokens(3 + i))
    for i in range(3):
        prompts.append(prompt + segment)
        completions.append(tokens(4 + i))
    prompts.append(tokens(5))
    completions.append(tokens(6))
    return prompts, completions


@pytest.mark.parametrize("block", [None, 64, 5])  # chosen; one attention block; many, segments across their edges
def test_pack_stores_each_shared_prefix_once(block):
    prompts, completions = tree_like_samples()
    shared = pack(prompts, completions, attention_block=block)
    unshared = pack(prompts, completions, share=False, attention_block=block)
    total = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    assert unshared.input_ids.shape[1] == unshared.unshared_tokens == total
    # the prompt (7) once, the common "11 12" once, the parent segment once, the unrelated sample whole
    distinct = 7 + 2 + sum(3 + i for i in range(4)) + 5 + sum(4 + i for i in range(3)) + 11
    assert shared.input_ids.shape[1] == distinct
    for packed in (shared, unshared):
        ids, positions, tree = packed.input_ids[0], packed.position_ids[0], packed.attention
        width = tree.query_index.shape[1]
        assert (tree.query_index.flatten()[tree.output_index] == torch.arange(ids.numel())).all()
        for b, (prompt, completion) in enumerate(zip(prompts, completions)):
            for t, token in enumerate(completion):
                node = int(packed.predictors[b, t])
                # the token predicting `token` sees exactly the tokens before it in its own sequence, at its position
                segment, query = divmod(int(tree.output_index[node]), width)
                context = ids[tree.key_index[segment][tree.mask[segment, query]]].tolist()
                assert context == (prompt + completion)[:len(prompt) + t]
                assert int(positions[node]) == len(prompt) + t - 1
        assert packed.completion_mask.sum() == sum(len(c) for c in completions)
        # blocks of `block` consecutive tokens; a block attends to the union of its queries' paths, nothing more
        tree = packed.attention
        if block is not None:
            assert tree.query_index.shape == (-(-ids.numel() // block), min(block, ids.numel()))
        for keys, used in zip(tree.key_index, tree.mask.any(1)):
            assert used[:int(used.sum())].all()  # only trailing key slots are padding
            assert (keys[used].diff() > 0).all()  # each key once, in packed order


def test_pack_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="sample 1 has an empty prompt"):
        pack([[5], []], [[6], [7]])


def weighted_gradients(model, logprobs_fn, mask):
    model.zero_grad()
    out = logprobs_fn()
    logp = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=logp.dtype)
    (logp * weights * mask).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the padded reference's attention
@pytest.mark.parametrize("share,block", [(True, None), (False, None), (True, 5)])
@pytest.mark.parametrize("kernel", ["products", "sdpa"])  # the packed attention's: small or large blocks
def test_packed_logprobs_and_gradients_equal_the_padded_computation(attention, share, block, kernel, monkeypatch):
    if kernel == "sdpa":
        monkeypatch.setattr(tree_attention, "SMALL_BLOCKS_MAX_SCORES", 0)
    prompts, completions = tree_like_samples()
    model = tiny_model(seed=0).float()
    model.config._attn_implementation = attention
    mask = pack(prompts, completions).completion_mask
    (logp, entropy), reference = weighted_gradients(
        model, lambda: completion_logprobs(model, collate(prompts, completions, 0), 0.7, with_entropy=True), mask)
    (packed_logp, packed_entropy), gradients = weighted_gradients(
        model, lambda: packed_logprobs(model, pack(prompts, completions, share=share, attention_block=block), 0.7,
                                       with_entropy=True), mask)
    real = mask.bool()
    torch.testing.assert_close(packed_logp[real], logp[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_entropy[real], entropy[real], rtol=1e-5, atol=1e-5)
    assert (packed_logp[~real] == 0).all()
    assert set(gradients) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(gradients[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_the_chunked_vocabulary_head_equals_the_whole_one():
    """In float64, so that only a real difference (not the order of a float32 sum) can fail it."""
    prompts, completions = tree_like_samples(seed=1)
    model = tiny_model(seed=0).double()
    packed = pack(prompts, completions)
    mask = packed.completion_mask
    vocabulary = model.config.vocab_size
    (whole, whole_entropy), reference = weighted_gradients(
        model, lambda: packed_logprobs(model, packed, 0.7, with_entropy=True), mask)
    (chunked, chunked_entropy), gradients = weighted_gradients(
        model, lambda: packed_logprobs(model, packed, 0.7, with_entropy=True, chunk_elements=3 * vocabulary), mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked_entropy, whole_entropy, rtol=1e-10, atol=1e-10)
    for name, grad in reference.items():
        torch.testing.assert_close(gradients[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("packing,checkpointing", [("prefix_tree", False), ("padding_free", False),
                                                   ("prefix_tree", True)])
def test_the_learner_update_is_the_same_packed_or_padded(tmp_path, packing, checkpointing):
    """Whole updates (micro-batching, idle rows dropped and repacked, samples of one prompt grouped): the same
    gradients and loss as with padded rows (to 1e-4 of each gradient's largest entry: these gradients are ~1e-6,
    and accumulating them over differently shaped passes moves float32 sums by ~1e-5 of that)."""
    samples = make_samples(count=12)
    for i, sample in enumerate(samples):  # groups of three completions of one prompt, as GRPO makes them
        sample.prompt_ids, sample.dataset_row = samples[i - i % 3].prompt_ids, i // 3
        if i % 4 == 3:
            sample.advantages = torch.zeros_like(sample.advantages)  # idle
    results = {}
    for mode in (packing, "padded"):
        learner, args = learner_for(tmp_path / mode, learner_packing=mode, per_device_train_batch_size=3,
                                    gradient_accumulation_steps=2, max_grad_norm=None, beta=0.0)
        assert learner.packing == mode
        if checkpointing:  # the backward pass recomputes the packed attention: it must still be the packed one
            learner.unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results[mode] = update_capturing_gradients(learner, args, samples)
    (metrics, grads), (padded_metrics, padded_grads) = results[packing], results["padded"]
    assert metrics["loss"] == pytest.approx(padded_metrics["loss"], rel=1e-5)
    assert metrics["train/shared_token_fraction"] > (0.2 if packing == "prefix_tree" else -1e-9)
    for step, padded_step in zip(grads, padded_grads):
        for name, grad in padded_step.items():
            torch.testing.assert_close(step[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)


def test_models_the_packed_attention_cannot_express_fall_back_to_padding(tmp_path, caplog):
    from accelerate import Accelerator

    from spo.trainer import GRPOConfig
    from spo.trainer.learner import Learner

    from helpers import tiny_run

    model = tiny_model(seed=0)
    assert packing_unsupported(model) is None
    model.config.sliding_window, model.config.use_sliding_window = 16, True
    assert "sliding-window" in packing_unsupported(model)
    learner = Learner(Accelerator(cpu=True), model, GRPOConfig(**tiny_run(tmp_path)), pad_token_id=0,
                      uses_adapters=False)
    assert learner.packing == "padded" and "the learner pads instead" in caplog.text
    model.config.use_sliding_window = False
    assert packing_unsupported(model) is None


def test_a_model_that_bypasses_the_attention_interface_is_refused():
    model = tiny_model(seed=0)
    for layer in model.model.layers:  # as a model with its own attention code would: never calls the interface
        layer.self_attn.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)
    prompts, completions = tree_like_samples()
    with pytest.raises(RuntimeError, match="0 of 2 layers ran the packed attention"):
        packed_logprobs(model, pack(prompts, completions), 1.0)


def test_the_attention_blocking_is_the_cheapest_candidate():
    """Short rollouts of one prompt and a deep binary tree: the chosen blocks cost no more than any fixed size."""
    def chain(parents, parent, length):
        for _ in range(length):
            parents.append(parent)
            parent = len(parents) - 1
        return parent

    group, tree = [], []
    prompt = chain(group, -1, 75)
    for _ in range(8):
        chain(group, prompt, 60)
    frontier = [chain(tree, -1, 75)]
    for _ in range(4):
        frontier = [chain(tree, node, 24) for node in frontier for _ in range(2)]
    cost = lambda attention: attention.mask.shape[0] * (  # noqa: E731
        attention.mask[0].numel() + packing.BLOCK_OVERHEAD_SCORES)
    for parents in (group, tree):
        chosen = cost(packing.tree_attention(parents))
        assert all(chosen <= cost(packing.tree_attention(parents, size)) for size in packing.BLOCK_SIZES)
        assert chosen < max(cost(packing.tree_attention(parents, size)) for size in (8, 16, 256))
