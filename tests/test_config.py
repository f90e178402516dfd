from dataclasses import dataclass, field
from typing import Literal

import pytest

from spo.config import ConfigError, from_dict, load_config, parse_overrides


@dataclass
class Inner:
    learning_rate: float = 1e-5
    steps: int = 10
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    budget: float | None = None
    tags: list[str] = field(default_factory=list)
    train: Inner = field(default_factory=Inner)
    verbose: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: run\ntrain:\n  learning_rate: 1e-4\n  steps: 3\n")
    config = load_config(Outer, path, ["--train.steps", "7", "--budget=0.5", "--tags", "[a, b]", "--verbose"])
    assert config == Outer(name="run", budget=0.5, tags=["a", "b"], train=Inner(1e-4, 7, "a"), verbose=True)


def test_dashes_become_underscores():
    assert parse_overrides(["--num-samples", "8"]) == {"num_samples": 8}


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'train.lerning_rate'. Did you mean 'learning_rate'"):
        from_dict(Outer, {"train": {"lerning_rate": 1.0}})


@pytest.mark.parametrize("data,match", [
    ({"train": {"steps": "many"}}, "train.steps must be an integer"),
    ({"train": {"steps": 2.5}}, "train.steps must be an integer"),
    ({"verbose": "yes"}, "verbose must be true or false"),
    ({"train": {"kind": "c"}}, "train.kind must be one of 'a', 'b'"),
    ({"tags": "a"}, "tags must be a list"),
    ({"budget": "lots"}, "budget must be float or None"),
])
def test_wrong_types_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)
