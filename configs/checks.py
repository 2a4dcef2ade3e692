"""Type and range checks of a Sacred configuration, before any work (issue: "inputs of the wrong kind").

Sacred turns ``trainer.max_epochs=abc`` into the text "abc" with only a warning; the code that
finally receives it fails far away with a message that names neither the key nor the fix. The
experiments call ``check_config_values`` from a config hook, so every wrong key is listed at once
before a model is built or a file is read.

A rule is ``(type hint, None or (test, text))`` (the test applies to numbers of that type) or a
function that raises ``ValueError`` with its own message. A key without a rule must keep the type
of its default when that default is a bool, an int or a float (an int is a valid float).
"""

from __future__ import annotations

import collections.abc
import numbers
import types
import typing
from typing import Literal, Union


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"trainer": {"max_epochs": 130}}`` -> ``{"trainer.max_epochs": 130}`` (empty dicts stay values)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def default_config(experiment) -> dict:
    """Every ingredient's and the experiment's defaults, flattened: ``{"trainer.max_epochs": 130, ...}``."""
    defaults = {}
    for ingredient in experiment.ingredients:
        for scope in ingredient.configurations:
            defaults.update(flatten(scope(), ingredient.path + "."))
    for scope in experiment.configurations:
        defaults.update(flatten(scope()))
    return defaults


def matches(value, hint) -> bool:
    """Whether ``value`` is of the type ``hint`` (unions, Literal, lists; bool is not an int here)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin is not None:
        return isinstance(value, origin)  # dict[str, int], Iterable[Logger]: the container only
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # bool is an int to Python, not to a config; an int is a valid float
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe(hint) -> str:
    """``int | None`` -> "an integer or None", for the error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return " or ".join(map(repr, args))
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0] if args else None, "values")
    names = {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint) or getattr(origin or hint, "__name__", str(hint))


def _rule(key: str, default, rules: dict):
    if key in rules:
        return rules[key]
    for kind in (bool, int, float):  # bool first: it is an int too
        if isinstance(default, kind):
            return kind, None
    return None, None


def check_config_values(config: dict, defaults: dict, rules: dict) -> None:
    """Raise one ``ValueError`` listing every key of ``config`` whose value breaks its rule."""
    problems = []
    for key, value in flatten(config).items():
        rule = _rule(key, defaults.get(key), rules)
        if callable(rule):
            try:
                rule(value)
            except ValueError as e:
                problems.append(str(e))
            continue
        hint, condition = rule
        if hint is None:
            continue
        if matches(value, hint) and (condition is None or not isinstance(value, numbers.Real) or condition[0](value)):
            continue
        expected = describe(hint) + (f", {condition[1]}" if condition else "")
        example = f" (e.g. {key}={defaults[key]!r})" if defaults.get(key) is not None else ""
        problems.append(f"{key} must be {expected}, got {value!r}{example}")
    if problems:
        raise ValueError("invalid configuration; fix these keys (command line or named config):\n  " + "\n  ".join(problems))
