"""Atomic checkpoints: written into a temporary folder, then renamed, so a kill at any moment leaves either the
previous complete checkpoint or the new complete one, never a half-written one.

Layout of ``checkpoint-<step>/``: ``trainable.safetensors`` (the trainable parameters: adapter pools or full
weights), ``trainer_state.pt`` (optimizer, scheduler, buffer, data position, step; plain tensors and numbers,
loaded with ``weights_only=True``), ``rng_state_<rank>.pt`` per process, and ``COMPLETE``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


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


def write_model_part(staging: Path, model) -> None:
    save_file(trainable_state(model), str(staging / "trainable.safetensors"))


def write_rng(staging: Path, rank: int, state: dict) -> None:
    torch.save(state, staging / f"rng_state_{rank}.pt")


def finalize(staging: Path, output_dir: Path, step: int, trainer_state: dict, keep: int | None) -> Path:
    """Write the trainer state, flush everything to disk, and publish the folder under its final name."""
    torch.save(trainer_state, staging / "trainer_state.pt")
    (staging / MARKER).write_text(str(step))
    for file in staging.iterdir():
        _fsync_file(file)
    _fsync_dir(staging)
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(output_dir)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def resolve(output_dir: Path, which: str) -> Path | None:
    """``"latest"`` -> newest complete checkpoint in ``output_dir`` (None if there is none), else a folder."""
    if which == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(which)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} file)")
    return path


def load_model_part(path: Path, model) -> None:
    state = load_file(str(path / "trainable.safetensors"))
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
    """Remove staging folders a killed run left behind."""
    for partial in output_dir.glob(".checkpoint-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
