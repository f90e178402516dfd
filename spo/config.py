"""Configuration: dataclasses filled from YAML recipes and command-line overrides, with type checking.

Unknown keys are rejected with the closest valid name suggested, values are checked against the field's type
(``int``, ``float``, ``str``, ``bool``, ``Optional``, ``Literal``, ``list``, ``dict``, nested dataclasses), and
overrides use dotted paths: ``--train.learning_rate 1e-5`` or ``--num-samples 8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "add_import_paths", "from_dict", "help_rows", "format_help_rows", "load_config",
           "load_yaml", "merge", "parse_overrides", "to_dict"]

T = TypeVar("T")


def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(tp) -> str:
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the type annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where} must not be empty")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where} must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}."
                              f"{_closest(str(value), map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be text, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}.{_closest(str(key), fields)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # the class's own checks (__post_init__) name the field
        raise ConfigError(f"{where}: {error}" if where else str(error)) from error


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def parse_overrides(argv: list[str]) -> dict:
    """``["--a.b", "1", "--flag", "--c=x"]`` -> ``{"a": {"b": 1}, "flag": True, "c": "x"}``. Values are read as
    YAML scalars (numbers, booleans, null, lists ``[1,2]``); dashes in keys become underscores."""
    result: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected an option like --section.key, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        parsed = yaml.safe_load(value) if value != "" else ""
        node = result
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = parsed
        i += 1
    return result


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not a text (UTF-8) YAML file: byte {error.start} is "
                          f"{error.object[error.start]:#04x}") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} is not a text YAML file: it holds NUL bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: give at least one key (see --help)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys at the top level, "
                          f"not a {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """``cls`` from an optional YAML file, then command-line overrides on top."""
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return from_dict(cls, data)


def add_import_paths(*folders: str | Path | None) -> None:
    """Put ``folders`` (a recipe's folder, the working directory) at the end of the import path, so a reward
    ``module:function`` in a file next to the recipe is found as a user expects; installed modules keep priority."""
    for folder in folders:
        if folder is None:
            continue
        entry = str(Path(folder).resolve())
        if entry not in sys.path:
            sys.path.append(entry)


# --- --help from the dataclasses' field(metadata={"help": ...}) (the TRL convention) ----------------------------


def _help_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_help_type(a) for a in args if a is not type(None)]
        return "|".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{_help_type(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, _type_name(tp))


def _help_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_help_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_help_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return "{...}"
    return repr(value) if isinstance(value, float) else str(value)


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def help_rows(cls, prefix: str = "", only=None, defaults_of=None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for each field of dataclass ``cls``: ``prefix`` goes before the key, ``only``
    limits the fields (names), ``defaults_of`` reads defaults from another (sub)class."""
    hints = typing.get_type_hints(cls)
    source = {f.name: f for f in dataclasses.fields(defaults_of or cls)}
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or (only is not None and f.name not in only):
            continue
        default = field_default(source.get(f.name, f))
        rows.append((prefix + f.name, _help_type(hints[f.name]),
                     "required" if default is dataclasses.MISSING else _help_value(default),
                     f.metadata.get("help", "")))
    return rows


def format_help_rows(rows) -> str:
    """Rows as aligned lines: ``  --key  type  default  help``."""
    if not rows:
        return ""
    widths = [min(max(len(row[i]) for row in rows), cap) for i, cap in ((0, 36), (1, 24), (2, 22))]
    return "\n".join(f"  --{key:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {text}".rstrip()
                     for key, kind, default, text in rows)
