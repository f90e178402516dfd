"""Run by the multi-process test under `accelerate launch --cpu --num_processes 2`: SPO-chain with MoS adapters and
LazyEviction rollouts on a tiny model; every process writes its adapter weights so the test can compare them."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from lora_shards import MoSConfig
from spo.data import make_arithmetic_task
from spo.models import load_model, load_tokenizer
from spo.trainer.checkpoint import trainable_state
from spo.trainer.config import SPOChainConfig
from spo.trainer.spo_chain import SPOChainTrainer


def vowel_share(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def main(model_dir: str, out: str) -> None:
    out_path = Path(out)
    args = SPOChainConfig(output_dir=str(out_path / "run"), max_steps=2, prompts_per_step=4, num_generations=2,
                          max_completion_length=10, temperature=1.0, top_p=1.0, learning_rate=1e-3, mc_samples=2,
                          kv_policy="lazy", kv_budget=0.5, per_device_train_batch_size=4, report_to=["none"],
                          save_steps=None)
    trainer = SPOChainTrainer(model=load_model(model_dir), reward_funcs=[vowel_share], args=args,
                              train_dataset=make_arithmetic_task("train", 16), processing_class=load_tokenizer(model_dir),
                              peft_config=MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1,
                                                    target_modules=["q_proj", "v_proj"]))
    rank = trainer.accelerator.process_index
    if rank == 0:
        save_file(trainable_state(trainer.unwrapped), str(out_path / "initial.safetensors"))
    trainer.train()
    save_file(trainable_state(trainer.unwrapped), str(out_path / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
