"""SPO-chain's Monte Carlo cost per step with and without prefix forking, in one run on the embedded model.

With forking each distinct state (prompt + partial response) is encoded once and its KV cache copied to its K
continuations; without, every continuation re-encodes its state. Same seeds, same rollouts, same states.

    python benchmarks/spo_mc.py [--steps 2] [--k 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spo.data import make_arithmetic_task  # noqa: E402
from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer  # noqa: E402
from spo.trainer.config import SPOChainConfig  # noqa: E402
from spo.trainer.spo_chain import SPOChainTrainer  # noqa: E402


def run(share: bool, steps: int, k: int) -> dict:
    from peft import LoraConfig

    with tempfile.TemporaryDirectory() as out:
        args = SPOChainConfig(output_dir=out, max_steps=steps, prompts_per_step=8, num_generations=4,
                              max_completion_length=96, temperature=0.7, top_p=1.0, mc_samples=k,
                              cutpoint_interval=5, max_mc_states_per_step=32, mc_share_prefixes=share,
                              report_to=["none"], save_steps=None,
                              learning_rate=1e-4, per_device_train_batch_size=8, log_completions=False)
        trainer = SPOChainTrainer(model=load_model(EMBEDDED_MODEL), reward_funcs=["arithmetic_accuracy"], args=args,
                                  train_dataset=make_arithmetic_task("train", 64, seed=3),
                                  processing_class=load_tokenizer(EMBEDDED_MODEL),
                                  peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        history = trainer.train()
    keys = ("timing/monte_carlo", "timing/step", "spo/mc_states", "spo/mc_rollouts", "spo/mc_tokens",
            "spo/mc_prefill_tokens")
    return {key: sum(h[key] for h in history) / len(history) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    options = parser.parse_args()
    shared, unshared = run(True, options.steps, options.k), run(False, options.steps, options.k)
    print(f"\nSPO-chain Monte Carlo per step (8 prompts x 4 rollouts, K = {options.k}, interval 5, at most 32 states, "
          f"mean of {options.steps} steps)")
    print(f"{'':<22}{'MC seconds':>12}{'step seconds':>14}{'states':>8}{'continuations':>15}{'prefill tokens':>16}")
    for name, r in (("forked prefixes", shared), ("re-encoded prefixes", unshared)):
        print(f"{name:<22}{r['timing/monte_carlo']:>12.1f}{r['timing/step']:>14.1f}{r['spo/mc_states']:>8.0f}"
              f"{r['spo/mc_rollouts']:>15.0f}{r['spo/mc_prefill_tokens']:>16.0f}")
    print(f"forking saves {unshared['timing/monte_carlo'] / max(shared['timing/monte_carlo'], 1e-9):.2f}x of the "
          f"Monte Carlo time")


if __name__ == "__main__":
    main()
