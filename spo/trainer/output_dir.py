"""The output folder of a run: writable, used by one run at a time, and never silently mixed with an earlier run.

A second run started on a folder in use fails at once, naming the first run's process id (an exclusive ``flock``
on ``.lock``, held until the process ends and released by the kernel however it ends). A folder that already holds a run
(checkpoints, metrics, a saved model) is continued only with ``--resume``, cleared only with
``overwrite_output_dir``, and otherwise refused: re-running into it would cut its metrics, rotate away the new
checkpoints (the old ones have higher step numbers) and overwrite its model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from . import checkpoint as ckpt

LOCK = ".lock"
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "summary.json", "learning_curve.png", "adapter", "model")


class OutputDirInUse(ConfigError):
    """Another run holds the output folder."""


def check_writable(output_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when the output folder is unusable."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir) as probe:  # unnamed: nothing is left if we are killed
            probe.write(b"0" * 4096)
            probe.flush()
    except OSError as error:
        raise OSError(f"output_dir {output_dir} is not writable: {error}") from error


_HELD: dict[Path, object] = {}  # output folders this process holds, with their open lock files


def lock(output_dir: Path) -> None:
    """Hold ``output_dir`` for this process until it ends. Raises ``OutputDirInUse`` naming the holder's process id
    when another process holds it. A process may start several trainers on one folder (a notebook re-running a
    cell, a test resuming in-process): the lock is the process's, not a trainer's."""
    key = output_dir.resolve()
    if key in _HELD:
        return
    handle = open(output_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirInUse(f"output_dir {output_dir} is in use by another run (pid {holder}); wait for it to end "
                             "or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[key] = handle


def previous_run(output_dir: Path) -> list[str]:
    """What an earlier run left in ``output_dir``: checkpoint folders and run files, by name."""
    found = [p.name for p in ckpt.list_checkpoints(output_dir)]
    return found + [name for name in RUN_FILES if (output_dir / name).exists()]


def check_previous_run(output_dir: Path, resume: bool, overwrite: bool, main: bool) -> None:
    """Refuse to start a new run over an earlier one, unless resuming it or told to overwrite it (then the main
    process removes the earlier run's checkpoints and files)."""
    found = previous_run(output_dir)
    if not found or resume:
        return
    if not overwrite:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"output_dir {output_dir} already holds a run ({listed}): continue it with --resume, start "
                          "over with --train.overwrite_output_dir true, or choose another output_dir")
    if main:
        for name in found:
            path = output_dir / name
            if name.startswith("checkpoint-"):
                ckpt.remove(path)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
