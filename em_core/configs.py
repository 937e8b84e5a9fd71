"""Reading the entry points' dataclass configs (each kept beside its stage's code) from YAML from YAML with CLI/MLproject overrides.

Parsing is TRL's `TrlParser` (an `HfArgumentParser`): `--config file.yaml` sets defaults, CLI
flags override them, unknown keys in either are an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import shlex
from pathlib import Path
from typing import TypeVar

import yaml

from em_core.errors import ConfigError

C = TypeVar("C")


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


def _list_fields(cls: type | None) -> set[str]:
    if cls is None:
        return set()
    return {f.name for f in dataclasses.fields(cls) if "list[" in str(f.type)}


def expand_cli(argv: list[str], cls: type | None = None) -> list[str]:
    """Make MLproject-style argv parseable.

    MLproject passes every parameter, so unset optional ones arrive as `--flag ""`: drop them.
    `--overrides "lora_r=8 learning_rate=1e-4"` becomes `--lora_r 8 --learning_rate 1e-4`.
    A list field given as one comma-separated value (`-P questions=a,b`) becomes `a b`.
    """
    lists = _list_fields(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--overrides" and nxt is not None:
            for item in shlex.split(nxt):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(f"overrides: {item!r} is not key=value")
                out += [f"--{key.lstrip('-')}", *value.split(",")] if "," in value else [f"--{key.lstrip('-')}", value]
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
    `prog` (e.g. `em pipeline`) is what `--help` shows as the command."""
    from trl import TrlParser

    argv = expand_cli(list(argv or []), cls)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        _check_yaml(cls, path)
    helping = "-h" in argv or "--help" in argv
    if not helping:
        check_keys("command line", [k for k in _cli_keys(argv) if k != "config"], cls)
    parser = TrlParser(dataclass_types=[cls], prog=prog)
    if helping:  # TrlParser takes --config out of argv itself; declared only so --help lists it
        parser.add_argument("--config", metavar="FILE", help="YAML file of these settings; flags override it")
    try:
        (cfg,) = parser.parse_args_and_config(argv)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except SystemExit as e:  # argparse already printed what is wrong (or the help, exit 0)
        if not e.code:
            raise
        raise ConfigError(f"invalid command-line arguments for {cls.__name__} (see above)") from e
    return cfg


def _check_yaml(cls: type, path: str) -> None:
    """Unknown or mistyped keys are named with the file, before argparse sees them."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{path}{':' + str(line + 1) if line is not None else ''}: invalid YAML: "
                          f"{getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of {cls.__name__} fields")
    check_keys(path, set(data) - {"env"}, cls)
    nested = getattr(cls, "check_sections", None)
    if nested is not None:  # e.g. a pipeline's `train:`/`evaluate:`/`judge:` mappings
        nested(path, data)


def load_config(cls: type[C], path: str | Path, **overrides) -> C:
    """Programmatic equivalent of `--config path --key value ...`."""
    _check_yaml(cls, str(path))
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.pop("env", None)
    data.update(overrides)
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
