"""train.py's flags, generated from the fields of `TrainArgs` (and of any dataclass declared
with `jaxlora.train.settings.setting`): each flag's help, choices and type come from its field,
and its default from the field or from both profiles, shown as ``[demo | lit-llama]``. So a
default, a help text or a list of choices is written once, where the setting is.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from jaxlora.train.settings import DEMO_PROFILE, GROUPS, LIT_LLAMA_RECIPE, TrainArgs

__all__ = ["add_flags", "build_parser", "defaults_shown", "flag_type", "train_args"]


def defaults_shown(name: str, default: Any) -> str:
    """The defaults a flag's help ends with: both profiles' values, or the field's own."""
    if name in DEMO_PROFILE or name in LIT_LLAMA_RECIPE:
        return f" [{_show(DEMO_PROFILE.get(name))} | {_show(LIT_LLAMA_RECIPE.get(name))}]"
    if default is None or isinstance(default, bool):
        return ""
    return f" (default {_show(default)})"


def _show(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_type(cls: type, name: str) -> type:
    """The Python type a flag's text converts to: bool, float, int or str (from the annotation,
    None left out; a field that may be int or float takes float)."""
    hint = typing.get_type_hints(cls)[name]
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else {hint}
    for kind in (bool, float, int):
        if kind in args:
            return kind
    return str


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any]) -> None:
    """One flag per field of `cls` that has help text, into the argument group its field names
    (created in `groups` when new)."""
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help"):
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if meta.get("exclusive"):
            group = exclusive.get(meta["exclusive"]) or exclusive.setdefault(
                meta["exclusive"], group.add_mutually_exclusive_group())
        help_text = meta["help"].replace("%", "%%") + defaults_shown(f.name, f.default)
        kind = flag_type(cls, f.name)
        if meta.get("negated"):
            group.add_argument(f"--{meta['negated']}", dest=f.name, action="store_false", default=None,
                               help=help_text)
        elif kind is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(f"--{f.name}", action=action, default=None, help=help_text)
        else:
            choices = list(meta["choices"]) if meta.get("choices") is not None else None
            group.add_argument(f"--{f.name}", type=kind, choices=choices, default=None, help=help_text)


def build_parser(description: str, epilog: str, *extra: type) -> argparse.ArgumentParser:
    """A parser of every TrainArgs flag, then the flags of each of `extra`'s dataclasses."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for cls in (TrainArgs, *extra):
        add_flags(parser, cls, groups)
    return parser


def train_args(values: dict[str, Any]) -> TrainArgs:
    """TrainArgs from parsed flags (a flag left out keeps the field's default); other keys ignored."""
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in values.items() if k in names and v is not None})
