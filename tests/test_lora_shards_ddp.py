"""MoS adapters under accelerate DDP: 2 CPU processes (gloo) take one SGD step on their halves of a batch; the
pools must equal a single-process step on the whole batch, on both ranks, with the sharing intact.

Run as a test (it launches itself, about 10 s): ``pytest tests/test_lora_shards_ddp.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model():
    from peft import get_peft_model

    from lora_shards import MoSConfig, shard_pools
    from spo.models import tiny_model

    model = get_peft_model(tiny_model(seed=0, layers=4), MoSConfig(
        r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pool in shard_pools(model).values():
            pool.B.copy_(torch.randn(pool.B.shape, generator=generator) * 0.1)
    return model


def sgd_step(model, batches, backward) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = sum(model(batch, labels=batch).loss for batch in batches) / len(batches)
    backward(loss)
    optimizer.step()


def worker(out_dir: str) -> None:
    from accelerate import Accelerator

    from lora_shards import mos_layers, shard_pools

    torch.set_flush_denormal(True)
    accelerator = Accelerator(cpu=True)
    batch = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    halves = batch.chunk(2)

    reference = build_model()  # one process, the whole batch
    sgd_step(reference, halves, lambda loss: loss.backward())

    model = build_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    local = halves[accelerator.process_index]
    accelerator.backward(ddp_model(local, labels=local).loss)
    optimizer.step()

    model = accelerator.unwrap_model(ddp_model)
    pools, expected = shard_pools(model), shard_pools(reference)
    max_error = max((pools[k].A - expected[k].A).abs().max().item() for k in pools)
    max_error = max(max_error, *((pools[k].B - expected[k].B).abs().max().item() for k in pools))
    shared = all(layer.mos_shards["default"] is pools[name.rsplit(".", 1)[1]] for name, layer in mos_layers(model))
    checksum = torch.stack([pool.A.sum() + pool.B.sum() for pool in pools.values()]).sum().reshape(1)
    checksums = accelerator.gather(checksum).tolist()
    result = {"max_error": max_error, "shared": shared, "checksums": checksums, "world": accelerator.num_processes,
              "backend": accelerator.state.backend}
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    # Free DDP's reducer, which holds the process group, while both processes are still up and after a barrier:
    # destroyed later (at exit, holding the GIL), gloo's destructor can wait forever for a worker thread that needs
    # the GIL to free the last all-gather's tensor. spo's trainers do the same in RLTrainer.close().
    accelerator.wait_for_everyone()
    del ddp_model, optimizer
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is installed (accelerate
    # 1.15); the multi-process launcher (torchrun) plus Accelerator(cpu=True) in the worker gives 2 CPU ranks on gloo.
    # The launcher of this interpreter (not whichever is first on PATH), on a free port.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", os.path.abspath(__file__), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=env, timeout=300)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2 and result["backend"] == "gloo"
        assert result["shared"]
        assert result["max_error"] < 1e-6
        assert result["checksums"][0] == pytest.approx(result["checksums"][1], abs=0)


if __name__ == "__main__":
    worker(sys.argv[1])
