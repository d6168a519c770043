"""YAML recipes: loading, ``--opts KEY VALUE`` overrides, and validation against a schema before any work starts.

A schema maps dotted keys to ``(types, check)``: ``types`` is a type or tuple of types the value must have (an int is
accepted where a float is expected; a bool never counts as a number), ``check`` is None or a predicate the value must
satisfy, optionally with a description: ``(float, (lambda v: v > 0, "> 0"))``. A key whose type is ``dict`` is a leaf:
its contents are not checked.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

Check = Callable[[Any], bool] | tuple[Callable[[Any], bool], str] | None
Schema = dict[str, tuple[type | tuple[type, ...], Check]]


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4`` and ``1E6`` as floats (YAML 1.1 wants ``5.0e-4``)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_text(path: Path, what: str = "config file") -> str:
    """The content of ``path`` as UTF-8 text; UserError naming the file, and the line and column of the first byte
    that is not UTF-8 (e.g. a file saved as Latin-1), when it is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, column {column}) "
            f"— save it as UTF-8"
        ) from None


def load_yaml(path: str | Path, loader: type = RecipeLoader, missing_hint: str = "", what: str = "config file") -> dict:
    """Read a YAML mapping with ``loader``; UserError naming the file (``what`` says what it is) when missing, not
    UTF-8, not valid YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}{missing_hint}")
    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def merge_configs(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged over it, neither modified: mappings of the exact type ``dict`` merge key by key,
    recursively; any other value of ``overlay`` (a scalar, a list, a tagged node) replaces the one in ``base``.

    Each input is deep-copied once, so nodes shared inside ``base`` (YAML anchors and aliases) stay shared.
    """
    merged = copy.deepcopy(base)
    _merge_into(merged, copy.deepcopy(overlay))
    return merged


def _merge_into(target: dict, overlay: dict) -> None:
    for key, value in overlay.items():
        if type(value) is dict and type(target.get(key)) is dict:
            _merge_into(target[key], value)
        else:
            target[key] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError:
        return text


class OverridesAction(argparse.Action):
    """``--opts KEY VALUE [KEY VALUE ...]`` that may be given several times: every group counts, in the order given
    (a key named twice takes its last value). A group with an odd number of items is a UserError naming it."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if len(values) % 2:
            raise UserError(f"{option} takes KEY VALUE pairs; got an odd number of items: {' '.join(values)}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The entry points' ``--opts`` (:class:`OverridesAction`); ``example``: KEY VALUE pairs for the help."""
    parser.add_argument(
        "--opts",
        nargs="+",
        action=OverridesAction,
        default=[],
        metavar="KEY VALUE",
        help=f"config overrides, e.g. --opts {example}; may be given several times: every pair counts, in order, "
        "and a key given twice takes its last value",
    )


def apply_overrides(cfg: dict, opts: Sequence[str], check_file: Callable[[dict], None] | None = None) -> dict:
    """Return a copy of ``cfg`` with ``opts = [key, value, key, value, ...]`` applied; keys are dotted paths that must
    already exist in ``cfg``; values are parsed as YAML (``1e-3`` -> float, ``[1,2]`` -> list, ``true`` -> bool).

    A key missing from ``cfg`` is a UserError with the closest key as a hint; ``check_file(cfg)`` runs first, so a typo
    in the file itself (a hint would then point at the misspelt key) is named in the file's own terms."""
    try:
        return _apply_overrides(cfg, opts)
    except UserError:
        if check_file is not None:
            check_file(cfg)
        raise


def _apply_overrides(cfg: dict, opts: Sequence[str]) -> dict:
    if len(opts) % 2:
        raise UserError(f"--opts takes KEY VALUE pairs; got an odd number of items: {' '.join(opts)}")
    result = copy.deepcopy(cfg)
    for key, raw in zip(opts[::2], opts[1::2]):
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                hint = difflib.get_close_matches(part, known, n=1)
                suggestion = f" (did you mean {'.'.join(parts[:depth] + hint)}?)" if hint else ""
                raise UserError(f"--opts key {key!r} is not in the config{suggestion}")
            if depth == len(parts) - 1:
                node[part] = _parse_scalar(raw)
            else:
                node = node[part]
    return result


def _flatten(cfg: dict, schema: Schema, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in schema:
            flat.update(_flatten(value, schema, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def check_finite(node: Any, source: str, key: str = "") -> None:
    """Raise UserError naming the first number in ``node`` (mappings and lists, walked recursively) that is infinite
    or NaN: ``1e400`` or ``.inf`` in YAML read as infinity, which no setting means."""
    if isinstance(node, dict):
        for name, value in node.items():
            check_finite(value, source, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_finite(value, source, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        why = "not a number" if math.isnan(node) else "not a finite number (a value beyond ±1.8e308 reads as infinity)"
        raise UserError(f"{source}: {key} = {node} is {why} — give a finite value")


def validate(cfg: dict, schema: Schema, source: str = "config") -> None:
    """Raise UserError naming the first infinite or NaN number (:func:`check_finite`), unknown key, wrongly typed
    value or out-of-range value in ``cfg``."""
    check_finite(cfg, source)
    for key, value in _flatten(cfg, schema).items():
        if key not in schema:
            hint = difflib.get_close_matches(key, list(schema), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(f"{source}: unknown key {key!r}{suggestion}")
        types, check = schema[key]
        if not _type_ok(value, types):
            raise UserError(f"{source}: {key} must be {_type_name(types)}, got {value!r} ({type(value).__name__})")
        if check is None or value is None:
            continue
        predicate, description = check if isinstance(check, tuple) else (check, "a valid value")
        if not predicate(value):
            raise UserError(f"{source}: {key} = {value!r} is out of range (must be {description})")


def config_facts(config: Any, prefix: str = "") -> dict[str, str]:
    """``config`` flattened to ``{"a.b.c": repr(value)}`` (lists are values), for comparing what ranks see
    (:func:`projector_kd.engine.distributed.check_ranks_agree`)."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): repr(config)}
    facts: dict[str, str] = {}
    for key, value in config.items():
        facts.update(config_facts(value, f"{prefix}{key}."))
    return facts
