"""The accelerate set-up: one ``Accelerator`` for GPUs or CPUs, whatever the launcher config says.

accelerate starts several CPU processes only under its ``MULTI_GPU`` launcher type, and ``Accelerator(cpu=True)``
then gives plain data parallelism: it silently drops an FSDP config. On a machine without a GPU the FSDP plugin
the launcher asked for (its ``FSDP_*`` environment) is put back, so FSDP2 runs on CPU processes over gloo, as the
tests do. DeepSpeed runs on CPU processes through its CPU accelerator over gloo.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def use_cpu() -> bool:
    """Train on the CPU when there is no accelerator (also under ``accelerate launch --multi_gpu``, which is how
    accelerate starts several CPU processes without MPI)."""
    return not torch.cuda.is_available()


def launcher_wants_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def launcher_wants_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def make_accelerator(**kwargs):
    """``Accelerator(**kwargs)`` on the GPU when there is one, else on CPU processes (gloo), keeping FSDP."""
    from accelerate import Accelerator

    allow_precision_change(kwargs.get("mixed_precision"))

    if not use_cpu():
        return Accelerator(**kwargs)
    if launcher_wants_deepspeed():
        # DeepSpeed's CPU accelerator over gloo; cpu=True would switch DeepSpeed off, and without a backend named
        # accelerate would see one process while torch.distributed sees several
        from accelerate.utils import InitProcessGroupKwargs

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
        warn_if_gpu_launch_on_cpu(accelerator)
        return accelerator
    accelerator = Accelerator(cpu=True, **kwargs)
    if launcher_wants_fsdp() and accelerator.num_processes > 1:
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        state = AcceleratorState()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    warn_if_gpu_launch_on_cpu(accelerator)
    return accelerator


def allow_precision_change(mixed_precision: str | None) -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; in a single-process
    session (a notebook, a benchmark) a second trainer may ask for another, so the state is started afresh."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if state and state.get("_mixed_precision") != mixed_precision and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def warn_if_gpu_launch_on_cpu(accelerator) -> None:
    """A GPU launcher config started on a machine without a GPU: say what it costs before anything runs."""
    if accelerator.num_processes > 2 and accelerator.is_main_process:
        logger.warning("no GPU found: %d CPU processes share this machine's %d cores, each with its own copy of "
                       "the model; expect each step to take far longer than on GPUs (recipes/accelerate/"
                       "cpu_2proc.yaml is the CPU setting)", accelerator.num_processes, os.cpu_count() or 1)


def distributed_state():
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())
