import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from spo.trainer import checkpoint as ckpt
from spo.trainer.tracking import MetricsLog

ROOT = Path(__file__).resolve().parents[1]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def _complete_checkpoint(tmp_path, step=2):
    staging = ckpt.staging_dir(tmp_path, step)
    staging.mkdir()
    model = torch.nn.Linear(2, 2)
    ckpt.write_model_part(staging, model)
    ckpt.write_rank_state(staging, 0, {"torch": torch.get_rng_state()})
    return ckpt.finalize(staging, tmp_path, step, {"step": step}, keep=None), model


def test_checkpoint_is_published_whole(tmp_path):
    final, model = _complete_checkpoint(tmp_path)
    assert final.name == "checkpoint-2" and (final / "COMPLETE").is_file()
    assert not list(tmp_path.glob(".checkpoint-*"))
    other = torch.nn.Linear(2, 2)
    ckpt.load_model_part(final, other)
    assert torch.equal(other.weight, model.weight)
    assert ckpt.load_state(final, "trainer_state.pt") == {"step": 2}


def test_partial_and_incomplete_checkpoints_are_ignored(tmp_path):
    _complete_checkpoint(tmp_path, step=2)
    ckpt.staging_dir(tmp_path, 4).mkdir()  # a kill during the write of step 4
    (tmp_path / "checkpoint-6").mkdir()  # a folder without its COMPLETE marker
    assert ckpt.resolve(tmp_path, "latest").name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve(tmp_path, str(tmp_path / "checkpoint-6"))
    ckpt.clean_partials(tmp_path)
    assert not ckpt.staging_dir(tmp_path, 4).exists()


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        staging = ckpt.staging_dir(tmp_path, step)
        staging.mkdir()
        ckpt.finalize(staging, tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_a_malicious_pickle_in_a_checkpoint_is_not_executed(tmp_path, monkeypatch):
    final, _ = _complete_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    with open(final / "trainer_state.pt", "wb") as handle:
        pickle.dump({"step": _Exploit()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_state(final, "trainer_state.pt")
    assert not marker.exists()


def test_mismatched_weights_are_refused(tmp_path):
    final, _ = _complete_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not match the model"):
        ckpt.load_model_part(final, torch.nn.Linear(2, 3, bias=False))


def test_a_crash_while_replacing_or_deleting_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    _complete_checkpoint(tmp_path, step=1)
    old, _ = _complete_checkpoint(tmp_path, step=2)
    replacement = ckpt.staging_dir(tmp_path, 2)
    replacement.mkdir()
    new_model = torch.nn.Linear(2, 2)
    ckpt.write_model_part(replacement, new_model)
    (replacement / ckpt.MARKER).write_text("2")

    def dies_midway(path, *args, **kwargs):  # the process is killed after deleting one file
        next(Path(path).glob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove(tmp_path / "checkpoint-1")
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish(replacement, tmp_path / "checkpoint-2")
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    model = torch.nn.Linear(2, 2)
    ckpt.load_model_part(tmp_path / "checkpoint-2", model)
    assert torch.equal(model.weight, new_model.weight)  # the replacement, whole
    ckpt.clean_partials(tmp_path)
    assert not list(tmp_path.glob(".*"))


def test_metrics_restart_at_the_resumed_step_without_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.write(step, {"reward": step / 10})
    with open(log.metrics_path, "a") as handle:
        handle.write('{"step": 4, "rew')  # a kill in the middle of a line
    log.truncate_after(2)
    assert log.history() == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}]
    log.write(3, {"reward": 0.5})
    assert [row["step"] for row in log.history()] == [1, 2, 3]
    log.truncate_after(0)  # a run that starts over
    assert log.history() == [] and not list(tmp_path.glob(".*"))


def _defaults(tree):
    """(name, default expression) of every function parameter and annotated class field with a default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = node.args.posonlyargs + node.args.args
            yield from ((a.arg, d) for a, d in zip(positional[::-1], node.args.defaults[::-1]))
            yield from ((a.arg, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            yield node.target.id, _field_default(node.value)


def _field_default(value):
    """The default inside a dataclass field helper (``field(default=X, ...)``, ``_f(X, "help")``), else the value."""
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field", "_f"):
        keywords = {k.arg: k.value for k in value.keywords}
        if "default" in keywords:
            return keywords["default"]
        if value.args:
            return value.args[0]
    return value


def test_loading_never_unpickles_or_runs_remote_code_by_default():
    """Every torch.load in the library passes weights_only=True, and trust_remote_code is never on by default."""
    sources = [p for package in ("spo", "lora_shards", "rewards") for p in sorted((ROOT / package).rglob("*.py"))]
    loads = remote_code_defaults = 0
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.load"):
            loads += 1
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert keywords.get("weights_only") == "True", f"{path}:{call.lineno} torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert ast.unparse(node.value) != "True", f"{path}:{node.value.lineno} passes trust_remote_code=True"
        for name, default in _defaults(tree):
            if name == "trust_remote_code":
                remote_code_defaults += 1
                assert ast.unparse(default) == "False", f"{path}:{default.lineno} trust_remote_code defaults to on"
    assert loads >= 1 and remote_code_defaults >= 3  # checkpoint loading; load_model, load_tokenizer, Recipe


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "trainer_state.pt"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog, damaged):
    for step in (1, 2):
        staging = ckpt.staging_dir(tmp_path, step)
        staging.mkdir()
        ckpt.write_model_part(staging, torch.nn.Linear(2, 3))
        ckpt.write_rank_state(staging, 0, {"rng": torch.get_rng_state()})
        ckpt.finalize(staging, tmp_path, step, {"step": step}, keep=None)
    file = tmp_path / "checkpoint-2" / damaged
    file.write_bytes(file.read_bytes()[:40])  # cut short, as a full disk or a kill during a copy leaves it
    with caplog.at_level("WARNING"):
        assert ckpt.resolve(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert str(file) in caplog.text and "falling back" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=str(file)):
        ckpt.resolve(tmp_path, str(tmp_path / "checkpoint-2"))
