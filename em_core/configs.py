"""Reading the entry points' dataclass configs (each kept beside its stage's code) from YAML from YAML with CLI/MLproject overrides.

Parsing is TRL's `TrlParser` (an `HfArgumentParser`): `--config file.yaml` sets defaults, CLI
flags override them, unknown keys in either are an error.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from em_core.errors import ConfigError

C = TypeVar("C")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[type | None, bool, bool]]:
    """field -> (scalar type, is a list, accepts None), from the dataclass's type hints."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, optional = hints.get(f.name), False
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            optional = type(None) in args
            rest = [a for a in args if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else None
        is_list = typing.get_origin(tp) in (list, tuple)
        if is_list:
            tp = (typing.get_args(tp) or (None,))[0]
        out[f.name] = (tp if tp in (str, int, float, bool) else None, is_list, optional)
    return out


def _is_kv_list(cls: type, name: str) -> bool:
    """A list of `key=value` step settings (pipeline/grid/sweep train, evaluate, judge): its items
    hold commas of their own and are never split at them."""
    return name in getattr(cls, "KV_FIELDS", ())


def _scalar(tp: type | None, value: Any, where: str) -> Any:
    if tp is None or value is None:
        return value
    text = value.strip() if isinstance(value, str) else None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(text) if text is not None else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(text) if text is not None else float(value)  # YAML reads 1e-4 as a string
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not {'a' if tp is not int else 'an'} {tp.__name__}") from None
    return value


def coerce_value(cls: type, key: str, value: Any, where: str = "") -> Any:
    """`value` (a YAML value or the text after `key=`) as the type of `cls.key`: a list field
    splits a string at commas; a scalar keeps its commas; numbers and booleans are parsed."""
    where = f"{where}: {key}" if where else key
    tp, is_list, optional = _field_types(cls)[key]
    if isinstance(value, str) and optional and value.strip().lower() in _NONE:
        return None
    if is_list:
        if value is None or isinstance(value, Mapping):
            return value  # a YAML mapping of step settings; the config normalises it
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else \
            list(value) if isinstance(value, (list, tuple)) else [value]
        return [_scalar(tp, v, where) for v in items]
    return _scalar(tp, value, where)


def override_items(value: Any, where: str) -> list[str]:
    """Step settings as `key=value` strings, from a YAML mapping (lists comma-joined) or from
    `k=v` text (one string or a list of them, shell-quoted as on a command line)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k, v in value.items() if v is not None]
    items = shlex.split(value) if isinstance(value, str) else [i for v in value for i in shlex.split(str(v))]
    for item in items:
        if "=" not in item.strip("=") or item.startswith("="):
            raise ConfigError(f"{where}: {item!r} is not key=value (e.g. --{where} max_steps=40)")
    return items


def parse_overrides(cls: type, value: Any, where: str = "overrides") -> dict[str, Any]:
    """The one `key=value` parser: items (see override_items) -> {field: value typed as the field}.
    An unknown key is an error naming it."""
    fields = _field_types(cls)
    out: dict[str, Any] = {}
    for item in override_items(value, where):
        key, _, text = item.partition("=")
        key = key.strip().lstrip("-")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        out[key] = coerce_value(cls, key, text, where)
    return out


def _argv_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides_argv(cls: type, value: Any, where: str = "overrides") -> list[str]:
    """`key=value` items as argv for `cls`'s parser: `--key value`, or `--key a b` for a list."""
    out: list[str] = []
    for key, v in parse_overrides(cls, value, where).items():
        if v is None:
            raise ConfigError(f"{where}: {key}: cannot be reset to none from the command line; "
                              "leave it out or set it in the YAML config")
        out += [f"--{key}", *map(_argv_value, v)] if isinstance(v, list) else [f"--{key}", _argv_value(v)]
    return out


def expand_cli(argv: list[str], cls: type | None = None) -> list[str]:
    """Make MLproject-style argv parseable.

    MLproject passes every parameter, so unset optional ones arrive as `--flag ""`: drop them.
    `--overrides "lora_r=8 run_name=a,b"` becomes `--lora_r 8 --run_name a,b` (typed by the field:
    only list fields split at commas). A list field given as one comma-separated value
    (`-P questions=a,b`) becomes `a b`.
    """
    lists = {k for k, (_, is_list, _) in _field_types(cls).items() if is_list and not _is_kv_list(cls, k)} \
        if cls is not None else set()
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--overrides" and nxt is not None:
            if cls is None:
                raise ConfigError("--overrides needs the config class to type its values")
            out += overrides_argv(cls, nxt, "overrides")
            i += 2
        elif a.startswith("--") and nxt == "":
            i += 2
        elif a.startswith("--") and a[2:] in lists and nxt is not None and "," in nxt:
            out += [a, *[v for v in nxt.split(",") if v]]
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Parse `--config FILE` + CLI overrides into `cls`, with errors that name the culprit.

    The YAML goes through the same typing as the command line (coerce_value), so
    `learning_rate: 1e-4` is a float however PyYAML reads it."""
    from trl import TrlParser

    argv = expand_cli(list(argv or []), cls)
    parser = TrlParser(dataclass_types=[cls])
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
        data = read_yaml(cls, path)
        for key, value in (data.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        parser.set_defaults_with_config(**data)
    try:
        (cfg,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except SystemExit as e:  # argparse already printed what is wrong
        raise ConfigError(f"invalid command-line arguments for {cls.__name__} (see above)") from e
    return cfg


def read_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    """A YAML config's fields, checked (unknown keys named with the file) and typed as `cls`'s."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{path}{':' + str(line + 1) if line is not None else ''}: invalid YAML: "
                          f"{getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of {cls.__name__} fields")
    known = {f.name for f in dataclasses.fields(cls)} | {"env"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"valid keys: {', '.join(sorted(known - {'env'}))}")
    if data.get("env") is not None and not isinstance(data["env"], dict):
        raise ConfigError(f"{path}: env must be a mapping of environment variables")
    return {k: v if k == "env" else coerce_value(cls, k, v, str(path)) for k, v in data.items()}


def load_config(cls: type[C], path: str | Path, **overrides) -> C:
    """Programmatic equivalent of `--config path --key value ...`."""
    data = read_yaml(cls, path)
    data.pop("env", None)
    data.update(overrides)
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
