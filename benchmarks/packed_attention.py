"""The learner's packed attention alone, on the quickstarts' real micro-batches: each blocking of the packed trie
(``packing.tree_attention``: the one it chooses, fixed block sizes, segments) with each kernel (explicit products,
SDPA's flash kernel under the mask), forward and backward, in bf16 and float32.

For each algorithm's quickstart recipe, one training step's samples are generated and grouped into micro-batches as
the learner does; for the first ``--micro-batches`` of them, queries, keys and values of the embedded model's
attention shape (9 query heads, 3 key/value heads, head size 64) are drawn at random and one layer's attention runs
forward and backward (the gathers and the output scatter included), ``--repeats`` times after a warm-up. Prints the
milliseconds per call summed over the micro-batches, and the scores each blocking computes (blocks x queries x
keys). These figures are what ``BLOCK_OVERHEAD_SCORES`` and the kernel choice rest on.

    python benchmarks/packed_attention.py [--algorithms grpo spo_chain spo_tree] [--micro-batches 4]

Time it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from spo.models import setup_cpu_math  # noqa: E402
from spo.trainer import packing, tree_attention  # noqa: E402
from spo.trainer.run import build_trainer, load_recipe  # noqa: E402
from update import RECIPES, one_step_of_samples, reset_accelerate  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
BLOCKINGS = ("chosen", 16, 32, 64, 128, "segments")


def blocked(prompts, completions, blocking) -> packing.PackedBatch:
    if blocking == "segments":  # no fixed-size candidates: the segment blocking alone
        saved, packing.BLOCK_SIZES = packing.BLOCK_SIZES, ()
        try:
            return packing.pack(prompts, completions)
        finally:
            packing.BLOCK_SIZES = saved
    return packing.pack(prompts, completions, attention_block=None if blocking == "chosen" else blocking)


class _Layer(torch.nn.Module):
    layer_idx, num_key_value_groups, is_causal = 0, HEADS // KV_HEADS, True


def milliseconds(batch: packing.PackedBatch, dtype: torch.dtype, kernel: str, repeats: int) -> float:
    n = batch.input_ids.shape[1]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, n, HEAD_DIM, generator=generator).to(dtype).requires_grad_()
    key = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=generator).to(dtype).requires_grad_()
    value = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=generator).to(dtype).requires_grad_()
    limit = tree_attention.SMALL_BLOCKS_MAX_SCORES
    tree_attention.SMALL_BLOCKS_MAX_SCORES = 1 << 62 if kernel == "products" else 0
    try:
        def call():
            packed_pass = tree_attention.PackedPass(batch.attention)
            out, _ = tree_attention.packed_tree_attention(_Layer(), query, key, value, None, scaling=HEAD_DIM ** -0.5,
                                                          packed_tree=packed_pass)
            out.float().square().sum().backward()

        call()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - started) / repeats * 1000
    finally:
        tree_attention.SMALL_BLOCKS_MAX_SCORES = limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    setup_cpu_math()
    print(f"Packed attention, one layer forward + backward, {torch.get_num_threads()} CPU threads; ms per call summed "
          f"over {options.micro_batches} micro-batches")
    print("| algorithm | blocking | scores | bf16 products | bf16 flash | float32 products | float32 flash |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for algorithm in options.algorithms:
        reset_accelerate()
        with tempfile.TemporaryDirectory() as out:
            recipe = load_recipe(ROOT / "recipes" / RECIPES[algorithm],
                                 {"train": {"output_dir": out, "report_to": ["none"], "save_steps": None},
                                  "evaluate_before": False, "evaluate_after": False})
            trainer = build_trainer(recipe)
            batch, _ = one_step_of_samples(trainer)
            micro = [m.batch for m in trainer.learner._micro_batches(batch) if m.rows][:options.micro_batches]
            trainer.close()
        for blocking in BLOCKINGS:
            packed = [blocked(m.prompts, m.completions, blocking) for m in micro]
            scores = sum(p.attention.mask.numel() for p in packed)
            cells = [sum(milliseconds(p, dtype, kernel, options.repeats) for p in packed)
                     for dtype in (torch.bfloat16, torch.float32) for kernel in ("products", "flash")]
            print(f"| {algorithm} | {blocking} | {scores:,} | " + " | ".join(f"{c:.1f}" for c in cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
