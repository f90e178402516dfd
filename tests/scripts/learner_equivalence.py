"""The Learner on one process or under `accelerate launch` (DDP or FSDP2 on CPU processes): the same global batch
of samples, split over the processes, must train the same weights. Then the learner's checkpoint state (weights,
optimizer, scheduler) is loaded into a fresh learner, and one more update must give identical weights.

    learner_equivalence.py OUT {none|lora|mos}

Writes ``OUT/world<N>.safetensors`` (the trained weights, gathered) and ``OUT/world<N>.json`` from the main process.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spo.models import tiny_model  # noqa: E402
from spo.trainer.config import GRPOConfig  # noqa: E402
from spo.trainer.distributed import make_accelerator  # noqa: E402
from spo.trainer.learner import Learner  # noqa: E402
from spo.trainer.samples import train_batch  # noqa: E402
from test_learner import make_samples  # noqa: E402

GLOBAL_BATCH = 12


def build(peft: str):
    model = tiny_model(seed=0, layers=2)
    torch.manual_seed(1234)  # adapter initialisation draws from the global generator
    if peft == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    elif peft == "mos":
        import lora_shards  # noqa: F401
        from lora_shards import MoSConfig, shard_pools
        from peft import get_peft_model

        model = get_peft_model(model, MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1,
                                                target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for pool in shard_pools(model).values():
                pool.B.normal_(0, 0.1)
    return model


def main(out: str, peft: str) -> None:
    accelerator = make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    args = GRPOConfig(output_dir=str(Path(out) / "run"), per_device_train_batch_size=GLOBAL_BATCH // (2 * world),
                      gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.0,
                      lr_scheduler_type="constant", importance_sampling_sequence_band=None,  # random behaviour
                      beta=float(os.environ.get("EQ_BETA", 0.1 if peft != "none" else 0.0)), max_steps=10)
    samples = make_samples(count=GLOBAL_BATCH)
    local = samples[rank::world]

    def learner():
        return Learner(accelerator, build(peft), args, pad_token_id=0, uses_adapters=peft != "none")

    first = learner()
    for step in range(2):
        metrics = first.update(train_batch(local, args), step)
        first.scheduler.step()
    trained = first.trainable_state()
    state = {"trainable": trained, "optimizer": first.optimizer_state(), "scheduler": first.scheduler.state_dict()}
    # a fresh learner, as after a resume: every process loads the whole state (as each reads the checkpoint files)
    state = accelerator.gather_for_metrics([state], use_gather_object=True)[0] if world > 1 else copy.deepcopy(state)
    second = learner()
    second.load_trainable_state(state["trainable"], "the first learner")
    second.load_optimizer_state(state["optimizer"])
    second.scheduler.load_state_dict(state["scheduler"])
    for one in (first, second):
        one.update(train_batch(local, args), 2)
    after_first, after_second = first.trainable_state(), second.trainable_state()
    if accelerator.is_main_process:
        save_file(trained, str(Path(out) / f"world{world}.safetensors"))
        resume_error = max((after_first[n] - after_second[n]).abs().max().item() for n in after_first)
        moved = max((after_first[n] - trained[n]).abs().max().item() for n in after_first)
        report = {"world": world, "distributed_type": str(accelerator.distributed_type), "loss": metrics["loss"],
                  "grad_norm": metrics.get("grad_norm"), "resume_error": resume_error, "third_update_moved": moved,
                  "names": sorted(trained)}
        (Path(out) / f"world{world}.json").write_text(json.dumps(report))
    first.release_wrapper()
    second.release_wrapper()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:3])
