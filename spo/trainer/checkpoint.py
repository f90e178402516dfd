"""Atomic checkpoints: written into a hidden staging folder, then renamed, so a kill at any moment leaves either
the previous complete checkpoint or the new complete one, never a half-written one.

Layout of ``checkpoint-<step>/``: ``trainable.safetensors`` (the trainable parameters: adapter pools or full
weights), ``trainer_state.pt`` (optimizer, scheduler, data position, step; plain tensors and numbers,
loaded with ``weights_only=True``), ``rank_state_<rank>.pt`` per process (random-number generators, sample buffer,
replay), and ``COMPLETE``.

A visible ``checkpoint-<step>`` folder only ever appears or disappears by one rename: a new one is published from
``.checkpoint-<step>.partial``, one it replaces or one rotation deletes is first renamed to a hidden name and only
then removed. Hidden leftovers of a killed run (``.checkpoint-*``) are cleaned up on resuming and by the next save.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"
OPTIMIZER_COPIES = 3  # a checkpoint holds the trainable weights and Adam's two moments
LOG_HEADROOM = 64 * 2**20  # metrics, completions, plots and tracker files besides the checkpoints


class CheckpointError(OSError):
    """A checkpoint (or the final model) could not be written; the message names the folder and the cause."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".checkpoint-{step}.partial"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; a parameter shared by several modules (MoS pools) appears once."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def write_trainable(staging: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(staging / "trainable.safetensors"))


def write_model_part(staging: Path, model) -> None:
    write_trainable(staging, trainable_state(model))


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "trainable.safetensors"))


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank}.pt"


def write_rank_state(staging: Path, rank: int, state: dict) -> None:
    torch.save(state, staging / rank_state_name(rank))


# --- disk space ------------------------------------------------------------------------------------------------


def estimate_checkpoint_bytes(model) -> int:
    """Rough size of one checkpoint: the trainable parameters plus Adam's two moments (same dtype), plus 1 MiB of
    trainer state and random-number states."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return OPTIMIZER_COPIES * trainable + 2**20


def check_free_space(output_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training, not at the first checkpoint, when ``output_dir`` cannot hold a checkpoint."""
    needed = checkpoint_bytes + LOG_HEADROOM
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"output_dir {output_dir} has {free:,} bytes free, but training needs about "
                                    f"{needed:,} (a checkpoint of about {checkpoint_bytes:,} bytes: trainable "
                                    f"parameters and optimizer state, plus {LOG_HEADROOM:,} for logs); free some "
                                    "space or choose another output_dir")


@contextlib.contextmanager
def removed_on_failure(staging: Path, what: str):
    """Run the writes of ``what`` into ``staging``; if one fails (a full disk, a quota, an I/O error), remove the
    staging folder, leave every published folder as it was, and raise a ``CheckpointError`` naming the cause."""
    try:
        yield
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        code = getattr(error, "errno", None) or errno.EIO
        try:
            free = f"{shutil.disk_usage(staging.parent).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise CheckpointError(code, f"could not write {what} in {staging.parent} ({free}): "
                                    f"{type(error).__name__}: {error}. The partial folder was removed; "
                                    f"{_intact(staging.parent)}") from error


def _intact(output_dir: Path) -> str:
    latest = list_checkpoints(output_dir)
    if not latest:
        return "there is no earlier complete checkpoint"
    return f"the last complete checkpoint, {latest[-1]}, is intact"


# --- publishing and removing folders ---------------------------------------------------------------------------


def publish(staging: Path, final: Path) -> None:
    """Flush the complete folder ``staging`` to disk and make it visible as ``final`` in one rename. An existing
    ``final`` is first renamed to a hidden name and deleted afterwards, so ``final`` is at every moment the old
    complete folder, absent, or the new complete folder."""
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync_file(file)
    _fsync_dir(staging)
    aside = final.with_name(f".{final.name}.replaced")
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete a folder so that it disappears at once: renamed to a hidden name, then deleted."""
    hidden = path.with_name(f".{path.name}.removed")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def finalize(staging: Path, output_dir: Path, step: int, trainer_state: dict, keep: int | None) -> Path:
    """Write the trainer state, flush everything to disk, and publish the folder under its final name."""
    torch.save(trainer_state, staging / "trainer_state.pt")
    (staging / MARKER).write_text(str(step))
    final = output_dir / f"checkpoint-{step}"
    publish(staging, final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            remove(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def resolve(output_dir: Path, which: str) -> Path | None:
    """``"latest"`` -> the newest intact checkpoint in ``output_dir`` (None if there is none; a damaged newer one is
    skipped with a warning naming the file), else that folder, which must be intact."""
    if which == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problem = damage(path)
            if problem is None:
                return path
            logger.warning("%s; falling back to the previous checkpoint", problem)
        return None
    path = Path(which)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} file)")
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(errno.EIO, problem)
    return path


def damage(path: Path) -> str | None:
    """What makes a checkpoint unreadable (a truncated or corrupt file, named), or None when it is intact."""
    from safetensors import safe_open

    names = ["trainable.safetensors", "trainer_state.pt"] + sorted(p.name for p in path.glob("rank_state_*.pt"))
    for name in names:
        file = path / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), "pt"):
                    pass
            else:
                load_state(path, name)
        except Exception as error:  # noqa: BLE001 (any failure to read means the file is damaged)
            return f"checkpoint file {file} is damaged or missing ({type(error).__name__}: {error})"
    return None


def load_model_part(path: Path, model) -> None:
    state = read_trainable(path)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def load_state(path: Path, name: str) -> dict:
    return torch.load(path / name, map_location="cpu", weights_only=True)


def clean_partials(output_dir: Path) -> None:
    """Remove what a killed run left hidden: staging folders and checkpoints it was replacing or deleting."""
    for partial in output_dir.glob(".checkpoint-*"):
        shutil.rmtree(partial, ignore_errors=True)
