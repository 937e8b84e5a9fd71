"""Reading the entry points' dataclass configs (each kept beside its stage's code) from YAML from YAML with CLI/MLproject overrides.

Parsing is TRL's `TrlParser` (an `HfArgumentParser`): `--config file.yaml` sets defaults, CLI
flags override them, unknown keys in either are an error.
"""
from __future__ import annotations

import dataclasses
import difflib
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


# --------------------------------------------------------------------------- shared groups
# Fields several step configs share are declared once here and inherited (as TRL's scripts share
# ModelConfig), so a default or help text cannot drift between steps. kw_only: a group's fields
# go after each config's own in the constructor, whatever their defaults.

@dataclasses.dataclass(kw_only=True)
class TrackingGroup:
    """The MLflow experiment a command records into."""

    experiment_name: str = dataclasses.field(default="em-lab", metadata={"help": "MLflow experiment"})


@dataclasses.dataclass(kw_only=True)
class RunGroup(TrackingGroup):
    """The MLflow experiment and run name of one step's run."""

    run_name: str | None = dataclasses.field(default=None, metadata={
        "help": "MLflow run name (default: a descriptive one made from the model and data)"})



def field_names(cls: type) -> list[str]:
    """The settable keys of a config dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def unknown_keys_message(where: str, unknown: list[str] | set[str], valid: list[str] | set[str],
                         what: str = "") -> str | None:
    """One error line for keys not in `valid`: where they are, the valid keys, and for each typo
    the nearest valid key (`did you mean lora_r?`). None when nothing is unknown.

    Shared by the YAML check, the CLI check and the pipeline's per-step overrides, so a typo reads
    the same wherever it was made."""
    unknown = sorted(set(unknown) - set(valid))
    if not unknown:
        return None
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if near:
            hints.append(f"did you mean {near[0]}?" if len(unknown) == 1 else f"{key}: did you mean {near[0]}?")
    head = f"{where}: unknown key(s) {', '.join(unknown)}" + (f" for {what}" if what else "")
    return "; ".join([head, *hints, f"valid keys: {', '.join(sorted(valid))}"])


def check_keys(where: str, keys, cls: type) -> None:
    """Raise ConfigError naming `where` when any of `keys` is not a field of `cls`."""
    msg = unknown_keys_message(where, set(keys), set(field_names(cls)), cls.__name__)
    if msg:
        raise ConfigError(msg)


def _cli_keys(argv: list[str]) -> list[str]:
    """`--key` flags of an (expanded) argv; values never start with `--` in our configs."""
    keys = [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--") and len(a) > 2]
    return [k[3:] if k.startswith("no_") else k for k in keys]  # argparse's --no_<bool field>


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
        import json

        # a nested mapping (e.g. a train section's `mitigation:` block) travels as its JSON
        return [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else json.dumps(v) if isinstance(v, Mapping) else v}"
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
            raise ConfigError(unknown_keys_message(where, {key}, set(fields), cls.__name__))
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


def parse_config(cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Parse `--config FILE` + CLI overrides into `cls`, with errors that name the culprit.

    The YAML goes through the same typing as the command line (coerce_value), so
    `learning_rate: 1e-4` is a float however PyYAML reads it. `prog` (e.g. `em pipeline`) is what
    `--help` shows as the command."""
    from trl import TrlParser

    argv = expand_cli(list(argv or []), cls)
    parser = TrlParser(dataclass_types=[cls], prog=prog)
    if "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
        data = read_yaml(cls, path)
        for key, value in (data.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        parser.set_defaults_with_config(**data)
    helping = "-h" in argv or "--help" in argv
    if helping:  # declared only so --help lists it
        parser.add_argument("--config", metavar="FILE", help="YAML file of these settings; flags override it")
    else:
        check_keys("command line", _cli_keys(argv), cls)
    try:
        (cfg,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except SystemExit as e:  # argparse already printed what is wrong (or the help, exit 0)
        if not e.code:
            raise
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
    check_keys(str(path), set(data) - {"env"}, cls)
    nested = getattr(cls, "check_sections", None)
    if nested is not None:  # e.g. a pipeline's `train:`/`evaluate:`/`judge:` mappings
        nested(str(path), data)
    for f in dataclasses.fields(cls):  # named with the line, before coercion turns it into a bare type error
        if f.name in data and not _fits(data[f.name], _type_name(f.type)):
            line = _key_line(p, f.name)
            raise ConfigError(f"{path}{':' + str(line) if line else ''}: {f.name}: expected {_type_name(f.type)}, "
                              f"got {data[f.name]!r}; fix the value in the file")
    if data.get("env") is not None and not isinstance(data["env"], dict):
        raise ConfigError(f"{path}: env must be a mapping of environment variables")
    return {k: v if k == "env" else coerce_value(cls, k, v, str(path)) for k, v in data.items()}


def _type_name(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def _fits(value, type_name: str) -> bool:
    """Whether a YAML value can become a field of this (annotation-string) type, the way the
    command line would coerce it. Types it does not know are let through."""
    options = [o.strip() for o in type_name.split("|")]
    if value is None:  # `key:` left empty: the parser takes it as "unset"; the config's own checks judge it
        return True
    return any(_fits_one(value, o) for o in options if o != "None")


def _fits_one(value, t: str) -> bool:
    if isinstance(value, dict):  # e.g. a pipeline's per-stage settings; their own config checks them
        return t not in ("int", "float", "bool")
    if t.startswith("list[") and t.endswith("]"):
        items = value if isinstance(value, list) else [value]
        return all(_fits_one(v, t[5:-1]) for v in items)
    if isinstance(value, list):
        return t not in ("int", "float", "bool", "str")
    if t in ("int", "float"):
        if isinstance(value, bool):
            return False
        try:
            (int if t == "int" and not isinstance(value, float) else float)(value)
        except (TypeError, ValueError):
            return False
        return t == "float" or not isinstance(value, float) or value.is_integer()
    if t == "bool":
        return isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0")
    return True  # str and anything else: argparse takes it as given


def _key_line(path: Path, key: str) -> int | None:
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    for k, _ in getattr(node, "value", []):
        if getattr(k, "value", None) == key:
            return k.start_mark.line + 1
    return None


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
