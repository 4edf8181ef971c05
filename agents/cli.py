"""Command lines built from config dataclasses (``tyro``), and one way every CLI reports a user error.

Every CLI here (`agents.hepo`, `agents.pretrain`, `agents.collect`, `agents.evaluate`, `agents.ope`,
`agents.ablation`, `agents.sweep`, `agents.sb3_ppo`, `agents.tokenize`) maps its flags 1:1 onto the fields of a frozen
dataclass (its ``Args``, plus e.g. ``CompareConfig``, plus ``WorldConfig`` as ``--world.*`` overrides of a
preset). The dataclass is the one place that holds a setting's name, type, default, validation
(``__post_init__``) and help text (the docstring under the field, which tyro reads), and a run's
``config.json`` is just ``dataclasses.asdict(args)``.

Flags (tyro's defaults, the spellings the docs use): field ``num_envs`` -> ``--num-envs 4`` (``--num_envs``
and ``--num-envs=4`` work too); bools -> ``--x`` / ``--no-x``; tuples -> space-separated values
(``--sweep-temperatures 0.1 0.3``; tyro also takes zero values, which argparse's ``nargs="+"`` refused, and
the field's validation decides); nested dataclasses -> dotted flags (``--loss.value-coef 0.1``, a nested
bool ``--loss.no-process-rewards``; the argparse-era spelling ``--no-loss.process-rewards`` is rewritten to
it before parsing, as tyro puts the ``no-`` after the last dot and has no option for the other order).

World overrides: ``--world.num-ads 1000`` / ``--world.reward.gmv 0.1`` change only those fields of the
preset named by ``--preset``. tyro fills the ``--world.*`` flags from a default instance, so ``--preset`` is
read first (`given_value`, the last one given, as the parser itself does) and that preset is the default
instance: the flags not given keep the preset's values, and ``--help`` shows the preset's values.

Errors: `run_main` wraps every ``__main__``: a user error (a ``ValueError`` from validation, a missing or
unwritable file, an unparsable command line) prints one line ``error: <message>`` naming the flag or the
file and exits 2; ``--debug`` shows the traceback instead; other exceptions (bugs) keep their traceback.
tyro prints parse failures as multi-line boxes; to get one line, `parse_configs` turns them into
`UsageError` (a ``ValueError``: `parse_args` called from code raises it where argparse exited; ``--help``
still exits 0) through tyro's parse-error hook (``tyro._errors.on_parse_error``: a private, documented hook
of tyro >= 1.0.17). Without the hook (a tyro that dropped it) tyro's own box is printed, still exit 2.
The CLIs that keep plain argparse (`agents.plots`, the benchmarks) get the same one line: within
`run_main`, ``argparse.ArgumentParser.error`` raises `UsageError` instead of printing the usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import tyro

from gpr_sim.world import WorldConfig, preset

T = TypeVar("T")

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
"""exceptions `run_main` reports as one line (exit 2): bad input, not a bug (`UsageError` is a ValueError)"""


class UsageError(ValueError):
    """A command line that cannot be parsed (unknown flag, missing value, value of the wrong type)."""


# ----------------------------------------------------------------------------- parsing


def given_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` / ``flag=VALUE`` in ``argv`` (None if absent)."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1 :]
    return value


def _tyro_spelling(token: str) -> str:
    """``--no-loss.process-rewards`` -> ``--loss.no-process-rewards`` (tyro's nested negation)."""
    if token.startswith("--no-") and "." in token and "=" not in token:
        left, _, right = token[len("--no-") :].rpartition(".")
        return f"--{left}.no-{right}"
    return token


def _flag(argument: Any) -> str:
    """The flag spelling(s) of a tyro argument (``--num-envs``)."""
    return "/".join(getattr(getattr(argument, "lowered", None), "name_or_flags", None) or ["?"])


def _raise_usage_error(event: Any) -> NoReturn:
    """tyro parse-error hook: one line instead of tyro's box (event types of ``tyro._errors``)."""
    kind = type(event).__name__
    if kind == "InstantiationFailure":
        arg = event.argument
        raise UsageError(event.message if arg is None else f"{_flag(arg)}: {event.message}")
    if kind == "UnrecognizedArgs":
        raise UsageError(f"unrecognized arguments: {' '.join(event.tokens)}")
    if kind == "BadValue":
        if event.reason == "fixed":
            raise UsageError(f"{_flag(event.argument)} cannot be set")
        raise UsageError(f"{_flag(event.argument)}: expected a value")
    if kind == "InvalidChoice":
        raise UsageError(
            f"{_flag(event.argument)}: invalid choice {event.value!r}: expected one of {event.choices}"
        )
    if kind == "MissingArgs":
        raise UsageError(
            "missing required flags: " + ", ".join(_flag(a.arg) for a in event.missing_arguments)
        )
    raise UsageError(f"invalid command line ({kind})")


def _one_line_errors() -> contextlib.AbstractContextManager:
    try:
        from tyro import _errors
    except ImportError:  # a tyro without the hook: its own (multi-line) report, still exit 2
        return contextlib.nullcontext()
    return _errors.on_parse_error(_raise_usage_error)


def _prog(cls: type, entry: str | None = None) -> str | None:
    """``python -m agents.hepo`` for the usage line: ``entry`` (the entry point's module, for a config class that
    lives in the library: ``agents.rl.config.RLConfig``), else the module of ``cls``, also when run as
    ``__main__``."""
    module = entry or cls.__module__
    if module == "__main__":
        module = getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", None)
    return f"python -m {module}" if module else None


def _bundle(classes: Sequence[type], world: WorldConfig | None) -> type:
    """One dataclass holding ``classes`` with unprefixed flags, plus ``world`` under ``--world.*``."""
    spec: list[Any] = [
        (f"config{i}", Annotated[cls, tyro.conf.arg(name="")]) for i, cls in enumerate(classes)
    ]
    if world is not None:
        spec.append(("world", WorldConfig, dataclasses.field(default=world)))
    return dataclasses.make_dataclass("CommandLine", spec, frozen=True)


def _diff(cfg: Any, base: Any) -> dict:
    """The fields of dataclass ``cfg`` that differ from ``base`` (nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value, ref = getattr(cfg, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(value):
            sub = _diff(value, ref)
            if sub:
                out[f.name] = sub
        elif value != ref:
            out[f.name] = value
    return out


def parse_configs(
    *classes: type,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    world: bool = False,
    default: Any = None,
    entry: str | None = None,
) -> tuple:
    """One instance per dataclass in ``classes`` from the command line (their field names must not clash).

    With ``world`` the result ends with the ``--world.*`` overrides given, as a dict of `WorldConfig` field
    values (``reward`` as a dict) over the preset named by ``--preset`` (a field of one of ``classes``);
    apply them with `world_config`. ``default``: an instance of the single class whose values the flags not
    given keep (a named profile, `parse_args`), instead of the class's own defaults. ``entry``: the module the
    usage line names (``python -m ENTRY``), when it is not the first class's.
    """
    argv = [_tyro_spelling(a) for a in (sys.argv[1:] if argv is None else argv)]
    base = None
    if world:
        default = next(f.default for c in classes for f in dataclasses.fields(c) if f.name == "preset")
        base = preset(given_value(argv, "--preset") or default)
    target = classes[0] if len(classes) == 1 and base is None else _bundle(classes, base)
    with _one_line_errors():
        parsed = tyro.cli(
            target, prog=_prog(classes[0], entry), args=argv, description=description, default=default
        )
    if target is classes[0]:
        return (parsed,)
    out = tuple(getattr(parsed, f"config{i}") for i in range(len(classes)))
    return out + (_diff(parsed.world, base),) if base is not None else out


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    profiles: dict[str, dict] | None = None,
    entry: str | None = None,
) -> T:
    """``cls`` (a dataclass) from the command line: one flag per field.

    ``profiles``: named sets of defaults (``{name: {field: value}}``) selected by the field ``profile``: the
    ``--profile NAME`` given (read first, as ``--preset``) makes ``cls(profile=NAME, **profiles[NAME])`` the
    instance whose values the flags not given keep, so ``--help`` shows the profile's values too. ``entry``: the
    module of the command line (``parse_configs``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    if profiles is not None:
        name = given_value(argv, "--profile") or next(
            f.default for f in dataclasses.fields(cls) if f.name == "profile"
        )
        if name not in profiles:
            raise UsageError(f"--profile: unknown profile {name!r}: expected one of {sorted(profiles)}")
        default = _defaults_instance(cls, {**profiles[name], "profile": name})
    return parse_configs(cls, argv=argv, description=description, default=default, entry=entry)[0]


def _defaults_instance(cls: type[T], values: dict) -> T:
    """An instance of dataclass ``cls`` holding ``values`` over its defaults, not yet validated: tyro reads the
    defaults of the flags from it, and validation runs on the instance the command line builds (so a profile's
    ``device="cuda"`` overridden by ``--device cpu`` is never checked on a machine without CUDA)."""
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(obj, f.name, value)
    return obj


def parse_args_with_world(
    cls: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    entry: str | None = None,
) -> tuple[T, dict]:
    """Like `parse_args`, plus the ``--world.*`` overrides given (apply them with `world_config`)."""
    args, overrides = parse_configs(cls, argv=argv, description=description, world=True, entry=entry)
    return args, overrides


def world_config(preset_name: str, overrides: dict) -> WorldConfig:
    """A preset with ``--world.*`` overrides applied (nested ``reward`` overrides merge into the preset's)."""
    cfg = preset(preset_name)
    overrides = dict(overrides)
    if "reward" in overrides:
        overrides["reward"] = dataclasses.replace(cfg.reward, **overrides["reward"])
    return cfg.replace(**overrides) if overrides else cfg


# ----------------------------------------------------------------------------- validation


def check_finite_fields(config: Any) -> None:
    """Raise ``ValueError`` naming the field if a float field (or a float in a tuple field) is NaN or inf.

    Range checks written as ``value < lo`` let NaN through (every comparison with NaN is False), so each
    config calls this once instead of guarding every float by hand. Nested dataclasses check themselves.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name}={value!r} is invalid: expected a finite number")


def check_device(device: str, name: str = "device") -> None:
    """Raise ``ValueError`` if ``device`` is not a torch device this machine has (empty = none asked for)."""
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"{name}={device!r} is invalid: expected a torch device such as cpu, cuda or cuda:1"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
            raise ValueError(
                f"{name}={device!r} is unavailable: CUDA is not available here ({build}); use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={device!r} is unavailable: {torch.cuda.device_count()} CUDA device(s) here"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r} is unavailable: MPS is not available here; use cpu")


def check_env(env_id: str, name: str = "env") -> None:
    """Raise ``ValueError`` unless ``env_id`` is a registered Gymnasium id (after ``import envs``)."""
    import gymnasium

    import envs  # noqa: F401  (registers ads-v0)

    try:
        gymnasium.spec(env_id)
    except gymnasium.error.Error as e:
        ours = sorted(k for k, s in gymnasium.registry.items() if str(s.entry_point).startswith("envs."))
        raise ValueError(f"{name}={env_id!r} is not a registered environment: expected one of {ours}") from e


def check_out(out: str, name: str = "out") -> None:
    """Raise ``ValueError`` unless the nearest existing folder above ``out`` is a folder this user may write.

    Run folders and output files are made at the end of a stage, so without this a typo'd ``--out``
    would fail only after the work is done.
    """
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}={out!r} is invalid: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{name}={out!r} is invalid: the folder {str(parent)!r} is not writable")
            return


def check_args(args: Any) -> None:
    """The checks every entry point's ``Args`` shares: finite floats, and ``device``, ``env``, ``preset``,
    ``out`` when set (each would otherwise fail only when first used, possibly after a long stage)."""
    check_finite_fields(args)
    if getattr(args, "preset", ""):
        preset(args.preset)  # ValueError naming the known presets
    if getattr(args, "device", ""):
        check_device(args.device)
    if getattr(args, "env", ""):
        check_env(args.env)
    if getattr(args, "out", ""):
        check_out(args.out)


# ----------------------------------------------------------------------------- reporting


_LEADING_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(=| is )")


def _given_flag(path: str, argv: Sequence[str]) -> str | None:
    """The flag in ``argv`` that sets field ``path`` (``value_coef`` -> ``--loss.value-coef`` if given)."""
    want = path.replace("_", "-").split(".")
    for token in reversed(argv):
        if token.startswith("--"):
            parts = [p.removeprefix("no-") for p in token[2:].split("=")[0].replace("_", "-").split(".")]
            if parts[-len(want) :] == want:
                return "--" + ".".join(parts)
    return None


def flag_message(message: str, argv: Sequence[str]) -> str:
    """``message`` with a leading field name spelled as its flag (``num_envs=0 ...`` -> ``--num-envs=0 ...``).

    The flag is the one given in ``argv`` that ends with the field's (dotted) name, so a nested field names
    its prefix (``--loss.value-coef``, ``--world.num-ads``); a ``name=`` message whose field was not given
    (a cross-field check) gets ``--name``.
    """
    m = _LEADING_FIELD.match(message)
    if m is None:
        return message
    flag = _given_flag(m.group(1), argv)
    if flag is None:
        if m.group(2) != "=":
            return message
        flag = "--" + m.group(1).replace("_", "-")
    return flag + message[len(m.group(1)) :]


def user_message(err: BaseException, argv: Sequence[str]) -> str:
    """One line for a user error: the flag spelled as on the command line, or the file and the OS reason."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(flag_message(text, argv).split())


@contextlib.contextmanager
def _argparse_raises() -> Iterator[None]:
    """argparse parsers (plots, benchmarks) raise `UsageError` instead of printing usage and exiting."""

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise UsageError(message)

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` as a program: user errors as one line on stderr and exit 2, Ctrl-C exit 130.

    ``--debug`` anywhere in ``argv`` (default ``sys.argv[1:]``) is removed and makes every error show its
    traceback. ``SystemExit("message")`` raised by a CLI counts as a user error too; other exceptions are
    bugs and keep their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        with _argparse_raises():
            main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {user_message(e, argv)}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        print(f"error: {' '.join(e.code.split())}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
