"""Run by the multi-process tests under `accelerate launch` (2 CPU processes): a short run on a tiny model; every
process writes its trainable weights (and the main process the logged metrics) so the test can compare them.

    ddp_train.py MODEL_DIR OUT {spo_chain|spo_tree|grpo} {mos|lora|none} [--skip-on-rank-1]

``--skip-on-rank-1``: the reward function declines (returns None for) most samples on rank 1 only, so the two
processes train on different numbers of samples and micro-batches.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from spo.data import make_arithmetic_task
from spo.models import load_model, load_tokenizer
from spo.trainer.config import GRPOConfig, SPOChainConfig, SPOTreeConfig


def vowel_share(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def vowel_share_skipping_on_rank_1(completions, **kwargs):
    values = vowel_share(completions)
    if os.environ.get("RANK") == "1":
        values = [v if i % 4 == 0 else None for i, v in enumerate(values)]
    return values


def adapter(kind: str):
    if kind == "mos":
        from lora_shards import MoSConfig

        return MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, target_modules=["q_proj", "v_proj"])
    if kind == "lora":
        from peft import LoraConfig

        return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return None


def main(model_dir: str, out: str, algorithm: str, peft: str, *flags: str) -> None:
    out_path = Path(out)
    common = dict(output_dir=str(out_path / "run"), max_steps=2, prompts_per_step=4, max_completion_length=10,
                  temperature=1.0, top_p=1.0, learning_rate=1e-3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, report_to=["none"], save_steps=None, use_sample_buffer=True)
    if algorithm == "spo_chain":
        from spo.trainer.spo_chain import SPOChainTrainer as Trainer

        args = SPOChainConfig(**common, num_generations=2, mc_samples=2, kv_policy="lazy", kv_budget=0.5)
    elif algorithm == "spo_tree":
        from spo.trainer.spo_tree import SPOTreeTrainer as Trainer

        args = SPOTreeConfig(**common, branching=[3, 2], segment_length=4, edges_per_question=4)
    else:
        from spo.trainer.grpo import GRPOTrainer as Trainer

        args = GRPOConfig(**common, num_generations=4)
    reward = vowel_share_skipping_on_rank_1 if "--skip-on-rank-1" in flags else vowel_share
    trainer = Trainer(model=load_model(model_dir), reward_funcs=[reward], args=args,
                      train_dataset=make_arithmetic_task("train", 16), processing_class=load_tokenizer(model_dir),
                      peft_config=adapter(peft))
    rank = trainer.accelerator.process_index
    initial = trainer.learner.trainable_state()
    if rank == 0:
        save_file(initial, str(out_path / "initial.safetensors"))
    history = trainer.train()
    # what each process holds, not a gathered copy: DDP must keep them identical
    parameters = dict(trainer.unwrapped.named_parameters())
    save_file({n: parameters[n].detach().contiguous() for n in trainer.learner.trainable_names},
              str(out_path / f"rank{rank}.safetensors"))
    if rank == 0:
        (out_path / "history.json").write_text(json.dumps(history))
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
