"""Command lines built from config dataclasses: one ``--flag`` per field.

Every CLI here (`agents.collect`, `agents.ope`, `agents.evaluate`, `agents.sb3_ppo`, `agents.tokenize`)
maps its flags 1:1 onto the fields of a frozen dataclass (its ``Args``, plus e.g. ``CompareConfig``,
plus ``WorldConfig`` as ``--world.*`` overrides of a preset). The dataclass is the one place that
holds a setting's name, type, default, validation (``__post_init__``) and help text (the docstring
under the field), and a run's ``config.json`` is just ``dataclasses.asdict(args)``. This module turns
such a dataclass into argparse flags and the parsed namespace back into field values, so each CLI
does not carry its own copy of that loop (and its own drift: missing help, bools, tuples, nesting).

Mapping: field ``num_envs`` -> ``--num-envs``; bools -> ``--x`` / ``--no-x``; tuples and lists ->
``nargs="+"`` of the element type; ``X | None`` -> type X; nested dataclasses recurse with a dotted
prefix (``--world.reward.gmv``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Sequence

from gpr_sim.world import WorldConfig, preset

WORLD_PREFIX = "world."
"""Prefix of the ``WorldConfig`` override flags (``--world.num-ads 1000``)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (the CLI help text)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: object) -> object:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", overrides_only: bool = False) -> None:
    """Add one ``--{prefix}{field-name}`` flag per field of dataclass ``cls`` (nested dataclasses recurse).

    With ``overrides_only`` every default is None, so the parsed namespace holds only what was given.
    """
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp, f"{prefix}{f.name}.", overrides_only)
            continue
        if overrides_only:
            default = None
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"dest": f"{prefix}{f.name}", "default": default, "help": docs.get(f.name, "").replace("%", "%%")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        else:
            kw["type"] = tp
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", **kw)


def read_flags(ns: argparse.Namespace, cls: type, prefix: str = "", skip_none: bool = False) -> dict:
    """Field values of ``cls`` from a namespace filled by `add_flags` (nested dataclasses as dicts)."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = read_flags(ns, tp, f"{prefix}{f.name}.", skip_none)
            if sub or not skip_none:
                out[f.name] = sub
            continue
        value = getattr(ns, f"{prefix}{f.name}")
        if value is None and skip_none:
            continue
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def make_parser(*classes: type, description: str | None = None, world: bool = False) -> argparse.ArgumentParser:
    """A parser with the flags of every dataclass in ``classes`` (their field names must not clash).

    With ``world`` it also has a ``--world.*`` flag per `WorldConfig` field, default None (only the
    overrides given; read them with `world_overrides`).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        add_flags(parser, cls)
    if world:
        add_flags(parser, WorldConfig, prefix=WORLD_PREFIX, overrides_only=True)
    return parser


def world_overrides(ns: argparse.Namespace) -> dict:
    """The ``--world.*`` flags that were given, as `WorldConfig` field values (``reward`` as a dict)."""
    return read_flags(ns, WorldConfig, WORLD_PREFIX, skip_none=True)


T = typing.TypeVar("T")


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``cls`` (a dataclass) from the command line: one flag per field."""
    ns = make_parser(cls, description=description).parse_args(argv)
    return cls(**read_flags(ns, cls))


def parse_args_with_world(
    cls: type[T], argv: Sequence[str] | None = None, description: str | None = None
) -> tuple[T, dict]:
    """Like `parse_args`, plus the ``--world.*`` overrides given (`world_overrides`; apply with `world_config`)."""
    ns = make_parser(cls, description=description, world=True).parse_args(argv)
    return cls(**read_flags(ns, cls)), world_overrides(ns)


def world_config(preset_name: str, overrides: dict) -> WorldConfig:
    """A preset with ``--world.*`` overrides applied (nested ``reward`` overrides merge into the preset's)."""
    cfg = preset(preset_name)
    overrides = dict(overrides)
    if "reward" in overrides:
        overrides["reward"] = dataclasses.replace(cfg.reward, **overrides["reward"])
    return cfg.replace(**overrides) if overrides else cfg
