"""Reading nested YAML/JSON mappings with errors that name the file, the key path and the problem."""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from sim.errors import InputError, parse_words

REQUIRED = object()

# No input servesim reads comes near this (a device's bytes are ~1e11, its FLOP/s ~1e15), and
# anything past it overflows once multiplied: a flood step of 1e308 tokens stopped the engine
# overhead's fit on "SVD did not converge".
LARGEST = 1e18

# YAML aliases let a few lines name a structure of 10^8 values (nine lists of ten, each the one
# before repeated: "a billion laughs"); a plan expanding one filled 2 GB in a minute.
MAX_VALUES = 1_000_000

# A value in a message: the start of a long list or string, never the whole (which may be huge).
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 6, 6, 60, 60
show = _SHOW.repr


class _Loader(yaml.SafeLoader):
    """YAML 1.1, which PyYAML reads, takes `1e9` and `2.5e-3` for strings (it wants `1.0e+9`);
    this loader reads them as numbers, as YAML 1.2 and every other config reader do."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """One YAML document (raises yaml.YAMLError, also for one nested past Python's recursion limit,
    holding a value YAML cannot construct, such as the date 2023-13-45, or holding more than
    MAX_VALUES values once its aliases are expanded)."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as e:  # a scalar that looks like a date, a number or a tag's type but is none
        raise yaml.YAMLError(f"a value it cannot read: {parse_words(e)}") from None
    stack, seen = [data], 0
    while stack:  # counts an aliased node at every place it appears, as reading the values will
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise yaml.YAMLError(f"holds more than {MAX_VALUES:,} values (YAML aliases expanded)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return data


def read_yaml(path: Path, what: str) -> Any:
    """The YAML file at `path`; an unreadable or invalid one is an InputError naming the file
    (and the line), `what` saying what the file was read as."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise InputError(f"{path}: {where}invalid YAML: {getattr(e, 'problem', e)}") from None


class Fields:
    """One mapping of an input file. Every key must be read; `done()` rejects the rest."""

    def __init__(self, data: Any, file: str, path: str = ""):
        self.file, self.path = file, path
        if data is None:
            self.fail("is empty: expected a mapping of keys")
        if not isinstance(data, dict):
            self.fail(f"expected a mapping, got {type(data).__name__}")
        self.data = data
        self.read: set[str] = set()
        self.strings: dict[str, str] = {}  # string values as read (a YAML 1.1 `off` as "off")

    def where(self, key: Any = None) -> str:
        parts = [self.path] * bool(self.path) + [str(key)] * (key is not None)  # a YAML key may be a number
        return ".".join(parts) or "(top level)"

    def fail(self, problem: str, key: str | None = None) -> None:
        raise InputError(f"{self.file}: {self.where(key)}: {problem}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        self.read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is REQUIRED:
                self.fail("is required", key)
            return default
        return self.data[key]

    def section(self, key: str, required: bool = False) -> Fields | None:
        value = self.raw(key, REQUIRED if required else None)
        return None if value is None else Fields(value, self.file, self.where(key))

    def str(self, key: str, default: Any = REQUIRED, choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(key, default)
        if value is None:
            return value
        if value is False and choices and "off" in choices:
            value = "off"  # YAML 1.1 reads a bare `off` as false
        if not isinstance(value, str):
            self.fail(f"expected a string, got {show(value)}", key)
        if choices and value not in choices:
            self.fail(f"{show(value)} is not one of: {', '.join(choices)}", key)
        self.strings[key] = value
        return value

    def name(self, key: str, default: Any = REQUIRED) -> str:
        """A string that names a results folder (results/<name>): one path component."""
        value = self.str(key, default)
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            self.fail(f"{show(value)} is not a plain name: it names a results folder, so no '/' or '..'", key)
        return value

    def bool(self, key: str, default: Any = REQUIRED) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(f"expected true or false, got {show(value)}", key)
        return value

    def num(self, key: str, default: Any = REQUIRED, *, low: float | None = None,
            high: float | None = None, positive: bool = False, integer: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None:
            return value
        return self._check_num(value, key, low, high, positive, integer)

    def nums(self, key: str, default: Any = REQUIRED, *, positive: bool = False, low: float | None = None,
             integer: bool = False, ascending: bool = False, min_len: int = 1) -> list[float]:
        """A list of numbers, each checked as `num` checks one; `ascending`: strictly (an axis)."""
        value = self.raw(key, default)
        if not isinstance(value, list) or len(value) < min_len:
            self.fail(f"expected a list of at least {min_len} numbers, got {show(value)}", key)
        values = [self._check_num(v, f"{key}[{i}]", low, None, positive, integer) for i, v in enumerate(value)]
        if ascending and sorted(set(values)) != values:
            self.fail("must be strictly ascending", key)
        return values

    def _check_num(self, value, key, low, high, positive, integer):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"expected a number, got {show(value)}", key)
        if isinstance(value, float) and not math.isfinite(value):  # an int may be past any float
            self.fail(f"must be finite, got {value!r}", key)
        if abs(value) > LARGEST:
            self.fail(f"must be at most {LARGEST:g} in size, got {show(value)}", key)
        if integer:
            if value != int(value):
                self.fail(f"expected a whole number, got {value!r}", key)
            value = int(value)
        if positive and value <= 0:
            self.fail(f"must be > 0, got {value!r}", key)
        if low is not None and value < low:
            self.fail(f"must be >= {low}, got {value!r}", key)
        if high is not None and value > high:
            self.fail(f"must be <= {high}, got {value!r}", key)
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read, key=str)  # YAML keys may be numbers or null too
        if unknown:
            allowed = ", ".join(sorted(self.read))
            # Which keys a section takes can hang on its policy or kind: name it, since changing it
            # alone (`--set autoscaler.policy=off`) leaves the old one's keys behind.
            selector = next((f" with {k} {self.strings[k]!r}" for k in ("policy", "kind") if k in self.strings), "")
            self.fail(f"unknown key {show(unknown[0])}{selector} (allowed here: {allowed})")
