"""Rollout generator benchmark on the embedded SmolLM2-135M-Instruct (fp32).

1. Throughput: our decode loop (full cache) versus Hugging Face ``generate``, both sampling (temperature 0.7,
   top_p 1, top_k off), same prompts (built-in arithmetic task, chat-formatted), batch 8 / 32 / 64,
   128 new tokens, the model in float32 and in bfloat16 (both sides in the same dtype; then our bf16
   rollouts against HF on the float32 model). Tokens/s counts generated tokens up to and including EOS; each
   setting is the median of ``--repeats`` runs, ours and HF's interleaved (this machine's speed drifts by 10-20%
   between minutes). Ours is also timed with prepacking off (``pack_weights=False``), to show what it adds.
2. Prefix forking: K continuations of P prefixes (prompt + the first tokens of a rollout) with one shared
   encoding per prefix, versus encoding every continuation's prefix.
3. KV policies at 25/50/75% budgets: peak KV bytes versus a padded dense cache (what HF's cache holds) and versus
   our own full-cache policy (no padding, finished rows leave the batch), and accuracy on the arithmetic task
   (greedy, ``rewards.accuracy.numeric_accuracy``).

    python benchmarks/rollout.py                                   # everything (about 27 minutes on 2 cores)
    python benchmarks/rollout.py --batches 8 --new-tokens 32 --problems 8 --skip-hf   # a quick look
    python benchmarks/rollout.py --sections profile --batches 32       # where the time goes, ours and HF's
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewards.accuracy import numeric_accuracy  # noqa: E402
from spo.data import make_arithmetic_task, tokenize_prompts  # noqa: E402
from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer  # noqa: E402
from spo.rollout import Generator, SamplingParams  # noqa: E402

COMPRESSED = ["streaming", "h2o", "snapkv", "windowkv", "lazy"]


def arithmetic(tokenizer, n: int, split: str = "test"):
    """(prompt ids, reference answers) of ``n`` built-in arithmetic problems."""
    task = make_arithmetic_task(split, n)
    return tokenize_prompts(tokenizer, task["prompt"]), list(task["answer"])


def hf_generate(model, tokenizer, prompts, new_tokens: int, seed: int) -> tuple[int, float]:
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                             temperature=0.7, top_p=1.0, top_k=0, pad_token_id=pad)
    seconds = time.perf_counter() - started
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id]) | {tokenizer.eos_token_id}
    tokens = 0
    for row in out[:, width:].tolist():
        for t in row:
            tokens += 1
            if t in eos:
                break
    return tokens, seconds


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def throughput(model, tokenizer, args) -> None:
    print(f"\n## Throughput: {args.new_tokens} new tokens, sampling T=0.7 (tokens/s, median of {args.repeats} "
          "interleaved runs)\n")
    print("| dtype | batch | ours tok/s | ours, plain F.linear tok/s | HF generate tok/s | ours / HF |")
    print("|---|---|---|---|---|---|")
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, seed=0)
    rates = {}
    for dtype in args.dtypes:
        typed = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
        packed, plain = Generator(typed, tokenizer), Generator(typed, tokenizer, pack_weights=False)
        for batch in args.batches:
            prompts, _ = arithmetic(tokenizer, batch)
            runs = {"ours": [], "plain": [], "hf": []}
            for repeat in range(args.repeats):
                for name, generator in (("ours", packed), ("plain", plain)):
                    stats = generator.generate(prompts, replace(params, seed=repeat)).stats
                    runs[name].append(stats["tokens_generated"] / stats["seconds"])
                if not args.skip_hf:
                    tokens, seconds = hf_generate(typed, tokenizer, prompts, args.new_tokens, seed=repeat)
                    runs["hf"].append(tokens / seconds)
            for name, values in runs.items():
                if values:
                    rates[(name, dtype, batch)] = _median(values)
            ours, no_pack = rates[("ours", dtype, batch)], rates[("plain", dtype, batch)]
            hf = rates.get(("hf", dtype, batch))
            print(f"| {dtype} | {batch} | {ours:.1f} | {no_pack:.1f} | {'-' if hf is None else f'{hf:.1f}'} | "
                  f"{'-' if hf is None else f'{ours / hf:.2f}x'} |", flush=True)
    if not args.skip_hf and "float32" in args.dtypes:
        for dtype in (d for d in args.dtypes if d != "float32"):
            print(f"\nRollouts in {dtype} (the trainer's `rollout_dtype`) vs HF generate on the float32 model:")
            for batch in args.batches:
                print(f"- batch {batch}: {rates[('ours', dtype, batch)] / rates[('hf', 'float32', batch)]:.2f}x")


def forking(model, tokenizer, args) -> None:
    prompts, _ = arithmetic(tokenizer, args.prefixes)
    generator = Generator(model, tokenizer)
    first = generator.generate(prompts, SamplingParams(max_new_tokens=args.partial, greedy=True))
    states = [(r.prompt_ids, r.completion_ids) for r in first.rollouts]
    params = SamplingParams(max_new_tokens=args.fork_new_tokens, temperature=0.7, seed=1)
    print(f"\n## Prefix forking: {len(states)} prefixes x K={args.forks}, {args.fork_new_tokens} new tokens\n")
    print("| mode | prefill tokens | seconds | rollouts |")
    print("|---|---|---|---|")
    for label, share in (("shared (ours)", True), ("re-encode every prefix", False)):
        stats = generator.continue_from(states, params, k=args.forks, share_prefixes=share).stats
        print(f"| {label} | {stats['prefill_tokens']} | {stats['seconds']:.2f} | {stats['rollouts']} |", flush=True)


def profile(model, tokenizer, args) -> None:
    """Where the time goes: one float32 call of ours and of HF ``generate`` at the first ``--batches`` size, under
    ``torch.profiler``, operators by self CPU time (the profiles quoted in RESULTS.md)."""
    from torch.profiler import ProfilerActivity, profile as profiled

    batch = args.batches[0]
    prompts, _ = arithmetic(tokenizer, batch)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, seed=0)
    generator = Generator(model, tokenizer)
    generator.generate(prompts, params)  # warm-up (weight prepacking)
    calls = {"ours": lambda: generator.generate(prompts, params).stats["tokens_generated"],
             "HF generate": lambda: hf_generate(model, tokenizer, prompts, args.new_tokens, seed=0)[0]}
    for name, call in calls.items():
        if name != "ours" and args.skip_hf:
            continue
        with profiled(activities=[ProfilerActivity.CPU]) as profiler:
            started = time.perf_counter()
            tokens = call()
            seconds = time.perf_counter() - started
        print(f"\n## Profile: {name}, batch {batch}, float32, {tokens} tokens in {seconds:.1f} s under the profiler\n")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def policies(model, tokenizer, args) -> None:
    prompts, answers = arithmetic(tokenizer, args.problems)
    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=True)
    print(f"\n## KV policies: {len(prompts)} arithmetic problems, greedy, {args.new_tokens} new tokens\n")
    print("| policy | budget | budget tokens | peak KV MB | full KV MB | peak / full | peak / our full | accuracy "
          "| tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("full", None)] + [(p, b) for p in args.policies for b in args.budgets]
    ours_full = None  # peak of our own full-cache policy (the first run): no padding, finished rows leave
    for name, budget in runs:
        batch = Generator(model, tokenizer, kv_policy=name, kv_budget=budget).generate(prompts, params)
        stats = batch.stats
        ours_full = ours_full or stats["peak_kv_bytes"]
        accuracy = sum(numeric_accuracy(completions=[r.text for r in batch.rollouts], answer=answers,
                                        truncated=[r.cut_off for r in batch.rollouts])) / len(answers)
        print(f"| {name} | {'-' if budget is None else f'{budget:.0%}'} | {stats['kv_budget_tokens'] or '-'} | "
              f"{stats['peak_kv_bytes'] / 2**20:.1f} | {stats['full_kv_bytes'] / 2**20:.1f} | "
              f"{stats['peak_kv_bytes'] / stats['full_kv_bytes']:.2f} | {stats['peak_kv_bytes'] / ours_full:.2f} | "
              f"{accuracy:.3f} | "
              f"{stats['tokens_per_second']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"],
                        help="model dtypes to time (bfloat16 needs AVX512-BF16 or AMX to be fast on a CPU)")
    parser.add_argument("--skip-hf", action="store_true", help="do not time Hugging Face generate")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs per setting (median kept)")
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--forks", type=int, default=8)
    parser.add_argument("--partial", type=int, default=16, help="tokens of each prefix's partial completion")
    parser.add_argument("--fork-new-tokens", type=int, default=32)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--policies", type=lambda s: s.split(","), default=COMPRESSED)
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--sections", default="throughput,forking,policies",
                        help="comma-separated, of throughput, forking, policies, profile")
    parser.add_argument("--profile-rows", type=int, default=25, help="operators the profile section prints")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(EMBEDDED_MODEL).eval()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    print(f"# spo.rollout on {EMBEDDED_MODEL} (fp32, CPU, {torch.get_num_threads()} threads)")
    sections = {"throughput": throughput, "forking": forking, "policies": policies, "profile": profile}
    for name in args.sections.split(","):
        sections[name](model, tokenizer, args)


if __name__ == "__main__":
    main()
