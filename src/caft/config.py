"""Command-line options from config dataclasses, with `--config FILE.yaml` (flags override the file).

Each command has one dataclass whose fields carry a `help` text; this module turns it into argparse
options (`--learning-rate` for `learning_rate`) and back, in the spirit of TRL's `TrlParser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from caft.errors import CaftError


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()):
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind, is_list = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(
                flag,
                type=kind,
                nargs="+" if is_list else None,
                default=default,
                help=f"{help_text} (default: {default})",
                metavar=field.name.upper(),
            )


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is a list) of `int`, `str | None`, `list[int] | None`, ..."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str], cls) -> None:
    """If `--config FILE` is in argv, make the file's values the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    path = Path(known.config)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CaftError(f"Cannot read config file {path}: {error}") from error
    if not isinstance(values, dict):
        raise CaftError(f"{path}: expected a mapping of option: value.")
    names = {f.name for f in dataclasses.fields(cls)} | {
        action.dest for action in parser._actions if action.dest not in ("help", "config")
    }
    normalized = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalized) - names)
    if unknown:
        raise CaftError(
            f"{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}."
        )
    parser.set_defaults(**normalized)


def changed_settings(path: str | Path, settings, neutral: tuple[str, ...] = ()) -> str:
    """'key: old -> new, ...' for the settings of a dataclass that differ from those saved in the
    JSON file `path` (ignoring `neutral` keys and keys the file lacks); '' when none differ or
    there is no file. Resumable jobs use it to refuse mixing results made with other settings."""
    from caft.io import read_json

    path = Path(path)
    if not path.is_file():
        return ""
    previous = read_json(path)
    current = dataclasses.asdict(settings)
    changed = sorted(
        key
        for key, value in current.items()
        if key not in neutral and key in previous and previous[key] != value
    )
    return ", ".join(f"{key}: {previous[key]!r} -> {current[key]!r}" for key in changed)
